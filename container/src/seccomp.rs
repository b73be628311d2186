//! Seccomp: the OCI profile (`linux.seccomp`) compiled to classic BPF with `seccompiler`
//! (pure Rust, Firecracker's), in the parent at `create` time, so a bad profile is an error of
//! `create` and the child only installs ready programs.
//!
//! A seccompiler filter has one action for matches and one for the rest, while an OCI profile
//! has an action per rule. The profile becomes a stack of filters: one per distinct rule
//! action (that action on a match, ALLOW otherwise) plus one for the default action (ALLOW for
//! every syscall some rule names, the default action otherwise). The kernel runs every filter
//! and applies the highest-precedence result (KILL > TRAP > ERRNO > TRACE > LOG > ALLOW), which
//! gives each syscall its rule's action, or the default action when no rule matches.

use std::collections::BTreeMap;
use std::str::FromStr;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::child::{ChildError, StepResult};
use crate::Error;

/// The errno of an ERRNO action without `errnoRet` (runc's choice).
const DEFAULT_ERRNO: u32 = libc::EPERM as u32;

/// Compiled filters, installed in order.
#[derive(Debug, Clone)]
pub(crate) struct SeccompProgram {
    filters: Vec<BpfProgram>,
    flags: libc::c_ulong,
    /// Syscall names of the profile that this architecture does not have (skipped).
    pub unknown_syscalls: Vec<String>,
}

/// An OCI action as a seccompiler action.
pub(crate) fn action(
    a: LinuxSeccompAction,
    errno_ret: Option<u32>,
) -> Result<SeccompAction, Error> {
    Ok(match a {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActErrno => {
            SeccompAction::Errno(errno_ret.unwrap_or(DEFAULT_ERRNO))
        }
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno_ret.unwrap_or(0)),
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(Error::Unsupported(
                "seccomp action SCMP_ACT_NOTIFY (no seccomp agent)".into(),
            ))
        }
    })
}

/// An OCI argument comparison as a seccompiler condition (64-bit compare, as libseccomp).
fn condition(
    index: usize,
    op: LinuxSeccompOperator,
    value: u64,
    value_two: Option<u64>,
) -> Result<SeccompCondition, Error> {
    let op = match op {
        LinuxSeccompOperator::ScmpCmpNe => SeccompCmpOp::Ne,
        LinuxSeccompOperator::ScmpCmpLt => SeccompCmpOp::Lt,
        LinuxSeccompOperator::ScmpCmpLe => SeccompCmpOp::Le,
        LinuxSeccompOperator::ScmpCmpEq => SeccompCmpOp::Eq,
        LinuxSeccompOperator::ScmpCmpGe => SeccompCmpOp::Ge,
        LinuxSeccompOperator::ScmpCmpGt => SeccompCmpOp::Gt,
        // OCI/libseccomp: value is the mask, valueTwo the datum.
        LinuxSeccompOperator::ScmpCmpMaskedEq => SeccompCmpOp::MaskedEq(value),
    };
    let datum = match op {
        SeccompCmpOp::MaskedEq(_) => value_two.unwrap_or(0),
        _ => value,
    };
    let index = u8::try_from(index)
        .ok()
        .filter(|i| *i < 6)
        .ok_or_else(|| Error::Seccomp(format!("argument index {index} (syscalls have 6)")))?;
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, datum)
        .map_err(|e| Error::Seccomp(e.to_string()))
}

/// Rules of one filter: syscall number to conditions (an empty list matches every call).
type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Adds a rule; an unconditional one makes the syscall match whatever its arguments.
fn add_rule(rules: &mut Rules, nr: i64, rule: Option<SeccompRule>, unconditional: &mut Vec<i64>) {
    if unconditional.contains(&nr) {
        return;
    }
    match rule {
        None => {
            unconditional.push(nr);
            rules.insert(nr, Vec::new());
        }
        Some(r) => rules.entry(nr).or_default().push(r),
    }
}

