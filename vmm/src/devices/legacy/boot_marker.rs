//! The boot-time marker: a guest byte written to port 0x3f0 makes the VMM log the time since
//! its own start, so benchmarks can split boot into phases without trusting guest clocks.
//! Values are labels chosen by the guest (the guest agent writes 1 when it is ready, for
//! example); Firecracker uses the same port with the value 123.

use crate::devices::BusDevice;

pub const BOOT_MARKER_PORT: u64 = 0x3f0;

#[derive(Default)]
pub struct BootMarker {
    /// (value, milliseconds since VMM start) of every marker written, for tests and reports.
    pub marks: Vec<(u8, f64)>,
}

const MAX_MARKS: usize = 64;

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let ms = crate::timing::since_start().as_secs_f64() * 1000.0;
        // A guest writing in a loop must not grow our memory.
        if self.marks.len() < MAX_MARKS {
            self.marks.push((value, ms));
        }
        guest_info!(target: "boot_marker", "guest boot marker {value} at {ms:.3} ms");
    }
}
