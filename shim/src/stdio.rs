//! The process's stdio as containerd gives it: FIFO paths (or `binary://` / `file://` URIs,
//! not supported yet) opened on the host and handed to the sandbox's stdio streams.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use sandbox::{ProcessIo, WindowSize};

/// The stdio of one process as containerd asked for it.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("stdio URI {0:?}: only FIFO paths are supported (binary:// and file:// are not implemented yet)")]
    Unsupported(String),
    #[error("open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
}

/// The size a terminal starts with until containerd sends ResizePty.
const INITIAL_WINDOW: WindowSize = WindowSize { rows: 24, cols: 80 };

fn check_uri(p: &str) -> Result<(), StdioError> {
    if p.contains("://") && !p.starts_with("fifo://") {
        return Err(StdioError::Unsupported(p.into()));
    }
    Ok(())
}

fn path_of(p: &str) -> &str {
    p.strip_prefix("fifo://").unwrap_or(p)
}

fn clear_nonblock(fd: &OwnedFd) {
    // SAFETY: fcntl on a descriptor we own; only the O_NONBLOCK status flag changes.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
}

/// stdin: opened read-write, so the open never blocks and the FIFO never reads as end-of-file
/// before containerd's writer has connected (containerd closes the guest's stdin explicitly
/// with CloseIO when its own input ends).
fn open_input(p: &str) -> Result<OwnedFd, StdioError> {
    let path = path_of(p);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| StdioError::Open {
            path: path.into(),
            source,
        })?;
    Ok(f.into())
}

/// stdout/stderr: opened write-only and non-blocking (the open fails at once instead of
/// hanging when nobody reads), then switched to blocking for the copy thread. With no reader
/// yet (ENXIO), read-write, so the open cannot fail.
fn open_output(p: &str) -> Result<OwnedFd, StdioError> {
    let path = path_of(p);
    let err = |source| StdioError::Open {
        path: path.into(),
        source,
    };
    let f = match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(err)?,
        Err(e) => return Err(err(e)),
    };
    let fd: OwnedFd = f.into();
    clear_nonblock(&fd);
    Ok(fd)
}

impl StdioPaths {
    /// Checks the URIs without opening anything (at create/exec time).
    pub fn check(&self) -> Result<(), StdioError> {
        for p in [&self.stdin, &self.stdout, &self.stderr] {
            if !p.is_empty() {
                check_uri(p)?;
            }
        }
        Ok(())
    }

    /// Opens the FIFOs for a process about to start. With a terminal, stderr is merged into
    /// stdout by the pty (containerd gives no stderr FIFO then).
    pub fn open(&self) -> Result<ProcessIo, StdioError> {
        self.check()?;
        let stdin = (!self.stdin.is_empty())
            .then(|| open_input(&self.stdin))
            .transpose()?;
        let stdout = (!self.stdout.is_empty())
            .then(|| open_output(&self.stdout))
            .transpose()?;
        let stderr = (!self.stderr.is_empty() && !self.terminal)
            .then(|| open_output(&self.stderr))
            .transpose()?;
        Ok(ProcessIo {
            stdin,
            stdout,
            stderr,
            terminal: self.terminal.then_some(INITIAL_WINDOW),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn mkfifo(p: &std::path::Path) {
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn fifos_open_without_blocking_and_carry_data() {
        let dir = tempfile::tempdir().unwrap();
        let (i, o) = (dir.path().join("in"), dir.path().join("out"));
        mkfifo(&i);
        mkfifo(&o);
        let paths = StdioPaths {
            stdin: i.to_str().unwrap().into(),
            stdout: o.to_str().unwrap().into(),
            ..Default::default()
        };
        // Nobody on the other ends yet: still opens.
        let io = paths.open().unwrap();
        let mut reader = std::fs::File::open(&o).unwrap();
        std::fs::File::from(io.stdout.unwrap())
            .write_all(b"out")
            .unwrap();
        let mut buf = [0u8; 3];
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"out");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&i)
            .unwrap()
            .write_all(b"in")
            .unwrap();
        let mut buf = [0u8; 2];
        std::fs::File::from(io.stdin.unwrap())
            .read_exact(&mut buf)
            .unwrap();
        assert_eq!(&buf, b"in");
    }

    #[test]
    fn other_uris_are_refused_clearly() {
        let p = StdioPaths {
            stdout: "binary:///usr/bin/logger?x=1".into(),
            ..Default::default()
        };
        let e = p.check().unwrap_err().to_string();
        assert!(
            e.contains("binary://") && e.contains("not implemented"),
            "{e}"
        );
    }
}
