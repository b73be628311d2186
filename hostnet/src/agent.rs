//! The guest's half: what the agent's `ConfigureNetwork` needs to give the guest's interface the
//! pod interface's identity.

use agent_protocol::agent as pb;

use crate::{IpNet, PodInterface};

fn net(n: &IpNet) -> pb::IpNetwork {
    pb::IpNetwork {
        address: n.addr.to_string(),
        prefix_len: u32::from(n.prefix_len),
        ..Default::default()
    }
}

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

impl PodInterface {
    /// The `ConfigureNetwork` request that makes the guest device with this interface's MAC
    /// (the VMM's net device must be given that MAC) take its name, MTU, addresses, routes and
    /// static neighbours.
    pub fn agent_request(&self) -> pb::ConfigureNetworkRequest {
        pb::ConfigureNetworkRequest {
            interfaces: vec![pb::NetworkInterface {
                mac: mac(self.mac),
                name: self.name.clone(),
                mtu: self.mtu,
                addresses: self.addresses.iter().map(net).collect(),
                ..Default::default()
            }],
            routes: self
                .routes
                .iter()
                .map(|r| pb::NetworkRoute {
                    destination: r.destination.as_ref().map(net).into(),
                    gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    device: self.name.clone(),
                    source: r.source.map(|s| s.to_string()).unwrap_or_default(),
                    scope_link: r.scope_link,
                    ..Default::default()
                })
                .collect(),
            neighbours: self
                .neighbours
                .iter()
                .map(|n| pb::NetworkNeighbour {
                    address: n.ip.to_string(),
                    mac: mac(n.mac),
                    device: self.name.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::{Neighbour, Route};

    #[test]
    fn the_request_carries_the_interface_identity() {
        let gw = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1));
        let pod = PodInterface {
            name: "eth0".into(),
            mac: [0x0a, 0x58, 0x0a, 0x01, 0x00, 0x05],
            mtu: 1450,
            addresses: vec![IpNet {
                addr: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 5)),
                prefix_len: 24,
            }],
            routes: vec![Route {
                destination: None,
                gateway: Some(gw),
                source: None,
                scope_link: false,
            }],
            neighbours: vec![Neighbour {
                ip: gw,
                mac: [2, 0, 0, 0, 0, 1],
            }],
        };
        let req = pod.agent_request();
        let ifc = &req.interfaces[0];
        assert_eq!(ifc.mac, "0a:58:0a:01:00:05");
        assert_eq!((ifc.name.as_str(), ifc.mtu), ("eth0", 1450));
        assert_eq!(ifc.addresses[0].address, "10.1.0.5");
        assert_eq!(ifc.addresses[0].prefix_len, 24);
        assert!(req.routes[0].destination.is_none());
        assert_eq!(req.routes[0].gateway, "10.1.0.1");
        assert_eq!(req.routes[0].device, "eth0");
        assert_eq!(req.neighbours[0].mac, "02:00:00:00:00:01");
    }
}
