//! A small vocabulary for writing the lists: a [`SyscallList`] of calls allowed always or only
//! with some argument values, built from plain functions and merged per thread role.

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule,
};

/// The allowed system calls of one thread role: each either always allowed (`None`) or allowed
/// when one of its rules matches (a rule is a conjunction of argument conditions).
#[derive(Debug, Default)]
pub struct SyscallList(BTreeMap<i64, Option<Vec<SeccompRule>>>);

impl SyscallList {
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows each of `syscalls` whatever its arguments.
    pub fn allow(mut self, syscalls: &[libc::c_long]) -> Self {
        for &nr in syscalls {
            self.0.insert(nr, None);
        }
        self
    }

    /// Allows `syscall` when any of `rules` matches. A call already allowed always stays so.
    pub fn allow_when(mut self, syscall: libc::c_long, rules: Vec<SeccompRule>) -> Self {
        match self.0.entry(syscall) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(Some(rules));
            }
            std::collections::btree_map::Entry::Occupied(mut e) => {
                if let Some(existing) = e.get_mut() {
                    existing.extend(rules);
                }
            }
        }
        self
    }

    /// Everything `other` allows, too.
    pub fn merge(mut self, other: SyscallList) -> Self {
        for (nr, rules) in other.0 {
            self = match rules {
                None => self.allow(&[nr]),
                Some(rules) => self.allow_when(nr, rules),
            };
        }
        self
    }

    /// Whether `syscall` is in the list at all (with or without conditions).
    pub fn contains(&self, syscall: libc::c_long) -> bool {
        self.0.contains_key(&syscall)
    }

    /// Whether `syscall` is allowed whatever its arguments.
    pub fn allows_unconditionally(&self, syscall: libc::c_long) -> bool {
        matches!(self.0.get(&syscall), Some(None))
    }

    /// The BPF program for this machine's architecture: listed calls allowed, anything else
    /// gets `mismatch`.
    pub fn compile(self, mismatch: SeccompAction) -> Result<BpfProgram, BackendError> {
        let rules = self
            .0
            .into_iter()
            .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
            .collect();
        let arch = std::env::consts::ARCH.try_into()?;
        SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)?.try_into()
    }
}

/// A rule: every condition must hold.
pub fn all(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(conditions)
}

/// Argument `arg` (as the kernel's 32-bit `int`/`unsigned int`) equals `value`.
pub fn arg_eq(arg: u8, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

/// The bits `mask` of argument `arg` (32 bits) equal `value`.
pub fn arg_masked(arg: u8, mask: u64, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
}

/// One rule per value: argument `arg` is one of `values`.
pub fn arg_in(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, BackendError> {
    values.iter().map(|&v| all(vec![arg_eq(arg, v)?])).collect()
}

/// `ioctl(fd, request, ...)` with `request` one of `requests`. The kernel takes the request
/// as an `unsigned int`, so the upper half of the register is not compared.
pub fn ioctls(requests: &[u64]) -> Result<Vec<SeccompRule>, BackendError> {
    arg_in(1, requests)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unconditional_allow_wins_over_conditions_in_either_order() {
        let cond = || arg_in(0, &[1]).unwrap();
        let a = SyscallList::new()
            .allow_when(libc::SYS_ioctl, cond())
            .merge(SyscallList::new().allow(&[libc::SYS_ioctl]));
        assert!(a.allows_unconditionally(libc::SYS_ioctl));
        let b = SyscallList::new()
            .allow(&[libc::SYS_ioctl])
            .merge(SyscallList::new().allow_when(libc::SYS_ioctl, cond()));
        assert!(b.allows_unconditionally(libc::SYS_ioctl));
        let c = SyscallList::new()
            .allow_when(libc::SYS_ioctl, cond())
            .merge(SyscallList::new().allow_when(libc::SYS_ioctl, cond()));
        assert!(c.contains(libc::SYS_ioctl) && !c.allows_unconditionally(libc::SYS_ioctl));
        assert_eq!(c.0[&libc::SYS_ioctl].as_ref().unwrap().len(), 2);
    }
}
