//! Plumbing in real network namespaces (needs root): a "pod" namespace with a veth `eth0` as
//! CNI's bridge plugin leaves it (address, default route), its peer in a "host" namespace.
//! Frames written to the tap come out of the peer, frames sent by the peer come out of the tap,
//! and teardown leaves nothing behind.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use hostnet::{netns, Error, IpNet, Neighbour, Route};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const VNET_HDR_LEN: usize = 12;

/// Two namespaces joined by a veth pair, deleted on drop.
struct Fixture {
    pod: String,
    host: String,
}

impl Fixture {
    fn new(mtu: u32) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id());
        let f = Self {
            pod: format!("hn-pod-{id}"),
            host: format!("hn-host-{id}"),
        };
        ip(&["netns", "add", &f.pod]);
        ip(&["netns", "add", &f.host]);
        let mtu = mtu.to_string();
        let (pod, host) = (f.pod.as_str(), f.host.as_str());
        ip(&[
            "-n", pod, "link", "add", "eth0", "mtu", &mtu, "type", "veth", "peer", "name", "peer0",
            "mtu", &mtu, "netns", host,
        ]);
        ip(&["-n", pod, "addr", "add", "10.77.0.2/24", "dev", "eth0"]);
        ip(&["-n", pod, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            pod,
            "route",
            "add",
            "default",
            "via",
            "10.77.0.1",
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            pod,
            "route",
            "add",
            "10.99.0.0/16",
            "via",
            "10.77.0.1",
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            pod,
            "neigh",
            "add",
            "10.77.0.9",
            "lladdr",
            "02:00:00:00:00:09",
            "nud",
            "permanent",
            "dev",
            "eth0",
        ]);
        ip(&["-n", host, "addr", "add", "10.77.0.1/24", "dev", "peer0"]);
        ip(&["-n", host, "link", "set", "peer0", "up"]);
        f
    }

    fn pod_path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.pod)
    }

    fn host_path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.host)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.host] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn exists(f: &Fixture, name: &str) -> bool {
    hostnet::link_state(&f.pod_path(), name).unwrap().is_some()
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mac_of(netns: &str, dev: &str) -> [u8; 6] {
    let out = Command::new("ip")
        .args(["-n", netns, "-o", "link", "show", dev])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    let hw = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("link/ether");
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(hw.split(':')) {
        *b = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

/// Waits (at most 20 s, a guard against hanging, not a timing check) for a frame on the tap
/// and returns it without its virtio header.
fn read_frame(tap: &OwnedFd) -> Vec<u8> {
    let mut fds = [PollFd::new(tap.as_fd(), PollFlags::POLLIN)];
    let n = poll(&mut fds, PollTimeout::from(20_000u16)).expect("poll the tap");
    assert_eq!(n, 1, "no frame came out of the tap");
    let mut buf = vec![0u8; 65_600];
    let len = nix::unistd::read(tap.as_raw_fd(), &mut buf).expect("read the tap");
    assert!(len > VNET_HDR_LEN + 14, "short frame ({len} bytes)");
    buf[VNET_HDR_LEN..len].to_vec()
}

fn write_frame(tap: &OwnedFd, frame: &[u8]) {
    let mut out = vec![0u8; VNET_HDR_LEN];
    out.extend_from_slice(frame);
    let n = nix::unistd::write(tap, &out).expect("write the tap");
    assert_eq!(n, out.len());
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 + UDP frame (UDP checksum 0: none, valid for IPv4).
fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + payload.len()) as u16;
    let mut iph = vec![0x45, 0];
    iph.extend_from_slice(&total.to_be_bytes());
    iph.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    iph.extend_from_slice(&src.octets());
    iph.extend_from_slice(&dst.octets());
    let c = checksum(&iph);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&iph);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

fn arp_reply(my_mac: [u8; 6], my_ip: Ipv4Addr, to_mac: [u8; 6], to_ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&to_mac);
    f.extend_from_slice(&my_mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&my_mac);
    f.extend_from_slice(&my_ip.octets());
    f.extend_from_slice(&to_mac);
    f.extend_from_slice(&to_ip.octets());
    f
}

fn is_arp_request_for(frame: &[u8], ip: Ipv4Addr) -> bool {
    frame.len() >= 42
        && frame[12..14] == [8, 6]
        && frame[20..22] == [0, 1]
        && frame[38..42] == ip.octets()
}

fn udp_payload_to(frame: &[u8], dst: Ipv4Addr, port: u16) -> Option<&[u8]> {
    if frame.len() < 42
        || frame[12..14] != [8, 0]
        || frame[23] != 17
        || frame[30..34] != dst.octets()
    {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let udp = &frame[14 + ihl..];
    (udp[2..4] == port.to_be_bytes()).then(|| &udp[8..])
}

#[test]
fn plumbing_reads_the_interface_and_joins_a_tap_to_it() {
    let f = Fixture::new(1400);
    let plumbing = hostnet::plumb(&f.pod_path(), "eth0", "tap0_mvm").expect("plumb");
    let pod = &plumbing.interface;

    assert_eq!(pod.name, "eth0");
    assert_eq!(pod.mac, mac_of(&f.pod, "eth0"));
    assert_eq!(pod.mtu, 1400);
    assert_eq!(
        pod.addresses,
        vec![IpNet {
            addr: IpAddr::V4(POD_IP),
            prefix_len: 24
        }]
    );
    let gw = Some(IpAddr::V4(PEER_IP));
    assert!(
        pod.routes.contains(&Route {
            destination: None,
            gateway: gw,
            source: None,
            scope_link: false
        }),
        "{:?}",
        pod.routes
    );
    let net = IpNet {
        addr: IpAddr::V4(Ipv4Addr::new(10, 99, 0, 0)),
        prefix_len: 16,
    };
    assert!(
        pod.routes.contains(&Route {
            destination: Some(net),
            gateway: gw,
            source: None,
            scope_link: false
        }),
        "{:?}",
        pod.routes
    );
    assert_eq!(
        pod.routes.len(),
        2,
        "the kernel's own subnet route is left out: {:?}",
        pod.routes
    );
    assert_eq!(
        pod.neighbours,
        vec![Neighbour {
            ip: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 9)),
            mac: [2, 0, 0, 0, 0, 9]
        }]
    );

    let tap = hostnet::link_state(&f.pod_path(), "tap0_mvm")
        .unwrap()
        .expect("the tap exists");
    let veth = hostnet::link_state(&f.pod_path(), "eth0").unwrap().unwrap();
    assert_eq!((tap.mtu, tap.up, tap.ingress_qdisc), (1400, true, true));
    assert!(veth.ingress_qdisc);
    assert_eq!(tap.ingress_filters.len(), 1);
    assert_eq!(tap.ingress_filters[0].kind, "u32");
    assert_eq!(tap.ingress_filters[0].priority, hostnet::FILTER_PRIORITY);
    assert_eq!(tap.ingress_filters[0].redirect_to, Some(veth.index));
    assert_eq!(veth.ingress_filters.len(), 1);
    assert_eq!(veth.ingress_filters[0].redirect_to, Some(tap.index));
    // Kata's tcfilter model: the veth keeps its address.
    assert_eq!(
        hostnet::read_interface(&f.pod_path(), "eth0")
            .unwrap()
            .addresses,
        pod.addresses
    );

    // Plumbing again is refused, changing nothing.
    assert!(matches!(
        hostnet::plumb(&f.pod_path(), "eth0", "tap0_mvm"),
        Err(Error::Exists(_))
    ));
    assert!(matches!(
        hostnet::plumb(&f.pod_path(), "eth0", "tap1_mvm"),
        Err(Error::Busy(_))
    ));
    assert!(!exists(&f, "tap1_mvm"));

    plumbing.unplumb().expect("unplumb");
    assert!(!exists(&f, "tap0_mvm"));
    let veth = hostnet::link_state(&f.pod_path(), "eth0").unwrap().unwrap();
    assert!(!veth.ingress_qdisc && veth.ingress_filters.is_empty());
    assert_eq!(
        hostnet::read_interface(&f.pod_path(), "eth0").unwrap(),
        *pod,
        "CNI's interface is untouched"
    );
    // Idempotent, also once the namespace is gone.
    plumbing.unplumb().expect("unplumb again");
    let path = f.pod_path();
    drop(f);
    hostnet::unplumb(&path, "eth0", "tap0_mvm").expect("unplumb a deleted namespace");
}

