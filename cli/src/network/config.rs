//! microvm's own CNI network, `microvm`: its conflist (written on first use) and where the CNI
//! plugins are.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::cni::ConfList;

/// The network's name (host-local keeps its leases in `/var/lib/cni/networks/<name>`).
pub const NETWORK: &str = "microvm";
/// The host bridge every run's veth joins.
pub const BRIDGE: &str = "microvm0";
/// The runs' subnet and the bridge's address (their gateway).
pub const SUBNET: &str = "10.89.0.0/16";
pub const GATEWAY: &str = "10.89.0.1";
/// Where the conflist is, unless `$MICROVM_CNI_CONFIG` names one.
pub const DEFAULT_CONFLIST: &str = "/etc/microvm/cni/microvm.conflist";
/// Where the plugins are searched, unless `$MICROVM_CNI_PATH` (a `:` list) says.
pub const DEFAULT_PLUGIN_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];
/// The most of a conflist file read.
const CONFLIST_CAP: u64 = 1 << 20;

/// The conflist written on first use: a bridge with host-local addresses, masquerading out,
/// the firewall plugin (it lets the runs' traffic through a FORWARD chain whose policy is
/// DROP, as docker leaves it) and portmap for `-p`.
pub fn default_conflist() -> serde_json::Value {
    json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "firewall"},
        ],
    })
}

/// The conflist's path.
pub fn conflist_path() -> PathBuf {
    std::env::var_os("MICROVM_CNI_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFLIST))
}

/// Reads the conflist at `path`, writing [`default_conflist`] there first if there is none.
pub fn load_or_write(path: &Path) -> Result<ConfList> {
    if !path.exists() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let text = serde_json::to_vec_pretty(&default_conflist())?;
        // Written beside and renamed: a concurrent first run reads a whole file or none.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))?;
    }
    let mut text = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(
            std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?,
            CONFLIST_CAP + 1,
        ),
        &mut text,
    )?;
    if text.len() as u64 > CONFLIST_CAP {
        bail!("{} is larger than 1 MiB", path.display());
    }
    ConfList::parse(&text).with_context(|| format!("{}", path.display()))
}

/// The plugin directories that exist.
pub fn plugin_dirs() -> Result<Vec<PathBuf>> {
    let dirs: Vec<PathBuf> = match std::env::var_os("MICROVM_CNI_PATH") {
        Some(v) => std::env::split_paths(&v).collect(),
        None => DEFAULT_PLUGIN_DIRS.iter().map(PathBuf::from).collect(),
    };
    let found: Vec<PathBuf> = dirs.iter().filter(|d| d.is_dir()).cloned().collect();
    if found.is_empty() {
        bail!(
            "no CNI plugins: none of {} exists (Debian: apt-get install \
             containernetworking-plugins; or --network none)",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_conflist_is_written_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni/microvm.conflist");
        let list = load_or_write(&path).unwrap();
        assert_eq!(list.name, NETWORK);
        let types: Vec<&str> = list
            .plugins
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "firewall"]);
        // An edited file is used as it is, not overwritten.
        let mut edited = default_conflist();
        edited["name"] = "mine".into();
        std::fs::write(&path, serde_json::to_vec(&edited).unwrap()).unwrap();
        assert_eq!(load_or_write(&path).unwrap().name, "mine");
        std::fs::write(&path, b"{").unwrap();
        assert!(load_or_write(&path).is_err());
    }
}
