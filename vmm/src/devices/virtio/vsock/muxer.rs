//! The host side of the device: the listening socket, the table of host streams, the control
//! packets waiting for the guest, and a private epoll set (plus a timerfd) that watches them.
//!
//! Every host stream has a slot: a host client still sending its `CONNECT` line, or a
//! connection. Slots are addressed by index; epoll events carry `generation << 32 | index`, so an
//! event still in hand for a slot that was freed and reused in the same round is recognised as
//! stale. Connections are found from guest packets by `(local port, peer port)`.
//!
//! Whatever the guest can trigger at will (malformed packets, protocol violations, unusable
//! buffers) is logged at `debug` level only, so that a guest cannot flood the host's logs.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, RxRead, State};
use super::handshake::{LineBuf, Parse};
use super::packet::{
    op_name, peek_header, write_header, Header, HDR_SIZE, HOST_CID, MAX_PKT_LEN, OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_SEND,
    TYPE_STREAM,
};
use super::{VsockError, BUF_ALLOC, CONNECT_TIMEOUT, MAX_CONNECTIONS};

/// First local port handed to host-initiated connections; the counter wraps back to it.
pub(super) const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Control packets that may wait for rx buffers. Each connection has at most a few in the queue
/// at a time; refusals and resets of unknown connections take the rest.
const CTL_CAPACITY: usize = 4 * MAX_CONNECTIONS;
/// Above this many waiting control packets the tx queue is left alone (the guest's own sends
/// wait in its ring) until the guest takes some.
const CTL_TX_STALL: usize = CTL_CAPACITY / 2;
/// Epoll events handled per round; more stay ready for the next round.
const EVENTS_PER_ROUND: usize = 64;
/// Connections accepted per listener event.
const ACCEPTS_PER_EVENT: usize = 32;
/// Rx packets filled per stream event, so one busy stream cannot starve the others.
const RX_PKTS_PER_EVENT: usize = 16;
/// Back-off for the listener after `accept` failed for want of resources (EMFILE and the like):
/// the listener is taken out of the epoll set meanwhile, as it would stay readable.
const LISTENER_RETRY: Duration = Duration::from_millis(200);

const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_TIMER: u64 = u64::MAX - 1;

/// A control packet waiting for an rx buffer. Credit fields are filled in when it goes out.
#[derive(Clone, Copy, Debug)]
struct CtlPkt {
    local_port: u32,
    peer_port: u32,
    op: u16,
    flags: u32,
}

/// The guest's rx queue, lent to the muxer for one round.
pub(super) struct GuestRx<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub queue: &'a mut Queue,
    /// Whether a buffer was returned to the guest (it may need an interrupt).
    pub used: bool,
}

impl GuestRx<'_> {
    fn add_used(&mut self, head: u16, len: u32) {
        if let Err(e) = self.queue.add_used(self.mem, head, len) {
            guest_warn!("vsock: cannot return rx descriptor {head}: {e}");
        }
        self.used = true;
    }
}

/// A host client that connected to the listening socket and is sending its `CONNECT` line.
#[derive(Debug)]
struct PendingHost {
    stream: UnixStream,
    line: LineBuf,
    deadline: Instant,
}

#[derive(Debug)]
enum Entry {
    Free,
    Pending(PendingHost),
    Conn(Connection),
}

#[derive(Debug)]
struct Slot {
    gen: u32,
    entry: Entry,
}

pub(super) struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    /// Device and inode of the socket we bound, so that drop only removes our own file.
    uds_id: (u64, u64),
    listener: UnixListener,
    /// Set while the listener is out of the epoll set after an `accept` failure.
    listener_retry: Option<Instant>,
    epoll: Epoll,
    timer: TimerFd,
    timer_at: Option<Instant>,
    /// Whether the device is activated (guest driver up); host clients are refused otherwise.
    guest_active: bool,
    pub(super) connect_timeout: Duration,
    pub(super) max_connections: usize,
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    by_key: HashMap<(u32, u32), u32>,
    ctl: VecDeque<CtlPkt>,
    next_port: u32,
    /// Some rx path found no rx buffer; blocked connections resume when the guest adds some.
    rx_starved: bool,
    events: [EpollEvent; EVENTS_PER_ROUND],
}

