//! `microvm run`'s network, docker-style: `--network bridge` (the default) joins the run to
//! microvm's own CNI network (`microvm0`, [`config`]) through the real CNI plugins, `-p`
//! publishes ports with the portmap plugin, `--network none` leaves the VM without a network
//! device.
//!
//! For a bridge run: a network namespace of the run's own (`/run/netns/microvm-<id>`), CNI
//! `ADD` into it (a veth `eth0` on the bridge, an address from host-local, NAT and port
//! forwards), then `hostnet` joins a tap to that `eth0` (tc redirects) and the VMM runs in the
//! namespace with a virtio-net device on the tap; the agent gives the guest's interface
//! `eth0`'s identity. What was made is recorded in the run's directory (`network.json`) before
//! it is made, so [`detach`] undoes it from any process: the run's own end, `microvm rm`.

pub mod cni;
pub mod config;
pub mod hosts;
pub mod options;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use hosts::{parse_add_host, parse_hostname, AddHost};
pub use options::{parse_mode, parse_publish, Mode, Publish};

/// Where the runs' namespaces are (so `ip netns` lists them).
pub const NETNS_DIR: &str = "/run/netns";
/// The interface CNI makes in the namespace (and the guest's interface takes its name).
pub const IFNAME: &str = hostnet::DEFAULT_INTERFACE;
/// In the run's directory: what [`attach`] made.
const RECORD: &str = "network.json";
/// The most of a record read back.
const RECORD_CAP: u64 = 4 << 20;

/// A run's network, planned.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetworkPlan {
    pub mode: Mode,
    pub publish: Vec<Publish>,
    /// `--dns`: replaces the nameservers the guest would get otherwise.
    pub dns: Vec<IpAddr>,
    /// `--add-host`: extra lines of the container's `/etc/hosts`.
    #[serde(default)]
    pub add_hosts: Vec<AddHost>,
}

/// What [`attach`] made and recorded: enough for [`detach`] in another process.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    netns: PathBuf,
    container_id: String,
    plugin_dirs: Vec<PathBuf>,
    conflist: cni::ConfList,
    runtime_config: Map<String, Value>,
    /// The `ADD`'s result, once there is one (the `DEL`'s `prevResult`).
    result: Option<Value>,
}

impl Record {
    fn runtime(&self) -> cni::Runtime {
        cni::Runtime {
            plugin_dirs: self.plugin_dirs.clone(),
            container_id: self.container_id.clone(),
            netns: self.netns.clone(),
            ifname: IFNAME.into(),
            runtime_config: self.runtime_config.clone(),
        }
    }

    fn write(&self, run_dir: &Path) -> Result<()> {
        crate::state::write_atomic(&run_dir.join(RECORD), &serde_json::to_vec_pretty(self)?)
    }

    fn read(run_dir: &Path) -> Result<Option<Record>> {
        let path = run_dir.join(RECORD);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("open {}", path.display())),
        };
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(file, RECORD_CAP), &mut text)?;
        Ok(Some(
            serde_json::from_slice(&text).with_context(|| format!("read {}", path.display()))?,
        ))
    }
}

/// A bridge run's network, ready for the VM.
pub struct Attached {
    /// The namespace the VMM runs in.
    pub netns: PathBuf,
    /// The tap joined to CNI's `eth0`, and the identity the guest takes.
    pub plumbing: hostnet::Plumbing,
    /// For the guest's `/etc/resolv.conf`.
    pub dns: Dns,
}

