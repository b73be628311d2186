//! `--network`, `-p/--publish` and `--dns` as docker spells them.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// `--network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// microvm's CNI network (`microvm0`), docker's default.
    #[default]
    Bridge,
    /// No network device; the container's own namespace has only `lo`.
    None,
}

pub fn parse_mode(s: &str) -> Result<Mode, String> {
    match s {
        "bridge" | "default" => Ok(Mode::Bridge),
        "none" => Ok(Mode::None),
        "host" => Err(
            "--network host is not possible: the container runs in a microVM with \
                       its own kernel and network stack, which cannot share the host's; use \
                       the default bridge network and publish ports with -p HOSTPORT:CTRPORT"
                .into(),
        ),
        other => Err(format!(
            "unknown network {other:?}: microvm has bridge (the default) and none"
        )),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// One `-p`: a host port forwarded to a container port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    /// `None`: every host address.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

impl Publish {
    /// The entry of portmap's `runtimeConfig.portMappings`.
    pub fn port_mapping(&self) -> Value {
        json!({
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": match self.protocol { Protocol::Tcp => "tcp", Protocol::Udp => "udp" },
            "hostIP": self.host_ip.map(|i| i.to_string()).unwrap_or_default(),
        })
    }
}

/// docker ps's form: `0.0.0.0:18080->80/tcp`.
impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        write!(
            f,
            "{}:{}->{}/{proto}",
            self.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            self.host_port,
            self.container_port
        )
    }
}

fn port(s: &str, what: &str) -> Result<u16, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{what} {s:?} is not a port number"))?;
    match u16::try_from(n) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{what} {n} is out of range (1-65535)")),
    }
}

/// `[HOSTIP:]HOSTPORT:CTRPORT[/tcp|/udp]`.
pub fn parse_publish(s: &str) -> Result<Publish, String> {
    let (spec, protocol) = match s.rsplit_once('/') {
        Some((spec, "tcp")) => (spec, Protocol::Tcp),
        Some((spec, "udp")) => (spec, Protocol::Udp),
        Some((_, p)) => return Err(format!("-p {s:?}: protocol {p:?} is not tcp or udp")),
        None => (s, Protocol::Tcp),
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let (host_ip, host_port, container_port) = match parts.as_slice() {
        [c] => {
            return Err(format!(
                "-p {s:?}: give the host port too (HOSTPORT:{c}); microvm does not pick one"
            ))
        }
        [h, c] => (None, *h, *c),
        [ip, h, c] => {
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("-p {s:?}: {ip:?} is not an IP address"))?;
            match ip {
                IpAddr::V4(v4) if v4.is_unspecified() => (None, *h, *c),
                IpAddr::V4(v4) => (Some(v4), *h, *c),
                IpAddr::V6(_) => {
                    return Err(format!("-p {s:?}: IPv6 is not supported yet"));
                }
            }
        }
        _ => {
            return Err(format!(
                "-p {s:?}: want [HOSTIP:]HOSTPORT:CTRPORT[/tcp|/udp] (IPv6 is not supported yet)"
            ))
        }
    };
    Ok(Publish {
        host_ip,
        host_port: port(host_port, "host port").map_err(|e| format!("-p {s:?}: {e}"))?,
        container_port: port(container_port, "container port")
            .map_err(|e| format!("-p {s:?}: {e}"))?,
        protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_forms() {
        let p = parse_publish("18080:80").unwrap();
        assert_eq!(
            p,
            Publish {
                host_ip: None,
                host_port: 18080,
                container_port: 80,
                protocol: Protocol::Tcp
            }
        );
        let p = parse_publish("127.0.0.1:53:5353/udp").unwrap();
        assert_eq!(p.host_ip, Some(Ipv4Addr::LOCALHOST));
        assert_eq!((p.host_port, p.container_port), (53, 5353));
        assert_eq!(p.protocol, Protocol::Udp);
        assert_eq!(parse_publish("0.0.0.0:1:2/tcp").unwrap().host_ip, None);
        assert_eq!(
            parse_publish("127.0.0.1:53:5353/udp").unwrap().to_string(),
            "127.0.0.1:53->5353/udp"
        );
        assert_eq!(
            parse_publish("18080:80").unwrap().to_string(),
            "0.0.0.0:18080->80/tcp"
        );
        assert_eq!(
            parse_publish("10.0.0.1:8080:80").unwrap().port_mapping(),
            json!({"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "10.0.0.1"})
        );
    }

    #[test]
    fn bad_publish_is_refused_with_the_reason() {
        for (bad, why) in [
            ("0:80", "out of range"),
            ("70000:80", "out of range"),
            ("8080:0", "out of range"),
            ("8080:99999", "out of range"),
            ("garbage", "give the host port"),
            ("a:b", "not a port number"),
            ("80", "give the host port"),
            ("8080:80/sctp", "not tcp or udp"),
            ("1.2.3:8080:80", "not an IP address"),
            ("::1:8080:80", "want [HOSTIP:]"),
            ("1:2:3:4", "want [HOSTIP:]"),
            ("", "give the host port"),
        ] {
            let e = parse_publish(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn network_modes() {
        assert_eq!(parse_mode("bridge"), Ok(Mode::Bridge));
        assert_eq!(parse_mode("none"), Ok(Mode::None));
        assert!(parse_mode("host").unwrap_err().contains("own kernel"));
        assert!(parse_mode("container:x")
            .unwrap_err()
            .contains("unknown network"));
    }
}
