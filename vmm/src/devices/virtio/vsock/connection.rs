//! One vsock stream connection: its state machine, the credit accounting in both directions,
//! and the guest → host buffer.
//!
//! Directions are named from the guest's point of view of the queues: *tx* is guest → host
//! (guest `OP_RW` packets written to the Unix stream), *rx* is host → guest (Unix stream read
//! into rx buffers).

use std::io::{self, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};
use vmm_sys_util::epoll::EventSet;

use super::handshake::ok_reply;
use super::BUF_ALLOC;

/// Where the connection handshake stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Host-initiated: `OP_REQUEST` queued or sent to the guest, no answer yet.
    LocalInit,
    /// Both sides agreed; data may flow.
    Established,
}

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnError {
    #[error("guest sent {len} bytes with {buffered} already buffered: credit exceeded")]
    CreditExceeded { len: usize, buffered: usize },
    #[error("guest sent data after shutting down its send side")]
    DataAfterShutdown,
    #[error("host stream: {0}")]
    Io(#[from] io::Error),
    #[error("guest memory: {0}")]
    Memory(#[from] VolatileMemoryError),
}

/// What reading the host stream into a guest buffer gave.
#[derive(Debug)]
pub(super) enum RxRead {
    /// This many bytes are in the guest buffer.
    Data(u32),
    /// Nothing to read now.
    WouldBlock,
    /// The host closed its sending side.
    Eof,
    /// The stream failed.
    Error(io::Error),
}

/// Guest bytes the host stream has not taken yet: a fixed-capacity ring, allocated the first time
/// it is needed and kept for the connection's life (no allocation per packet).
#[derive(Debug, Default)]
pub(super) struct TxBuf {
    buf: Box<[u8]>,
    head: usize,
    len: usize,
}

impl TxBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `src`. The caller checks that it fits in [`BUF_ALLOC`].
    fn push<B: BitmapSlice>(&mut self, src: &VolatileSlice<'_, B>) -> Result<(), ConnError> {
        if self.buf.is_empty() {
            self.buf = vec![0u8; BUF_ALLOC as usize].into_boxed_slice();
        }
        let cap = self.buf.len();
        let n = src.len();
        if self.len + n > cap {
            return Err(ConnError::CreditExceeded {
                len: n,
                buffered: self.len,
            });
        }
        let tail = (self.head + self.len) % cap;
        let first = n.min(cap - tail);
        src.subslice(0, first)?
            .copy_to(&mut self.buf[tail..tail + first]);
        if first < n {
            src.subslice(first, n - first)?
                .copy_to(&mut self.buf[..n - first]);
        }
        self.len += n;
        Ok(())
    }

    /// The oldest contiguous run of buffered bytes.
    fn front(&self) -> &[u8] {
        let end = (self.head + self.len).min(self.buf.len());
        &self.buf[self.head..end]
    }

    fn consume(&mut self, n: usize) {
        self.len -= n;
        self.head = if self.len == 0 {
            0
        } else {
            (self.head + n) % self.buf.len()
        };
    }
}

#[derive(Debug)]
pub(super) struct Connection {
    pub stream: UnixStream,
    /// The host side's port (src port of what we send).
    pub local_port: u32,
    /// The guest side's port.
    pub peer_port: u32,
    pub state: State,
    /// Handshake deadline (host-initiated connections awaiting the guest).
    pub deadline: Option<Instant>,
    /// What the stream is registered for in the muxer's epoll set (empty: not registered).
    pub interest: EventSet,
    /// Host data could not go out for want of rx buffers; resumed when the guest adds some.
    pub rx_blocked: bool,
    /// An `OP_CREDIT_UPDATE` for this connection is in the control queue.
    pub credit_update_queued: bool,

    // Guest → host.
    tx_buf: TxBuf,
    /// Guest bytes handed to the host stream.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard from us.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// `OK <port>\n` still to be written to the host stream (before any guest data).
    reply: [u8; 16],
    reply_pos: usize,
    reply_end: usize,

    // Host → guest.
    /// Bytes put into rx buffers.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,

    // Shutdown.
    /// The guest will send no more (`OP_SHUTDOWN` with `SEND`).
    guest_shut_send: bool,
    /// The guest will receive no more (`OP_SHUTDOWN` with `RCV`).
    guest_shut_rcv: bool,
    /// The host stream reached end of file (the guest has been or will be told).
    host_eof: bool,
    /// `shutdown(Write)` was done on the host stream.
    host_write_shut: bool,
}

impl Connection {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            deadline: None,
            interest: EventSet::empty(),
            rx_blocked: false,
            credit_update_queued: false,
            tx_buf: TxBuf::default(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            reply: [0; 16],
            reply_pos: 0,
            reply_end: 0,
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_eof: false,
            host_write_shut: false,
        }
    }

    /// A host-initiated connection waiting for the guest's answer until `deadline`.
    pub fn local_init(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
    ) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, State::LocalInit);
        c.deadline = Some(deadline);
        c
    }

    /// A guest-initiated connection, already connected on the host side.
    pub fn peer_init(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        peer_buf_alloc: u32,
        peer_fwd_cnt: u32,
    ) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, State::Established);
        c.update_peer_credit(peer_buf_alloc, peer_fwd_cnt);
        c
    }

    /// The guest accepted a host-initiated connection: queue `OK <port>\n` for the host.
    pub fn establish(&mut self) {
        self.state = State::Established;
        self.deadline = None;
        self.reply_pos = 0;
        self.reply_end = ok_reply(self.local_port, &mut self.reply);
    }

    /// Our `fwd_cnt`, for headers going to the guest.
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt.0
    }

    /// A header carrying our current `fwd_cnt` is going to the guest.
    pub fn note_fwd_cnt_sent(&mut self) {
        self.last_fwd_cnt_sent = self.fwd_cnt;
    }

    /// Every guest header carries the guest's receive buffer state.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        // A guest claiming to have consumed more than we sent gets no credit (the subtraction
        // wraps to a huge in-flight count); that only stalls its own connection.
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn reply_pending(&self) -> bool {
        self.reply_pos < self.reply_end
    }

    /// Whether host data may be read for the guest (credit and rx buffers aside).
    fn may_read_host(&self) -> bool {
        self.state == State::Established && !self.host_eof && !self.guest_shut_rcv
    }

    /// The epoll interest the connection needs now.
    pub fn wanted_interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.may_read_host() && !self.rx_blocked && self.peer_credit() > 0 {
            set |= EventSet::IN;
        }
        if self.reply_pending() || !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Whether the rx path may read more now (checked per packet).
    pub fn can_send_to_guest(&self) -> bool {
        self.may_read_host() && self.peer_credit() > 0
    }

    /// An `OP_RW` payload from the guest: written to the host stream, the rest buffered.
    pub fn recv_from_guest<B: BitmapSlice>(
        &mut self,
        data: &VolatileSlice<'_, B>,
    ) -> Result<(), ConnError> {
        if self.guest_shut_send {
            return Err(ConnError::DataAfterShutdown);
        }
        let len = data.len();
        if self.tx_buf.len() + len > BUF_ALLOC as usize {
            return Err(ConnError::CreditExceeded {
                len,
                buffered: self.tx_buf.len(),
            });
        }
        let mut off = 0;
        if !self.reply_pending() && self.tx_buf.is_empty() {
            while off < len {
                let mut w = &self.stream;
                match w.write_volatile(&data.subslice(off, len - off)?) {
                    Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                    Ok(n) => {
                        off += n;
                        self.fwd_cnt += n as u32;
                    }
                    Err(VolatileMemoryError::IOError(e)) => match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => continue,
                        _ => return Err(e.into()),
                    },
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if off < len {
            self.tx_buf.push(&data.subslice(off, len - off)?)?;
        }
        Ok(())
    }

    /// Writes what waits for the host stream; completes a pending `shutdown(Write)`.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.reply_pending() {
            match (&self.stream).write(&self.reply[self.reply_pos..self.reply_end]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.reply_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        while !self.tx_buf.is_empty() {
            match (&self.stream).write(self.tx_buf.front()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.consume(n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.guest_shut_send && !self.host_write_shut {
            self.host_write_shut = true;
            match self.stream.shutdown(Shutdown::Write) {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// `OP_SHUTDOWN` from the guest. Shutdown is one-way: flags are never cleared.
    pub fn shutdown_from_guest(&mut self, flags: u32) -> io::Result<()> {
        self.guest_shut_rcv |= flags & super::packet::SHUTDOWN_RCV != 0;
        self.guest_shut_send |= flags & super::packet::SHUTDOWN_SEND != 0;
        self.flush()
    }

    /// Reads host data straight into a guest rx buffer, within the guest's credit.
    pub fn read_to_guest<B: BitmapSlice>(&mut self, dst: &VolatileSlice<'_, B>) -> RxRead {
        let max = dst
            .len()
            .min(self.peer_credit() as usize)
            .min(super::packet::MAX_PKT_LEN as usize);
        let mut dst = match dst.subslice(0, max) {
            Ok(d) => d,
            Err(e) => return RxRead::Error(io::Error::other(e)),
        };
        loop {
            let mut r = &self.stream;
            return match r.read_volatile(&mut dst) {
                Ok(0) => {
                    self.host_eof = true;
                    RxRead::Eof
                }
                Ok(n) => {
                    self.rx_cnt += n as u32;
                    RxRead::Data(n as u32)
                }
                Err(VolatileMemoryError::IOError(e)) => match e.kind() {
                    io::ErrorKind::WouldBlock => RxRead::WouldBlock,
                    io::ErrorKind::Interrupted => continue,
                    _ => RxRead::Error(e),
                },
                Err(e) => RxRead::Error(io::Error::other(e)),
            };
        }
    }

    /// Whether the guest may be starved of credit: we forwarded half a buffer since it last
    /// heard our `fwd_cnt`.
    pub fn wants_credit_update(&self) -> bool {
        !self.credit_update_queued
            && !self.guest_shut_send
            && (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= BUF_ALLOC / 2
    }

    /// Both directions are finished: guest → host flushed and shut down, host → guest at end
    /// of file or refused by the guest.
    pub fn is_done(&self) -> bool {
        self.host_write_shut && (self.host_eof || self.guest_shut_rcv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(b: &mut [u8]) -> VolatileSlice<'_, ()> {
        VolatileSlice::from(b)
    }

    #[test]
    fn tx_buf_wraps_around() {
        let mut t = TxBuf::default();
        let mut chunk = vec![7u8; BUF_ALLOC as usize - 10];
        t.push(&slice(&mut chunk)).unwrap();
        t.consume(BUF_ALLOC as usize - 20);
        let mut tail: Vec<u8> = (0..30).collect();
        t.push(&slice(&mut tail)).unwrap();
        assert_eq!(t.len(), 40);
        let mut out = t.front().to_vec();
        let n = out.len();
        t.consume(n);
        out.extend_from_slice(t.front());
        let n = t.front().len();
        t.consume(n);
        assert!(t.is_empty());
        assert_eq!(&out[..10], &[7u8; 10]);
        assert_eq!(&out[10..], &tail[..]);
    }

    #[test]
    fn tx_buf_refuses_overflow() {
        let mut t = TxBuf::default();
        let mut big = vec![0u8; BUF_ALLOC as usize];
        t.push(&slice(&mut big)).unwrap();
        let mut one = [1u8];
        assert!(matches!(
            t.push(&slice(&mut one)),
            Err(ConnError::CreditExceeded { .. })
        ));
    }

    #[test]
    fn credit_accounting() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Connection::peer_init(a, 1, 2, 1000, 0);
        assert_eq!(c.peer_credit(), 1000);
        c.rx_cnt += 600;
        assert_eq!(c.peer_credit(), 400);
        c.update_peer_credit(1000, 600);
        assert_eq!(c.peer_credit(), 1000);
        // Wrapping counters.
        c.rx_cnt = Wrapping(u32::MAX - 5);
        c.update_peer_credit(100, u32::MAX - 50);
        c.rx_cnt += 20; // wraps
        assert_eq!(c.peer_credit(), 100 - 65);
        // A lying fwd_cnt gives no credit rather than a huge one.
        c.update_peer_credit(100, c.rx_cnt.0.wrapping_add(10));
        assert_eq!(c.peer_credit(), 0);
    }
}
