//! The device against a real tap: each test runs in a thread with a network namespace of its own
//! (so tests run in parallel and leave nothing behind), creates the tap through the device, gives
//! the host end an address with `ip`, and drives real descriptor chains in real guest memory.
//! Frames really cross: datagrams from host sockets arrive in the RX queue, frames from the TX
//! queue arrive at host sockets.

use std::collections::HashMap;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::{RXQ, TXQ};
use super::*;
use crate::devices::virtio::test_utils::{
    add_chain, queue_with_used_ring, used_elem, used_idx, QSIZE,
};
use crate::devices::virtio::{
    ActivateError, IrqTrigger, VirtioDevice, VirtioEvents, VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_VRING,
};

const TAP: &str = "mvtest0";
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const HOST_IP: [u8; 4] = [10, 0, 0, 1];
const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
const MEM_SIZE: usize = 0x40_0000;
/// (descriptor table and avail ring, used ring) of each queue.
const RXQ_AT: (u64, u64) = (0, 0x2000);
const TXQ_AT: (u64, u64) = (0x4000, 0x6000);
const RX_BUF_BASE: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x1000;
const TX_BUF: u64 = 0x20_0000;
/// Long enough for any poll or read here never to expire on a working device, however slow the
/// machine: expiring means the frame never came.
const WAIT: Duration = Duration::from_secs(10);

/// Runs `f` in a new thread inside a network namespace of its own.
pub(super) fn in_own_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare(2) with a flag; it affects only this thread.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
        // No IPv6 on the test's interfaces: the kernel's own router and multicast listener
        // solicitations would otherwise land in the RX queue between the test's frames.
        for conf in ["all", "default"] {
            let knob = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
            if std::path::Path::new(&knob).exists() {
                std::fs::write(&knob, "1").unwrap();
            }
        }
        f()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn ip(args: &str) {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("ip (iproute2)");
    assert!(out.status.success(), "ip {args}: {out:?}");
}

fn dotted(a: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

fn colons(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The device on a fresh tap whose host end is `HOST_IP`, with the guest's address resolved
/// statically (the test plays the guest and answers no ARP).
fn device(mtu: u16) -> Net {
    let net = Net::new(TAP, GUEST_MAC, mtu).unwrap();
    ip(&format!("link set {TAP} address {}", colons(HOST_MAC)));
    ip(&format!("addr add {}/24 dev {TAP}", dotted(HOST_IP)));
    ip(&format!("link set {TAP} up"));
    ip(&format!(
        "neigh add {} lladdr {} dev {TAP}",
        dotted(GUEST_IP),
        colons(GUEST_MAC)
    ));
    net
}

/// The guest driver's side of the two queues.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rxq: MockSplitQueue<'a, GuestMemoryMmap>,
    txq: MockSplitQueue<'a, GuestMemoryMmap>,
    rx_next: u16,
    tx_next: u16,
    rx_seen: u16,
    rx_slot: u64,
    /// Head descriptor -> buffer address.
    rx_bufs: HashMap<u16, u64>,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self {
            mem,
            rxq: MockSplitQueue::create(mem, GuestAddress(RXQ_AT.0), QSIZE),
            txq: MockSplitQueue::create(mem, GuestAddress(TXQ_AT.0), QSIZE),
            rx_next: 0,
            tx_next: 0,
            rx_seen: 0,
            rx_slot: 0,
            rx_bufs: HashMap::new(),
        }
    }

    /// Activates `net` with `features` accepted, as the transport does at DRIVER_OK.
    fn activate(&self, net: &mut Net, features: u64) -> Result<Arc<IrqTrigger>, ActivateError> {
        let irq = Arc::new(IrqTrigger::new().unwrap());
        net.core.set_acked_features(features);
        let queues = vec![
            queue_with_used_ring(&self.rxq, RXQ_AT.1),
            queue_with_used_ring(&self.txq, TXQ_AT.1),
        ];
        net.activate(self.mem.clone(), queues, irq.clone())?;
        Ok(irq)
    }

    /// Offers `n` RX buffers of `len` bytes each, one descriptor per buffer.
    fn provide_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let addr = RX_BUF_BASE + (self.rx_slot % u64::from(QSIZE)) * RX_SLOT;
            self.rx_slot += 1;
            let head = add_chain(&self.rxq, &mut self.rx_next, &[(addr, len, true)]);
            self.rx_bufs.insert(head, addr);
        }
    }

    /// Frames the device returned since the last call, with their used lengths.
    fn received(&mut self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        while self.rx_seen != used_idx(self.mem, RXQ_AT.1) {
            let (id, len) = used_elem(self.mem, RXQ_AT.1, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let mut frame = vec![0u8; len as usize];
            let addr = self.rx_bufs[&(id as u16)];
            self.mem.read_slice(&mut frame, GuestAddress(addr)).unwrap();
            frames.push(frame);
        }
        frames
    }

    /// Queues a TX chain; descriptors are `(addr, len, device-writable)`.
    fn send(&mut self, descs: &[(u64, u32, bool)]) {
        add_chain(&self.txq, &mut self.tx_next, descs);
    }

    /// Writes `frame` at `TX_BUF` and queues it as a header descriptor and a frame descriptor,
    /// as Linux does.
    fn send_frame(&mut self, frame: &[u8]) {
        self.mem.write_slice(frame, GuestAddress(TX_BUF)).unwrap();
        let hdr = VNET_HDR_LEN as u32;
        let rest = frame.len() as u32 - hdr;
        self.send(&[(TX_BUF, hdr, false), (TX_BUF + u64::from(hdr), rest, false)]);
    }

    fn tx_used(&self) -> u16 {
        used_idx(self.mem, TXQ_AT.1)
    }
}

