//! End-to-end tests without a real guest: the "guest" is a set of mock split queues on guest
//! memory, the host side real Unix sockets in a temporary directory.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::device::TXQ;
use super::muxer::FIRST_LOCAL_PORT;
use super::packet::*;
use super::*;
use crate::devices::virtio::{IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING};

const GUEST_CID: u64 = 3;
const QSIZE: u16 = 256;
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

/// Adds a descriptor chain `(addr, len, device-writable)` to a mock queue's avail ring.
fn add_chain(
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    next: &mut u16,
    descs: &[(u64, u32, bool)],
) -> u16 {
    let head = *next;
    for (i, &(addr, len, write)) in descs.iter().enumerate() {
        let idx = (head + i as u16) % QSIZE;
        let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        if i + 1 < descs.len() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        let desc = SplitDescriptor::new(addr, len, flags, (idx + 1) % QSIZE);
        vq.desc_table()
            .store(idx, RawDescriptor::from(desc))
            .unwrap();
    }
    *next = (head + descs.len() as u16) % QSIZE;
    let avail = vq.avail().idx().load();
    vq.avail()
        .ring()
        .ref_at((avail % QSIZE) as usize)
        .unwrap()
        .store(head);
    vq.avail().idx().store(avail.wrapping_add(1));
    head
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
        dev.set_acked_features(VIRTIO_F_VERSION_1);
        let queue = |vq: &MockSplitQueue<'_, GuestMemoryMmap>, used: u64| {
            let mut q: Queue = vq.create_queue().unwrap();
            q.set_used_ring_address(Some(used as u32), Some(0));
            q
        };
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

fn used_idx(mem: &GuestMemoryMmap, used_ring: u64) -> u16 {
    mem.read_obj::<u16>(GuestAddress(used_ring + 2)).unwrap()
}

/// Used ring element `i`: (descriptor id, length).
fn used_elem(mem: &GuestMemoryMmap, used_ring: u64, i: u16) -> (u32, u32) {
    let at = used_ring + 4 + 8 * u64::from(i % QSIZE);
    let id = mem.read_obj::<u32>(GuestAddress(at)).unwrap();
    let len = mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap();
    (id, len)
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

#[test]
fn host_initiated_connection_end_to_end() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    let irq = guest.activate(&mut dev);

    // The host asks for guest port 1234; the line arrives in two pieces.
    let mut host = UnixStream::connect(&env.uds).unwrap();
    host.set_read_timeout(Some(TIMEOUT)).unwrap();
    host.write_all(b"CONN").unwrap();
    guest.provide_rx(16);
    pump(&mut dev);
    assert!(
        guest.recv().is_empty(),
        "nothing before the line is complete"
    );
    host.write_all(b"ECT 1234\n").unwrap();
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_REQUEST]);
    let req = pkts[0].hdr;
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, 1234);
    assert!(req.src_port >= FIRST_LOCAL_PORT);
    assert_eq!(req.type_, TYPE_STREAM);
    assert_eq!(req.buf_alloc, BUF_ALLOC);
    assert_ne!(irq.status() & VIRTIO_MMIO_INT_VRING, 0, "guest interrupted");
    let local = req.src_port;

    // The guest accepts; the host learns the local port.
    guest.send(ghdr(OP_RESPONSE, 1234, local), &[]);
    pump(&mut dev);
    assert_eq!(read_line(&mut host), format!("OK {local}\n"));

    // Host -> guest: 5000 bytes span two 4 KiB rx buffers.
    let h2g = pattern(5000, 1);
    host.write_all(&h2g).unwrap();
    pump(&mut dev);
    let pkts = guest.recv();
    assert!(pkts.len() >= 2);
    assert_eq!(rw_payload(&pkts, local, 1234), h2g);
    assert!(pkts.iter().all(|p| p.hdr.buf_alloc == BUF_ALLOC));

    // Guest -> host, in two packets.
    let g2h = pattern(6000, 2);
    guest.send(rw(1234, local, 3500), &g2h[..3500]);
    guest.send(rw(1234, local, 2500), &g2h[3500..]);
    pump(&mut dev);
    let mut got = vec![0u8; g2h.len()];
    host.read_exact(&mut got).unwrap();
    assert_eq!(got, g2h);

    // The host closes its sending side: the guest sees SHUTDOWN(SEND).
    host.shutdown(std::net::Shutdown::Write).unwrap();
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_SHUTDOWN]);
    assert_ne!(pkts[0].hdr.flags & SHUTDOWN_SEND, 0);

    // The guest closes: both directions are done, the device answers RST and drops it.
    let mut shut = ghdr(OP_SHUTDOWN, 1234, local);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    guest.send(shut, &[]);
    pump(&mut dev);
    assert_eq!(ops(&guest.recv()), [OP_RST]);
    assert!(sees_eof(&mut host));
    assert_eq!(dev.muxer.live(), 0);
    assert_eq!(guest.tx_used(), guest.tx_sent, "every tx buffer returned");
}

