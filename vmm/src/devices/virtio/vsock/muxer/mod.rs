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
//!
//! This file holds the muxer's state and its host events; `tx.rs` handles the guest's packets,
//! `rx.rs` fills the guest's rx queue, and `slots.rs` keeps the host streams' slots.

mod rx;
mod slots;
mod tx;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, error};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::Connection;
use super::handshake::LineBuf;
use super::{VsockError, CONNECT_TIMEOUT, MAX_CONNECTIONS};

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
