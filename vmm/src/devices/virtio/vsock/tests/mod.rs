//! End-to-end tests without a real guest: the "guest" is a set of mock split queues on guest
//! memory, the host side real Unix sockets in a temporary directory.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::device::TXQ;
use super::muxer::FIRST_LOCAL_PORT;
use super::packet::*;
use super::*;
use crate::devices::virtio::test_utils::{
    add_chain, queue_with_used_ring, used_elem, used_idx, QSIZE,
};
use crate::devices::virtio::{
    IrqTrigger, Subscriber, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
};

const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 0x100_0000;
const RX_BUF_BASE: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x2000;
const RX_DATA_LEN: u32 = 4096;
const TX_BUF_BASE: u64 = 0x40_0000;
const TX_BUF_END: u64 = 0xf0_0000;
const GUEST_BUF_ALLOC: u32 = 256 * 1024;
/// Where the queues live: (descriptor table and avail ring from `MockSplitQueue`, used ring).
/// The used rings are placed by hand: virtio-queue 0.18's mock computes the end of the avail ring
/// as `start + len` (elements, not bytes), so its used ring overlaps avail slots `len/2..` and a
/// test using more than half of a 256-entry ring corrupts its own avail ring.
const RXQ_AT: (u64, u64) = (0, 0x2000);
const TXQ_AT: (u64, u64) = (0x8000, 0xa000);
const EVQ_AT: (u64, u64) = (0x1_0000, 0x1_2000);
const TIMEOUT: Duration = Duration::from_secs(5);

/// A packet the device put on the rx queue.
#[derive(Debug)]
struct Pkt {
    hdr: Header,
    data: Vec<u8>,
}

/// The guest driver's side of the three queues.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rxq: MockSplitQueue<'a, GuestMemoryMmap>,
    txq: MockSplitQueue<'a, GuestMemoryMmap>,
    evq: MockSplitQueue<'a, GuestMemoryMmap>,
    rx_next_desc: u16,
    rx_used_seen: u16,
    rx_slot: u64,
    /// Head descriptor index -> (header address, data address).
    rx_bufs: HashMap<u16, (u64, u64)>,
    tx_next_desc: u16,
    tx_next_addr: u64,
    tx_sent: u16,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self {
            mem,
            rxq: MockSplitQueue::create(mem, GuestAddress(RXQ_AT.0), QSIZE),
            txq: MockSplitQueue::create(mem, GuestAddress(TXQ_AT.0), QSIZE),
            evq: MockSplitQueue::create(mem, GuestAddress(EVQ_AT.0), QSIZE),
            rx_next_desc: 0,
            rx_used_seen: 0,
            rx_slot: 0,
            rx_bufs: HashMap::new(),
            tx_next_desc: 0,
            tx_next_addr: TX_BUF_BASE,
            tx_sent: 0,
        }
    }

    /// Activates `dev` on these queues, like the transport does at DRIVER_OK.
    fn activate(&self, dev: &mut Vsock) -> Arc<IrqTrigger> {
        let irq = Arc::new(IrqTrigger::new().unwrap());
        dev.core.set_acked_features(VIRTIO_F_VERSION_1);
        let queue = queue_with_used_ring;
        let queues = vec![
            queue(&self.rxq, RXQ_AT.1),
            queue(&self.txq, TXQ_AT.1),
            queue(&self.evq, EVQ_AT.1),
        ];
        dev.activate(self.mem.clone(), queues, irq.clone()).unwrap();
        irq
    }

    /// Offers `n` rx buffers: a header descriptor and a 4 KiB data descriptor each (every
    /// fourth one as a single descriptor holding both, as Linux 6.2+ does).
    fn provide_rx(&mut self, n: usize) {
        for _ in 0..n {
            let base = RX_BUF_BASE + (self.rx_slot % u64::from(QSIZE)) * RX_SLOT;
            let data = base + HDR_SIZE as u64;
            let head = if self.rx_slot % 4 == 3 {
                let len = HDR_SIZE as u32 + RX_DATA_LEN;
                add_chain(&self.rxq, &mut self.rx_next_desc, &[(base, len, true)])
            } else {
                add_chain(
                    &self.rxq,
                    &mut self.rx_next_desc,
                    &[(base, HDR_SIZE as u32, true), (data, RX_DATA_LEN, true)],
                )
            };
            self.rx_bufs.insert(head, (base, data));
            self.rx_slot += 1;
        }
    }

    /// Packets the device returned on the rx queue since the last call.
    fn recv(&mut self) -> Vec<Pkt> {
        let mut out = Vec::new();
        while self.rx_used_seen != self.rx_used() {
            let (id, len) = used_elem(self.mem, RXQ_AT.1, self.rx_used_seen);
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
            let (hdr_addr, data_addr) = self.rx_bufs[&(id as u16)];
            let len = len as usize;
            assert!(len >= HDR_SIZE, "short rx packet: {len} bytes");
            let mut b = [0u8; HDR_SIZE];
            self.mem.read_slice(&mut b, GuestAddress(hdr_addr)).unwrap();
            let hdr = Header::from_bytes(&b);
            assert_eq!(
                hdr.len as usize,
                len - HDR_SIZE,
                "used length matches header"
            );
            let mut data = vec![0u8; len - HDR_SIZE];
            self.mem
                .read_slice(&mut data, GuestAddress(data_addr))
                .unwrap();
            out.push(Pkt { hdr, data });
        }
        out
    }

    fn tx_alloc(&mut self, len: usize) -> u64 {
        let len = (len as u64 + 63) & !63;
        if self.tx_next_addr + len > TX_BUF_END {
            self.tx_next_addr = TX_BUF_BASE;
        }
        let addr = self.tx_next_addr;
        self.tx_next_addr += len.max(64);
        addr
    }

    /// Queues a packet on the tx queue: header descriptor plus data descriptor.
    fn send(&mut self, hdr: Header, data: &[u8]) {
        let h = self.tx_alloc(HDR_SIZE);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .unwrap();
        if data.is_empty() {
            self.send_raw(&[(h, HDR_SIZE as u32, false)]);
        } else {
            let d = self.tx_alloc(data.len());
            self.mem.write_slice(data, GuestAddress(d)).unwrap();
            self.send_raw(&[(h, HDR_SIZE as u32, false), (d, data.len() as u32, false)]);
        }
    }

    /// Queues an arbitrary tx chain.
    fn send_raw(&mut self, descs: &[(u64, u32, bool)]) {
        add_chain(&self.txq, &mut self.tx_next_desc, descs);
        self.tx_sent = self.tx_sent.wrapping_add(1);
    }

    /// Writes a header into fresh tx memory and returns its address.
    fn tx_header(&mut self, hdr: Header) -> u64 {
        let h = self.tx_alloc(HDR_SIZE);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .unwrap();
        h
    }

    fn tx_used(&self) -> u16 {
        used_idx(self.mem, TXQ_AT.1)
    }

    fn rx_used(&self) -> u16 {
        used_idx(self.mem, RXQ_AT.1)
    }
}

fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A header from the guest.
fn ghdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

fn rw(src_port: u32, dst_port: u32, len: usize) -> Header {
    Header {
        len: len as u32,
        ..ghdr(OP_RW, src_port, dst_port)
    }
}

/// Runs every processing entry point a few times, as the event loop would.
fn pump(dev: &mut Vsock) {
    for _ in 0..4 {
        dev.process_tx();
        dev.process_rx();
        dev.process_backend();
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 251) as u8)
        .collect()
}

fn host_connect(uds: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    s
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8];
    while line.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut b).unwrap(), 1, "EOF before the newline");
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Whether the peer closed: reads until EOF (true) or an error / timeout (false).
fn sees_eof(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return e.kind() == ErrorKind::ConnectionReset,
        }
    }
}

fn rw_payload(pkts: &[Pkt], local: u32, peer: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pkts.iter().filter(|p| p.hdr.op == OP_RW) {
        assert_eq!((p.hdr.src_port, p.hdr.dst_port), (local, peer));
        assert_eq!((p.hdr.src_cid, p.hdr.dst_cid), (HOST_CID, GUEST_CID));
        out.extend_from_slice(&p.data);
    }
    out
}

fn ops(pkts: &[Pkt]) -> Vec<u16> {
    pkts.iter().map(|p| p.hdr.op).collect()
}

struct Env {
    _dir: tempfile::TempDir,
    uds: PathBuf,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    Env { _dir: dir, uds }
}

/// A host listener for guest connections to `port`.
fn host_listener(uds: &Path, port: u32) -> UnixListener {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    UnixListener::bind(p).unwrap()
}

/// Opens a host-initiated connection to guest port `port` and completes the handshake.
/// Returns the host stream and the local port.
fn establish_host(
    dev: &mut Vsock,
    guest: &mut Guest<'_>,
    uds: &Path,
    port: u32,
    guest_buf_alloc: u32,
) -> (UnixStream, u32) {
    let mut host = host_connect(uds, port);
    guest.provide_rx(1);
    pump(dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_REQUEST]);
    let local = pkts[0].hdr.src_port;
    let resp = Header {
        buf_alloc: guest_buf_alloc,
        ..ghdr(OP_RESPONSE, port, local)
    };
    guest.send(resp, &[]);
    pump(dev);
    assert_eq!(read_line(&mut host), format!("OK {local}\n"));
    (host, local)
}

/// Opens a guest-initiated connection from guest port `src` to host port `port`.
fn establish_guest(
    dev: &mut Vsock,
    guest: &mut Guest<'_>,
    listener: &UnixListener,
    src: u32,
    port: u32,
) -> UnixStream {
    guest.provide_rx(1);
    guest.send(ghdr(OP_REQUEST, src, port), &[]);
    pump(dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_RESPONSE]);
    assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (port, src));
    let (peer, _) = listener.accept().unwrap();
    peer.set_read_timeout(Some(TIMEOUT)).unwrap();
    peer
}

mod lifecycle;
mod streams;
