//! The command-line form of a net device, `TAP[,mac=..][,mtu=N]` (`microvm boot --net`).

use std::str::FromStr;

use crate::NetConfig;

impl NetConfig {
    /// A device on `tap_name` with MTU 1500 and a MAC derived from the name: 02:00 (locally
    /// administered, unicast) and four bytes of its FNV-1a hash, stable and different per tap.
    pub fn new(tap_name: &str) -> Self {
        let h = tap_name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let [a, b, c, d, ..] = h.to_le_bytes();
        Self {
            tap_name: tap_name.to_string(),
            mac: [0x02, 0x00, a, b, c, d],
            mtu: 1500,
        }
    }
}

impl FromStr for NetConfig {
    type Err = String;

    /// `TAP[,mac=XX:XX:XX:XX:XX:XX][,mtu=N]`
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let tap_name = parts.next().unwrap_or_default();
        if tap_name.is_empty() {
            return Err("empty tap name".into());
        }
        let mut net = Self::new(tap_name);
        for opt in parts {
            match opt.split_once('=') {
                Some(("mac", v)) => net.mac = parse_mac(v).ok_or(format!("bad MAC {v:?}"))?,
                Some(("mtu", v)) => net.mtu = v.parse().map_err(|_| format!("bad MTU {v:?}"))?,
                _ => return Err(format!("unknown net option {opt:?} (use mac= or mtu=)")),
            }
        }
        Ok(net)
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_form() {
        let n: NetConfig = "tap0,mac=52:54:00:12:34:5a,mtu=1400".parse().unwrap();
        assert_eq!(n.tap_name, "tap0");
        assert_eq!(n.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x5a]);
        assert_eq!(n.mtu, 1400);
        let d: NetConfig = "tap1".parse().unwrap();
        assert_eq!((d.mac[0], d.mtu), (0x02, 1500));
        assert_ne!(d.mac, NetConfig::new("tap2").mac);
        for bad in [
            "tap0,mac=52:54:00",
            "tap0,mac=52:54:00:12:34:56:78",
            "tap0,mac=5:54:00:12:34:567",
            "tap0,mtu=x",
            ",mtu=1400",
            "tap0,speed=10",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }
}
