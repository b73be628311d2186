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

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sandbox::{ProcessIo, WindowSize};

/// How long a logging binary may take to close its ready pipe (fd 5).
pub const LOGGER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// After the process's output ended: how long the logger may take to exit by itself, then
/// after SIGTERM (containerd's 12 s), before SIGKILL.
const LOGGER_EXIT_GRACE: Duration = Duration::from_secs(10);
const LOGGER_TERM_GRACE: Duration = Duration::from_secs(12);

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

/// Where a process's stdout (and then stderr) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sink {
    /// FIFO paths (or nothing).
    Fifos,
    File(PathBuf),
    Binary {
        path: PathBuf,
        args: Vec<String>,
    },
}

fn parse_sink(uri: &str) -> Result<Sink, StdioError> {
    if uri.is_empty() || !uri.contains("://") || uri.starts_with("fifo://") {
        return Ok(Sink::Fifos);
    }
    let bad = |why: &str| StdioError::BadUri {
        uri: uri.into(),
        why: why.into(),
    };
    let u = url::Url::parse(uri).map_err(|e| bad(&e.to_string()))?;
    if !matches!(u.scheme(), "file" | "binary") {
        return Err(StdioError::Unsupported(uri.into()));
    }
    if u.host_str().is_some_and(|h| !h.is_empty()) {
        return Err(bad(
            "has a host part; write an absolute path after three slashes (binary:///usr/bin/x)",
        ));
    }
    let path = u.to_file_path().map_err(|()| bad("not an absolute path"))?;
    if path.as_os_str().len() <= 1 {
        return Err(bad("no path"));
    }
    Ok(match u.scheme() {
        "file" => Sink::File(path),
        _ => {
            // containerd's order: each key, then its (first) value.
            let mut args = Vec::new();
            for (k, v) in u.query_pairs() {
                args.push(k.into_owned());
                args.push(v.into_owned());
            }
            Sink::Binary { path, args }
        }
    })
}

/// The size a terminal starts with until containerd sends ResizePty.
const INITIAL_WINDOW: WindowSize = WindowSize { rows: 24, cols: 80 };

