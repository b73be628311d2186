//! The guest spec of specs shaped as containerd 1.6's CRI plugin and `ctr` write them.

use serde_json::{json, Value};

use super::namespaces::check_host_netns;
use super::*;

const SANDBOX: &str = include_str!("testdata/cri-sandbox.json");
const CONTAINER: &str = include_str!("testdata/cri-container.json");
/// The pid the shim reported for the sandbox's pause process (in cri-container.json's paths).
const SANDBOX_PID: u32 = 4242;

fn spec(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

fn first_pod() -> PodView<'static> {
    PodView {
        first: true,
        running: &|_| false,
    }
}

fn pod_with_sandbox() -> PodView<'static> {
    PodView {
        first: false,
        running: &|pid| pid == SANDBOX_PID,
    }
}

/// The guest's `linux.namespaces` as (type, path) pairs.
fn namespaces(g: &GuestSpec) -> Vec<(String, Option<String>)> {
    g.spec["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ns| {
            (
                ns["type"].as_str().unwrap().to_string(),
                ns.get("path").map(|p| p.as_str().unwrap().to_string()),
            )
        })
        .collect()
}

fn without(text: &str, typ: &str) -> Value {
    let mut s = spec(text);
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|ns| ns["type"] != typ);
    s
}

fn with_path(text: &str, typ: &str, path: &str) -> Value {
    let mut s = spec(text);
    for ns in s["linux"]["namespaces"].as_array_mut().unwrap() {
        if ns["type"] == typ {
            ns["path"] = json!(path);
        }
    }
    s
}

#[test]
fn the_sandbox_netns_is_recorded_and_the_guest_gets_fresh_namespaces() {
    let s = spec(SANDBOX);
    assert_eq!(Role::of(&s), Role::Sandbox);
    let g = guest_spec(&s, &first_pod()).unwrap();
    assert_eq!(
        g.host_netns.as_deref(),
        Some(std::path::Path::new(
            "/var/run/netns/cni-8c3e4f1a-6d2b-4b9e-7a1c-2f5d8e9b0c3a"
        ))
    );
    let ns = namespaces(&g);
    assert_eq!(ns.len(), 5);
    assert!(ns.iter().all(|(_, p)| p.is_none()), "{ns:?}");
    let text = serde_json::to_string(&g.spec).unwrap();
    assert!(!text.contains("/var/run/netns"), "{text}");
}

#[test]
fn a_pod_container_joins_the_sandbox_in_the_guest() {
    let s = spec(CONTAINER);
    assert_eq!(Role::of(&s), Role::PodContainer);
    let g = guest_spec(&s, &pod_with_sandbox()).unwrap();
    assert_eq!(g.host_netns, None);
    let ns = namespaces(&g);
    let path = |t: &str| ns.iter().find(|(n, _)| n == t).unwrap().1.clone();
    assert_eq!(path("network").as_deref(), Some("/proc/4242/ns/net"));
    assert_eq!(path("ipc").as_deref(), Some("/proc/4242/ns/ipc"));
    assert_eq!(path("uts").as_deref(), Some("/proc/4242/ns/uts"));
    assert_eq!(
        path("pid"),
        None,
        "its own PID namespace (no shareProcessNamespace)"
    );
    assert_eq!(path("mount"), None);
    // shareProcessNamespace: the PID namespace of the sandbox.
    let s = with_path(CONTAINER, "pid", "/proc/4242/ns/pid");
    let g = guest_spec(&s, &pod_with_sandbox()).unwrap();
    assert!(namespaces(&g).contains(&("pid".into(), Some("/proc/4242/ns/pid".into()))));
}

#[test]
fn a_path_to_no_container_of_the_pod_is_refused() {
    // The sandbox is not running (or the pid is someone else's): nothing to join.
    let e = guest_spec(&spec(CONTAINER), &first_pod()).unwrap_err();
    assert!(matches!(e, NamespaceError::Path { .. }), "{e}");
    assert!(e.to_string().contains("/proc/4242/ns/"), "{e}");
    for (typ, path) in [
        ("network", "/var/run/netns/other-pod"),
        ("network", "/proc/4242/../1/ns/net"),
        ("network", "/proc/4242/ns/net/"),
        ("network", "/proc/4242/ns/ipc"),
        ("ipc", "/proc/self/ns/ipc"),
        ("uts", "/proc/1/ns/uts"),
        ("pid", "/proc/-4242/ns/pid"),
        ("mount", "/proc/4242/ns/mnt"),
        ("cgroup", "/proc/4242/ns/cgroup"),
    ] {
        let s = with_path(CONTAINER, typ, path);
        let e = guest_spec(&s, &pod_with_sandbox()).unwrap_err().to_string();
        assert!(e.contains(path), "{typ} {path}: {e}");
    }
}

