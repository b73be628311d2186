//! Process stdio: streams the host attached (parked until their process starts) and the pumps
//! between them and the process's pipes or terminal.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_protocol::stdio::Stream;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Notify};
use tokio_vsock::VsockStream;

/// The three streams of one process, indexed by [`index`].
pub type Streams = [Option<VsockStream>; 3];

pub fn index(s: Stream) -> usize {
    match s {
        Stream::Stdin => 0,
        Stream::Stdout => 1,
        Stream::Stderr => 2,
    }
}

/// Streams the host attached for processes that have not started yet.
#[derive(Default)]
pub struct Parked {
    streams: Mutex<HashMap<(String, String), Streams>>,
    arrived: Notify,
}

impl Parked {
    /// Parks a stream; fails if that stream of that process is attached already.
    pub fn park(
        &self,
        container_id: &str,
        exec_id: &str,
        which: Stream,
        stream: VsockStream,
    ) -> Result<(), String> {
        let mut map = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut map
            .entry((container_id.to_string(), exec_id.to_string()))
            .or_default()[index(which)];
        if slot.is_some() {
            return Err(format!("{which} is attached already"));
        }
        *slot = Some(stream);
        drop(map);
        self.arrived.notify_waiters();
        Ok(())
    }

    /// Waits until every wanted stream of the process is attached, and takes them all (the
    /// unwanted ones too, dropped: they close). Fails after `timeout`.
    pub async fn take(
        &self,
        container_id: &str,
        exec_id: &str,
        wanted: [bool; 3],
        timeout: Duration,
    ) -> Result<Streams, String> {
        let key = (container_id.to_string(), exec_id.to_string());
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut map = self.streams.lock().unwrap_or_else(|e| e.into_inner());
                let have = map.get(&key);
                let ready = (0..3).all(|i| !wanted[i] || have.is_some_and(|s| s[i].is_some()));
                if ready {
                    let mut s = map.remove(&key).unwrap_or_default();
                    for i in 0..3 {
                        if !wanted[i] {
                            s[i] = None;
                        }
                    }
                    return Ok(s);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let missing: Vec<&str> = {
                    let map = self.streams.lock().unwrap_or_else(|e| e.into_inner());
                    let have = map.get(&key);
                    Stream::ALL
                        .iter()
                        .filter(|s| {
                            let i = index(**s);
                            wanted[i] && have.is_none_or(|v| v[i].is_none())
                        })
                        .map(|s| s.as_str())
                        .collect()
                };
                return Err(format!(
                    "the host did not attach {} within {timeout:?} (connect to vsock port {} first)",
                    missing.join(", "),
                    agent_protocol::STDIO_PORT
                ));
            }
        }
    }

    /// Drops (closes) every parked stream of a container, or of one of its processes.
    pub fn discard(&self, container_id: &str, exec_id: Option<&str>) {
        let mut map = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|(c, e), _| !(c == container_id && exec_id.is_none_or(|x| x == e)));
    }
}

/// A non-blocking file descriptor (pipe end or pty master) registered with tokio.
pub type Fd = Arc<AsyncFd<OwnedFd>>;

/// Makes `fd` non-blocking and registers it.
pub fn async_fd(fd: OwnedFd) -> io::Result<Fd> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open (and the same file) for
    // as long as it is registered.
    let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
    Ok(Arc::new(fd))
}