#[test]
fn guest_initiated_connection_and_refusal() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);

    let listener = host_listener(&env.uds, 5000);
    let mut peer = establish_guest(&mut dev, &mut guest, &listener, 40, 5000);

    // Data both ways.
    let g2h = pattern(3000, 3);
    guest.send(rw(40, 5000, g2h.len()), &g2h);
    pump(&mut dev);
    let mut got = vec![0u8; g2h.len()];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(got, g2h);
    let h2g = pattern(2000, 4);
    peer.write_all(&h2g).unwrap();
    guest.provide_rx(4);
    pump(&mut dev);
    assert_eq!(rw_payload(&guest.recv(), 5000, 40), h2g);

    // Nobody listens on port 5001: RST.
    guest.provide_rx(1);
    guest.send(ghdr(OP_REQUEST, 41, 5001), &[]);
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_RST]);
    assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (5001, 41));
    assert_eq!(dev.muxer.live(), 1);
}

#[test]
fn guest_shutdown_flushes_then_closes_host_write_side() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    let listener = host_listener(&env.uds, 7000);
    let mut peer = establish_guest(&mut dev, &mut guest, &listener, 50, 7000);

    let data = pattern(1000, 5);
    guest.send(rw(50, 7000, data.len()), &data);
    let mut shut = ghdr(OP_SHUTDOWN, 50, 7000);
    shut.flags = SHUTDOWN_SEND;
    guest.send(shut, &[]);
    pump(&mut dev);
    let mut got = Vec::new();
    peer.read_to_end(&mut got).unwrap();
    assert_eq!(got, data, "data, then EOF");

    // The host may still send; when it closes, the connection is finished.
    guest.provide_rx(4);
    peer.write_all(b"bye").unwrap();
    drop(peer);
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_RW, OP_SHUTDOWN, OP_RST]);
    assert_eq!(pkts[0].data, b"bye");
    assert_eq!(dev.muxer.live(), 0);
}

