//! The slots of host streams: accepting host clients, their `CONNECT` handshake and its timer,
//! slot allocation and removal, epoll interest, control-packet queueing and local ports.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use tracing::{debug, error, warn};
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::super::connection::Connection;
use super::super::handshake::{LineBuf, Parse};
use super::super::packet::{op_name, OP_CREDIT_UPDATE, OP_REQUEST, OP_RST};
use super::{
    CtlPkt, Entry, PendingHost, Slot, VsockMuxer, ACCEPTS_PER_EVENT, CTL_CAPACITY,
    FIRST_LOCAL_PORT, LISTENER_RETRY, TOKEN_LISTENER,
};

impl VsockMuxer {
    pub(super) fn accept_clients(&mut self) {
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
    pub(super) fn read_handshake(&mut self, idx: u32) {
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
    pub(super) fn on_timer(&mut self) {
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

    pub(super) fn arm_timer(&mut self, at: Instant) {
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

    pub(super) fn token(&self, idx: u32) -> u64 {
        (u64::from(self.slots[idx as usize].gen) << 32) | u64::from(idx)
    }

    pub(super) fn conn_mut(&mut self, idx: u32) -> Option<&mut Connection> {
        match self.slots.get_mut(idx as usize) {
            Some(Slot {
                entry: Entry::Conn(c),
                ..
            }) => Some(c),
            _ => None,
        }
    }

    pub(super) fn insert(&mut self, entry: Entry) -> u32 {
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
    pub(super) fn take_slot(&mut self, idx: u32) -> Entry {
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
    pub(super) fn remove_slot(&mut self, idx: u32) {
        drop(self.take_slot(idx));
    }

    /// Drops slot `idx`; for a connection, the guest gets an `OP_RST`.
    pub(super) fn reset_slot(&mut self, idx: u32) {
        if let Entry::Conn(c) = self.take_slot(idx) {
            self.queue_ctl(c.local_port, c.peer_port, OP_RST, 0);
        }
    }

    /// After a connection changed: finish it, ask for credit, or adjust its epoll interest.
    pub(super) fn post_update(&mut self, idx: u32) {
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

    pub(super) fn queue_credit_update(&mut self, idx: u32) {
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
    pub(super) fn update_interest(&mut self, idx: u32) {
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

    pub(super) fn ctl_has_room(&self) -> bool {
        self.ctl.len() < CTL_CAPACITY
    }

    /// Queues a control packet for the guest. Returns false (and drops it) when the queue is
    /// full, which takes a guest that sends without ever taking rx buffers.
    pub(super) fn queue_ctl(
        &mut self,
        local_port: u32,
        peer_port: u32,
        op: u16,
        flags: u32,
    ) -> bool {
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
    pub(super) fn alloc_local_port(&mut self) -> u32 {
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
}