/// Compiles the profile for x86_64.
pub(crate) fn compile(s: &LinuxSeccomp) -> Result<SeccompProgram, Error> {
    if s.listener_path().is_some() {
        return Err(Error::Unsupported(
            "seccomp listenerPath (no seccomp agent)".into(),
        ));
    }
    if let Some(archs) = s.architectures() {
        let native = [Arch::ScmpArchX86_64, Arch::ScmpArchNative];
        if !archs.is_empty() && !archs.iter().any(|a| native.contains(a)) {
            return Err(Error::Seccomp(format!(
                "architectures {archs:?} do not include x86_64, the only one this runtime filters"
            )));
        }
    }
    let mut flags: libc::c_ulong = 0;
    for f in s.flags().iter().flatten() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => 0, // single-threaded at install
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                return Err(Error::Unsupported(
                    "seccomp flag SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (no seccomp agent)".into(),
                ))
            }
        };
    }
    let default = action(s.default_action(), s.default_errno_ret())?;

    // Per action: its rules. Plus everything some rule names, for the default filter.
    let mut by_action: Vec<(SeccompAction, Rules, Vec<i64>)> = Vec::new();
    let mut named: Rules = BTreeMap::new();
    let mut named_unconditional = Vec::new();
    let mut unknown_syscalls = Vec::new();
    for (i, sc) in s.syscalls().iter().flatten().enumerate() {
        let act = action(sc.action(), sc.errno_ret())
            .map_err(|e| Error::Seccomp(format!("syscalls[{i}]: {e}")))?;
        if act == default {
            continue; // what the default does anyway
        }
        let conditions = sc
            .args()
            .iter()
            .flatten()
            .map(|a| condition(a.index(), a.op(), a.value(), a.value_two()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Seccomp(format!("syscalls[{i}]: {e}")))?;
        let rule = if conditions.is_empty() {
            None
        } else {
            Some(SeccompRule::new(conditions).map_err(|e| Error::Seccomp(e.to_string()))?)
        };
        let slot = match by_action.iter().position(|(a, _, _)| *a == act) {
            Some(p) => p,
            None => {
                by_action.push((act.clone(), BTreeMap::new(), Vec::new()));
                by_action.len() - 1
            }
        };
        for name in sc.names() {
            let Ok(sysno) = syscalls::x86_64::Sysno::from_str(name) else {
                unknown_syscalls.push(name.clone());
                continue;
            };
            let nr = i64::from(sysno.id());
            let (_, rules, unconditional) = &mut by_action[slot];
            add_rule(rules, nr, rule.clone(), unconditional);
            add_rule(&mut named, nr, rule.clone(), &mut named_unconditional);
        }
    }

    let mut filters = Vec::new();
    let mut build = |rules: Rules, mismatch: SeccompAction, matched: SeccompAction| {
        let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
            .map_err(|e| Error::Seccomp(e.to_string()))?;
        let program: BpfProgram = filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| Error::Seccomp(e.to_string()))?;
        filters.push(program);
        Ok::<(), Error>(())
    };
    if default != SeccompAction::Allow {
        build(named, default.clone(), SeccompAction::Allow)?;
    }
    for (act, rules, _) in by_action {
        if act != SeccompAction::Allow {
            build(rules, SeccompAction::Allow, act)?;
        }
    }
    if !unknown_syscalls.is_empty() {
        tracing::debug!(
            ?unknown_syscalls,
            "seccomp: syscalls unknown on x86_64 skipped"
        );
    }
    Ok(SeccompProgram {
        filters,
        flags,
        unknown_syscalls,
    })
}

impl SeccompProgram {
    /// How many BPF filters the profile became.
    #[cfg(test)]
    pub fn filter_count(&self) -> usize {
        self.filters.len()
    }

    /// Child: installs the filters. Needs no_new_privs or CAP_SYS_ADMIN; does not set
    /// no_new_privs itself (seccompiler's `apply_filter` would), so the spec's choice holds.
    pub fn install(&self) -> StepResult {
        for program in &self.filters {
            let prog = libc::sock_fprog {
                len: program.len() as u16,
                filter: program.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: `prog` points at `program`'s instructions, which outlive the call;
            // seccompiler's `sock_filter` is `#[repr(C)]` with the same fields as the kernel's
            // (and libc's) `struct sock_filter`. The kernel copies the program.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    self.flags,
                    &prog as *const libc::sock_fprog,
                )
            };
            if rc != 0 {
                return Err(ChildError::io(
                    "seccomp",
                    "installing the filter",
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn allow_by_default_with_errno_and_kill_rules() {
        let p = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86"],
                "syscalls":[
                  {"names":["mkdir","mkdirat","no_such_call"],"action":"SCMP_ACT_ERRNO","errnoRet":1},
                  {"names":["uname"],"action":"SCMP_ACT_KILL_PROCESS"},
                  {"names":["read"],"action":"SCMP_ACT_ALLOW"}]}"#,
        ))
        .unwrap();
        // No default filter (ALLOW), one per non-default action.
        assert_eq!(p.filter_count(), 2);
        assert_eq!(p.unknown_syscalls, vec!["no_such_call"]);
    }

    #[test]
    fn errno_by_default_with_conditional_allow() {
        let p = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                  {"names":["read","write","exit_group"],"action":"SCMP_ACT_ALLOW"},
                  {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":0,"op":"SCMP_CMP_EQ"}]},
                  {"names":["clone"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]}]}"#,
        ))
        .unwrap();
        assert_eq!(p.filter_count(), 1);
    }

    #[test]
    fn unsupported_parts_are_clear_errors() {
        let notify = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount"],"action":"SCMP_ACT_NOTIFY"}]}"#,
        ));
        assert!(notify.unwrap_err().to_string().contains("SCMP_ACT_NOTIFY"));
        let arch = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_AARCH64"]}"#,
        ));
        assert!(arch.unwrap_err().to_string().contains("x86_64"));
        let bad_index = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW","args":[{"index":7,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#,
        ));
        assert!(bad_index
            .unwrap_err()
            .to_string()
            .contains("argument index 7"));
        let listener = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","listenerPath":"/run/x.sock"}"#,
        ));
        assert!(matches!(listener, Err(Error::Unsupported(_))));
    }

    #[test]
    fn actions_map() {
        assert_eq!(
            action(LinuxSeccompAction::ScmpActErrno, None).unwrap(),
            SeccompAction::Errno(1)
        );
        assert_eq!(
            action(LinuxSeccompAction::ScmpActErrno, Some(38)).unwrap(),
            SeccompAction::Errno(38)
        );
        assert_eq!(
            action(LinuxSeccompAction::ScmpActKill, None).unwrap(),
            SeccompAction::KillThread
        );
        assert_eq!(
            action(LinuxSeccompAction::ScmpActLog, None).unwrap(),
            SeccompAction::Log
        );
    }
}