#[test]
fn malformed_packets_are_dropped_or_reset() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    let listener = host_listener(&env.uds, 5000);
    let mut peer = establish_guest(&mut dev, &mut guest, &listener, 40, 5000);
    guest.provide_rx(32);

    // Foreign source CID, no connection: dropped silently.
    let mut h = ghdr(OP_REQUEST, 41, 5000);
    h.src_cid = 99;
    guest.send(h, &[]);
    // Unknown op: RST.
    guest.send(ghdr(99, 42, 5000), &[]);
    // Unsupported type (SEQPACKET): RST.
    let mut h = ghdr(OP_REQUEST, 43, 5000);
    h.type_ = 2;
    guest.send(h, &[]);
    // Destination other than the host: RST.
    let mut h = ghdr(OP_REQUEST, 45, 5000);
    h.dst_cid = 7;
    guest.send(h, &[]);
    // Header descriptor too short to hold a header: dropped.
    let a = guest.tx_alloc(16);
    guest.send_raw(&[(a, 10, false)]);
    // Device-writable tx header: dropped.
    let a = guest.tx_header(ghdr(OP_REQUEST, 47, 5000));
    guest.send_raw(&[(a, HDR_SIZE as u32, true)]);
    // Header outside guest memory: dropped.
    guest.send_raw(&[(MEM_SIZE as u64 - 8, HDR_SIZE as u32, false)]);
    // Length the descriptors cannot hold, unknown connection: RST.
    let a = guest.tx_header(rw(44, 5000, 1000));
    let d = guest.tx_alloc(16);
    guest.send_raw(&[(a, HDR_SIZE as u32, false), (d, 16, false)]);
    // Data for an unknown connection: RST; RST for an unknown connection: nothing.
    guest.send(rw(46, 5000, 3), b"abc");
    guest.send(ghdr(OP_RST, 48, 5000), &[]);
    pump(&mut dev);
    assert_eq!(guest.tx_used(), guest.tx_sent, "every tx buffer returned");
    let pkts = guest.recv();
    assert!(pkts.iter().all(|p| p.hdr.op == OP_RST), "{pkts:?}");
    let mut reset: Vec<u32> = pkts.iter().map(|p| p.hdr.dst_port).collect();
    reset.sort_unstable();
    assert_eq!(reset, [42, 43, 44, 45, 46]);
    assert_eq!(dev.muxer.live(), 1, "the good connection survived");

    // A huge length on the live connection resets it.
    let a = guest.tx_header(rw(40, 5000, 100_000));
    let d = guest.tx_alloc(16);
    guest.send_raw(&[(a, HDR_SIZE as u32, false), (d, 16, false)]);
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_RST]);
    assert_eq!(pkts[0].hdr.dst_port, 40);
    assert!(sees_eof(&mut peer));
    // So does a protocol violation (a second REQUEST) on another one.
    let mut peer2 = establish_guest(&mut dev, &mut guest, &listener, 60, 5000);
    guest.send(ghdr(OP_REQUEST, 60, 5000), &[]);
    guest.provide_rx(4);
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_RST]);
    assert_eq!(pkts[0].hdr.dst_port, 60);
    assert!(sees_eof(&mut peer2));
    assert_eq!(dev.muxer.live(), 0);
}

#[test]
fn host_to_guest_respects_credit_and_stops_watching() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    let (mut host, local) = establish_host(&mut dev, &mut guest, &env.uds, 1234, 4096);

    let data = pattern(10_000, 6);
    host.write_all(&data).unwrap();
    guest.provide_rx(8);
    pump(&mut dev);
    let first = rw_payload(&guest.recv(), local, 1234);
    assert_eq!(first.len(), 4096, "exactly the guest's credit");
    // Out of credit: the stream is out of the epoll set although data waits, so the event
    // loop is not woken for it (no busy polling).
    assert_eq!(
        dev.muxer.conn_interest(local, 1234),
        Some(EventSet::empty())
    );
    assert_eq!(dev.muxer.ready_events(), 0);

    // The guest consumed it and says so.
    let mut credit = ghdr(OP_CREDIT_UPDATE, 1234, local);
    credit.buf_alloc = 4096;
    credit.fwd_cnt = 4096;
    guest.send(credit, &[]);
    pump(&mut dev);
    let second = rw_payload(&guest.recv(), local, 1234);
    assert_eq!(second.len(), 4096);

    // Any header carries credit, e.g. data the guest sends.
    let mut h = rw(1234, local, 2);
    h.buf_alloc = 4096;
    h.fwd_cnt = 8192;
    guest.send(h, b"hi");
    pump(&mut dev);
    let third = rw_payload(&guest.recv(), local, 1234);
    assert_eq!([first, second, third].concat(), data);
    let mut hi = [0u8; 2];
    host.read_exact(&mut hi).unwrap();
    assert_eq!(&hi, b"hi");
}

#[test]
fn missing_rx_buffers_pause_the_stream_until_the_guest_adds_some() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    // establish_host offers exactly one rx buffer, used by the REQUEST.
    let (mut host, local) = establish_host(&mut dev, &mut guest, &env.uds, 1234, GUEST_BUF_ALLOC);

    host.write_all(b"hello").unwrap();
    pump(&mut dev);
    assert!(guest.recv().is_empty());
    assert_eq!(
        dev.muxer.conn_interest(local, 1234),
        Some(EventSet::empty())
    );
    assert_eq!(
        dev.muxer.ready_events(),
        0,
        "nothing to wake the event loop"
    );

    guest.provide_rx(2);
    dev.process_rx(); // the rx queue notification
    pump(&mut dev);
    assert_eq!(rw_payload(&guest.recv(), local, 1234), b"hello");
    assert_eq!(
        dev.muxer.conn_interest(local, 1234),
        Some(EventSet::IN),
        "watching again"
    );
}

