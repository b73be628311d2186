//! Several pods at once through CRI, as a node starts them: each `crictl runp`, `create` and
//! `start` in a thread of its own, all together. Each pod gets a VM of its own and answers on
//! its own CNI address with its own name, reaches the next pod on its address (VM to VM over
//! the CNI bridge), sees only its own files, and once all are stopped and
//! removed (together again) nothing is left: no VMM, shim, network namespace, mount or shim
//! state.

use std::path::Path;

use crate::common::cri::{Cri, BUSYBOX};
use crate::common::host::{shim_pids, vmm_pids};
use crate::common::{check, wait_until};
use crate::lifecycle::{answer, entries, mounts_of, netns_files};
use crate::World;

/// Pods started together: as many as `cli/tests/concurrency.rs` starts VMs at once, for the
/// same reason (the testbed's one-vCPU L1).
const PODS: usize = 3;

pub fn microvm_pods(w: &World, c: &Cri) -> Result<(), String> {
    let vmms_before = vmm_pids().len();
    let netns_before = netns_files();
    let image = w.registry.image(BUSYBOX);
    c.crictl_ok(&["pull", &image])?;
    let started: Vec<Result<(String, String), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PODS)
            .map(|i| {
                let image = image.clone();
                s.spawn(move || start_pod(c, i, &image))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let pods: Vec<String> = started
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|(pod, _)| pod.clone()))
        .collect();
    let checked = (|| -> Result<(), String> {
        let mut ids = Vec::new();
        for r in &started {
            ids.push(r.clone()?);
        }
        check(vmm_pids().len() == vmms_before + PODS, || {
            format!("{PODS} pods run {} VMMs", vmm_pids().len() - vmms_before)
        })?;
        let mut ips = Vec::new();
        for (i, (pod, ctr)) in ids.iter().enumerate() {
            ips.push(pod_checks(c, i, pod, ctr)?);
        }
        for (i, (_, ctr)) in ids.iter().enumerate() {
            let next = (i + 1) % PODS;
            let script = format!("nc {} 8080 </dev/null", ips[next]);
            let heard = c.crictl_ok(&[
                "exec",
                "--sync",
                "--timeout",
                "60",
                ctr,
                "/bin/sh",
                "-c",
                &script,
            ])?;
            check(heard == format!("pod-{next}"), || {
                format!(
                    "pod {i} reached pod {next} at {}:8080 and heard {heard:?}",
                    ips[next]
                )
            })?;
        }
        Ok(())
    })();
    // Stopped and removed together, whatever happened above.
    let ended: Vec<Result<String, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|pod| {
                s.spawn(move || {
                    c.crictl_ok(&["stopp", pod])?;
                    c.crictl_ok(&["rmp", pod])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    checked?;
    for e in ended {
        e?;
    }
    wait_until("the pods' VMMs and shims to end", 120, || {
        vmm_pids().len() == vmms_before && shim_pids().is_empty()
    })
    .map_err(|e| format!("{e}: VMMs {:?}, shims {:?}", vmm_pids(), shim_pids()))?;
    wait_until("the pods' network namespaces to go", 60, || {
        netns_files() == netns_before
    })
    .map_err(|e| format!("{e}: before {netns_before:?}, now {:?}", netns_files()))?;
    for pod in &pods {
        let mounts = mounts_of(pod);
        check(mounts.is_empty(), || {
            format!("mounts of {pod} left: {mounts:?}")
        })?;
    }
    let states = entries(Path::new("/run/microvm-shim"));
    check(states.is_empty(), || format!("shim state left: {states:?}"))
}

/// Pod `i`: RunPodSandbox, CreateContainer, StartContainer; its container writes a file of
/// its own into `/tmp`, then serves `pod-I` on port 8080.
fn start_pod(c: &Cri, i: usize, image: &str) -> Result<(String, String), String> {
    let name = format!("at-once-{i}-{:?}", c.flavor).to_lowercase();
    let (dir, pod_json) = c.pod_config(&name, serde_json::json!({}))?;
    let ctr_json = dir.join("ctr.json");
    let app = format!("echo {i} >/tmp/mine-{i}; exec nc -ll -p 8080 -e echo pod-{i}");
    let ctr_config = serde_json::json!({
        "metadata": {"name": "app"},
        "image": {"image": image},
        "command": ["sh", "-c", app],
        "log_path": "app.log",
        "linux": {},
    });
    std::fs::write(&ctr_json, ctr_config.to_string()).map_err(|e| e.to_string())?;
    let pod = c.crictl_ok(&["runp", "--runtime", "microvm", pod_json.to_str().unwrap()])?;
    let ctr = c.create_and_start(&pod, &ctr_json, &pod_json)?;
    Ok((pod, ctr))
}

/// Pod `i` answers `pod-I` on its own address and its container sees only its own file; that
/// address.
fn pod_checks(c: &Cri, i: usize, pod: &str, ctr: &str) -> Result<String, String> {
    let ip = c.pod_ip(pod)?;
    let mut got = None;
    wait_until(&format!("pod {i} at {ip}:8080 to answer"), 120, || {
        got = answer(&ip);
        got.as_deref()
            .is_some_and(|a| a.trim() == format!("pod-{i}"))
    })
    .map_err(|e| format!("{e} (last answer {got:?})"))?;
    let listing = c.crictl_ok(&["exec", "--sync", ctr, "/bin/sh", "-c", "ls /tmp"])?;
    check(listing.trim() == format!("mine-{i}"), || {
        format!("pod {i}'s /tmp holds {listing:?}")
    })?;
    Ok(ip)
}