/// A chain's descriptors: `(addr, len, device-writable)`.
type Descs = Vec<(u64, u32, bool)>;

fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Runs `f` in a network namespace of its own with the device on a fresh tap, activated with
/// the basic features (no offloads: the tap hands over plain frames).
fn with_device(f: impl FnOnce(&mut Guest<'_>, &mut Net, Arc<IrqTrigger>) + Send + 'static) {
    in_own_netns(move || {
        let mem = guest_mem();
        let mut guest = Guest::new(&mem);
        let mut net = device(1500);
        let irq = guest.activate(&mut net, BASIC).unwrap();
        f(&mut guest, &mut net, irq);
    })
}

const BASIC: u64 =
    VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_MTU | 1 << VIRTIO_NET_F_STATUS;

/// Waits until the tap has a frame for the device (the event loop's edge-triggered wakeup).
fn wait_for_tap(net: &Net) {
    let mut pfd = libc::pollfd {
        fd: net.tap.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, WAIT.as_millis() as libc::c_int) };
    assert_eq!(r, 1, "the tap never became readable");
}

/// What the event loop does when the tap's fd reports readable.
fn tap_ready(net: &mut Net) {
    let events = net.backend_events()[0];
    net.backend_ready(events);
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let sum = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    !((folded & 0xffff) + (folded >> 16)) as u16
}

/// A guest frame: virtio header (no offloads), Ethernet, IPv4, UDP (no checksum), `payload`.
fn udp_frame(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&HOST_IP);
    let sum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&dst_port.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// The payload of a received frame if it is a UDP datagram to `port`.
fn udp_payload(frame: &[u8], port: u16) -> Option<&[u8]> {
    let eth = frame.get(VNET_HDR_LEN..)?;
    if eth.get(12..14)? != [0x08, 0x00] || eth.get(23)? != &17 {
        return None;
    }
    let udp = eth.get(14 + 20..)?;
    (udp.get(2..4)? == port.to_be_bytes()).then(|| &udp[8..])
}

/// The host-side kernel's count of frames it dropped on the way into the tap.
fn tap_tx_dropped() -> u64 {
    let out = Command::new("ip")
        .args(["-j", "-s", "link", "show", TAP])
        .output()
        .unwrap();
    let json = String::from_utf8_lossy(&out.stdout);
    let tx = &json[json.find("\"tx\":{").expect("tx stats")..];
    let dropped = &tx[tx.find("\"dropped\":").unwrap() + 10..];
    dropped[..dropped.find([',', '}']).unwrap()]
        .parse()
        .unwrap()
}

