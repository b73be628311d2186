//! The CPUID each vCPU reports: what the host's KVM supports, plus this vCPU's APIC id, the
//! topology (N single-threaded cores in one package), the hypervisor bit, and what lets the
//! guest kernel skip timer calibration:
//!
//! - the TSC-deadline timer bit (CPUID.1:ECX[24]), which `KVM_GET_SUPPORTED_CPUID` never sets
//!   (it depends on the in-kernel local APIC; KVM reports it as `KVM_CAP_TSC_DEADLINE_TIMER`).
//!   Without it Linux calibrates its local APIC timer against the PIT, waiting HZ/10 jiffies
//!   (100 ms of guest time) in `calibrate_APIC_clock`.
//! - the TSC and local APIC timer frequencies in KVM's timing leaf 0x40000010 (kHz in EAX and
//!   EBX, the layout VMware defined and KVM VMMs follow), from `KVM_GET_TSC_KHZ`. Linux 6.1 on
//!   KVM takes the TSC frequency from kvmclock instead (`kvm_get_tsc_khz`, which also sets
//!   `X86_FEATURE_TSC_KNOWN_FREQ`), but other guests (and newer kernels) read this leaf.

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
/// KVM's signature leaf: EAX is the highest hypervisor leaf.
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
/// The timing leaf: TSC frequency in kHz in EAX, local APIC timer frequency in kHz in EBX.
const LEAF_KVM_TIMING: u32 = 0x4000_0010;
/// KVM's local APIC timer runs at 1 GHz (`APIC_BUS_CYCLE_NS` = 1).
const KVM_APIC_TIMER_KHZ: u32 = 1_000_000;

/// What the host offers beyond `KVM_GET_SUPPORTED_CPUID`, probed once per VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostTimers {
    /// `KVM_CAP_TSC_DEADLINE_TIMER`.
    pub tsc_deadline: bool,
    /// The vCPU's TSC frequency (`KVM_GET_TSC_KHZ`), if KVM knows it.
    pub tsc_khz: Option<u32>,
}

impl HostTimers {
    pub fn probe(kvm: &Kvm, vcpu: &VcpuFd) -> Self {
        if !guest_tsc_advances(vcpu) {
            // Only the local APIC timer's own count (no TSC arithmetic) then wakes the guest.
            tracing::warn!(
                "the host's KVM reads this guest's TSC as a constant (\"user requested TSC rate \
                 below hardware speed\" in the host's kernel log?); the guest gets no \
                 TSC-deadline timer and no TSC frequency"
            );
            return HostTimers::default();
        }
        HostTimers {
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
            tsc_khz: vcpu.get_tsc_khz().ok().filter(|&khz| khz != 0),
        }
    }
}

/// `IA32_TIME_STAMP_COUNTER`.
const MSR_IA32_TSC: u32 = 0x10;

/// Whether KVM's view of the vCPU's TSC moves between two reads (each read is an ioctl: many
/// cycles). A host KVM without TSC scaling that could not give the vCPU the TSC frequency it
/// chose (seen on a nested host whose kvm.ko loaded before the host refined its TSC
/// calibration) reads the guest's TSC as a constant, and arms every TSC-deadline timer as many
/// seconds late as the TSC counts: the guest then sleeps until some device interrupt. A read
/// that fails proves nothing, and counts as moving.
fn guest_tsc_advances(vcpu: &VcpuFd) -> bool {
    tsc_moves(|| {
        let entry = kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        };
        let mut msrs = Msrs::from_entries(&[entry]).ok()?;
        (vcpu.get_msrs(&mut msrs).ok()? == 1).then(|| msrs.as_slice()[0].data)
    })
}

/// [`guest_tsc_advances`]'s verdict on two reads of `read`.
fn tsc_moves(mut read: impl FnMut() -> Option<u64>) -> bool {
    match (read(), read()) {
        (Some(first), Some(second)) => first != second,
        _ => true,
    }
}

/// The CPUID for vCPU `index` of `count`: `supported` adjusted by [`filter`], with the timing
/// leaf added when the TSC frequency is known.
pub fn for_vcpu(supported: &CpuId, index: u8, count: u8, timers: HostTimers) -> CpuId {
    let mut cpuid = supported.clone();
    filter(cpuid.as_mut_slice(), index, count, timers);
    if let Some(khz) = timers.tsc_khz {
        let has_signature = cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == LEAF_KVM_SIGNATURE);
        let has_timing = cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == LEAF_KVM_TIMING);
        // A leaf past the signature leaf's EAX is invisible to the guest: only add it where
        // the signature leaf exists (and was raised to cover it by `filter`).
        if has_signature && !has_timing {
            let timing = kvm_cpuid_entry2 {
                function: LEAF_KVM_TIMING,
                eax: khz,
                ebx: KVM_APIC_TIMER_KHZ,
                ..Default::default()
            };
            // The list is as long as KVM_MAX_CPUID_ENTRIES allows; if it is full, the guest
            // simply has no timing leaf.
            let _ = cpuid.push(timing);
        }
    }
    cpuid
}

