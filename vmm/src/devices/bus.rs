//! Address-range dispatch of MMIO and port I/O exits to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through MMIO or port I/O. Offsets are relative to the device's base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps a registered device")]
    Overlap { base: u64, len: u64 },
    #[error("empty range at {0:#x}")]
    Empty(u64),
}

#[derive(Clone)]
struct Range {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// An address space (MMIO or PIO) mapping non-overlapping ranges to devices. Read-mostly after
/// setup: vCPU threads share it through an `Arc` and lock only the device they hit.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let overlaps_prev = self
            .ranges
            .range(..=base)
            .next_back()
            .is_some_and(|(b, r)| b + r.len > base);
        let overlaps_next = self.ranges.range(base..end).next().is_some();
        if overlaps_prev || overlaps_next {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &Range)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the device's window.
        (offset + size as u64 <= range.len).then_some((offset, range))
    }

    /// Dispatches a read; returns false if no device covers the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, r)) => {
                crate::devices::lock(&r.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, r)) => {
                crate::devices::lock(&r.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x100, 0x10)
            .unwrap();
        bus.insert(Arc::new(Mutex::new(Echo(20))), 0x110, 0x10)
            .unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x108, 4).is_err());
        assert!(bus
            .insert(Arc::new(Mutex::new(Echo(0))), 0xf0, 0x11)
            .is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x200, 0).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b[0], 12);
        assert!(bus.write(0x110, &[5]));
        assert!(bus.read(0x111, &mut b));
        assert_eq!(b[0], 6);
        assert!(!bus.read(0x120, &mut b));
        // An access straddling the end of a window is not dispatched.
        let mut b4 = [0u8; 4];
        assert!(!bus.read(0x11e, &mut b4));
    }
}
