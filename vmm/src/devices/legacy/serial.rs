//! The 8250 UART at COM1 (port 0x3f8, IRQ 4), the guest's `console=ttyS0`.

use tracing::warn;
use vm_superio::Serial;

use super::{ConsoleWriter, EventFdTrigger};
use crate::devices::BusDevice;

pub const SERIAL_PORT: u64 = 0x3f8;

pub struct SerialConsole(Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleWriter>);

impl SerialConsole {
    pub fn new(irq: EventFdTrigger, out: ConsoleWriter) -> Self {
        Self(Serial::new(irq, out))
    }

    /// Writes out any partial line still buffered (at VM exit).
    pub fn flush(&mut self) {
        if let Err(e) = self.0.writer_mut().flush_all() {
            warn!("serial console: cannot write output: {e}");
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        if let Err(e) = self.0.write(offset as u8, data[0]) {
            warn!("serial console: {e}");
        }
    }
}
