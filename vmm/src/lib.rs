//! microvm's virtual machine monitor.

pub mod devices;
