//! The process's stdio as containerd gives it, opened on the host and handed to the sandbox's
//! stdio streams. stdout may also be a log URI, as containerd's runc shim takes them:
//!
//! - `file:///path`: stdout and stderr are appended to that file (created, with its
//!   directory, if missing);
//! - `binary:///path?key=value`: the shim spawns that program (arguments: each query key then
//!   its value) with the container's stdout as its fd 3, stderr as fd 4 and a "ready" pipe as
//!   fd 5, which it closes once ready; its environment is `CONTAINER_ID` and
//!   `CONTAINER_NAMESPACE` only. The shim waits (up to [`LOGGER_READY_TIMEOUT`]) for ready
//!   before the process starts; after the process's output is complete the logger gets EOF,
//!   and is sent SIGTERM (then SIGKILL) if it does not exit by itself.
//!
//! As in containerd, stderr goes where stdout goes when stdout is a log URI.

mod logger;
mod uri;

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use sandbox::{ProcessIo, WindowSize};

pub use self::logger::{LogContext, Logger};
use self::uri::{check_fifo, open_log_file, parse_sink, path_of, Sink};

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
    #[error(
        "stdio URI {0:?}: not supported (stdin and stderr take FIFO paths; stdout a FIFO path, \
         file:///PATH or binary:///PATH?ARGS)"
    )]
    Unsupported(String),
    #[error("stdio URI {uri:?}: {why}")]
    BadUri { uri: String, why: String },
    #[error("open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("logging binary {path}: {source}")]
    Logger {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("logging binary {path} did not close its ready pipe (fd 5) within {secs} s")]
    LoggerNotReady { path: PathBuf, secs: u64 },
}

/// The size a terminal starts with until containerd sends ResizePty.
const INITIAL_WINDOW: WindowSize = WindowSize { rows: 24, cols: 80 };

fn clear_nonblock(fd: &OwnedFd) {
    // SAFETY: fcntl on a descriptor we own; only the O_NONBLOCK status flag changes.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
}

/// stdin: the read end, plus a write end of our own. The read end is opened non-blocking (so the
/// open never waits for containerd's writer) and then switched to blocking for the copy thread.
/// Our write end keeps the FIFO from reading as end-of-file before containerd's writer has
/// connected; CloseIO drops it, so the reader sees end-of-file once containerd's writer is gone
/// too and everything written before has been read: no input is lost to the close.
fn open_input(p: &str) -> Result<(OwnedFd, OwnedFd), StdioError> {
    let path = path_of(p);
    let err = |source| StdioError::Open {
        path: path.into(),
        source,
    };
    let reader: OwnedFd = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(err)?
        .into();
    // A reader exists now, so this open does not block.
    let writer: OwnedFd = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(err)?
        .into();
    clear_nonblock(&reader);
    Ok((reader, writer))
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

/// A process's opened stdio, with the logging binary it feeds, if any.
pub struct OpenedIo {
    pub io: ProcessIo,
    pub logger: Option<Logger>,
    /// Our write end of the stdin FIFO: drop it on CloseIO (see `open_input`).
    pub stdin_writer: Option<OwnedFd>,
}

impl StdioPaths {
    /// The stdio of a Create or Exec request, its URIs checked.
    pub fn checked(
        stdin: &str,
        stdout: &str,
        stderr: &str,
        terminal: bool,
    ) -> Result<Self, StdioError> {
        let paths = StdioPaths {
            stdin: stdin.into(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            terminal,
        };
        paths.check()?;
        Ok(paths)
    }

    /// Checks the URIs without opening anything (at create/exec time).
    pub fn check(&self) -> Result<(), StdioError> {
        if !self.stdin.is_empty() {
            check_fifo(&self.stdin)?;
        }
        match parse_sink(&self.stdout)? {
            Sink::Fifos => {
                if !self.stderr.is_empty() {
                    check_fifo(&self.stderr)?;
                }
            }
            Sink::File(_) => {}
            Sink::Binary { path, .. } => {
                let meta = std::fs::metadata(&path).map_err(|source| StdioError::Logger {
                    path: path.clone(),
                    source,
                })?;
                if !meta.is_file() {
                    return Err(StdioError::BadUri {
                        uri: self.stdout.clone(),
                        why: format!("{} is not a file", path.display()),
                    });
                }
            }
        }
        Ok(())
    }

    /// Opens the stdio of a process about to start (spawning its logging binary, if any).
    /// With a terminal, stderr is merged into stdout by the pty (containerd gives no stderr
    /// FIFO then). Blocking: a logging binary is waited for until ready.
    pub fn open(&self, ctx: LogContext<'_>) -> Result<OpenedIo, StdioError> {
        self.check()?;
        let (stdin, stdin_writer) = match (!self.stdin.is_empty())
            .then(|| open_input(&self.stdin))
            .transpose()?
        {
            Some((reader, writer)) => (Some(reader), Some(writer)),
            None => (None, None),
        };
        let (stdout, stderr, logger) = match parse_sink(&self.stdout)? {
            Sink::Fifos => {
                let stdout = (!self.stdout.is_empty())
                    .then(|| open_output(&self.stdout))
                    .transpose()?;
                let stderr = (!self.stderr.is_empty() && !self.terminal)
                    .then(|| open_output(&self.stderr))
                    .transpose()?;
                (stdout, stderr, None)
            }
            Sink::File(path) => {
                let (out, err) = open_log_file(&path)?;
                (Some(out), (!self.terminal).then_some(err), None)
            }
            Sink::Binary { path, args } => {
                let (logger, out, err) = Logger::spawn(&path, &args, ctx)?;
                (Some(out), (!self.terminal).then_some(err), Some(logger))
            }
        };
        Ok(OpenedIo {
            io: ProcessIo {
                stdin,
                stdout,
                stderr,
                terminal: self.terminal.then_some(INITIAL_WINDOW),
            },
            logger,
            stdin_writer,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
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
        let io = paths.open(CTX).unwrap().io;
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

    pub(crate) const CTX: LogContext<'static> = LogContext {
        container_id: "c1",
        namespace: "ns1",
    };

    /// stdout and stderr both to `uri` (a log URI).
    pub(crate) fn both_to(uri: String) -> StdioPaths {
        StdioPaths {
            stdout: uri.clone(),
            stderr: uri,
            ..Default::default()
        }
    }

    /// Writes an executable shell script.
    pub(crate) fn executable_script(path: &std::path::Path, text: &str) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
}
