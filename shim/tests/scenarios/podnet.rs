//! A CRI pod on its CNI network: the pod's host network namespace has an `eth0` (a veth into
//! the host, as CNI's bridge or ptp plugins leave it), the pod's VM takes it over.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::cri::{run_cri_sandbox, run_detached_cmd};
use crate::common::{check, sh, text, wait_until, Containerd};

/// The pod's network namespace, as CNI's `/var/run/netns/cni-…`.
const NETNS: &str = "microvm-test-pod6";
/// The host's end of the pod's veth.
const HOST_VETH: &str = "mvt-pod6";
/// The pod's address (CNI's IPAM would pick it).
const POD_ADDR: &str = "10.88.0.2:8080";

fn ok(cmd: &str) -> Result<(), String> {
    let out = sh(cmd);
    check(out.status.success(), || format!("{cmd}: {}", text(&out)))
}

/// What CNI's ptp plugin leaves: a veth with `eth0` in the pod's namespace (10.88.0.2/24,
/// default route via the host's end, 10.88.0.1/24).
fn make_cni_network() -> Result<(), String> {
    // The testbed's kernel has these as modules and does not always load them on demand.
    let _ = sh("for m in veth tun sch_ingress cls_u32 act_mirred; do modprobe $m; done");
    ok(&format!("ip netns add {NETNS}"))?;
    ok(&format!(
        "ip link add {HOST_VETH} type veth peer name eth0 netns {NETNS} && \
         ip addr add 10.88.0.1/24 dev {HOST_VETH} && ip link set {HOST_VETH} up && \
         ip -n {NETNS} addr add 10.88.0.2/24 dev eth0 && ip -n {NETNS} link set eth0 up && \
         ip -n {NETNS} route add default via 10.88.0.1"
    ))
}

/// What 10.88.0.2:8080 answers, if anything.
fn answer() -> Option<String> {
    let addr: SocketAddr = POD_ADDR.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut got = String::new();
    s.read_to_string(&mut got).ok()?;
    Some(got)
}

/// The pod's tap and any ingress qdisc in the pod's namespace (empty when unplumbed).
fn plumbing_left() -> String {
    let links = text(&sh(&format!("ip -n {NETNS} -o link show")));
    let taps: Vec<&str> = links.lines().filter(|l| l.contains("tap0_mvm")).collect();
    let qdiscs = text(&sh(&format!("tc -n {NETNS} qdisc show")));
    let ingress: Vec<&str> = qdiscs.lines().filter(|l| l.contains("ingress")).collect();
    [taps, ingress].concat().join("\n")
}

/// The sandbox of a pod whose namespace has a CNI `eth0`, and an app container joining its
/// namespaces that serves on port 8080: the host reaches it on the pod's CNI address through
/// the veth (the VM has the veth's MAC and address); after the pod is deleted no tap or qdisc
/// is left in the namespace, and CNI's `eth0` is still there.
pub fn pod_on_its_cni_network(c: &Containerd) -> Result<(), String> {
    let _ = sh(&format!("ip link del {HOST_VETH}; ip netns del {NETNS}"));
    let r = make_cni_network().and_then(|()| {
        let app = run_cri_sandbox(c, "pod6", NETNS)?;
        let serve = ["nc", "-ll", "-p", "8080", "-e", "echo", "pod-ok"];
        run_detached_cmd(c, "pod6-app", &app, &serve)?;
        check(!plumbing_left().is_empty(), || {
            "no tap in the pod's namespace while the pod runs".into()
        })?;
        let mut last = None;
        wait_until(&format!("{POD_ADDR} to answer pod-ok"), 60, || {
            last = answer();
            last.as_deref().is_some_and(|a| a.trim() == "pod-ok")
        })
        .map_err(|e| {
            let guest = text(&c.exec_sh("ip", "pod6-app", "ip addr; ip route"));
            format!("{e} (last answer {last:?}); in the guest:\n{guest}")
        })?;
        for id in ["pod6-app", "pod6"] {
            c.remove(id);
        }
        wait_until("the pod's tap and qdiscs to go", 60, || {
            plumbing_left().is_empty()
        })
        .map_err(|e| format!("{e}:\n{}", plumbing_left()))?;
        let eth0 = sh(&format!("ip -n {NETNS} link show eth0"));
        check(eth0.status.success(), || {
            format!("CNI's eth0 is gone: {}", text(&eth0))
        })
    });
    for id in ["pod6-app", "pod6"] {
        c.remove(id);
    }
    let _ = sh(&format!("ip link del {HOST_VETH}; ip netns del {NETNS}"));
    r
}
