//! `ConfigureNetwork`: the guest's interfaces take over the identity of the pod's interface on
//! the host (MAC, name, MTU, addresses), then routes and static neighbours, over rtnetlink (no
//! `ip` binary in the guest).
//!
//! The request comes from the host and is checked whole before anything changes
//! ([`Plan::from_request`]): counts bounded, every address, prefix, MAC and name parsed and
//! checked, families consistent.

mod apply;

use std::net::IpAddr;

use agent_protocol::agent as pb;

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
}

#[cfg(test)]
mod tests;
