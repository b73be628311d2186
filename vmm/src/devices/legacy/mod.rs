//! Legacy PC devices on port I/O: the 8250 serial console (vm-superio), the i8042 controller's
//! reset line (how a guest booted with `reboot=k` ends the VM), and the boot-time marker port.

mod boot_marker;
mod console;
mod i8042;
mod serial;

pub use boot_marker::{BootMarker, BOOT_MARKER_PORT};
pub use console::ConsoleWriter;
pub use i8042::{I8042, I8042_PORT};
pub use serial::{SerialConsole, SERIAL_PORT};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An eventfd as a vm-superio interrupt or reset trigger.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