/// Adjusts the supported CPUID `entries` for vCPU `index` of `count`.
pub fn filter(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8, timers: HostTimers) {
    // Bits needed to hold any APIC id of the package.
    let id_bits = u32::BITS - (u32::from(count.max(1)) - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff)
                    | (u32::from(index) << 24)
                    | (u32::from(count) << 16)
                    | (8 << 8); // CLFLUSH line size in quadwords
                e.ecx |= ECX_HYPERVISOR;
                if timers.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // Cores per package - 1 in EAX[31:26]; one thread per cache (EAX[25:14] = 0).
                e.eax = (e.eax & 0x3fff) | ((u32::from(count) - 1) << 26);
            }
            LEAF_EXT_TOPOLOGY => {
                e.edx = u32::from(index);
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        // Core level: `count` cores.
                        e.eax = id_bits;
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_AMD_SIZE_IDS => {
                // NC (cores - 1) and ApicIdCoreIdSize, which AMD guests use for topology.
                e.ecx = (e.ecx & !0xf0ff) | (id_bits << 12) | (u32::from(count) - 1);
            }
            LEAF_KVM_SIGNATURE if timers.tsc_khz.is_some() => {
                e.eax = e.eax.max(LEAF_KVM_TIMING);
            }
            LEAF_KVM_TIMING => {
                if let Some(khz) = timers.tsc_khz {
                    e.eax = khz;
                    e.ebx = KVM_APIC_TIMER_KHZ;
                    e.flags &= !KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_tsc_that_stands_still_is_caught() {
        assert!(!tsc_moves(|| Some(7)), "a constant TSC");
        let mut t = 0;
        assert!(tsc_moves(|| {
            t += 1000;
            Some(t)
        }));
        assert!(tsc_moves(|| None), "a failed read proves nothing");
    }

    /// The real check on this host's KVM (where it can make a vCPU): its TSC moves.
    #[test]
    fn this_hosts_guest_tsc_advances() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        assert!(guest_tsc_advances(&vcpu));
        assert_ne!(HostTimers::probe(&kvm, &vcpu), HostTimers::default());
    }

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_id_topology_and_hypervisor_bit() {
        let mut e = [
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x8000_0008, 0),
            entry(4, 0),
        ];
        filter(&mut e, 3, 4, HostTimers::default());
        assert_eq!(e[0].ebx >> 24, 3, "initial APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 4, "logical processors");
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].edx, 3, "x2APIC id");
        assert_eq!(e[1].ebx, 1);
        assert_eq!(e[2].ebx, 4);
        assert_eq!(e[2].eax, 2, "4 cores need 2 APIC id bits");
        assert_eq!(e[3].ecx & 0xff, 3);
        assert_eq!(e[4].eax >> 26, 3);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut e = [entry(1, 0)];
        e[0].edx = EDX_HTT;
        filter(&mut e, 0, 1, HostTimers::default());
        assert_eq!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[0].ebx >> 24, 0);
    }

    #[test]
    fn tsc_deadline_bit_only_where_kvm_has_it() {
        let mut e = [entry(1, 0)];
        filter(&mut e, 0, 1, HostTimers::default());
        assert_eq!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        let timers = HostTimers {
            tsc_deadline: true,
            tsc_khz: None,
        };
        filter(&mut e, 0, 1, timers);
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
    }

    fn supported(entries: &[kvm_cpuid_entry2]) -> CpuId {
        CpuId::from_entries(entries).unwrap()
    }

    fn find(cpuid: &CpuId, function: u32) -> Option<kvm_cpuid_entry2> {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function)
            .copied()
    }

    #[test]
    fn timing_leaf_carries_tsc_and_apic_khz() {
        let mut sig = entry(LEAF_KVM_SIGNATURE, 0);
        sig.eax = 0x4000_0001;
        let base = supported(&[entry(1, 0), sig, entry(0x4000_0001, 0)]);
        let timers = HostTimers {
            tsc_deadline: false,
            tsc_khz: Some(2_345_678),
        };
        let cpuid = for_vcpu(&base, 0, 1, timers);
        let timing = find(&cpuid, LEAF_KVM_TIMING).expect("timing leaf added");
        assert_eq!(timing.eax, 2_345_678);
        assert_eq!(timing.ebx, KVM_APIC_TIMER_KHZ);
        assert_eq!(
            find(&cpuid, LEAF_KVM_SIGNATURE).unwrap().eax,
            LEAF_KVM_TIMING,
            "the signature leaf must announce the timing leaf"
        );
        // Asked again (an existing timing leaf), it is updated, not duplicated.
        let again = for_vcpu(&cpuid, 0, 1, timers);
        let n = again
            .as_slice()
            .iter()
            .filter(|e| e.function == LEAF_KVM_TIMING)
            .count();
        assert_eq!(n, 1);
    }

    #[test]
    fn no_timing_leaf_without_a_frequency_or_a_signature() {
        let mut sig = entry(LEAF_KVM_SIGNATURE, 0);
        sig.eax = 0x4000_0001;
        let base = supported(&[entry(1, 0), sig]);
        let cpuid = for_vcpu(&base, 0, 1, HostTimers::default());
        assert!(find(&cpuid, LEAF_KVM_TIMING).is_none());
        assert_eq!(find(&cpuid, LEAF_KVM_SIGNATURE).unwrap().eax, 0x4000_0001);
        let timers = HostTimers {
            tsc_deadline: false,
            tsc_khz: Some(1_000_000),
        };
        let cpuid = for_vcpu(&supported(&[entry(1, 0)]), 0, 1, timers);
        assert!(find(&cpuid, LEAF_KVM_TIMING).is_none());
    }
}
