//! The pod's network on the host: the VM's tap in the pod's (CNI's) network namespace, joined
//! to CNI's `eth0` by `hostnet` (Kata's tcfilter model). The VMM runs inside that namespace
//! and opens the tap by name; the guest takes over `eth0`'s identity (MAC, MTU, addresses,
//! routes) through the agent's `ConfigureNetwork`.

use std::path::{Path, PathBuf};

use sandbox::vmm_api::NetConfig;

/// The CNI interface the VM takes over.
pub const INTERFACE: &str = hostnet::DEFAULT_INTERFACE;
/// The VM's tap, beside it.
pub const TAP: &str = hostnet::DEFAULT_TAP;
/// In the pod's state directory: the namespace that was plumbed, for `delete` after a killed
/// shim to unplumb it.
pub const NETNS_FILE: &str = "netns";

/// Joins a tap to the namespace's `eth0`. `Ok(None)`: the namespace has no `eth0` (CNI made no
/// interface), and the VM boots without a network device.
pub fn plumb(netns: &Path) -> Result<Option<hostnet::Plumbing>, hostnet::Error> {
    match hostnet::plumb(netns, INTERFACE, TAP) {
        Ok(p) => Ok(Some(p)),
        Err(hostnet::Error::NoInterface(name)) if name == INTERFACE => {
            tracing::info!(
                "the pod's network namespace {} has no {INTERFACE}: the VM gets no network device",
                netns.display()
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The VM's network device on the plumbed tap, with the CNI interface's MAC and MTU.
pub fn net_config(p: &hostnet::Plumbing) -> Result<NetConfig, String> {
    Ok(NetConfig {
        tap_name: p.tap.clone(),
        mac: p.interface.mac,
        mtu: u16::try_from(p.interface.mtu)
            .map_err(|_| format!("{INTERFACE}'s MTU {} is too large", p.interface.mtu))?,
    })
}

/// Removes what [`plumb`] made (idempotent); a failure is logged.
pub fn unplumb(netns: &Path) {
    if let Err(e) = hostnet::unplumb(netns, INTERFACE, TAP) {
        tracing::warn!("unplumb the pod's network in {}: {e}", netns.display());
    }
}

/// The namespace recorded in `state_dir` by a shim that plumbed one.
pub fn recorded(state_dir: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(state_dir.join(NETNS_FILE)).ok()?;
    let path = PathBuf::from(text.trim_end_matches('\n'));
    path.is_absolute().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recorded_namespace_is_read_back_and_only_an_absolute_one() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(recorded(dir.path()), None);
        std::fs::write(dir.path().join(NETNS_FILE), "/var/run/netns/cni-1\n").unwrap();
        assert_eq!(
            recorded(dir.path()),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        std::fs::write(dir.path().join(NETNS_FILE), "relative/ns").unwrap();
        assert_eq!(recorded(dir.path()), None);
    }

    #[test]
    fn a_namespace_without_eth0_gets_no_device_and_unplumb_is_idempotent() {
        let name = format!("shim-podnet-{}", std::process::id());
        let ip = |args: &[&str]| {
            let st = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        ip(&["netns", "add", &name]);
        let path = PathBuf::from(format!("/var/run/netns/{name}"));
        let plumbed = plumb(&path);
        unplumb(&path);
        unplumb(&path);
        let tap = hostnet::link_state(&path, TAP);
        ip(&["netns", "del", &name]);
        assert!(plumbed.unwrap().is_none());
        assert!(tap.unwrap().is_none(), "no tap is made without {INTERFACE}");
        // A namespace that is gone is nothing to unplumb.
        unplumb(&path);
    }
}
