//! The host's ends of process stdio: vsock connections through the VMM's hybrid unix socket,
//! and the threads that copy between them and host file descriptors.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;

use agent_protocol::stdio::{read_line, Header, Reply, Stream};
use tokio::io::AsyncWriteExt;

use crate::Error;

/// Connects to guest vsock `port` through the VMM's unix socket (`CONNECT <port>\n`, answered
/// `OK <host port>\n`). Fails with `ConnectionRefused` when nothing listens on the port yet.
pub async fn connect_port(uds: &Path, port: u32) -> io::Result<tokio::net::UnixStream> {
    let mut s = tokio::net::UnixStream::connect(uds).await?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    let line = read_line(&mut s).await.map_err(|e| match e {
        agent_protocol::stdio::LineError::Io(e) => e,
        agent_protocol::stdio::LineError::Header(_) => io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("vsock port {port}: the VMM closed the connection"),
        ),
    })?;
    if !line.starts_with(b"OK ") {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "vsock port {port}: unexpected answer {:?}",
                String::from_utf8_lossy(&line)
            ),
        ));
    }
    Ok(s)
}

/// Opens one stdio stream of a process: connects to the agent's stdio port, sends the header
/// and checks the answer. Returns a blocking std stream.
pub async fn open_stream(uds: &Path, header: &Header) -> Result<UnixStream, Error> {
    let ctx = || {
        format!(
            "{} of process {:?} in container {}",
            header.stream, header.exec_id, header.container_id
        )
    };
    let line = header
        .encode()
        .map_err(|e| Error::Invalid(format!("{}: {e}", ctx())))?;
    // The agent is known to listen: a refusal is transient (the VMM closes a CONNECT the guest
    // did not answer within its 2 s handshake timeout, which a loaded host can miss). Nothing
    // reached the agent yet, so retrying is safe.
    let mut attempt = 0;
    let mut s = loop {
        match connect_port(uds, agent_protocol::STDIO_PORT).await {
            Ok(s) => break s,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && attempt < 5 => {
                attempt += 1;
                tracing::debug!("stdio stream {}: {e}; retrying", ctx());
                tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
            }
            Err(e) => return Err(Error::io(format!("connect the stdio stream {}", ctx()), e)),
        }
    };
    s.write_all(&line)
        .await
        .map_err(|e| Error::io(format!("send the stdio header {}", ctx()), e))?;
    let reply = read_line(&mut s)
        .await
        .map_err(|e| Error::Invalid(format!("no stdio reply for {}: {e}", ctx())))?;
    match Reply::parse(&reply) {
        Ok(Reply::Ok) => {}
        Ok(Reply::Err(reason)) => {
            return Err(Error::StdioRefused {
                what: ctx(),
                reason,
            })
        }
        Err(e) => return Err(Error::Invalid(format!("{}: {e}", ctx()))),
    }
    let s = s
        .into_std()
        .map_err(|e| Error::io("stdio stream into std", e))?;
    s.set_nonblocking(false)
        .map_err(|e| Error::io("stdio stream blocking", e))?;
    Ok(s)
}

/// Copies the guest's output stream into a host fd until EOF. If the host fd stops taking
/// data (a closed pipe), the rest is read and dropped so the process never blocks. Returns the
/// number of bytes received.
pub fn spawn_output(
    mut from: UnixStream,
    to: OwnedFd,
    name: Stream,
) -> io::Result<JoinHandle<io::Result<u64>>> {
    std::thread::Builder::new()
        .name(format!("stdio-{name}"))
        .spawn(move || {
            let mut to = std::fs::File::from(to);
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            let mut sink_ok = true;
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                total += n as u64;
                if sink_ok && to.write_all(&buf[..n]).is_err() {
                    sink_ok = false;
                }
            }
            let _ = to.flush();
            Ok(total)
        })
}

/// Copies a host fd into the guest's stdin stream until the fd's EOF (then half-closes the
/// stream: the process reads EOF) or until the agent closes the stream (the process exited).
pub fn spawn_input(from: OwnedFd, mut to: UnixStream) -> io::Result<JoinHandle<io::Result<u64>>> {
    std::thread::Builder::new()
        .name("stdio-stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            let mut src = std::fs::File::from(from);
            loop {
                let mut fds = [
                    libc::pollfd {
                        fd: src.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: to.as_raw_fd(),
                        events: libc::POLLRDHUP,
                        revents: 0,
                    },
                ];
                // SAFETY: poll on two valid pollfd structs we own.
                let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                    // The agent closed the stream: the process is gone.
                    return Ok(total);
                }
                if fds[0].revents == 0 {
                    continue;
                }
                let n = match src.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                if n == 0 {
                    let _ = to.shutdown(std::net::Shutdown::Write);
                    return Ok(total);
                }
                if to.write_all(&buf[..n]).is_err() {
                    return Ok(total);
                }
                total += n as u64;
            }
        })
}
