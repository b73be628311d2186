//! The 8250 UART at COM1 (port 0x3f8, IRQ 4), the guest's `console=ttyS0`.

use vm_superio::Serial;

use super::{ConsoleWriter, EventFdTrigger};
use crate::devices::BusDevice;

pub const SERIAL_PORT: u64 = 0x3f8;

pub struct SerialConsole(Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleWriter>);

impl SerialConsole {
    pub fn new(irq: EventFdTrigger, out: ConsoleWriter) -> Self {
        Self(Serial::new(irq, out))
    }

    /// Writes out any partial line still buffered (at VM exit). A failure is logged by the
    /// writer, which drops what it could not write.
    pub fn flush(&mut self) {
        let _ = self.0.writer_mut().flush_all();
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
            guest_warn!("serial console: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::console::CONSOLE_BUFFER_MAX;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A host stdout that is never drained.
    struct Full;
    impl std::io::Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::WouldBlock.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::ErrorKind::WouldBlock.into())
        }
    }

    #[test]
    fn a_guest_writing_to_an_undrained_console_stays_bounded() {
        let irq = EventFdTrigger(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut serial = SerialConsole::new(irq, ConsoleWriter::new(Box::new(Full)));
        // Byte by byte through the UART's data register, as the guest writes: 4 MiB, 64 times
        // the cap, without a newline (the worst case for a line-buffered console).
        for i in 0..4u32 << 20 {
            serial.write(0, &[b'a' + (i % 26) as u8]);
        }
        let writer = serial.0.writer_mut();
        assert!(
            writer.buffered() <= CONSOLE_BUFFER_MAX,
            "{}",
            writer.buffered()
        );
        assert!(writer.dropped() >= (4 << 20) - CONSOLE_BUFFER_MAX as u64);
    }
}
