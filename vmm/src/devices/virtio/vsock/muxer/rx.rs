//! Host → guest: control packets and connection data put into the guest's rx buffers.

use tracing::{debug, warn};
use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;

use super::super::connection::RxRead;
use super::super::packet::{
    write_header, Header, HDR_SIZE, HOST_CID, MAX_PKT_LEN, OP_CREDIT_UPDATE, OP_RW, OP_SHUTDOWN,
    SHUTDOWN_SEND, TYPE_STREAM,
};
use super::super::BUF_ALLOC;
use super::{GuestRx, VsockMuxer, RX_PKTS_PER_EVENT};

impl VsockMuxer {
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
    pub(super) fn conn_to_guest(&mut self, idx: u32, rx: &mut GuestRx<'_>) {
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
}