fn check_fifo(p: &str) -> Result<(), StdioError> {
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

/// A log file for stdout and stderr: appended to, created (0640) with its directory if
/// missing. Two descriptors of one open file (O_APPEND: each write lands at the end).
fn open_log_file(path: &Path) -> Result<(OwnedFd, OwnedFd), StdioError> {
    let err = |source| StdioError::Open {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
        .map_err(err)?;
    let second = f.try_clone().map_err(err)?;
    Ok((f.into(), second.into()))
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors that we then own (close-on-exec).
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just created by pipe2 and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A close-on-exec copy numbered 10 or above, so that the child's dup2 onto 3, 4 and 5 never
/// meets one of its own sources.
fn dup_high(fd: &OwnedFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new one that we then own.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: n was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Waits until `fd` (the ready pipe's read end) reads EOF or a byte, or the timeout.
fn wait_readable(fd: &OwnedFd, timeout: Duration) -> std::io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n > 0 {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// A running logging binary (`binary://`).
#[derive(Debug)]
pub struct Logger {
    path: PathBuf,
    child: Child,
}

/// Who the logging binary logs for (its environment).
#[derive(Debug, Clone, Copy)]
pub struct LogContext<'a> {
    pub container_id: &'a str,
    pub namespace: &'a str,
}

impl Logger {
    /// Spawns the logging binary; returns the write ends of its stdout and stderr pipes once
    /// it is ready.
    fn spawn(
        path: &Path,
        args: &[String],
        ctx: LogContext<'_>,
    ) -> Result<(Logger, OwnedFd, OwnedFd), StdioError> {
        let err = |source| StdioError::Logger {
            path: path.to_path_buf(),
            source,
        };
        let (out_r, out_w) = pipe().map_err(err)?;
        let (err_r, err_w) = pipe().map_err(err)?;
        let (ready_r, ready_w) = pipe().map_err(err)?;
        let sources = [
            dup_high(&out_r).map_err(err)?,
            dup_high(&err_r).map_err(err)?,
            dup_high(&ready_w).map_err(err)?,
        ];
        drop((out_r, err_r, ready_w));
        let raw: [i32; 3] = [
            sources[0].as_raw_fd(),
            sources[1].as_raw_fd(),
            sources[2].as_raw_fd(),
        ];
        let mut cmd = Command::new(path);
        cmd.args(args)
            .env_clear()
            .env("CONTAINER_ID", ctx.container_id)
            .env("CONTAINER_NAMESPACE", ctx.namespace)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only dup2 (async-signal-safe) between fork and exec. dup2 leaves the new
        // descriptors 3, 4, 5 without close-on-exec; the sources (>= 10) are closed by exec.
        unsafe {
            cmd.pre_exec(move || {
                for (i, fd) in raw.iter().enumerate() {
                    if libc::dup2(*fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(err)?;
        // Our copies of its ends: the ready pipe reads EOF once the logger closes fd 5.
        drop(sources);
        match wait_readable(&ready_r, LOGGER_READY_TIMEOUT) {
            Ok(true) => {}
            Ok(false) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(StdioError::LoggerNotReady {
                    path: path.to_path_buf(),
                    secs: LOGGER_READY_TIMEOUT.as_secs(),
                });
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(e));
            }
        }
        tracing::info!(
            container = ctx.container_id,
            "logging binary {} ready (pid {})",
            path.display(),
            child.id()
        );
        Ok((
            Logger {
                path: path.to_path_buf(),
                child,
            },
            out_w,
            err_w,
        ))
    }

    /// After the process's output is complete (the logger read EOF on fds 3 and 4): waits for
    /// the logger to exit, sending SIGTERM, then SIGKILL, if it takes too long. Blocking.
    pub fn finish(mut self) {
        let wait = |child: &mut Child, d: Duration| {
            let deadline = Instant::now() + d;
            loop {
                match child.try_wait() {
                    Ok(Some(s)) => return Some(s),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => return None,
                }
            }
        };
        let status = wait(&mut self.child, LOGGER_EXIT_GRACE).or_else(|| {
            // SAFETY: SIGTERM to our own child, not yet reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            wait(&mut self.child, LOGGER_TERM_GRACE)
        });
        match status {
            Some(s) => tracing::info!("logging binary {} ended: {s}", self.path.display()),
            None => {
                tracing::warn!(
                    "logging binary {} ignored SIGTERM: killed",
                    self.path.display()
                );
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// A process's opened stdio, with the logging binary it feeds, if any.
pub struct OpenedIo {
    pub io: ProcessIo,
    pub logger: Option<Logger>,
    /// Our write end of the stdin FIFO: drop it on CloseIO (see `open_input`).
    pub stdin_writer: Option<OwnedFd>,
}

impl StdioPaths {
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

    const CTX: LogContext<'static> = LogContext {
        container_id: "c1",
        namespace: "ns1",
    };

    #[test]
    fn log_uris_parse_like_containerd() {
        assert_eq!(parse_sink("/run/x/fifo").unwrap(), Sink::Fifos);
        assert_eq!(parse_sink("").unwrap(), Sink::Fifos);
        assert_eq!(
            parse_sink("file:///var/log/c%201.log").unwrap(),
            Sink::File("/var/log/c 1.log".into())
        );
        assert_eq!(
            parse_sink("binary:///usr/bin/logger?tag=web&-p=local0.info").unwrap(),
            Sink::Binary {
                path: "/usr/bin/logger".into(),
                args: vec![
                    "tag".into(),
                    "web".into(),
                    "-p".into(),
                    "local0.info".into()
                ]
            }
        );
        let e = parse_sink("binary://usr/bin/logger")
            .unwrap_err()
            .to_string();
        assert!(e.contains("three slashes"), "{e}");
        let e = parse_sink("http://x/y").unwrap_err().to_string();
        assert!(e.contains("not supported"), "{e}");
        let p = StdioPaths {
            stdin: "file:///x".into(),
            ..Default::default()
        };
        assert!(p.check().is_err());
        let p = StdioPaths {
            stdout: "binary:///nonexistent/logger".into(),
            ..Default::default()
        };
        let e = p.check().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/logger"), "{e}");
    }

    #[test]
    fn file_uri_appends_both_streams() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sub/c.log");
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        std::fs::write(&log, "before\n").unwrap();
        let uri = format!("file://{}", log.display());
        let p = StdioPaths {
            stdout: uri.clone(),
            stderr: uri,
            ..Default::default()
        };
        let opened = p.open(CTX).unwrap();
        assert!(opened.logger.is_none());
        std::fs::File::from(opened.io.stdout.unwrap())
            .write_all(b"out\n")
            .unwrap();
        std::fs::File::from(opened.io.stderr.unwrap())
            .write_all(b"err\n")
            .unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "before\nout\nerr\n");
    }

    #[test]
    fn binary_uri_spawns_a_ready_logger_with_fds_3_4_5() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("logger.sh");
        let out = dir.path().join("out.txt");
        // Closes fd 5 (ready), then copies fd 3 and fd 4 (to EOF) and its environment.
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec 5>&-\necho \"$1=$2 $CONTAINER_ID $CONTAINER_NAMESPACE\" > {o}\n\
                 cat <&3 >> {o}\ncat <&4 >> {o}\n",
                o = out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let uri = format!("binary://{}?k=v", script.display());
        let p = StdioPaths {
            stdout: uri.clone(),
            stderr: uri,
            ..Default::default()
        };
        let opened = p.open(CTX).unwrap();
        std::fs::File::from(opened.io.stdout.unwrap())
            .write_all(b"to-stdout\n")
            .unwrap();
        std::fs::File::from(opened.io.stderr.unwrap())
            .write_all(b"to-stderr\n")
            .unwrap();
        opened.logger.unwrap().finish();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "k=v c1 ns1\nto-stdout\nto-stderr\n"
        );
    }

    #[test]
    fn a_logger_that_exits_at_once_counts_as_ready() {
        // Exiting closes fd 5 too: ready (EOF), no wait for the timeout.
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("quick.sh");
        std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let p = StdioPaths {
            stdout: format!("binary://{}", script.display()),
            ..Default::default()
        };
        let started = Instant::now();
        let opened = p.open(CTX).unwrap();
        assert!(started.elapsed() < LOGGER_READY_TIMEOUT);
        opened.logger.unwrap().finish();
    }
}
