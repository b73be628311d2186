//! `ConfigureNetwork`: the guest's interfaces take over the identity of the pod's interface on
//! the host (MAC, name, MTU, addresses), then routes and static neighbours, over rtnetlink (no
//! `ip` binary in the guest).
//!
//! The request comes from the host and is checked whole before anything changes
//! ([`Plan::from_request`]): counts bounded, every address, prefix, MAC and name parsed and
//! checked, families consistent.

use std::collections::HashMap;
use std::net::IpAddr;

use agent_protocol::agent as pb;
use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

pub const MAX_INTERFACES: usize = 8;
pub const MAX_ADDRESSES: usize = 16;
pub const MAX_ROUTES: usize = 128;
pub const MAX_NEIGHBOURS: usize = 128;

/// Why a request was not carried out.
#[derive(Debug, PartialEq, Eq)]
pub enum NetError {
    /// The request is malformed (nothing was changed).
    Invalid(String),
    /// No guest device has that MAC, or a route names an unknown device.
    NotFound(String),
    /// The kernel refused a change.
    Failed(String),
}

/// A checked request.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    interfaces: Vec<Interface>,
    routes: Vec<Route>,
    neighbours: Vec<Neighbour>,
}

#[derive(Debug, PartialEq, Eq)]
struct Interface {
    mac: [u8; 6],
    name: Option<String>,
    mtu: Option<u32>,
    addresses: Vec<(IpAddr, u8)>,
}

#[derive(Debug, PartialEq, Eq)]
struct Route {
    destination: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
    device: String,
    source: Option<IpAddr>,
    scope_link: bool,
}

#[derive(Debug, PartialEq, Eq)]
struct Neighbour {
    ip: IpAddr,
    mac: [u8; 6],
    device: String,
}

fn invalid(msg: String) -> NetError {
    NetError::Invalid(msg)
}

fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts
            .next()
            .filter(|p| p.len() == 2)
            .ok_or_else(|| invalid(format!("bad MAC {s:?}")))?;
        *b = u8::from_str_radix(p, 16).map_err(|_| invalid(format!("bad MAC {s:?}")))?;
    }
    if parts.next().is_some() {
        return Err(invalid(format!("bad MAC {s:?}")));
    }
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(invalid(format!("MAC {s} is not a unicast address")));
    }
    Ok(mac)
}

fn parse_ip(s: &str, what: &str) -> Result<IpAddr, NetError> {
    let ip: IpAddr = s
        .parse()
        .map_err(|_| invalid(format!("{what}: bad IP address {s:?}")))?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(invalid(format!("{what}: {ip} is not a unicast address")));
    }
    Ok(ip)
}

fn parse_net(n: &pb::IpNetwork, what: &str) -> Result<(IpAddr, u8), NetError> {
    let ip: IpAddr = n
        .address
        .parse()
        .map_err(|_| invalid(format!("{what}: bad IP address {:?}", n.address)))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if n.prefix_len > max {
        return Err(invalid(format!(
            "{what}: prefix length {} is over {max}",
            n.prefix_len
        )));
    }
    Ok((ip, n.prefix_len as u8))
}

/// Whether `name` is an interface name the kernel takes literally.
fn valid_ifname(name: &str) -> bool {
    (1..16).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b'%' | b':'))
}

fn device(name: &str, what: &str) -> Result<String, NetError> {
    if !valid_ifname(name) {
        return Err(invalid(format!("{what}: bad interface name {name:?}")));
    }
    Ok(name.to_string())
}

