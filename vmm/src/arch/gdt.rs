//! Global descriptor table entries and their translation into KVM segment registers.

use kvm_bindings::kvm_segment;

/// Builds a GDT entry from its flags (access byte in bits 0-7, flags nibble in 12-15), base and
/// limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

fn bits(entry: u64, shift: u32, width: u32) -> u64 {
    (entry >> shift) & ((1 << width) - 1)
}

/// The KVM segment register a selector pointing at `entry` (slot `index`) loads.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = bits(entry, 16, 24) | (bits(entry, 56, 8) << 24);
    let raw_limit = (bits(entry, 0, 16) | (bits(entry, 48, 4) << 16)) as u32;
    let g = bits(entry, 55, 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bits(entry, 47, 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: bits(entry, 40, 4) as u8,
        present,
        dpl: bits(entry, 45, 2) as u8,
        db: bits(entry, 54, 1) as u8,
        s: bits(entry, 44, 1) as u8,
        l: bits(entry, 53, 1) as u8,
        g,
        avl: bits(entry, 52, 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment() {
        let e = gdt_entry(0xa09b, 0, 0xfffff);
        assert_eq!(e, 0x00af_9b00_0000_ffff);
        let s = segment_from_gdt(e, 1);
        assert_eq!(s.selector, 8);
        assert_eq!(
            (s.l, s.db, s.g, s.present, s.s, s.type_),
            (1, 0, 1, 1, 1, 0xb)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.unusable, 0);
    }

    #[test]
    fn base_and_limit_round_trip() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0x6_789a);
        let s = segment_from_gdt(e, 2);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0x6_789a, "byte granularity keeps the limit as is");
        assert_eq!((s.type_, s.dpl, s.g), (3, 0, 0));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }
}