#[test]
fn host_namespace_pods_are_refused_with_one_clear_error() {
    // hostNetwork: CRI drops the network and UTS namespaces from the sandbox's spec.
    let s = without(
        &serde_json::to_string(&without(SANDBOX, "network")).unwrap(),
        "uts",
    );
    let e = guest_spec(&s, &first_pod()).unwrap_err().to_string();
    assert!(
        e.starts_with("hostNetwork pods cannot run in a microVM: "),
        "{e}"
    );
    // hostPID, hostIPC: the namespace left out, or pointing at the host's.
    for (typ, mode) in [("pid", "hostPID"), ("ipc", "hostIPC")] {
        let e = guest_spec(&without(SANDBOX, typ), &first_pod())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("{mode} pods cannot run in a microVM: ")),
            "{e}"
        );
        let e = guest_spec(&with_path(SANDBOX, typ, "/proc/1/ns/x"), &first_pod())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("{mode} pods cannot run in a microVM: ")),
            "{e}"
        );
        assert!(e.contains("/proc/1/ns/x"), "{e}");
    }
    // A container of such a pod is refused the same way.
    let e = guest_spec(&without(CONTAINER, "network"), &pod_with_sandbox())
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("hostNetwork pods"), "{e}");
}

#[test]
fn plain_containers_keep_their_namespaces_and_only_the_first_names_the_host_netns() {
    // `ctr run --with-ns network:/var/run/netns/x` (no CRI annotations).
    let mut s = without(CONTAINER, "cgroup");
    s["annotations"] = json!({});
    for ns in s["linux"]["namespaces"].as_array_mut().unwrap() {
        ns.as_object_mut().unwrap().remove("path");
    }
    let netns = "/var/run/netns/x";
    let plain = with_path(&serde_json::to_string(&s).unwrap(), "network", netns);
    assert_eq!(Role::of(&plain), Role::Plain);
    let g = guest_spec(&plain, &first_pod()).unwrap();
    assert_eq!(g.host_netns.as_deref(), Some(std::path::Path::new(netns)));
    assert!(namespaces(&g).iter().all(|(_, p)| p.is_none()));
    // A later container of the pod cannot name a host namespace.
    let e = guest_spec(&plain, &pod_with_sandbox())
        .unwrap_err()
        .to_string();
    assert!(e.contains(netns), "{e}");
    // `ctr run --net-host`: no network namespace; not a CRI pod, so the VM's own network.
    let host_net = without(&serde_json::to_string(&s).unwrap(), "network");
    let g = guest_spec(&host_net, &first_pod()).unwrap();
    assert_eq!(namespaces(&g).len(), 4);
}

#[test]
fn the_host_netns_is_checked_to_be_a_network_namespace() {
    check_host_netns(std::path::Path::new("/proc/self/ns/net")).unwrap();
    let e = check_host_netns(std::path::Path::new("/proc/self/ns/uts"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a network namespace"), "{e}");
    let f = tempfile::NamedTempFile::new().unwrap();
    let e = check_host_netns(f.path()).unwrap_err().to_string();
    assert!(e.contains("not a namespace"), "{e}");
    assert!(check_host_netns(std::path::Path::new("/nonexistent/netns")).is_err());
}

#[test]
fn slot_disks_in_the_guest() {
    assert_eq!(guest_disk(0), "/dev/vda");
    assert_eq!(guest_disk(7), "/dev/vdh");
}

#[test]
fn a_sandbox_on_the_pod_network_keeps_its_other_namespaces() {
    let mut guest = guest_spec(&spec(SANDBOX), &first_pod()).unwrap();
    let types = |s: &Value| -> Vec<String> {
        s.pointer("/linux/namespaces")
            .and_then(Value::as_array)
            .unwrap()
            .iter()
            .map(|ns| ns["type"].as_str().unwrap().to_string())
            .collect()
    };
    let before = types(&guest.spec);
    assert!(before.iter().any(|t| t == "network"), "{before:?}");
    namespaces::use_vm_network(&mut guest.spec);
    let after = types(&guest.spec);
    let expected: Vec<String> = before.into_iter().filter(|t| t != "network").collect();
    assert_eq!(after, expected);
}

/// containerd 2.x's sandbox sysctls: the network ones move from the sandbox's spec (where the
/// agent would refuse them: the sandbox has no network namespace of its own in the guest) to
/// the VM's network namespace; the others stay.
#[test]
fn a_sandbox_on_the_pod_network_hands_its_network_sysctls_to_the_vm() {
    let mut spec = spec(SANDBOX);
    spec["linux"]["sysctl"] = serde_json::json!({
        "net.ipv4.ip_unprivileged_port_start": "0",
        "net.ipv4.ping_group_range": "0 2147483647",
        "kernel.shm_rmid_forced": "1",
    });
    let mut guest = guest_spec(&spec, &first_pod()).unwrap();
    let moved = namespaces::network_sysctls(&guest.spec);
    assert_eq!(
        moved.into_iter().collect::<Vec<_>>(),
        [
            (
                "net.ipv4.ip_unprivileged_port_start".to_string(),
                "0".to_string()
            ),
            (
                "net.ipv4.ping_group_range".to_string(),
                "0 2147483647".to_string()
            ),
        ]
    );
    namespaces::use_vm_network(&mut guest.spec);
    assert_eq!(
        guest.spec["linux"]["sysctl"],
        serde_json::json!({"kernel.shm_rmid_forced": "1"})
    );
}
