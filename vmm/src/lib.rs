//! microvm's virtual machine monitor.

pub mod arch;
pub mod devices;