impl Plan {
    /// Checks the whole request; nothing in the guest changes on an error.
    pub fn from_request(req: &pb::ConfigureNetworkRequest) -> Result<Self, NetError> {
        let count = |n: usize, max: usize, what: &str| {
            if n > max {
                return Err(invalid(format!("{n} {what} (at most {max})")));
            }
            Ok(())
        };
        count(req.interfaces.len(), MAX_INTERFACES, "interfaces")?;
        count(req.routes.len(), MAX_ROUTES, "routes")?;
        count(req.neighbours.len(), MAX_NEIGHBOURS, "neighbours")?;
        let mut interfaces = Vec::new();
        for (i, ifc) in req.interfaces.iter().enumerate() {
            let what = format!("interface {i}");
            count(ifc.addresses.len(), MAX_ADDRESSES, "addresses")?;
            let mac = parse_mac(&ifc.mac)?;
            let name = match ifc.name.as_str() {
                "" => None,
                n => Some(device(n, &what)?),
            };
            let mtu = match ifc.mtu {
                0 => None,
                m @ 68..=65535 => Some(m),
                m => return Err(invalid(format!("{what}: MTU {m} is not within 68..65535"))),
            };
            let addresses = ifc
                .addresses
                .iter()
                .map(|a| {
                    let (ip, len) = parse_net(a, &what)?;
                    parse_ip(&a.address, &what)?;
                    Ok((ip, len))
                })
                .collect::<Result<Vec<_>, NetError>>()?;
            interfaces.push(Interface {
                mac,
                name,
                mtu,
                addresses,
            });
        }
        for (i, a) in interfaces.iter().enumerate() {
            for b in &interfaces[i + 1..] {
                if a.mac == b.mac || (a.name.is_some() && a.name == b.name) {
                    return Err(invalid(format!(
                        "two interfaces share a MAC or a name ({:?})",
                        a.name
                    )));
                }
            }
        }
        let mut routes = Vec::new();
        for (i, r) in req.routes.iter().enumerate() {
            let what = format!("route {i}");
            let destination = match r.destination.as_ref() {
                Some(d) => Some(parse_net(d, &what)?),
                None => None,
            };
            let gateway = match r.gateway.as_str() {
                "" => None,
                g => Some(parse_ip(g, &what)?),
            };
            let source = match r.source.as_str() {
                "" => None,
                s => Some(parse_ip(s, &what)?),
            };
            let families: Vec<bool> = [destination.map(|d| d.0), gateway, source]
                .into_iter()
                .flatten()
                .map(|ip| ip.is_ipv4())
                .collect();
            if families.is_empty() {
                return Err(invalid(format!(
                    "{what}: neither a destination nor a gateway"
                )));
            }
            if families.iter().any(|&v4| v4 != families[0]) {
                return Err(invalid(format!("{what}: IPv4 and IPv6 addresses mixed")));
            }
            routes.push(Route {
                destination,
                gateway,
                device: device(&r.device, &what)?,
                source,
                scope_link: r.scope_link,
            });
        }
        let neighbours = req
            .neighbours
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let what = format!("neighbour {i}");
                Ok(Neighbour {
                    ip: parse_ip(&n.address, &what)?,
                    mac: parse_mac(&n.mac)?,
                    device: device(&n.device, &what)?,
                })
            })
            .collect::<Result<Vec<_>, NetError>>()?;
        Ok(Self {
            interfaces,
            routes,
            neighbours,
        })
    }

    /// Carries the plan out in the calling thread's network namespace.
    pub async fn apply(&self) -> Result<(), NetError> {
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|e| NetError::Failed(format!("netlink socket: {e}")))?;
        let driver = tokio::spawn(connection);
        let result = self.apply_with(&handle).await;
        driver.abort();
        result
    }

    async fn apply_with(&self, handle: &Handle) -> Result<(), NetError> {
        let links = links(handle).await.map_err(failed("list links".into()))?;
        let by_mac: HashMap<[u8; 6], u32> = links.iter().map(|l| (l.mac, l.index)).collect();
        let mut by_name: HashMap<String, u32> =
            links.into_iter().map(|l| (l.name, l.index)).collect();
        if let Some(&lo) = by_name.get("lo") {
            set_link(handle, LinkUnspec::new_with_index(lo).up())
                .await
                .map_err(failed("set lo up".into()))?;
        }
        for ifc in &self.interfaces {
            let mac = mac_text(ifc.mac);
            let index = *by_mac
                .get(&ifc.mac)
                .ok_or_else(|| NetError::NotFound(format!("no guest interface has MAC {mac}")))?;
            if let Some(name) = &ifc.name {
                if by_name.get(name) != Some(&index) {
                    // A rename needs the link down.
                    set_link(handle, LinkUnspec::new_with_index(index).down())
                        .await
                        .map_err(failed(format!("set {mac} down")))?;
                    set_link(handle, LinkUnspec::new_with_index(index).name(name.clone()))
                        .await
                        .map_err(failed(format!("rename {mac} to {name}")))?;
                    by_name.retain(|_, i| *i != index);
                    by_name.insert(name.clone(), index);
                }
            }
            if let Some(mtu) = ifc.mtu {
                set_link(handle, LinkUnspec::new_with_index(index).mtu(mtu))
                    .await
                    .map_err(failed(format!("set the MTU of {mac} to {mtu}")))?;
            }
            set_link(handle, LinkUnspec::new_with_index(index).up())
                .await
                .map_err(failed(format!("set {mac} up")))?;
            for &(ip, len) in &ifc.addresses {
                match handle.address().add(index, ip, len).execute().await {
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    r => r.map_err(failed(format!("add {ip}/{len} to {mac}")))?,
                }
            }
        }
        let index_of = |dev: &str| {
            by_name
                .get(dev)
                .copied()
                .ok_or_else(|| NetError::NotFound(format!("no guest interface {dev}")))
        };
        // On-link routes first: a gateway must be reachable when a route through it is added
        // (with a /32 address, only an on-link route to the gateway makes it so).
        let (on_link, via): (Vec<&Route>, Vec<&Route>) =
            self.routes.iter().partition(|r| r.gateway.is_none());
        for r in on_link.into_iter().chain(via) {
            let index = index_of(&r.device)?;
            let msg = route_message(r, index).map_err(NetError::Invalid)?;
            handle
                .route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(failed(format!("add route {r:?}")))?;
        }
        for n in &self.neighbours {
            let index = index_of(&n.device)?;
            handle
                .neighbours()
                .add(index, n.ip)
                .link_layer_address(&n.mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(failed(format!("add neighbour {}", n.ip)))?;
        }
        Ok(())
    }
}

