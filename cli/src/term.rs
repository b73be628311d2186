//! The host terminal in raw mode while a container owns it (`-t`), restored when the guard is
//! dropped: on exit, on error, and on unwinding.

use std::os::fd::{AsRawFd, BorrowedFd};

pub struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Puts the terminal `fd` into raw mode; `None` when it is not a terminal.
    pub fn enter(fd: BorrowedFd<'_>) -> std::io::Result<Option<RawMode>> {
        let fd = fd.as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it in.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and saved a valid termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the termios we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: as above; TCSANOW applies it at once.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Some(RawMode { fd, saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings saved from the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}
