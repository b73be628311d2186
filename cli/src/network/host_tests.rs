//! [`attach`](super::attach) and [`detach`](super::detach) on this host with the real CNI
//! plugins (root, Debian's containernetworking-plugins, iptables), no VM: a network of the
//! test's own (its own bridge, subnet and lease directory), so nothing of microvm's is touched.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use super::*;

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What a run may leave on the host: namespaces, links, NAT/filter rules naming `ip` or the run,
/// leases.
fn traces(id: &str, ip: &str, leases: &Path) -> Vec<String> {
    let mut found = Vec::new();
    if sh("ip netns list").contains(&format!("microvm-{id}")) {
        found.push("netns".into());
    }
    if Path::new(&format!("/run/netns/microvm-{id}")).exists() {
        found.push("netns file".into());
    }
    let rules = sh("iptables-save");
    for l in rules.lines() {
        if l.contains(&format!("{ip}/")) || l.contains(&format!("{ip}:")) || l.contains(id) {
            found.push(format!("rule: {l}"));
        }
    }
    // host-local keeps them in <dataDir>/<network name>.
    for e in std::fs::read_dir(leases.join("mvtest"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.parse::<std::net::IpAddr>().is_ok() {
            found.push(format!("lease {name}"));
        }
    }
    found
}

#[test]
fn real_plugins_attach_and_detach_leave_nothing() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (CNI plugins)");
    }
    let plugins = config::plugin_dirs().expect("the CNI plugins (containernetworking-plugins)");
    let tmp = tempfile::tempdir().unwrap();
    let leases = tmp.path().join("leases");
    let bridge = format!("mvt{}", std::process::id() % 100_000);
    let conflist = cni::ConfList::parse(
        &serde_json::to_vec(&json!({
            "cniVersion": "1.0.0",
            "name": "mvtest",
            "plugins": [
                {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": true,
                 "ipam": {"type": "host-local", "dataDir": leases,
                          "ranges": [[{"subnet": "10.231.0.0/24", "gateway": "10.231.0.1"}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": true}},
                {"type": "firewall"},
            ],
        }))
        .unwrap(),
    )
    .unwrap();
    let plan = NetworkPlan {
        mode: Mode::Bridge,
        publish: vec![options::parse_publish("18123:80").unwrap()],
        dns: vec!["192.0.2.53".parse().unwrap()],
        add_hosts: Vec::new(),
    };
    let run_dir: PathBuf = tmp.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    let id = format!("t{:011x}", std::process::id());
    let outcome = std::panic::catch_unwind(|| {
        let a = attach_to(&run_dir, &id, &plan, conflist.clone(), plugins.clone()).unwrap();
        assert_eq!(a.netns, Path::new(NETNS_DIR).join(format!("microvm-{id}")));
        let pod = &a.plumbing.interface;
        assert_eq!(pod.name, "eth0");
        let ip = pod.addresses[0].addr.to_string();
        assert!(ip.starts_with("10.231.0."), "{pod:?}");
        assert!(
            pod.routes.iter().any(
                |r| r.destination.is_none() && r.gateway == Some("10.231.0.1".parse().unwrap())
            ),
            "{pod:?}"
        );
        assert!(hostnet::link_state(&a.netns, hostnet::DEFAULT_TAP)
            .unwrap()
            .is_some());
        assert_eq!(a.dns.servers, ["192.0.2.53"]);
        assert_eq!(a.address().map(|i| i.to_string()), Some(ip.clone()));
        assert!(run_dir.join(RECORD).is_file());
        let here = traces(&id, &ip, &leases);
        assert!(here.iter().any(|t| t == "netns"), "{here:?}");
        assert!(here.iter().any(|t| t.starts_with("lease")), "{here:?}");
        assert!(
            here.iter()
                .any(|t| t.contains("DNAT") && t.contains("18123") || t.contains("--dport 18123")),
            "no port forward for -p 18123:80: {here:?}"
        );
        // A second run gets another address.
        let run2 = tmp.path().join("run2");
        std::fs::create_dir(&run2).unwrap();
        let id2 = format!("u{:011x}", std::process::id());
        let plan2 = NetworkPlan {
            mode: Mode::Bridge,
            ..Default::default()
        };
        let b = attach_to(&run2, &id2, &plan2, conflist.clone(), plugins.clone()).unwrap();
        let ip2 = b.plumbing.interface.addresses[0].addr.to_string();
        detach(&run2).unwrap();
        assert_ne!(ip, ip2);
        detach(&run_dir).unwrap();
        // Idempotent, as `microvm rm` after the run's own cleanup.
        detach(&run_dir).unwrap();
        assert!(!run_dir.join(RECORD).exists());
        let left = traces(&id, &ip, &leases);
        assert!(left.is_empty(), "left behind: {left:?}");
        let left2 = traces(&id2, &ip2, &leases);
        assert!(left2.is_empty(), "left behind: {left2:?}");
        let veths = sh(&format!("ip -o link show master {bridge}"));
        assert!(
            veths.trim().is_empty(),
            "veths still on the bridge: {veths}"
        );
    });
    // Whatever happened: nothing of this test stays on the host.
    let _ = detach(&run_dir);
    let _ = detach(&tmp.path().join("run2"));
    let _ = Command::new("ip").args(["link", "del", &bridge]).status();
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn a_failed_add_undoes_what_was_made() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (CNI plugins)");
    }
    let plugins = config::plugin_dirs().expect("the CNI plugins (containernetworking-plugins)");
    let tmp = tempfile::tempdir().unwrap();
    // host-local refuses a subnet without room; the namespace made before must go.
    let conflist = cni::ConfList::parse(
        &serde_json::to_vec(&json!({
            "cniVersion": "1.0.0",
            "name": "mvtest-bad",
            "plugins": [{"type": "bridge", "bridge": "mvtbad0",
                         "ipam": {"type": "host-local", "dataDir": tmp.path().join("l"),
                                  "ranges": [[{"subnet": "10.232.0.0/32"}]]}}],
        }))
        .unwrap(),
    )
    .unwrap();
    let id = format!("f{:011x}", std::process::id());
    let e = attach_to(tmp.path(), &id, &NetworkPlan::default(), conflist, plugins)
        .err()
        .expect("a /32 subnet has no address to give");
    // Its DEL fails as well (the same bad range): the namespace goes all the same, and the
    // record stays for a retry.
    let _ = detach(tmp.path());
    let _ = Command::new("ip").args(["link", "del", "mvtbad0"]).status();
    assert!(
        format!("{e:#}").contains("CNI plugin bridge (ADD) failed"),
        "{e:#}"
    );
    assert!(!Path::new(NETNS_DIR).join(format!("microvm-{id}")).exists());
}