#[test]
fn a_host_datagram_arrives_in_the_rx_queue() {
    with_device(|guest, net, irq| {
        guest.provide_rx(8, 2048);
        net.queue_notified(RXQ);

        let sock = UdpSocket::bind((Ipv4Addr::from(HOST_IP), 0)).unwrap();
        sock.send_to(b"hello, guest", (Ipv4Addr::from(GUEST_IP), 7777))
            .unwrap();
        wait_for_tap(net);
        tap_ready(net);

        let frames = guest.received();
        let frame = frames
            .iter()
            .find(|f| udp_payload(f, 7777).is_some())
            .expect("the datagram did not arrive");
        assert_eq!(udp_payload(frame, 7777).unwrap(), b"hello, guest");
        assert_eq!(frame[VNET_HDR_LEN..VNET_HDR_LEN + 6], GUEST_MAC);
        assert_eq!(frame[10..12], [1, 0], "num_buffers is 1");
        assert_ne!(irq.status() & VIRTIO_MMIO_INT_VRING, 0, "no interrupt");
        assert!(net.stats().rx_frames >= 1);
        assert_eq!(net.stats().rx_dropped, 0);
    });
}

#[test]
fn a_guest_frame_arrives_at_a_host_socket() {
    with_device(|guest, net, _irq| {
        let sock = UdpSocket::bind((Ipv4Addr::from(HOST_IP), 7000)).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();

        guest.send_frame(&udp_frame(4321, 7000, b"hello, host"));
        net.queue_notified(TXQ);

        let mut buf = [0u8; 64];
        let (n, from) = sock.recv_from(&mut buf).expect("the frame did not arrive");
        assert_eq!(&buf[..n], b"hello, host");
        assert_eq!(from, (Ipv4Addr::from(GUEST_IP), 4321).into());
        assert_eq!(guest.tx_used(), 1);
        assert_eq!(net.stats().tx_frames, 1);
    });
}

#[test]
fn malformed_tx_chains_are_dropped_and_returned() {
    with_device(|guest, net, _irq| {
        guest
            .mem
            .write_slice(&udp_frame(1, 7001, b"x"), GuestAddress(TX_BUF))
            .unwrap();
        let too_many: Vec<_> = (0..=MAX_DESCRIPTORS as u64)
            .map(|i| (TX_BUF + 64 * i, 64, false))
            .collect();
        let cases: [(&str, Descs); 5] = [
            (
                "larger than MAX_FRAME",
                vec![(TX_BUF, 40_000, false), (TX_BUF, 30_000, false)],
            ),
            (
                "outside guest memory",
                vec![(MEM_SIZE as u64 - 10, 100, false)],
            ),
            (
                "device-writable descriptor",
                vec![(TX_BUF, 12, false), (TX_BUF + 12, 60, true)],
            ),
            ("too many descriptors", too_many),
            ("header only", vec![(TX_BUF, VNET_HDR_LEN as u32, false)]),
        ];
        for (i, (what, descs)) in cases.iter().enumerate() {
            guest.send(descs);
            net.queue_notified(TXQ);
            assert_eq!(guest.tx_used(), i as u16 + 1, "{what}: chain not returned");
            assert_eq!(net.stats().tx_dropped, i as u64 + 1, "{what}: not dropped");
        }
        assert_eq!(net.stats().tx_frames, 0);

        // The device still works.
        let sock = UdpSocket::bind((Ipv4Addr::from(HOST_IP), 7001)).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        guest.send_frame(&udp_frame(1, 7001, b"still here"));
        net.queue_notified(TXQ);
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).expect("the good frame did not arrive");
        assert_eq!(&buf[..n], b"still here");
    });
}

