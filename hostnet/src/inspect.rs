//! Reading what CNI gave an interface: MAC, MTU, addresses, routes and static neighbours.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::{netlink_errno, Error, IpNet, Neighbour, PodInterface, Route};

/// The link `name`, or `None` if the namespace has none of that name.
pub async fn link(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, Error> {
    let found = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await;
    match found {
        Ok(link) => Ok(link),
        Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(Error::netlink(format!("look up {name}"), e)),
    }
}

/// Everything the guest needs to take over interface `name`.
pub async fn interface(handle: &Handle, name: &str) -> Result<(u32, PodInterface), Error> {
    let link = link(handle, name)
        .await?
        .ok_or_else(|| Error::NoInterface(name.to_string()))?;
    let index = link.header.index;
    let mut mac = None;
    let mut mtu = None;
    for attr in &link.attributes {
        match attr {
            LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::Mtu(m) => mtu = Some(*m),
            _ => {}
        }
    }
    let mac = mac.ok_or_else(|| Error::NotEthernet(name.to_string()))?;
    let interface = PodInterface {
        name: name.to_string(),
        mac,
        mtu: mtu.unwrap_or(1500),
        addresses: addresses(handle, index).await?,
        routes: routes(handle, index).await?,
        neighbours: neighbours(handle, index).await?,
    };
    Ok((index, interface))
}

/// The interface's global addresses. IPv6 link-local ones are left out: the guest derives the
/// same one from the same MAC.
async fn addresses(handle: &Handle, index: u32) -> Result<Vec<IpNet>, Error> {
    let msgs: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::netlink("list addresses".into(), e))?;
    let mut out = Vec::new();
    for m in msgs.iter().filter(|m| m.header.index == index) {
        // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS
        // otherwise (the two are equal on Ethernet).
        let local = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        let Some(addr) = local.or(address) else {
            continue;
        };
        if matches!(addr, IpAddr::V6(v6) if v6.is_unicast_link_local()) {
            continue;
        }
        out.push(IpNet {
            addr,
            prefix_len: m.header.prefix_len,
        });
    }
    Ok(out)
}

/// The main table's unicast routes out of the interface, except those the kernel made itself
/// from an address (the guest's kernel makes the same ones when it gets the address).
async fn routes(handle: &Handle, index: u32) -> Result<Vec<Route>, Error> {
    let mut out = Vec::new();
    for family in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let msgs: Vec<RouteMessage> = handle
            .route()
            .get(family)
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::netlink("list routes".into(), e))?;
        out.extend(msgs.iter().filter_map(|m| route(m, index)));
    }
    Ok(out)
}

fn route(m: &RouteMessage, index: u32) -> Option<Route> {
    let main = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Table(t) => Some(*t),
        _ => None,
    });
    let table = main.unwrap_or(u32::from(m.header.table));
    let oif = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    if table != u32::from(libc::RT_TABLE_MAIN)
        || oif != Some(index)
        || m.header.kind != RouteType::Unicast
        || m.header.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    };
    let mut destination = None;
    let mut gateway = None;
    let mut source = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => destination = ip(d),
            RouteAttribute::Gateway(g) => gateway = ip(g),
            RouteAttribute::PrefSource(s) => source = ip(s),
            _ => {}
        }
    }
    Some(Route {
        destination: destination.map(|addr| IpNet {
            addr,
            prefix_len: m.header.destination_prefix_length,
        }),
        gateway,
        source,
        scope_link: m.header.scope == RouteScope::Link,
    })
}

/// Static (permanent) neighbour entries on the interface, which some CNI plugins add instead
/// of letting ARP resolve the gateway.
async fn neighbours(handle: &Handle, index: u32) -> Result<Vec<Neighbour>, Error> {
    let msgs: Vec<_> = handle
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::netlink("list neighbours".into(), e))?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.ifindex == index && m.header.state == NeighbourState::Permanent)
        .filter_map(|m| {
            let ip = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    Some(IpAddr::V6(*v6))
                }
                _ => None,
            })?;
            let mac = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(l.as_slice()).ok(),
                _ => None,
            })?;
            Some(Neighbour { ip, mac })
        })
        .collect())
}
