//! The `binary://` logging program: spawned with the container's stdout as its fd 3, stderr
//! as fd 4 and a "ready" pipe as fd 5, waited for until ready, ended after the output.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::StdioError;

/// How long a logging binary may take to close its ready pipe (fd 5).
pub const LOGGER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// After the process's output ended: how long the logger may take to exit by itself, then
/// after SIGTERM (containerd's 12 s), before SIGKILL.
const LOGGER_EXIT_GRACE: Duration = Duration::from_secs(10);
const LOGGER_TERM_GRACE: Duration = Duration::from_secs(12);

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
    pub(super) fn spawn(
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

#[cfg(test)]
mod tests {
    use crate::stdio::tests::{both_to, executable_script, CTX};
    use crate::stdio::StdioPaths;
    use std::io::Write;

    #[test]
    fn binary_uri_spawns_a_ready_logger_with_fds_3_4_5() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("logger.sh");
        let out = dir.path().join("out.txt");
        // Closes fd 5 (ready), then copies fd 3 and fd 4 (to EOF) and its environment.
        executable_script(
            &script,
            &format!(
                "#!/bin/sh\nexec 5>&-\necho \"$1=$2 $CONTAINER_ID $CONTAINER_NAMESPACE\" > {o}\n\
                 cat <&3 >> {o}\ncat <&4 >> {o}\n",
                o = out.display()
            ),
        );
        let uri = format!("binary://{}?k=v", script.display());
        let opened = both_to(uri).open(CTX).unwrap();
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
        // Exiting closes fd 5 too: ready (EOF), not LoggerNotReady.
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("quick.sh");
        executable_script(&script, "#!/bin/sh\nexit 0\n");
        let p = StdioPaths {
            stdout: format!("binary://{}", script.display()),
            ..Default::default()
        };
        let opened = p.open(CTX).unwrap();
        opened.logger.unwrap().finish();
    }
}