#[test]
fn frames_cross_between_the_tap_and_the_veth_peer() {
    let f = Fixture::new(1500);
    let plumbing = hostnet::plumb(&f.pod_path(), "eth0", "tap0_mvm").expect("plumb");
    let tap = plumbing.open_tap().expect("open the tap");
    nix::fcntl::fcntl(
        tap.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let pod_mac = plumbing.interface.mac;
    let peer_mac = mac_of(&f.host, "peer0");

    // Tap to peer: a UDP datagram the VM would send reaches a socket on the host side.
    let server = netns::run_in(&f.host_path(), || {
        UdpSocket::bind((PEER_IP, 5555)).map_err(|e| Error::Thread(e.to_string()))
    })
    .expect("bind in the host namespace");
    write_frame(
        &tap,
        &udp_frame(pod_mac, peer_mac, POD_IP, PEER_IP, 5555, b"from the vm"),
    );
    let mut buf = [0u8; 64];
    server
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let (n, from) = server
        .recv_from(&mut buf)
        .expect("the datagram reached the host side");
    assert_eq!(&buf[..n], b"from the vm");
    assert_eq!(from.ip(), IpAddr::V4(POD_IP));

    // Peer to tap: the host side's ARP request for the pod's IP comes out of the tap (the pod
    // namespace's own stack never sees it, so never answers), the VM's reply written to the tap
    // resolves it, and the datagram then comes out of the tap too.
    let client = netns::run_in(&f.host_path(), || {
        UdpSocket::bind((PEER_IP, 0)).map_err(|e| Error::Thread(e.to_string()))
    })
    .unwrap();
    client.send_to(b"to the vm", (POD_IP, 6666)).expect("send");
    let mut got = None;
    for _ in 0..64 {
        let frame = read_frame(&tap);
        if is_arp_request_for(&frame, POD_IP) {
            assert_eq!(frame[6..12], peer_mac);
            write_frame(&tap, &arp_reply(pod_mac, POD_IP, peer_mac, PEER_IP));
        } else if let Some(p) = udp_payload_to(&frame, POD_IP, 6666) {
            assert_eq!(frame[0..6], pod_mac);
            got = Some(p.to_vec());
            break;
        }
    }
    assert_eq!(got.as_deref(), Some(&b"to the vm"[..]));

    drop(tap);
    plumbing.unplumb().unwrap();
}

#[test]
fn a_missing_interface_or_a_bad_name_changes_nothing() {
    let f = Fixture::new(1500);
    assert!(matches!(
        hostnet::plumb(&f.pod_path(), "eth9", "tap0_mvm"),
        Err(Error::NoInterface(_))
    ));
    assert!(matches!(
        hostnet::plumb(&f.pod_path(), "eth0", "tap%d"),
        Err(Error::InvalidName(_))
    ));
    assert!(!exists(&f, "tap0_mvm"));
    assert!(
        !hostnet::link_state(&f.pod_path(), "eth0")
            .unwrap()
            .unwrap()
            .ingress_qdisc
    );
    // open_tap never creates a tap.
    assert!(matches!(
        hostnet::open_tap(&f.pod_path(), "tap0_mvm"),
        Err(Error::NoInterface(_))
    ));
    assert!(!exists(&f, "tap0_mvm"));
    assert!(matches!(
        hostnet::read_interface(&PathBuf::from("/nonexistent/ns"), "eth0"),
        Err(Error::Netns { .. })
    ));
}

fn tc_in(netns: &str, args: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "tc"])
        .args(args.split_whitespace())
        .output()
        .expect("tc (iproute2)");
    assert!(out.status.success(), "tc {args}: {out:?}");
}

