//! The CPUID each vCPU reports: what the host's KVM supports, plus this vCPU's APIC id, the
//! topology (N single-threaded cores in one package), and the hypervisor bit.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Adjusts the supported CPUID `entries` for vCPU `index` of `count`.
pub fn filter(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8) {
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
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        filter(&mut e, 3, 4);
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
        filter(&mut e, 0, 1);
        assert_eq!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[0].ebx >> 24, 0);
    }
}
