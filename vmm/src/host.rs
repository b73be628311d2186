//! Can this host boot an unmodified guest kernel? Answered before anything else, so a user on a
//! host that cannot gets one clear line instead of a VM that hangs or crawls.

use std::path::Path;

/// Why guests cannot boot here.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and do you have access to /dev/kvm?)")]
    NoKvm(std::io::Error),
    #[error(
        "this host's KVM cannot run an unmodified guest kernel at usable speed (PVM without a \
         PVM guest kernel): no vmx/svm CPU flag and kvm_pvm is loaded; run on a host with \
         hardware virtualization (or inside `cargo xtask testbed`), or set `force` (`--force`) \
         for a PVM guest kernel"
    )]
    PvmOnly,
    #[error("KVM lacks a capability this VMM needs: {0}")]
    MissingCapability(&'static str),
}

/// The facts the decision is made from, separated so it can be tested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    pub hardware_virt: bool,
    pub pvm_loaded: bool,
}

impl HostFacts {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self {
            hardware_virt: cpuinfo_has_hw_virt(&cpuinfo),
            pvm_loaded: Path::new("/sys/module/kvm_pvm").exists(),
        }
    }

    pub fn check(self) -> Result<(), HostError> {
        if !self.hardware_virt && self.pvm_loaded {
            return Err(HostError::PvmOnly);
        }
        Ok(())
    }
}

/// Whether any `flags` line of /proc/cpuinfo lists `vmx` or `svm`.
pub fn cpuinfo_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Checks that guests can boot here: /dev/kvm opens, the CPU virtualizes in hardware (or at
/// least KVM is not PVM-only), and KVM has the capabilities the VMM uses.
pub fn check_can_boot_guests() -> Result<(), HostError> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| HostError::NoKvm(e.into()))?;
    HostFacts::probe().check()?;
    check_capabilities(&kvm)
}

/// The KVM capabilities the VMM relies on.
pub fn check_capabilities(kvm: &kvm_ioctls::Kvm) -> Result<(), HostError> {
    use kvm_ioctls::Cap;
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(HostError::MissingCapability(name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_flags() {
        assert!(cpuinfo_has_hw_virt(
            "processor: 0\nflags\t\t: fpu vme svm sse\n"
        ));
        assert!(cpuinfo_has_hw_virt("flags : vmx\n"));
        assert!(!cpuinfo_has_hw_virt("flags : fpu svmx vmxe\n"));
        assert!(!cpuinfo_has_hw_virt("model name : svm vmx\nflags : fpu\n"));
    }

    #[test]
    fn pvm_without_hw_virt_is_refused_with_one_clear_line() {
        let err = HostFacts {
            hardware_virt: false,
            pvm_loaded: true,
        }
        .check()
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("PVM without a PVM guest kernel"), "{msg}");
        assert!(!msg.contains('\n'));
        assert!(HostFacts {
            hardware_virt: true,
            pvm_loaded: true
        }
        .check()
        .is_ok());
        assert!(HostFacts {
            hardware_virt: false,
            pvm_loaded: false
        }
        .check()
        .is_ok());
    }

    #[test]
    fn this_host_is_classified() {
        // Whatever this machine is, probing must not fail and must agree with /proc/cpuinfo.
        let facts = HostFacts::probe();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        assert_eq!(facts.hardware_virt, cpuinfo_has_hw_virt(&cpuinfo));
    }
}