/// One non-blocking read (`WouldBlock` when nothing is there).
fn try_read(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: read into a valid, writable buffer of buf.len() bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn try_write(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: write from a valid buffer of buf.len() bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

async fn read_fd(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|f| try_read(f.get_ref(), buf)) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

async fn write_all_fd(fd: &AsyncFd<OwnedFd>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let mut guard = fd.writable().await?;
        match guard.try_io(|f| try_write(f.get_ref(), buf)) {
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// Waits until the flag turns true (or its sender is gone).
async fn until(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|v| *v).await;
}

/// Where output goes: the host's stream, or nowhere once the host stopped reading (the process
/// must not block on a full pipe because the host went away).
struct Sink(Option<VsockStream>);

impl Sink {
    async fn send(&mut self, data: &[u8]) {
        if let Some(s) = &mut self.0 {
            if let Err(e) = s.write_all(data).await {
                tracing::debug!("stdio stream closed by the host: {e}");
                self.0 = None;
            }
        }
    }

    /// Half-closes the stream: the host reads EOF after the last byte.
    async fn finish(mut self) {
        if let Some(s) = &mut self.0 {
            let _ = s.flush().await;
            let _ = s.shutdown().await;
        }
    }
}

/// Copies a process's output (pipe read end or pty master) to the host's stream until EOF or,
/// once `exited` turns true, until what the process left in the pipe is drained; then
/// half-closes the stream. Returns the number of bytes read.
///
/// After the exit the pipe holds at most its capacity of the process's own bytes: the drain
/// reads until the pipe is empty, EOF, or that many bytes (anything beyond was written by
/// descendants that outlived the process and still hold the pipe). A pty's master is read until
/// EIO (every slave closed) or until it stays quiet for 100 ms.
pub async fn pump_output(
    src: Fd,
    dst: Option<VsockStream>,
    mut exited: watch::Receiver<bool>,
    pty: bool,
) -> u64 {
    let mut sink = Sink(dst);
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        tokio::select! {
            r = read_fd(&src, &mut buf) => match r {
                Ok(0) => {
                    sink.finish().await;
                    return total;
                }
                Ok(n) => {
                    sink.send(&buf[..n]).await;
                    let before = total;
                    total += n as u64;
                    if before >> 20 != total >> 20 {
                        tracing::debug!("output: {} MiB", total >> 20);
                    }
                }
                Err(e) => {
                    if !(pty && e.raw_os_error() == Some(libc::EIO)) {
                        tracing::warn!("reading process output: {e}");
                    }
                    sink.finish().await;
                    return total;
                }
            },
            _ = until(&mut exited) => break,
        }
    }
    // The process has exited: drain.
    if pty {
        loop {
            match tokio::time::timeout(Duration::from_millis(100), read_fd(&src, &mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    sink.send(&buf[..n]).await;
                    total += n as u64;
                }
                _ => break,
            }
        }
    } else {
        // SAFETY: F_GETPIPE_SZ on a pipe we own.
        let capacity = unsafe { libc::fcntl(src.get_ref().as_raw_fd(), libc::F_GETPIPE_SZ) };
        let mut budget = if capacity > 0 {
            capacity as usize
        } else {
            1 << 20
        };
        while budget > 0 {
            let want = buf.len().min(budget);
            match try_read(src.get_ref(), &mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => {
                    sink.send(&buf[..n]).await;
                    total += n as u64;
                    budget -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break, // WouldBlock: empty
            }
        }
    }
    sink.finish().await;
    total
}

/// Copies the host's stdin stream into the process (pipe write end or pty master) until the
/// host half-closes it, `close` turns true (CloseStdin) or the process exits. For a pipe, the
/// write end is then dropped: the process reads EOF. For a terminal, EOF is the terminal's
/// end-of-file character (^D) written once.
pub async fn pump_input(
    mut src: VsockStream,
    dst: Fd,
    mut exited: watch::Receiver<bool>,
    mut close: watch::Receiver<bool>,
    pty: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            r = src.read(&mut buf) => match r {
                Ok(n) if n > 0 => {
                    tokio::select! {
                        w = write_all_fd(&dst, &buf[..n]) => if let Err(e) = w {
                            tracing::debug!("writing process stdin: {e}");
                            return;
                        },
                        _ = until(&mut exited) => return,
                        _ = until(&mut close) => break,
                    }
                }
                _ => break, // EOF or error: the host closed stdin
            },
            _ = until(&mut exited) => return,
            _ = until(&mut close) => break,
        }
    }
    if pty {
        let _ = write_all_fd(&dst, &[4]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap()
    }

    /// After the exit, what is in the pipe is drained even though a writer (a "descendant")
    /// still holds it open, and the pump ends.
    #[tokio::test]
    async fn drains_after_exit_without_waiting_for_eof() {
        let (r, w) = pipe();
        let data = vec![7u8; 10_000];
        assert_eq!(try_write(&w, &data).unwrap(), data.len());
        let (tx, rx) = watch::channel(false);
        let src = async_fd(r).unwrap();
        tx.send(true).unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), pump_output(src, None, rx, false))
            .await
            .expect("the pump ends although the write end is open");
        assert_eq!(n, 10_000);
        drop(w);
    }

    #[tokio::test]
    async fn copies_until_eof() {
        let (r, w) = pipe();
        let (_tx, rx) = watch::channel(false);
        let src = async_fd(r).unwrap();
        let pump = tokio::spawn(pump_output(src, None, rx, false));
        let w = async_fd(w).unwrap();
        for _ in 0..100 {
            write_all_fd(&w, &[1u8; 65536]).await.unwrap();
        }
        drop(w);
        assert_eq!(pump.await.unwrap(), 100 * 65536);
    }

    #[tokio::test]
    async fn take_waits_for_wanted_streams_and_times_out_precisely() {
        let parked = Parked::default();
        let err = parked
            .take("c", "", [false, true, true], Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(err.contains("stdout, stderr"), "{err}");
        let s = parked
            .take("c", "", [false, false, false], Duration::from_millis(50))
            .await
            .unwrap();
        assert!(s.iter().all(Option::is_none));
    }
}