#[test]
fn unusable_rx_chains_drop_the_frame_not_the_device() {
    with_device(|guest, net, _irq| {
        let sock = UdpSocket::bind((Ipv4Addr::from(HOST_IP), 0)).unwrap();

        // Too small for the frame, then device-readable.
        guest.provide_rx(1, 64);
        let head = add_chain(
            &guest.rxq,
            &mut guest.rx_next,
            &[(RX_BUF_BASE + 0x8_0000, 2048, false)],
        );
        guest.rx_bufs.insert(head, RX_BUF_BASE + 0x8_0000);
        for _ in 0..2 {
            sock.send_to(&[7u8; 200], (Ipv4Addr::from(GUEST_IP), 7002))
                .unwrap();
            wait_for_tap(net);
            net.queue_notified(RXQ);
        }
        let frames = guest.received();
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(|f| f.is_empty()), "used length 0");
        assert_eq!(net.stats().rx_dropped, 2);

        // A good buffer gets the next one.
        guest.provide_rx(1, 2048);
        sock.send_to(b"fits", (Ipv4Addr::from(GUEST_IP), 7002))
            .unwrap();
        wait_for_tap(net);
        net.queue_notified(RXQ);
        let frames = guest.received();
        assert_eq!(udp_payload(&frames[0], 7002), Some(&b"fits"[..]));
    });
}

#[test]
fn an_rx_queue_never_refilled_holds_one_frame_while_the_kernel_drops_the_flood() {
    with_device(|guest, net, _irq| {
        let sock = UdpSocket::bind((Ipv4Addr::from(HOST_IP), 0)).unwrap();
        sock.set_nonblocking(true).unwrap();

        // Three times the tap's queue, the device woken after every datagram as the event loop
        // would be: it takes one frame and then leaves the tap alone.
        for _ in 0..3000 {
            let _ = sock.send_to(&[1u8; 1000], (Ipv4Addr::from(GUEST_IP), 7003));
            tap_ready(net);
        }
        assert!(net.rx.pending() > 0, "one frame waits for a buffer");
        assert_eq!(net.stats().rx_frames, 0);
        assert!(tap_tx_dropped() > 0, "the kernel dropped nothing");

        // Buffers come: the waiting frame and the next ones go into them, and one waits again.
        guest.provide_rx(16, 2048);
        net.queue_notified(RXQ);
        assert_eq!(guest.received().len(), 16);
        assert!(net.rx.pending() > 0);
    });
}

#[test]
fn config_space_mtu_and_offloads() {
    in_own_netns(|| {
        let mut net = device(1400);
        let read = |offset, len| {
            let mut buf = vec![0u8; len];
            net.read_config(offset, &mut buf);
            buf
        };
        assert_eq!(read(0, 6), GUEST_MAC);
        assert_eq!(read(6, 2), [1, 0], "LINK_UP");
        assert_eq!(read(10, 2), 1400u16.to_le_bytes());
        assert_eq!(read(12, 4), [0; 4]);
        let out = Command::new("ip")
            .args(["link", "show", TAP])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("mtu 1400"));

        // This host's tap takes checksum and TSO offloads, so they are offered.
        let offered = net.core.avail_features();
        let csum_tso4 = 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4;
        assert_eq!(offered & csum_tso4, csum_tso4);

        // A driver that accepts TSO without checksum offload is refused by the tap; one without
        // VERSION_1 by the device.
        let mem = guest_mem();
        let guest = Guest::new(&mem);
        let err = guest
            .activate(&mut net, BASIC | 1 << VIRTIO_NET_F_GUEST_TSO4)
            .unwrap_err();
        assert!(matches!(err, ActivateError::Backend(_)), "{err}");
        let err = guest
            .activate(&mut net, BASIC & !VIRTIO_F_VERSION_1)
            .unwrap_err();
        assert!(matches!(err, ActivateError::MissingFeature(_)), "{err}");
        assert!(!net.core.is_activated());
        guest.activate(&mut net, BASIC | csum_tso4).unwrap();
    });
}

#[test]
fn bad_configurations_are_refused() {
    for (mac, mtu) in [
        (GUEST_MAC, 60),
        ([0x03, 0, 0, 0, 0, 1], 1500),
        ([0; 6], 1500),
    ] {
        assert!(Net::new(TAP, mac, mtu).is_err(), "{mac:?} {mtu}");
    }
    assert!(matches!(
        Net::new("no/slash", GUEST_MAC, 1500),
        Err(NetError::Tap(TapError::InvalidName(_)))
    ));
}