#[test]
fn credit_updates_after_forwarding_and_on_request() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    let listener = host_listener(&env.uds, 5000);
    let mut peer = establish_guest(&mut dev, &mut guest, &listener, 40, 5000);
    peer.set_nonblocking(true).unwrap();
    guest.provide_rx(8);

    // Three 64 KiB packets, within the 256 KiB credit.
    let data = pattern(3 * 65536, 7);
    for chunk in data.chunks(65536) {
        guest.send(rw(40, 5000, chunk.len()), chunk);
    }
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    for _ in 0..1000 {
        pump(&mut dev);
        match peer.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        if got.len() == data.len() {
            break;
        }
    }
    assert_eq!(got, data);
    pump(&mut dev);
    let pkts = guest.recv();
    let updates: Vec<u32> = pkts
        .iter()
        .filter(|p| p.hdr.op == OP_CREDIT_UPDATE)
        .map(|p| p.hdr.fwd_cnt)
        .collect();
    assert!(!updates.is_empty(), "{pkts:?}");
    assert!(updates[0] >= BUF_ALLOC / 2);

    // Asked explicitly, the device tells the exact count.
    guest.send(ghdr(OP_CREDIT_REQUEST, 40, 5000), &[]);
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_CREDIT_UPDATE]);
    assert_eq!(pkts[0].hdr.fwd_cnt, data.len() as u32);
    assert_eq!(pkts[0].hdr.buf_alloc, BUF_ALLOC);
}

#[test]
fn guest_exceeding_credit_is_reset() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    let listener = host_listener(&env.uds, 5000);
    // The host never reads.
    let _peer = establish_guest(&mut dev, &mut guest, &listener, 40, 5000);
    guest.provide_rx(8);

    let chunk = pattern(65536, 8);
    for _ in 0..16 {
        guest.send(rw(40, 5000, chunk.len()), &chunk);
    }
    pump(&mut dev);
    let pkts = guest.recv();
    assert!(ops(&pkts).contains(&OP_RST), "{:?}", ops(&pkts));
    assert_eq!(dev.muxer.live(), 0);
    assert_eq!(guest.tx_used(), guest.tx_sent);
}

#[test]
fn handshake_timeouts_close_host_streams() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    dev.muxer.connect_timeout = Duration::from_millis(50);
    guest.activate(&mut dev);

    // One client whose guest never answers, one that never sends its line.
    let mut answered_never = host_connect(&env.uds, 1234);
    let mut silent = UnixStream::connect(&env.uds).unwrap();
    guest.provide_rx(4);
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_REQUEST]);
    let local = pkts[0].hdr.src_port;
    assert_eq!(dev.muxer.live(), 2);

    std::thread::sleep(Duration::from_millis(120));
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_RST], "the guest forgets the request");
    assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (local, 1234));
    assert!(sees_eof(&mut answered_never));
    assert!(sees_eof(&mut silent));
    assert_eq!(dev.muxer.live(), 0);
    assert_eq!(dev.muxer.ready_events(), 0, "timer consumed, not re-armed");
}

#[test]
fn refused_host_connections_are_closed() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();

    // Before the driver is up: closed at once.
    let mut early = host_connect(&env.uds, 1);
    pump(&mut dev);
    assert!(sees_eof(&mut early));

    guest.activate(&mut dev);
    guest.provide_rx(4);
    // Garbage instead of a CONNECT line.
    let mut garbage = UnixStream::connect(&env.uds).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    // A port that does not parse.
    let mut bad_port = UnixStream::connect(&env.uds).unwrap();
    bad_port.write_all(b"CONNECT 4294967296\n").unwrap();
    // No newline within the limit.
    let mut overlong = UnixStream::connect(&env.uds).unwrap();
    overlong.write_all(&[b' '; 40]).unwrap();
    pump(&mut dev);
    assert!(sees_eof(&mut garbage));
    assert!(sees_eof(&mut bad_port));
    assert!(sees_eof(&mut overlong));
    assert!(guest.recv().is_empty());

    // Nobody listens in the guest: it answers RST, the host stream is closed.
    let mut host = host_connect(&env.uds, 99);
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_REQUEST]);
    guest.send(ghdr(OP_RST, 99, pkts[0].hdr.src_port), &[]);
    pump(&mut dev);
    assert!(sees_eof(&mut host));
    assert!(guest.recv().is_empty(), "no RST in answer to an RST");
    assert_eq!(dev.muxer.live(), 0);
}

