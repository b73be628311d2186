//! Request checks, and plans applied for real in a network namespace of the test's own.

use super::apply::route_message;
use super::*;

fn net(address: &str, prefix_len: u32) -> pb::IpNetwork {
    pb::IpNetwork {
        address: address.into(),
        prefix_len,
        ..Default::default()
    }
}

fn request() -> pb::ConfigureNetworkRequest {
    pb::ConfigureNetworkRequest {
        interfaces: vec![pb::NetworkInterface {
            mac: "52:54:00:12:34:56".into(),
            name: "eth0".into(),
            mtu: 1400,
            addresses: vec![net("10.1.0.5", 24)],
            ..Default::default()
        }],
        routes: vec![pb::NetworkRoute {
            gateway: "10.1.0.1".into(),
            device: "eth0".into(),
            ..Default::default()
        }],
        neighbours: vec![pb::NetworkNeighbour {
            address: "10.1.0.1".into(),
            mac: "02:00:00:00:00:01".into(),
            device: "eth0".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn a_pod_interface_is_accepted() {
    let plan = Plan::from_request(&request()).unwrap();
    assert_eq!(plan.interfaces[0].mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    assert_eq!(plan.interfaces[0].mtu, Some(1400));
    assert_eq!(
        plan.interfaces[0].addresses,
        vec![("10.1.0.5".parse().unwrap(), 24)]
    );
    assert_eq!(plan.routes[0].destination, None);
    let msg = route_message(&plan.routes[0], 2).unwrap();
    assert_eq!(msg.header.destination_prefix_length, 0);
    assert_eq!(
        msg.header.address_family,
        rtnetlink::packet_route::AddressFamily::Inet
    );
}

#[test]
fn everything_from_the_host_is_checked() {
    type Change = Box<dyn Fn(&mut pb::ConfigureNetworkRequest)>;
    let bad: Vec<(&str, Change)> = vec![
        (
            "prefix",
            Box::new(|r| r.interfaces[0].addresses[0].prefix_len = 33),
        ),
        (
            "v6 prefix",
            Box::new(|r| r.interfaces[0].addresses[0] = net("fd00::1", 129)),
        ),
        (
            "address",
            Box::new(|r| r.interfaces[0].addresses[0].address = "10.1.0".into()),
        ),
        (
            "multicast",
            Box::new(|r| r.interfaces[0].addresses[0].address = "224.0.0.1".into()),
        ),
        (
            "mac",
            Box::new(|r| r.interfaces[0].mac = "52:54:00:12:34".into()),
        ),
        (
            "multicast mac",
            Box::new(|r| r.interfaces[0].mac = "01:00:5e:00:00:01".into()),
        ),
        (
            "name",
            Box::new(|r| r.interfaces[0].name = "eth0/../x".into()),
        ),
        (
            "long name",
            Box::new(|r| r.interfaces[0].name = "sixteen-chars-xx".into()),
        ),
        ("mtu", Box::new(|r| r.interfaces[0].mtu = 67)),
        ("mtu high", Box::new(|r| r.interfaces[0].mtu = 65536)),
        (
            "addresses",
            Box::new(|r| r.interfaces[0].addresses = vec![net("10.1.0.5", 24); 17]),
        ),
        (
            "interfaces",
            Box::new(|r| {
                let i = r.interfaces[0].clone();
                r.interfaces = (0..9)
                    .map(|n| pb::NetworkInterface {
                        mac: format!("52:54:00:00:00:{n:02x}"),
                        name: String::new(),
                        ..i.clone()
                    })
                    .collect();
            }),
        ),
        (
            "same mac",
            Box::new(|r| {
                let mut i = r.interfaces[0].clone();
                i.name = "eth1".into();
                r.interfaces.push(i);
            }),
        ),
        (
            "routes",
            Box::new(|r| r.routes = vec![r.routes[0].clone(); 129]),
        ),
        (
            "neighbours",
            Box::new(|r| r.neighbours = vec![r.neighbours[0].clone(); 129]),
        ),
        (
            "mixed families",
            Box::new(|r| r.routes[0].destination = Some(net("fd00::", 64)).into()),
        ),
        ("empty route", Box::new(|r| r.routes[0].gateway.clear())),
        ("route device", Box::new(|r| r.routes[0].device.clear())),
        (
            "gateway",
            Box::new(|r| r.routes[0].gateway = "0.0.0.0".into()),
        ),
        (
            "neighbour mac",
            Box::new(|r| r.neighbours[0].mac = "zz:00:00:00:00:01".into()),
        ),
    ];
    for (what, change) in bad {
        let mut req = request();
        change(&mut req);
        assert!(
            matches!(Plan::from_request(&req), Err(NetError::Invalid(_))),
            "{what} accepted"
        );
    }
}

/// Runs `f` on a thread in a network namespace of its own, with a veth pair `v0`/`v1`
/// (`v0` with the request's MAC) standing for the VM's device.
fn in_netns_with_device<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
        ip("link add v0 address 52:54:00:12:34:56 type veth peer name v1");
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn ip(args: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("ip (iproute2)");
    assert!(out.status.success(), "ip {args}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn apply(req: &pb::ConfigureNetworkRequest) -> Result<(), NetError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(Plan::from_request(req)?.apply())
}

#[test]
fn the_device_with_the_mac_takes_the_pod_interface_over() {
    in_netns_with_device(|| {
        apply(&request()).expect("configure");
        let link = ip("-o link show eth0");
        assert!(
            link.contains("mtu 1400") && link.contains("52:54:00:12:34:56"),
            "{link}"
        );
        assert!(link.contains(",UP"), "{link}");
        assert!(ip("-o addr show dev eth0").contains("inet 10.1.0.5/24"));
        let routes = ip("route show");
        assert!(routes.contains("default via 10.1.0.1 dev eth0"), "{routes}");
        let neigh = ip("neigh show dev eth0");
        assert!(
            neigh.contains("10.1.0.1 lladdr 02:00:00:00:00:01 PERMANENT"),
            "{neigh}"
        );
        assert!(ip("-o link show lo").contains(",UP"));
        // Again: the same state, no error (addresses present are kept, routes replaced).
        apply(&request()).expect("configure again");
        assert_eq!(ip("-o addr show dev eth0").matches("inet ").count(), 1);
    });
}

#[test]
fn a_gateway_reached_through_an_on_link_route_works_in_any_order() {
    in_netns_with_device(|| {
        // As CNI plugins that give a /32 address do: the gateway is reachable only through
        // an on-link route, which the request lists after the default route.
        let mut req = request();
        req.interfaces[0].addresses = vec![net("10.2.0.7", 32)];
        req.routes = vec![
            pb::NetworkRoute {
                gateway: "169.254.1.1".into(),
                device: "eth0".into(),
                ..Default::default()
            },
            pb::NetworkRoute {
                destination: Some(net("169.254.1.1", 32)).into(),
                device: "eth0".into(),
                scope_link: true,
                ..Default::default()
            },
        ];
        req.neighbours.clear();
        apply(&req).expect("configure");
        let routes = ip("route show");
        assert!(
            routes.contains("default via 169.254.1.1 dev eth0"),
            "{routes}"
        );
        assert!(
            routes
                .lines()
                .any(|l| l.starts_with("169.254.1.1 dev eth0 ") && l.contains("scope link")),
            "{routes}"
        );
    });
}

#[test]
fn an_unknown_mac_or_device_is_not_found() {
    in_netns_with_device(|| {
        let mut req = request();
        req.interfaces[0].mac = "52:54:00:00:00:99".into();
        assert!(matches!(apply(&req), Err(NetError::NotFound(_))));
        let mut req = request();
        req.routes[0].device = "eth7".into();
        assert!(matches!(apply(&req), Err(NetError::NotFound(_))));
    });
}
