//! Pods on CNI networks other than the bridge, through containerd 2's CRI plugin: `ptp` (a
//! routed veth per pod, no bridge: the pod reaches even its own subnet through the host) and
//! `macvlan` (a macvlan of a host link per pod). The shim plumbs the VM into whatever link the
//! plugin left as the pod's `eth0`, and the guest takes over its address and routes.
//!
//! A runc pod (the control) and a microvm pod on one network: each answers the host on the
//! address CNI gave it, each reaches the other pod and a server on the host's gateway address;
//! after both are removed no network namespace, host link or IPAM lease is left.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::common::cri::{write_json, Cri, BUSYBOX};
use crate::common::host::vmm_pids;
use crate::common::{check, text, wait_until};
use crate::lifecycle::{answer, entries, netns_files};
use crate::World;

/// The pods' app: serves `pod-ok` on port 8080 (as the bridge scenarios' app).
const APP: &str = "exec nc -ll -p 8080 -e echo pod-ok";

/// A pod of the scenario: its sandbox, its app container and its CNI address.
struct Pod {
    handler: &'static str,
    id: String,
    app: String,
    ip: String,
}

pub fn pods_talk(w: &World, c: &Cri) -> Result<(), String> {
    let image = w.registry.image(BUSYBOX);
    c.crictl_ok(&["pull", &image])?;
    let server = HostServer::start()?;
    let links_before = host_links();
    let netns_before = netns_files();
    let leases_before = c.leases();
    let mut pods = Vec::new();
    let result: Result<(), String> = (|| {
        for handler in ["runc", "microvm"] {
            pods.push(run_pod(w, c, handler)?);
        }
        check(!vmm_pids().is_empty(), || {
            "no VMM runs for the microvm pod".into()
        })?;
        for pod in &pods {
            reaches_from_host(c, pod)?;
        }
        for (from, to) in [(&pods[0], &pods[1]), (&pods[1], &pods[0])] {
            let heard = nc_from(c, from, &to.ip, 8080)?;
            check(heard == "pod-ok", || {
                format!(
                    "the {} pod reached {}:8080 (the {} pod) and heard {heard:?}",
                    from.handler, to.ip, to.handler
                )
            })?;
        }
        for pod in &pods {
            let heard = nc_from(c, pod, &c.gateway(), server.port)?;
            check(heard == "host-ok", || {
                format!(
                    "the {} pod reached the host at {}:{} and heard {heard:?}",
                    pod.handler,
                    c.gateway(),
                    server.port
                )
            })?;
        }
        Ok(())
    })();
    let mut removed = Ok(String::new());
    for pod in &pods {
        let stopped = c.crictl_ok(&["stopp", &pod.id]);
        removed = removed.and(stopped).and(c.crictl_ok(&["rmp", &pod.id]));
    }
    server.stop();
    result?;
    removed?;
    let mut left = String::new();
    wait_until(
        "the pods' namespaces, host links and leases to go",
        60,
        || {
            let (netns, links, leases) = (netns_files(), host_links(), c.leases());
            left = format!(
                "network namespaces {:?}, host links {:?}, leases {:?}",
                netns.difference(&netns_before).collect::<Vec<_>>(),
                links.difference(&links_before).collect::<Vec<_>>(),
                leases
                    .iter()
                    .filter(|l| !leases_before.contains(l))
                    .collect::<Vec<_>>()
            );
            netns == netns_before && links == links_before && leases == leases_before
        },
    )
    .map_err(|e| format!("{e}: left {left}"))
}

/// RunPodSandbox and the app container under `handler`; the pod's address is on the network.
fn run_pod(w: &World, c: &Cri, handler: &'static str) -> Result<Pod, String> {
    let name = format!("{handler}-{:?}-{:?}", c.network, c.flavor).to_lowercase();
    let (dir, pod_json) = c.pod_config(&name, serde_json::json!({}))?;
    let app_json = write_json(
        &dir.join("app.json"),
        &serde_json::json!({
            "metadata": {"name": "app"},
            "image": {"image": w.registry.image(BUSYBOX)},
            "command": ["sh", "-c", APP],
            "log_path": "app.log",
            "linux": {},
        }),
    )?;
    let id = c.crictl_ok(&[
        "runp",
        "--runtime",
        handler,
        &pod_json.display().to_string(),
    ])?;
    let app = c.create_and_start(&id, &app_json, &pod_json)?;
    let ip = c.pod_ip(&id)?;
    check(ip.starts_with(&c.pod_prefix()), || {
        format!(
            "the {handler} pod's address {ip:?} is not on the {:?} network {}",
            c.network,
            c.subnet()
        )
    })?;
    Ok(Pod {
        handler,
        id,
        app,
        ip,
    })
}

fn reaches_from_host(c: &Cri, pod: &Pod) -> Result<(), String> {
    let mut got = None;
    wait_until(
        &format!(
            "the {} pod's {}:8080 to answer the host",
            pod.handler, pod.ip
        ),
        60,
        || {
            got = answer(&pod.ip);
            got.as_deref().is_some_and(|a| a.trim() == "pod-ok")
        },
    )
    .map_err(|e| format!("{e} on the {:?} network (last answer {got:?})", c.network))
}

/// What the pod's app container hears from `ip:port` with busybox's `nc`.
fn nc_from(c: &Cri, pod: &Pod, ip: &str, port: u16) -> Result<String, String> {
    let script = format!("nc {ip} {port} </dev/null");
    let out = c.crictl(&[
        "exec",
        "--sync",
        "--timeout",
        "60",
        &pod.app,
        "/bin/sh",
        "-c",
        &script,
    ]);
    Ok(if out.status.success() {
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    } else {
        format!("nothing: {}", text(&out))
    })
}

/// The links of the host's (the test's) network namespace, by name.
fn host_links() -> BTreeSet<PathBuf> {
    entries(Path::new("/sys/class/net")).into_iter().collect()
}

/// A TCP server on all the host's addresses that sends `host-ok` to whoever connects.
struct HostServer {
    port: u16,
    stopping: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl HostServer {
    fn start() -> Result<HostServer, String> {
        let listener = TcpListener::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(mut conn) = conn {
                    let _ = conn.write_all(b"host-ok\n");
                }
            }
        });
        Ok(HostServer {
            port,
            stopping,
            thread,
        })
    }

    fn stop(self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        let _ = self.thread.join();
    }
}