/// Turns a netlink error into a [`NetError::Failed`] saying what was being done.
fn failed(what: String) -> impl FnOnce(rtnetlink::Error) -> NetError {
    move |e| NetError::Failed(format!("{what}: {e}"))
}

fn route_message(
    r: &Route,
    index: u32,
) -> Result<rtnetlink::packet_route::route::RouteMessage, String> {
    let v4 = [r.destination.map(|d| d.0), r.gateway, r.source]
        .into_iter()
        .flatten()
        .next()
        .is_some_and(|ip| ip.is_ipv4());
    let (dest, len) = r.destination.unwrap_or(if v4 {
        (IpAddr::from([0u8; 4]), 0)
    } else {
        (IpAddr::from([0u16; 8]), 0)
    });
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dest, len)
        .map_err(|e| e.to_string())?
        .output_interface(index);
    if let Some(g) = r.gateway {
        b = b.gateway(g).map_err(|e| e.to_string())?;
    }
    if let Some(s) = r.source {
        b = b.pref_source(s).map_err(|e| e.to_string())?;
    }
    if r.scope_link {
        b = b.scope(RouteScope::Link);
    }
    Ok(b.build())
}

struct Link {
    index: u32,
    name: String,
    mac: [u8; 6],
}

async fn links(handle: &Handle) -> Result<Vec<Link>, rtnetlink::Error> {
    let msgs: Vec<_> = handle.link().get().execute().try_collect().await?;
    Ok(msgs
        .into_iter()
        .map(|m| {
            let mut link = Link {
                index: m.header.index,
                name: String::new(),
                mac: [0; 6],
            };
            for a in m.attributes {
                match a {
                    LinkAttribute::IfName(n) => link.name = n,
                    LinkAttribute::Address(a) => {
                        link.mac = <[u8; 6]>::try_from(a.as_slice()).unwrap_or_default()
                    }
                    _ => {}
                }
            }
            link
        })
        .collect())
}

async fn set_link(
    handle: &Handle,
    msg: rtnetlink::LinkMessageBuilder<LinkUnspec>,
) -> Result<(), rtnetlink::Error> {
    handle.link().set(msg.build()).execute().await
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

#[cfg(test)]
mod tests {
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
}