impl Attached {
    /// The run's address on the network (the container's `/etc/hosts` maps its hostname to it).
    pub fn address(&self) -> Option<IpAddr> {
        self.plumbing.interface.addresses.first().map(|a| a.addr)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dns {
    pub servers: Vec<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

/// Makes a bridge run's network: the namespace, CNI `ADD`, the tap. Everything is recorded in
/// `run_dir` first; on a failure what was made is undone ([`detach`]) before the error returns.
pub fn attach(run_dir: &Path, id: &str, plan: &NetworkPlan) -> Result<Attached> {
    load_modules();
    let conflist = config::load_or_write(&config::conflist_path())?;
    attach_to(run_dir, id, plan, conflist, config::plugin_dirs()?)
}

/// [`attach`] to the network `conflist` with the plugins in `plugin_dirs`.
fn attach_to(
    run_dir: &Path,
    id: &str,
    plan: &NetworkPlan,
    conflist: cni::ConfList,
    plugin_dirs: Vec<PathBuf>,
) -> Result<Attached> {
    let made = (|| {
        let mut runtime_config = Map::new();
        if !plan.publish.is_empty() {
            runtime_config.insert(
                "portMappings".into(),
                Value::Array(plan.publish.iter().map(Publish::port_mapping).collect()),
            );
        }
        let mut record = Record {
            netns: Path::new(NETNS_DIR).join(format!("microvm-{id}")),
            container_id: id.to_string(),
            plugin_dirs,
            conflist,
            runtime_config,
            result: None,
        };
        record.write(run_dir)?;
        std::fs::create_dir_all(NETNS_DIR).with_context(|| format!("create {NETNS_DIR}"))?;
        hostnet::netns::create(&record.netns).context("create the run's network namespace")?;
        let (result, value) = cni::add(&record.conflist, &record.runtime())
            .with_context(|| format!("join the CNI network {:?}", record.conflist.name))?;
        record.result = Some(value);
        record.write(run_dir)?;
        let plumbing = hostnet::plumb(&record.netns, IFNAME, hostnet::DEFAULT_TAP)
            .context("connect the VM's tap to the run's network")?;
        if let Some(ip) = result.ips.iter().find_map(|i| i.ip().ok()) {
            tracing::info!(
                "run {id}: {ip} on the CNI network {:?}",
                record.conflist.name
            );
        }
        Ok(Attached {
            netns: record.netns.clone(),
            plumbing,
            dns: dns(plan, &result.dns, &host_resolv_conf()),
        })
    })();
    if made.is_err() {
        if let Err(e) = detach(run_dir) {
            tracing::warn!("undoing a failed network setup: {e:#}");
        }
    }
    made
}

/// The kernel modules the CNI plugins (bridge, veth, iptables NAT and filter rules) and the tap
/// plumbing use.
const MODULES: &[&str] = &[
    "bridge",
    "veth",
    "tun",
    "sch_ingress",
    "cls_u32",
    "act_mirred",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_ct",
    "nf_nat",
    "nf_conntrack",
    "xt_nat",
    "xt_MASQUERADE",
    "xt_conntrack",
    "xt_comment",
    "xt_multiport",
    "xt_mark",
    "xt_addrtype",
    "xt_tcpudp",
];

/// Loads [`MODULES`], best effort, as docker loads `bridge` and `br_netfilter`: the kernel
/// loads them on demand only where its `modprobe` helper can reach the modules, which is not
/// so in a chroot such as the testbed's (there the helper runs in the initramfs). One
/// `modprobe` process; failures (no modprobe, a module built in or absent) are ignored, and
/// a missing feature then fails in the plugin that needs it, with its message.
fn load_modules() {
    let done = std::process::Command::new("modprobe")
        .arg("-a")
        .arg("-q")
        .args(MODULES)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    tracing::debug!("modprobe of the network's modules: {done:?}");
}

/// Undoes what [`attach`] recorded in `run_dir`: the tap and its redirects, CNI `DEL` (the
/// address lease, NAT and port forwards, the veth), the namespace. Idempotent; nothing
/// recorded is nothing to do. The record is removed once everything went, so a failure can be
/// retried (`microvm rm`).
pub fn detach(run_dir: &Path) -> Result<()> {
    let Some(record) = Record::read(run_dir)? else {
        return Ok(());
    };
    // Every step is tried whatever the others did; the first failure is returned.
    let mut failed: Option<anyhow::Error> = None;
    if let Err(e) = hostnet::unplumb(&record.netns, IFNAME, hostnet::DEFAULT_TAP) {
        failed.get_or_insert(anyhow::Error::new(e).context("remove the VM's tap"));
    }
    if let Err(e) = cni::del(&record.conflist, &record.runtime(), record.result.as_ref()) {
        failed
            .get_or_insert(e.context(format!("leave the CNI network {:?}", record.conflist.name)));
    }
    if let Err(e) = hostnet::netns::remove(&record.netns) {
        failed.get_or_insert(anyhow::Error::new(e).context("remove the run's network namespace"));
    }
    if let Some(e) = failed {
        return Err(e);
    }
    match std::fs::remove_file(run_dir.join(RECORD)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).context("remove the network record"),
    }
}

/// The VM's network device on the plumbed tap, with `eth0`'s MAC and MTU.
pub fn net_config(p: &hostnet::Plumbing) -> Result<sandbox::vmm_api::NetConfig> {
    Ok(sandbox::vmm_api::NetConfig {
        tap_name: p.tap.clone(),
        mac: p.interface.mac,
        mtu: u16::try_from(p.interface.mtu)
            .with_context(|| format!("{IFNAME}'s MTU {} is too large", p.interface.mtu))?,
    })
}

/// The host's `/etc/resolv.conf` (empty if unreadable).
fn host_resolv_conf() -> String {
    let mut text = String::new();
    if let Ok(f) = std::fs::File::open("/etc/resolv.conf") {
        let _ = std::io::Read::read_to_string(&mut std::io::Read::take(f, 64 << 10), &mut text);
    }
    text
}

/// docker's rules: `--dns` if given, else CNI's nameservers, else the host's (loopback ones
/// left out: they mean nothing in the VM), else Google's public ones; search domains and
/// options from CNI, else the host's.
fn dns(plan: &NetworkPlan, cni: &cni::ResultDns, host: &str) -> Dns {
    let mut host_servers = Vec::new();
    let (mut search, mut options) = (Vec::new(), Vec::new());
    for line in host.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                    if !ip.is_loopback() {
                        host_servers.push(ip.to_string());
                    }
                }
            }
            Some("search" | "domain") => search = words.map(String::from).collect(),
            Some("options") => options.extend(words.map(String::from)),
            _ => {}
        }
    }
    let servers = if !plan.dns.is_empty() {
        plan.dns.iter().map(IpAddr::to_string).collect()
    } else if !cni.nameservers.is_empty() {
        cni.nameservers.clone()
    } else if !host_servers.is_empty() {
        host_servers
    } else {
        vec!["8.8.8.8".into(), "8.8.4.4".into()]
    };
    Dns {
        servers,
        search: if cni.search.is_empty() {
            search
        } else {
            cni.search.clone()
        },
        options: if cni.options.is_empty() {
            options
        } else {
            cni.options.clone()
        },
    }
}