impl VsockMuxer {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        fn sys(what: &'static str) -> impl Fn(io::Error) -> VsockError {
            move |source| VsockError::Sys { what, source }
        }
        let epoll = Epoll::new().map_err(sys("an epoll set"))?;
        let timer = TimerFd::new()
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
            .map_err(sys("a timerfd"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_TIMER),
            )
            .map_err(sys("the timer's epoll registration"))?;
        let listener = bind_listener(uds_path)?;
        let setup = || -> Result<_, VsockError> {
            let meta = std::fs::symlink_metadata(uds_path).map_err(|source| VsockError::Bind {
                path: uds_path.to_owned(),
                source,
            })?;
            listener
                .set_nonblocking(true)
                .map_err(sys("a non-blocking listener"))?;
            epoll
                .ctl(
                    ControlOperation::Add,
                    listener.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
                )
                .map_err(sys("the listener's epoll registration"))?;
            Ok(meta)
        };
        let meta = match setup() {
            Ok(meta) => meta,
            Err(e) => {
                // Do not leave the socket we just bound behind.
                let _ = std::fs::remove_file(uds_path);
                return Err(e);
            }
        };
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            uds_id: (meta.dev(), meta.ino()),
            listener,
            listener_retry: None,
            epoll,
            timer,
            timer_at: None,
            guest_active: false,
            connect_timeout: CONNECT_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            by_key: HashMap::new(),
            ctl: VecDeque::with_capacity(CTL_CAPACITY),
            next_port: FIRST_LOCAL_PORT,
            rx_starved: false,
            events: [EpollEvent::default(); EVENTS_PER_ROUND],
        })
    }

    /// The epoll fd to watch: readable whenever a host stream, the listener or the timer is.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Starts or stops serving the guest. Stopping (device reset) drops every host stream.
    pub fn set_guest_active(&mut self, active: bool) {
        if !active {
            for idx in 0..self.slots.len() {
                self.remove_slot(idx as u32);
            }
            self.ctl.clear();
            self.rx_starved = false;
        }
        self.guest_active = active;
    }

    /// Whether so many control packets wait that the tx queue should be left alone.
    pub fn ctl_backlogged(&self) -> bool {
        self.ctl.len() >= CTL_TX_STALL
    }

    // ---------------------------------------------------------------------------------------
    // Guest → host: the tx queue.

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
    fn reject(&mut self, hdr: &Header) {
        if let Some(&idx) = self.by_key.get(&(hdr.dst_port, hdr.src_port)) {
            self.reset_slot(idx);
        } else if hdr.src_cid == self.guest_cid && hdr.op != OP_RST {
            self.queue_ctl(hdr.dst_port, hdr.src_port, OP_RST, 0);
        }
    }

    /// `OP_REQUEST` for host port `dst_port`: connect to `<uds_path>_<dst_port>`.
    fn guest_connect(&mut self, hdr: &Header) {
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
    fn conn_packet<B: vm_memory::bitmap::BitmapSlice>(
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

    // ---------------------------------------------------------------------------------------
    // Host → guest: the rx queue.

    /// Puts waiting control packets into rx buffers. Returns whether none is left waiting.
    pub fn flush_ctl(&mut self, rx: &mut GuestRx<'_>) -> bool {
        let mem = rx.mem;
        while let Some(&c) = self.ctl.front() {
            let Some(mut chain) = rx.queue.pop_descriptor_chain(mem) else {
                self.rx_starved = true;
                return false;
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_LEN) {
                Ok(pkt) => pkt,
                Err(e) => {
                    debug!("vsock: unusable rx buffer: {e}");
                    rx.add_used(head, 0);
                    continue;
                }
            };
            let (buf_alloc, fwd_cnt) = match self.by_key.get(&(c.local_port, c.peer_port)) {
                Some(&idx) => match self.conn_mut(idx) {
                    Some(conn) => {
                        conn.note_fwd_cnt_sent();
                        if c.op == OP_CREDIT_UPDATE {
                            conn.credit_update_queued = false;
                        }
                        (BUF_ALLOC, conn.fwd_cnt())
                    }
                    None => (0, 0),
                },
                None => (0, 0),
            };
            let hdr = Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: c.local_port,
                dst_port: c.peer_port,
                len: 0,
                type_: TYPE_STREAM,
                op: c.op,
                flags: c.flags,
                buf_alloc,
                fwd_cnt,
            };
            match write_header(&mut pkt, hdr) {
                Ok(()) => rx.add_used(head, HDR_SIZE as u32),
                Err(e) => {
                    debug!("vsock: cannot write rx header: {e}");
                    rx.add_used(head, 0);
                    continue;
                }
            }
            self.ctl.pop_front();
        }
        true
    }

    /// The guest added rx buffers: send waiting control packets, then let blocked connections
    /// read again.
    pub fn on_rx_buffers(&mut self, rx: &mut GuestRx<'_>) {
        if !self.flush_ctl(rx) || !self.rx_starved {
            return;
        }
        self.rx_starved = false;
        for idx in 0..self.slots.len() as u32 {
            if let Some(conn) = self.conn_mut(idx) {
                if conn.rx_blocked {
                    conn.rx_blocked = false;
                    self.update_interest(idx);
                }
            }
        }
    }

    /// Reads host data for connection `idx` into rx buffers, as credit and buffers allow.
    fn conn_to_guest(&mut self, idx: u32, rx: &mut GuestRx<'_>) {
        // Control packets go before data: data waits while any of them does.
        if !self.flush_ctl(rx) {
            if let Some(conn) = self.conn_mut(idx) {
                conn.rx_blocked = true;
            }
            return;
        }
        let mem = rx.mem;
        let guest_cid = self.guest_cid;
        for _ in 0..RX_PKTS_PER_EVENT {
            let Some(conn) = self.conn_mut(idx) else {
                return;
            };
            if !conn.can_send_to_guest() {
                return;
            }
            let Some(mut chain) = rx.queue.pop_descriptor_chain(mem) else {
                conn.rx_blocked = true;
                self.rx_starved = true;
                return;
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_LEN) {
                Ok(pkt) => pkt,
                Err(e) => {
                    debug!("vsock: unusable rx buffer: {e}");
                    rx.add_used(head, 0);
                    continue;
                }
            };
            let Some(data) = pkt.data_slice().copied() else {
                debug!("vsock: rx buffer without room for data");
                rx.add_used(head, 0);
                continue;
            };
            match conn.read_to_guest(&data) {
                RxRead::Data(n) => {
                    conn.note_fwd_cnt_sent();
                    let hdr = Header {
                        src_cid: HOST_CID,
                        dst_cid: guest_cid,
                        src_port: conn.local_port,
                        dst_port: conn.peer_port,
                        len: n,
                        type_: TYPE_STREAM,
                        op: OP_RW,
                        flags: 0,
                        buf_alloc: BUF_ALLOC,
                        fwd_cnt: conn.fwd_cnt(),
                    };
                    if let Err(e) = write_header(&mut pkt, hdr) {
                        // The data is lost with the packet; the stream cannot go on.
                        debug!("vsock: cannot write rx header: {e}");
                        rx.add_used(head, 0);
                        self.reset_slot(idx);
                        return;
                    }
                    rx.add_used(head, HDR_SIZE as u32 + n);
                }
                RxRead::WouldBlock => {
                    rx.queue.go_to_previous_position();
                    return;
                }
                RxRead::Eof => {
                    rx.queue.go_to_previous_position();
                    let (local, peer) = (conn.local_port, conn.peer_port);
                    self.queue_ctl(local, peer, OP_SHUTDOWN, SHUTDOWN_SEND);
                    return;
                }
                RxRead::Error(e) => {
                    rx.queue.go_to_previous_position();
                    warn!("vsock: host stream read failed: {e}");
                    self.reset_slot(idx);
                    return;
                }
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Host events.

    /// Handles what is ready in the epoll set. `rx` is `None` while the device is not active.
    pub fn process_events(&mut self, mut rx: Option<&mut GuestRx<'_>>) {
        let n = match self.epoll.wait(0, &mut self.events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                error!("vsock: epoll_wait failed: {e}");
                0
            }
        };
        for i in 0..n {
            let ev = self.events[i];
            match ev.data() {
                TOKEN_LISTENER => self.accept_clients(),
                TOKEN_TIMER => self.on_timer(),
                token => {
                    let idx = token as u32;
                    let gen = (token >> 32) as u32;
                    // A generation mismatch means the slot was freed earlier in this round.
                    let (pending, conn) = match self.slots.get(idx as usize) {
                        Some(slot) if slot.gen == gen => (
                            matches!(slot.entry, Entry::Pending(_)),
                            matches!(slot.entry, Entry::Conn(_)),
                        ),
                        _ => (false, false),
                    };
                    if pending {
                        self.read_handshake(idx);
                    } else if conn {
                        self.conn_event(idx, ev.event_set(), rx.as_deref_mut());
                    }
                }
            }
        }
        if let Some(rx) = rx {
            self.flush_ctl(rx);
        }
    }

    fn conn_event(&mut self, idx: u32, set: EventSet, rx: Option<&mut GuestRx<'_>>) {
        let trouble = EventSet::ERROR | EventSet::HANG_UP;
        let Some(conn) = self.conn_mut(idx) else {
            return;
        };
        let interest = conn.interest;
        if interest.contains(EventSet::OUT) && set.intersects(EventSet::OUT | trouble) {
            if let Err(e) = conn.flush() {
                debug!("vsock: host stream write failed: {e}");
                self.reset_slot(idx);
                return;
            }
        }
        if interest.contains(EventSet::IN) && set.intersects(EventSet::IN | trouble) {
            match rx {
                Some(rx) => self.conn_to_guest(idx, rx),
                None => {
                    if let Some(conn) = self.conn_mut(idx) {
                        conn.rx_blocked = true;
                    }
                }
            }
        }
        self.post_update(idx);
    }

    fn accept_clients(&mut self) {
        for _ in 0..ACCEPTS_PER_EVENT {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if !self.guest_active {
                        debug!("vsock: host connection refused: the guest driver is not up");
                        continue;
                    }
                    if self.live >= self.max_connections {
                        warn!("vsock: host connection refused: too many connections");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        warn!("vsock: host connection refused: {e}");
                        continue;
                    }
                    let deadline = Instant::now() + self.connect_timeout;
                    let fd = stream.as_raw_fd();
                    let idx = self.insert(Entry::Pending(PendingHost {
                        stream,
                        line: LineBuf::new(),
                        deadline,
                    }));
                    let ev = EpollEvent::new(EventSet::IN, self.token(idx));
                    if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, ev) {
                        error!("vsock: cannot watch a host connection: {e}");
                        self.remove_slot(idx);
                        continue;
                    }
                    self.arm_timer(deadline);
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => return,
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => {}
                    _ => {
                        // Most likely out of file descriptors. The listener stays readable, so
                        // stop watching it for a while rather than spin.
                        warn!("vsock: accept failed, pausing the listener: {e}");
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            self.listener.as_raw_fd(),
                            EpollEvent::default(),
                        );
                        let at = Instant::now() + LISTENER_RETRY;
                        self.listener_retry = Some(at);
                        self.arm_timer(at);
                        return;
                    }
                },
            }
        }
    }

    /// Reads the `CONNECT` line of host client `idx`, one byte at a time (see `handshake`).
    fn read_handshake(&mut self, idx: u32) {
        let Some(Slot {
            entry: Entry::Pending(p),
            ..
        }) = self.slots.get_mut(idx as usize)
        else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match (&p.stream).read(&mut byte) {
                Ok(0) => break None,
                Ok(_) => match p.line.feed(byte[0]) {
                    Parse::Incomplete => {}
                    Parse::Connect(port) => break Some(port),
                    Parse::Invalid => {
                        warn!("vsock: host client sent an invalid CONNECT line; closing");
                        break None;
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("vsock: host client read failed: {e}");
                    break None;
                }
            }
        };
        let Entry::Pending(p) = self.take_slot(idx) else {
            return;
        };
        let Some(port) = port else {
            return; // Dropping the stream closes it.
        };
        if !self.guest_active || !self.ctl_has_room() {
            warn!("vsock: host connection to guest port {port} refused: guest not ready");
            return;
        }
        let local = self.alloc_local_port();
        let deadline = Instant::now() + self.connect_timeout;
        let conn = Connection::local_init(p.stream, local, port, deadline);
        let idx = self.insert(Entry::Conn(conn));
        self.by_key.insert((local, port), idx);
        self.queue_ctl(local, port, OP_REQUEST, 0);
        self.arm_timer(deadline);
    }

    /// Handshake deadlines and the listener back-off.
    fn on_timer(&mut self) {
        // Consume the expiration. A timer re-armed earlier in this round has had its count
        // reset and is armed again: reading it would block, so only read an expired one.
        if matches!(self.timer.is_armed(), Ok(false)) {
            let _ = self.timer.wait();
        }
        self.timer_at = None;
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        for idx in 0..self.slots.len() as u32 {
            let deadline = match &self.slots[idx as usize].entry {
                Entry::Pending(p) => Some(p.deadline),
                Entry::Conn(c) => c.deadline,
                Entry::Free => None,
            };
            match deadline {
                Some(d) if d <= now => {
                    debug!("vsock: handshake timed out");
                    // Pending: just close. LocalInit: also tell the guest to forget it.
                    self.reset_slot(idx);
                }
                Some(d) => next = Some(next.map_or(d, |n| n.min(d))),
                None => {}
            }
        }
        if let Some(at) = self.listener_retry {
            if at <= now {
                self.listener_retry = None;
                let ev = EpollEvent::new(EventSet::IN, TOKEN_LISTENER);
                if let Err(e) = self
                    .epoll
                    .ctl(ControlOperation::Add, self.listener.as_raw_fd(), ev)
                {
                    error!("vsock: cannot watch the listener again: {e}");
                }
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        if let Some(at) = next {
            self.arm_timer(at);
        }
    }

    fn arm_timer(&mut self, at: Instant) {
        if self.timer_at.is_some_and(|cur| cur <= at) {
            return;
        }
        // A zero duration would disarm the timer.
        let dur = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.timer.reset(dur, None) {
            Ok(()) => self.timer_at = Some(at),
            Err(e) => error!("vsock: cannot arm the handshake timer: {e}"),
        }
    }

    // ---------------------------------------------------------------------------------------
    // Slots and bookkeeping.

    fn token(&self, idx: u32) -> u64 {
        (u64::from(self.slots[idx as usize].gen) << 32) | u64::from(idx)
    }

    fn conn_mut(&mut self, idx: u32) -> Option<&mut Connection> {
        match self.slots.get_mut(idx as usize) {
            Some(Slot {
                entry: Entry::Conn(c),
                ..
            }) => Some(c),
            _ => None,
        }
    }

    fn insert(&mut self, entry: Entry) -> u32 {
        self.live += 1;
        match self.free.pop() {
            Some(idx) => {
                self.slots[idx as usize].entry = entry;
                idx
            }
            None => {
                self.slots.push(Slot { gen: 0, entry });
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Frees slot `idx`, taking its stream out of the epoll set, and returns what it held.
    fn take_slot(&mut self, idx: u32) -> Entry {
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return Entry::Free;
        };
        let entry = std::mem::replace(&mut slot.entry, Entry::Free);
        let fd = match &entry {
            Entry::Free => return entry,
            Entry::Pending(p) => Some(p.stream.as_raw_fd()),
            Entry::Conn(c) => {
                self.by_key.remove(&(c.local_port, c.peer_port));
                (!c.interest.is_empty()).then(|| c.stream.as_raw_fd())
            }
        };
        if let Some(fd) = fd {
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            {
                debug!("vsock: epoll delete: {e}");
            }
        }
        slot.gen = slot.gen.wrapping_add(1);
        self.free.push(idx);
        self.live -= 1;
        entry
    }

    /// Drops slot `idx` silently (closing its host stream).
    fn remove_slot(&mut self, idx: u32) {
        drop(self.take_slot(idx));
    }

    /// Drops slot `idx`; for a connection, the guest gets an `OP_RST`.
    fn reset_slot(&mut self, idx: u32) {
        if let Entry::Conn(c) = self.take_slot(idx) {
            self.queue_ctl(c.local_port, c.peer_port, OP_RST, 0);
        }
    }

    /// After a connection changed: finish it, ask for credit, or adjust its epoll interest.
    fn post_update(&mut self, idx: u32) {
        let Some(conn) = self.conn_mut(idx) else {
            return;
        };
        if conn.is_done() {
            debug!(
                "vsock: connection {} <-> {} closed",
                conn.local_port, conn.peer_port
            );
            self.reset_slot(idx);
            return;
        }
        if conn.wants_credit_update() {
            self.queue_credit_update(idx);
        }
        self.update_interest(idx);
    }

    fn queue_credit_update(&mut self, idx: u32) {
        let Some(conn) = self.conn_mut(idx) else {
            return;
        };
        if conn.credit_update_queued {
            return;
        }
        conn.credit_update_queued = true;
        let (local, peer) = (conn.local_port, conn.peer_port);
        if !self.queue_ctl(local, peer, OP_CREDIT_UPDATE, 0) {
            if let Some(conn) = self.conn_mut(idx) {
                conn.credit_update_queued = false;
            }
        }
    }

    /// Registers, re-registers or deregisters connection `idx`'s stream to match what it needs.
    fn update_interest(&mut self, idx: u32) {
        let token = self.token(idx);
        let Some(Slot {
            entry: Entry::Conn(conn),
            ..
        }) = self.slots.get_mut(idx as usize)
        else {
            return;
        };
        let want = conn.wanted_interest();
        if want == conn.interest {
            return;
        }
        let fd = conn.stream.as_raw_fd();
        let (op, ev) = if want.is_empty() {
            (ControlOperation::Delete, EpollEvent::default())
        } else if conn.interest.is_empty() {
            (ControlOperation::Add, EpollEvent::new(want, token))
        } else {
            (ControlOperation::Modify, EpollEvent::new(want, token))
        };
        match self.epoll.ctl(op, fd, ev) {
            Ok(()) => conn.interest = want,
            Err(e) => {
                error!("vsock: cannot update a host stream's epoll interest: {e}");
                self.reset_slot(idx);
            }
        }
    }

    fn ctl_has_room(&self) -> bool {
        self.ctl.len() < CTL_CAPACITY
    }

    /// Queues a control packet for the guest. Returns false (and drops it) when the queue is
    /// full, which takes a guest that sends without ever taking rx buffers.
    fn queue_ctl(&mut self, local_port: u32, peer_port: u32, op: u16, flags: u32) -> bool {
        if !self.ctl_has_room() {
            debug!("vsock: control queue full; {} dropped", op_name(op));
            return false;
        }
        self.ctl.push_back(CtlPkt {
            local_port,
            peer_port,
            op,
            flags,
        });
        true
    }

    /// The next free local port for a host-initiated connection.
    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_port;
            self.next_port = if port == u32::MAX {
                FIRST_LOCAL_PORT
            } else {
                port + 1
            };
            let in_use = self
                .slots
                .iter()
                .any(|s| matches!(&s.entry, Entry::Conn(c) if c.local_port == port));
            if !in_use {
                return port;
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Introspection for tests.

    /// Epoll interest of the connection `(local_port, peer_port)`, `None` if there is none.
    #[cfg(test)]
    pub fn conn_interest(&self, local_port: u32, peer_port: u32) -> Option<EventSet> {
        let idx = *self.by_key.get(&(local_port, peer_port))?;
        match &self.slots[idx as usize].entry {
            Entry::Conn(c) => Some(c.interest),
            _ => None,
        }
    }

    /// How many host streams (connections and handshaking clients) exist.
    #[cfg(test)]
    pub fn live(&self) -> usize {
        self.live
    }

    /// How many epoll events are ready right now (without handling them).
    #[cfg(test)]
    pub fn ready_events(&self) -> usize {
        let mut evs = [EpollEvent::default(); EVENTS_PER_ROUND];
        self.epoll.wait(0, &mut evs).unwrap_or(0)
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        // Remove the socket file if it is still ours (nobody rebound the path meanwhile).
        if let Ok(meta) = std::fs::symlink_metadata(&self.uds_path) {
            if (meta.dev(), meta.ino()) == self.uds_id {
                let _ = std::fs::remove_file(&self.uds_path);
            }
        }
    }
}

/// Binds the listening socket, replacing a stale socket file.
fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| VsockError::RemoveStale {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(_) => return Err(VsockError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(VsockError::Bind {
                path: path.to_owned(),
                source,
            })
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| VsockError::Bind {
        path: path.to_owned(),
        source,
    })?;
    // Whoever may connect drives the guest's agent: the owner (and root) only, whatever the
    // umask gave the socket file.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        VsockError::Bind {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
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