#[test]
fn local_ports_are_distinct_and_increasing() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    let (_h1, p1) = establish_host(&mut dev, &mut guest, &env.uds, 1, GUEST_BUF_ALLOC);
    let (_h2, p2) = establish_host(&mut dev, &mut guest, &env.uds, 1, GUEST_BUF_ALLOC);
    assert_eq!(p1, FIRST_LOCAL_PORT);
    assert_eq!(p2, FIRST_LOCAL_PORT + 1);
}

#[test]
fn connection_cap_refuses_with_rst() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    dev.muxer.max_connections = 2;
    guest.activate(&mut dev);
    let listener = host_listener(&env.uds, 6000);
    guest.provide_rx(4);
    for src in 1..=3 {
        guest.send(ghdr(OP_REQUEST, src, 6000), &[]);
    }
    pump(&mut dev);
    assert_eq!(ops(&guest.recv()), [OP_RESPONSE, OP_RESPONSE, OP_RST]);
    assert_eq!(dev.muxer.live(), 2);
    // Host clients beyond the cap are closed too.
    let mut host = host_connect(&env.uds, 1);
    pump(&mut dev);
    assert!(sees_eof(&mut host));
    drop(listener);
}

#[test]
fn device_reset_drops_all_connections() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    let listener = host_listener(&env.uds, 5000);
    let mut peer = establish_guest(&mut dev, &mut guest, &listener, 40, 5000);
    let (mut host, _) = establish_host(&mut dev, &mut guest, &env.uds, 1234, GUEST_BUF_ALLOC);
    assert_eq!(dev.muxer.live(), 2);

    dev.reset();
    assert!(!dev.is_activated());
    assert_eq!(dev.muxer.live(), 0);
    assert!(sees_eof(&mut peer));
    assert!(sees_eof(&mut host));
    // The processing entry points are harmless while reset.
    pump(&mut dev);
}

#[test]
fn constructor_and_config_space() {
    let env = env();
    // Reserved CIDs.
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 32] {
        assert!(matches!(
            Vsock::new(cid, &env.uds),
            Err(VsockError::InvalidCid(c)) if c == cid
        ));
    }
    // A regular file is not replaced.
    std::fs::write(&env.uds, b"precious").unwrap();
    assert!(matches!(
        Vsock::new(GUEST_CID, &env.uds),
        Err(VsockError::NotASocket(_))
    ));
    std::fs::remove_file(&env.uds).unwrap();
    // A stale socket is.
    drop(UnixListener::bind(&env.uds).unwrap());
    assert!(env.uds.exists());
    let dev = Vsock::new(0x1234_5678, &env.uds).unwrap();
    assert_eq!(dev.guest_cid(), 0x1234_5678);
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1);

    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1234_5678);
    let mut b = [0u8; 4];
    dev.read_config(4, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0, "upper half");
    dev.read_config(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x1234_5678, "lower half");
    let mut b = [0u8; 4];
    dev.read_config(6, &mut b);
    assert_eq!(b, [0; 4], "out of range: untouched");
    dev.read_config(u64::MAX, &mut b);

    // Dropping the device removes its socket.
    drop(dev);
    assert!(!env.uds.exists());
}