/// The container's spec for a bridge run: it shares the guest's network namespace (the VM is
/// its network boundary, and the guest's `eth0` is the run's address) and sees the guest's
/// `/etc/resolv.conf`, which the agent writes.
pub fn share_guest_network(spec: &mut Value) {
    if let Some(ns) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
    {
        ns.retain(|n| n["type"] != "network");
    }
    hosts::bind_from_guest(spec, "/etc/resolv.conf");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dns_follows_docker() {
        let host = "# comment\nnameserver 127.0.0.53\nnameserver 192.0.2.1\nsearch a.example b.example\noptions ndots:2\n";
        let none = cni::ResultDns::default();
        let mut plan = NetworkPlan::default();
        let d = dns(&plan, &none, host);
        assert_eq!(d.servers, ["192.0.2.1"]);
        assert_eq!(d.search, ["a.example", "b.example"]);
        assert_eq!(d.options, ["ndots:2"]);
        assert_eq!(
            dns(&plan, &none, "nameserver 127.0.0.1\n").servers,
            ["8.8.8.8", "8.8.4.4"]
        );
        let from_cni = cni::ResultDns {
            nameservers: vec!["10.89.0.1".into()],
            search: vec!["cluster.local".into()],
            options: vec![],
        };
        let d = dns(&plan, &from_cni, host);
        assert_eq!(
            (d.servers[0].as_str(), d.search[0].as_str()),
            ("10.89.0.1", "cluster.local")
        );
        plan.dns = vec!["198.51.100.7".parse().unwrap()];
        assert_eq!(dns(&plan, &from_cni, host).servers, ["198.51.100.7"]);
    }

    #[test]
    fn a_bridge_container_shares_the_guest_network() {
        let mut spec = json!({
            "mounts": [],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "uts"}]},
        });
        share_guest_network(&mut spec);
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "uts"}])
        );
        assert_eq!(spec["mounts"][0]["destination"], "/etc/resolv.conf");
    }

    #[test]
    fn detach_without_a_record_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        detach(dir.path()).unwrap();
    }
}

#[cfg(test)]
mod host_tests;