#[test]
fn teardown_leaves_someone_elses_ingress_qdisc_and_filters() {
    // A qdisc that was there before: plumbing is refused, and a cleanup keeps it.
    let f = Fixture::new(1500);
    tc_in(&f.pod, "qdisc add dev eth0 ingress");
    tc_in(
        &f.pod,
        "filter add dev eth0 parent ffff: pref 7 protocol ip u32 match u32 0 0 flowid 1:1",
    );
    assert!(matches!(
        hostnet::plumb(&f.pod_path(), "eth0", "tap0_mvm"),
        Err(Error::Busy(_))
    ));
    hostnet::unplumb(&f.pod_path(), "eth0", "tap0_mvm").unwrap();
    let veth = hostnet::link_state(&f.pod_path(), "eth0").unwrap().unwrap();
    assert!(veth.ingress_qdisc);
    assert_eq!(veth.ingress_filters.len(), 1);
    assert_eq!(veth.ingress_filters[0].priority, 7);

    // A filter added beside ours after plumbing: teardown removes ours only.
    let f = Fixture::new(1500);
    let plumbing = hostnet::plumb(&f.pod_path(), "eth0", "tap0_mvm").unwrap();
    tc_in(
        &f.pod,
        "filter add dev eth0 parent ffff: pref 9 protocol ip u32 match u32 0 0 flowid 1:1",
    );
    plumbing.unplumb().unwrap();
    assert!(!exists(&f, "tap0_mvm"));
    let veth = hostnet::link_state(&f.pod_path(), "eth0").unwrap().unwrap();
    assert!(veth.ingress_qdisc);
    let prios: Vec<u16> = veth.ingress_filters.iter().map(|f| f.priority).collect();
    assert_eq!(prios, vec![9]);
}

#[test]
fn a_created_namespace_is_listed_entered_and_removed() {
    let name = format!("hn-new-{}", std::process::id());
    std::fs::create_dir_all("/run/netns").unwrap();
    let path = PathBuf::from(format!("/run/netns/{name}"));
    netns::create(&path).unwrap();
    // A second create at the same path is refused and leaves the first alone.
    assert!(matches!(netns::create(&path), Err(Error::Netns { .. })));
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    // Entered by path: it is a new namespace with only `lo`, and `ip` sees the same.
    let lo = hostnet::link_state(&path, "lo").unwrap();
    let links = Command::new("ip")
        .args(["-n", &name, "-o", "link"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    let theirs = netns::run_in(&path, || {
        std::fs::read_link("/proc/thread-self/ns/net").map_err(|e| Error::Thread(e.to_string()))
    })
    .unwrap();
    netns::remove(&path).unwrap();
    netns::remove(&path).unwrap();
    assert!(
        listed
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&name)),
        "{listed}"
    );
    assert!(lo.is_some(), "no lo in the new namespace");
    assert_eq!(links.lines().count(), 1, "{links}");
    assert_ne!(ours, theirs, "the namespace is the caller's own");
    assert!(!path.exists(), "{} left behind", path.display());
}