#[test]
fn event_manager_drives_the_device() {
    fn assert_send<T: Send>() {}
    assert_send::<Vsock>();

    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    // Keep the handshake timer from firing during the test, however slow the machine.
    dev.muxer.connect_timeout = Duration::from_secs(600);
    let irq = guest.activate(&mut dev);
    let dev = Arc::new(Mutex::new(dev));
    let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
    em.add_subscriber(dev.clone());

    let run_until = |em: &mut EventManager<Arc<Mutex<Vsock>>>, guest: &Guest<'_>, n: u16| {
        for _ in 0..50 {
            em.run_with_timeout(20).unwrap();
            if guest.rx_used() >= n {
                return;
            }
        }
        panic!("no rx packet");
    };

    guest.provide_rx(8);
    let mut host = host_connect(&env.uds, 77);
    run_until(&mut em, &guest, 1);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_REQUEST]);
    assert_eq!(pkts[0].hdr.dst_port, 77);
    assert_ne!(irq.status() & VIRTIO_MMIO_INT_VRING, 0);
    let local = pkts[0].hdr.src_port;

    // The guest answers and notifies the tx queue (the transport's ioeventfd would).
    guest.send(ghdr(OP_RESPONSE, 77, local), &[]);
    dev.lock().unwrap().queue_evts[TXQ].write(1).unwrap();
    for _ in 0..5 {
        em.run_with_timeout(20).unwrap();
    }
    assert_eq!(read_line(&mut host), format!("OK {local}\n"));

    host.write_all(b"ping").unwrap();
    run_until(&mut em, &guest, 2);
    assert_eq!(rw_payload(&guest.recv(), local, 77), b"ping");

    // Nothing left to do: the loop sleeps (no busy polling).
    assert_eq!(em.run_with_timeout(50).unwrap(), 0);
}

#[test]
fn paused_stream_that_hangs_up_does_not_wake_the_loop() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    let (mut host, local) = establish_host(&mut dev, &mut guest, &env.uds, 1234, 1000);

    // The host writes more than the guest's credit and hangs up. A paused stream left in the
    // epoll set with an empty mask would still report EPOLLHUP on every wait.
    let data = pattern(2500, 9);
    host.write_all(&data).unwrap();
    drop(host);
    guest.provide_rx(8);
    pump(&mut dev);
    let mut got = rw_payload(&guest.recv(), local, 1234);
    assert_eq!(got.len(), 1000);
    assert_eq!(dev.muxer.ready_events(), 0);

    // Credit comes back: the rest of the data, then SHUTDOWN(SEND); nothing is lost.
    let mut pkts = Vec::new();
    for fwd in [1000, 2000] {
        let mut credit = ghdr(OP_CREDIT_UPDATE, 1234, local);
        credit.buf_alloc = 1000;
        credit.fwd_cnt = fwd;
        guest.send(credit, &[]);
        pump(&mut dev);
        pkts.extend(guest.recv());
    }
    got.extend(rw_payload(&pkts, local, 1234));
    assert_eq!(ops(&pkts), [OP_RW, OP_RW, OP_SHUTDOWN]);
    assert_eq!(got, data);
}

#[test]
fn backed_up_control_queue_stalls_the_tx_queue() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);

    // A guest that sends to unknown connections without offering rx buffers piles up RSTs.
    let mut port = 0;
    let mut send_batch = |guest: &mut Guest<'_>, n: u32| {
        for _ in 0..n {
            port += 1;
            guest.send(ghdr(OP_RW, port, 9999), &[]);
        }
    };
    for _ in 0..10 {
        send_batch(&mut guest, 200);
        dev.process_tx();
    }
    assert_eq!(guest.tx_used(), 2000);
    send_batch(&mut guest, 200);
    dev.process_tx();
    // The queue holds CTL_CAPACITY / 2 = 2048 packets; then the tx queue is left alone.
    assert_eq!(guest.tx_used(), 2048);
    assert!(dev.muxer.ctl_backlogged());

    // The guest takes 100 (the harness's descriptor table holds ~140 rx buffers at a time):
    // the tx queue is served again, up to the limit.
    let mut ports = Vec::new();
    guest.provide_rx(100);
    dev.process_rx();
    ports.extend(guest.recv().iter().map(|p| p.hdr.dst_port));
    assert_eq!(guest.tx_used(), 2148);
    assert!(dev.muxer.ctl_backlogged());
    guest.provide_rx(100);
    dev.process_rx();
    ports.extend(guest.recv().iter().map(|p| p.hdr.dst_port));
    assert_eq!(guest.tx_used(), 2200, "all tx buffers returned");
    assert!(!dev.muxer.ctl_backlogged());
    // Drain the rest: every RST arrives, in order.
    for _ in 0..20 {
        guest.provide_rx(100);
        dev.process_rx();
        ports.extend(guest.recv().iter().map(|p| p.hdr.dst_port));
    }
    assert!(
        ports.iter().copied().eq(1..=2200),
        "{} RSTs, first {:?}",
        ports.len(),
        &ports[..ports.len().min(8)]
    );
}
