//! Legacy PC devices: the 8250 serial console, the i8042 reset line, the boot-time marker port.
