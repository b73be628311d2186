//! virtio-vsock (virtio 1.x, 5.10) with a Firecracker-style "hybrid" host side.
//!
//! # Why hybrid
//!
//! A guest speaks `AF_VSOCK`; the host side of a microVM is a process that should not need
//! `vhost-vsock`, a host CID, or any privilege. So the device terminates the vsock protocol in the
//! VMM and maps every vsock stream onto an ordinary Unix stream socket:
//!
//! * **Host-initiated**: the VMM listens on `uds_path`. A host process connects there and writes
//!   `CONNECT <port>\n`; the device sends the guest an `OP_REQUEST` from the host CID (2) and a
//!   freshly allocated local port to guest port `<port>`. When the guest answers `OP_RESPONSE`
//!   the VMM writes `OK <local port>\n` to the Unix stream, which from then on carries the
//!   connection's bytes both ways. If the guest answers `OP_RST` (nobody listening), or does not
//!   answer within [`CONNECT_TIMEOUT`], the Unix stream is closed.
//! * **Guest-initiated**: an `OP_REQUEST` for host port `P` makes the VMM connect to the Unix
//!   socket at `<uds_path>_<P>`; success is answered with `OP_RESPONSE`, failure with `OP_RST`.
//!
//! Access control is the file system's: whoever may connect to `uds_path` may reach guest ports,
//! whoever may bind `<uds_path>_<P>` serves host port `P`.
//!
//! # Structure
//!
//! * `device.rs` holds the virtio side: configuration space (the guest CID), the three
//!   queues (rx, tx, event) and the processing entry points.
//! * `muxer/` owns the host side: the listening socket, one slot per Unix stream (a
//!   host client still sending its `CONNECT` line, or a connection), the queue of control packets
//!   for the guest, and a private epoll set with a timerfd for handshake timeouts. `mod.rs` holds
//!   its state and host events, `tx.rs` the guest's packets, `rx.rs` the guest's rx queue,
//!   `slots.rs` the slots, their epoll interest and the handshake.
//! * `connection.rs` is one connection's state machine and credit accounting.
//! * `handshake.rs` parses the host's `CONNECT` line.
//! * `packet.rs` holds protocol constants and header helpers.
//!
//! The muxer's streams live in its own epoll set, whose fd is the one thing (besides the queue
//! eventfds) registered with the VMM's event manager. That lets the device add, pause and drop
//! streams from any context — `reset()` runs on a vCPU thread, where no `EventOps` exist —
//! and lets one wake-up of the event thread serve many streams and interrupt the guest once.
//!
//! # Flow control
//!
//! virtio-vsock is credit based (5.10.6.3). Each side advertises `buf_alloc` (its receive buffer)
//! and `fwd_cnt` (bytes it has consumed) in every header; a sender may have at most
//! `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes in flight.
//!
//! * Guest → host: bytes of `OP_RW` packets go straight to the Unix stream; what the stream does
//!   not take now goes into a per-connection ring of [`BUF_ALLOC`] bytes (allocated the first
//!   time it is needed, once per connection). `fwd_cnt` counts bytes handed to the stream. A
//!   guest that sends beyond its credit overflows nothing: the connection is reset. After
//!   forwarding half of `BUF_ALLOC` since the guest last heard our `fwd_cnt`, and whenever the
//!   guest asks (`OP_CREDIT_REQUEST`), an `OP_CREDIT_UPDATE` is queued.
//! * Host → guest: when a stream is readable, the guest has credit and the rx queue has a buffer,
//!   the stream is read straight into the guest's buffer behind the header (no intermediate copy).
//!
//! # No busy polling
//!
//! Epoll is level triggered, so a readable stream that we cannot serve (no guest credit, no rx
//! buffer, or control packets still waiting for rx buffers) would wake the event loop forever.
//! Such streams are taken out of the epoll set (`EPOLL_CTL_DEL`, not a modify to an empty mask:
//! `EPOLLHUP` is reported even for an empty mask, and a peer that wrote and closed would spin
//! us). They come back when the cause goes away: the guest adds rx buffers (rx queue
//! notification) or sends credit (`OP_CREDIT_UPDATE`, or any header with a larger `fwd_cnt`).
//! Streams with data waiting to be written are watched for `EPOLLOUT` only while data waits. The
//! handshake timeout is a timerfd armed only while some handshake is pending.
//!
//! # Hostile guest
//!
//! Packets with a foreign source CID, a destination other than the host, a type other than
//! `STREAM`, an unknown op, or a length the descriptors cannot hold are dropped; where they
//! name an existing connection it is reset. The number of host streams is capped at
//! [`MAX_CONNECTIONS`]; control packets to the guest wait in a bounded queue, and the tx queue
//! is not read while that queue is backed up. Nothing in this module panics on guest input.
//!
//! The host process must keep `SIGPIPE` ignored (the Rust runtime's default), as writes to a Unix
//! stream whose peer is gone are plain `write(2)` calls that then fail with `EPIPE`.

mod connection;
mod device;
mod event_handler;
mod handshake;
mod muxer;
mod packet;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

pub use device::Vsock;
pub use packet::HOST_CID;

/// Receive buffer we advertise per connection (`buf_alloc`), and the most guest data buffered
/// per connection while the host side is not reading.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Most host streams (connections plus host clients still handshaking) at a time.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a host client may take to send its `CONNECT` line, and the guest to answer the
/// resulting `OP_REQUEST`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved or out of range (must be 3..=0xfffffffe)")]
    InvalidCid(u64),
    #[error("{0} exists and is not a Unix socket")]
    NotASocket(PathBuf),
    #[error("cannot remove the stale socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create {what}: {source}")]
    Sys {
        what: &'static str,
        source: std::io::Error,
    },
}
