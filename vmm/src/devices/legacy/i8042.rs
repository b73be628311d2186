//! The i8042 keyboard controller, reduced to what matters here: command 0xFE on port 0x64
//! pulses the CPU reset line, which is how a guest booted with `reboot=k` asks to end the VM.

use vm_superio::I8042Device;

use super::EventFdTrigger;
use crate::devices::BusDevice;

/// Ports 0x60 (data) to 0x64 (command/status).
pub const I8042_PORT: u64 = 0x60;

pub struct I8042(I8042Device<EventFdTrigger>);

impl I8042 {
    /// `reset` is signalled when the guest resets the machine.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self(I8042Device::new(reset))
    }
}

impl BusDevice for I8042 {
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
            guest_warn!("i8042: cannot signal reset: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_signals() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger(evt.try_clone().unwrap()));
        dev.write(4, &[0x20]); // some other command
        assert!(evt.read().is_err(), "no reset yet");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
