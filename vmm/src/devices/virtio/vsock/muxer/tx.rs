//! Guest → host: tx descriptor chains, the guest's connection requests and the packets of its
//! connections, and the non-blocking connect to a host listener.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use tracing::debug;
use virtio_queue::DescriptorChain;
use virtio_vsock::packet::VsockPacket;
use vm_memory::GuestMemoryMmap;

use super::super::connection::{Connection, State};
use super::super::packet::{
    op_name, peek_header, Header, HOST_CID, MAX_PKT_LEN, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,
    OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, TYPE_STREAM,
};
use super::{Entry, VsockMuxer};

impl VsockMuxer {
    /// Handles one tx descriptor chain (the caller returns it to the guest).
    pub fn handle_tx_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) {
        let peeked = peek_header(mem, chain.clone());
        let mut chain = chain;
        let pkt = match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_LEN) {
            Ok(pkt) => pkt,
            Err(e) => {
                debug!("vsock: malformed tx packet dropped: {e}");
                if let Some(hdr) = peeked {
                    self.reject(&hdr);
                }
                return;
            }
        };
        let hdr = Header::of(&pkt);
        if hdr.src_cid != self.guest_cid
            || hdr.dst_cid != HOST_CID
            || hdr.type_ != TYPE_STREAM
            || !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&hdr.op)
        {
            debug!(
                "vsock: dropped packet {}:{} -> {}:{} type {} op {} ({})",
                hdr.src_cid,
                hdr.src_port,
                hdr.dst_cid,
                hdr.dst_port,
                hdr.type_,
                hdr.op,
                op_name(hdr.op)
            );
            self.reject(&hdr);
            return;
        }
        let Some(&idx) = self.by_key.get(&(hdr.dst_port, hdr.src_port)) else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(&hdr),
                OP_RST => {}
                op => {
                    debug!(
                        "vsock: {} for unknown connection {} -> {}",
                        op_name(op),
                        hdr.src_port,
                        hdr.dst_port
                    );
                    self.queue_ctl(hdr.dst_port, hdr.src_port, OP_RST, 0);
                }
            }
            return;
        };
        self.conn_packet(idx, &hdr, pkt.data_slice());
    }

    /// A packet we will not process: reset the connection it names, if any; otherwise answer a
    /// well-addressed non-RST packet with RST so that the guest's socket fails fast.
    pub(super) fn reject(&mut self, hdr: &Header) {
        if let Some(&idx) = self.by_key.get(&(hdr.dst_port, hdr.src_port)) {
            self.reset_slot(idx);
        } else if hdr.src_cid == self.guest_cid && hdr.op != OP_RST {
            self.queue_ctl(hdr.dst_port, hdr.src_port, OP_RST, 0);
        }
    }

    /// `OP_REQUEST` for host port `dst_port`: connect to `<uds_path>_<dst_port>`.
    pub(super) fn guest_connect(&mut self, hdr: &Header) {
        if self.live >= self.max_connections || !self.ctl_has_room() {
            debug!(
                "vsock: refusing guest connection to port {}: too many connections",
                hdr.dst_port
            );
            self.queue_ctl(hdr.dst_port, hdr.src_port, OP_RST, 0);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                debug!(
                    "vsock: guest connection to port {} refused: {}: {e}",
                    hdr.dst_port,
                    Path::new(&path).display()
                );
                self.queue_ctl(hdr.dst_port, hdr.src_port, OP_RST, 0);
                return;
            }
        };
        let conn = Connection::peer_init(
            stream,
            hdr.dst_port,
            hdr.src_port,
            hdr.buf_alloc,
            hdr.fwd_cnt,
        );
        let idx = self.insert(Entry::Conn(conn));
        self.by_key.insert((hdr.dst_port, hdr.src_port), idx);
        self.queue_ctl(hdr.dst_port, hdr.src_port, OP_RESPONSE, 0);
        self.update_interest(idx);
    }

    /// A packet for an existing connection.
    pub(super) fn conn_packet<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        idx: u32,
        hdr: &Header,
        data: Option<&vm_memory::VolatileSlice<'_, B>>,
    ) {
        let Some(conn) = self.conn_mut(idx) else {
            return;
        };
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        let result = match (hdr.op, conn.state) {
            (OP_RST, _) => {
                // The guest dropped it (or, for LocalInit, nobody listens): close, no answer.
                self.remove_slot(idx);
                return;
            }
            (OP_RESPONSE, State::LocalInit) => {
                conn.establish();
                conn.flush().map_err(|e| e.to_string())
            }
            (OP_RW, State::Established) => match data {
                Some(data) => conn.recv_from_guest(data).map_err(|e| e.to_string()),
                None => Ok(()),
            },
            (OP_SHUTDOWN, State::Established) => conn
                .shutdown_from_guest(hdr.flags)
                .map_err(|e| e.to_string()),
            (OP_CREDIT_UPDATE, State::Established) => Ok(()),
            (OP_CREDIT_REQUEST, State::Established) => {
                self.queue_credit_update(idx);
                Ok(())
            }
            (op, state) => Err(format!("unexpected {} in state {state:?}", op_name(op))),
        };
        match result {
            Ok(()) => self.post_update(idx),
            Err(e) => {
                debug!(
                    "vsock: resetting connection {} <-> {}: {e}",
                    hdr.dst_port, hdr.src_port
                );
                self.reset_slot(idx);
            }
        }
    }
}

/// Connects to a Unix stream socket without blocking. `std`'s `UnixStream::connect` blocks
/// while the listener's backlog is full, which would stall the event loop; a non-blocking
/// Unix `connect` either completes at once or fails (`EAGAIN` for a full backlog).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: `sockaddr_un` is plain old data, for which all-zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // Leave room for the terminating NUL, which the zeroed tail provides.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a usable Unix socket path (empty, too long, or with a NUL)",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: a plain system call with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is a valid, initialised `sockaddr_un` that outlives the call, and `len`
    // does not exceed its size (checked above).
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(sock))
}
