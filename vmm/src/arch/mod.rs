//! x86_64 guest setup: memory layout, kernel loading, boot structures, vCPU registers, CPUID and
//! the MP table that lets the guest find its CPUs without ACPI.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod mptable;
pub mod regs;

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest physical memory layout. Low addresses hold the boot structures, the kernel goes at 16 MiB
/// (where its ELF headers ask to be), devices live in a gap below 4 GiB.
pub mod layout {
    /// GDT for the boot CPU.
    pub const BOOT_GDT_START: u64 = 0x500;
    /// A null IDT: no interrupts until the kernel sets its own.
    pub const BOOT_IDT_START: u64 = 0x520;
    /// PVH `hvm_start_info`, followed by its memory map and module list.
    pub const PVH_INFO_START: u64 = 0x6000;
    /// Linux `boot_params` ("zero page") for the 64-bit boot protocol.
    pub const ZERO_PAGE_START: u64 = 0x7000;
    /// Initial stack of the boot CPU (64-bit boot protocol).
    pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
    /// Identity-mapping page tables for the 64-bit boot protocol (first 1 GiB, 2 MiB pages).
    pub const PML4_START: u64 = 0x9000;
    pub const PDPTE_START: u64 = 0xa000;
    pub const PDE_START: u64 = 0xb000;
    /// The kernel command line.
    pub const CMDLINE_START: u64 = 0x20000;
    pub const CMDLINE_MAX_SIZE: usize = 4096;
    /// Start of the EBDA, where the MP table goes (Linux scans the last KiB of base memory).
    pub const EBDA_START: u64 = 0x9fc00;
    /// Start of high memory: everything from here to the end of RAM is usable by the guest.
    pub const HIMEM_START: u64 = 0x10_0000;
    /// The MMIO gap: guest RAM stops here and resumes at 4 GiB.
    pub const MMIO_GAP_START: u64 = 0xc000_0000;
    pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
    /// virtio-mmio device windows, one page each.
    pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
    /// The in-kernel IOAPIC and local APIC.
    pub const IOAPIC_START: u64 = 0xfec0_0000;
    pub const APIC_START: u64 = 0xfee0_0000;
    /// Legacy IRQ lines for devices: serial on 4, virtio devices from 5 to 23 (IOAPIC pins).
    pub const SERIAL_IRQ: u32 = 4;
    pub const VIRTIO_IRQ_FIRST: u32 = 5;
    pub const IRQ_MAX: u32 = 23;
}

/// The guest RAM ranges for `mem_size` bytes: one range below the MMIO gap, and the rest above
/// 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let below = mem_size.min(layout::MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), below as usize)];
    if mem_size > below {
        ranges.push((
            GuestAddress(layout::MMIO_GAP_END),
            (mem_size - below) as usize,
        ));
    }
    ranges
}

/// The end of RAM below the MMIO gap.
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .filter(|&end| end <= layout::MMIO_GAP_START)
        .max()
        .unwrap_or(0)
}

/// A RAM or reserved range for the guest's memory map (e820 or PVH memmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub ram: bool,
}

/// The memory map the guest is told: base memory up to the EBDA, high memory up to the gap, and
/// memory above 4 GiB.
pub fn memory_map(mem_size: u64) -> Vec<MemoryMapEntry> {
    let mut map = vec![MemoryMapEntry {
        addr: 0,
        size: layout::EBDA_START,
        ram: true,
    }];
    for (start, len) in ram_ranges(mem_size) {
        let (start, end) = (start.0.max(layout::HIMEM_START), start.0 + len as u64);
        if end > start {
            map.push(MemoryMapEntry {
                addr: start,
                size: end - start,
                ram: true,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let map = memory_map(128 << 20);
        assert_eq!(map.len(), 2);
        assert_eq!(
            map[0],
            MemoryMapEntry {
                addr: 0,
                size: 0x9fc00,
                ram: true
            }
        );
        assert_eq!(
            map[1],
            MemoryMapEntry {
                addr: 0x10_0000,
                size: (128 << 20) - 0x10_0000,
                ram: true
            }
        );
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let size = 4u64 << 30;
        let ranges = ram_ranges(size);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0], (GuestAddress(0), 0xc000_0000));
        assert_eq!(ranges[1], (GuestAddress(0x1_0000_0000), (1 << 30) as usize));
        let map = memory_map(size);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].addr, 0x1_0000_0000);
        let total: u64 = map.iter().map(|e| e.size).sum();
        assert_eq!(total, size - (0x10_0000 - 0x9fc00));
        let mem = GuestMemoryMmap::<()>::from_ranges(&ram_ranges(256 << 20)).unwrap();
        assert_eq!(low_ram_end(&mem), 256 << 20);
    }
}
