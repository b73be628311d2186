//! Carrying a checked [`Plan`] out over rtnetlink.

use std::collections::HashMap;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::{NetError, Plan, Route};

impl Plan {
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

pub(super) fn route_message(
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
