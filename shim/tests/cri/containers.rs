//! Containers of one pod, as kubelet runs them: a server and a client that reaches it on the
//! pod's `localhost` (they share the pod's network); `crictl attach` to a third one's stdin; a
//! container that outgrows its memory limit is reported `OOMKilled` with 137, and is created
//! again in the same sandbox (kubelet's restart, attempt 1), which then runs. Under runc (the
//! control) and microvm.

use std::path::Path;

use crate::common::cri::{figure, Cri, BUSYBOX};
use crate::common::{check, text, wait_until};
use crate::World;

pub fn runc_control(w: &World, c: &Cri) -> Result<(), String> {
    pod_containers(w, c, "runc")
}

pub fn microvm_pod(w: &World, c: &Cri) -> Result<(), String> {
    pod_containers(w, c, "microvm")
}

fn pod_containers(w: &World, c: &Cri, handler: &str) -> Result<(), String> {
    let name = format!("two-{handler}-{:?}", c.flavor).to_lowercase();
    let image = w.registry.image(BUSYBOX);
    // As kubelet gives every pod (containerd's cgroupfs driver): PodSandboxStats reads it.
    let linux = serde_json::json!({"cgroup_parent": format!("/{CGROUP_TOP}/{name}")});
    let (dir, pod_json) = c.pod_config(&name, linux)?;
    let pod_json = pod_json.display().to_string();
    let ctr_json = |file: &str, ctr: &str, attempt: u32, command: &str, memory: u64| {
        write(
            &dir.join(file),
            serde_json::json!({
                "metadata": {"name": ctr, "attempt": attempt},
                "image": {"image": image},
                "command": ["sh", "-c", command],
                "log_path": format!("{ctr}-{attempt}.log"),
                "linux": {"resources": {"memory_limit_in_bytes": memory}},
            }),
        )
    };
    let server = ctr_json(
        "server.json",
        "server",
        0,
        "exec nc -ll -p 8081 -e echo from-the-server",
        0,
    )?;
    let client = ctr_json(
        "client.json",
        "client",
        0,
        "sleep 1; nc 127.0.0.1 8081 </dev/null; exec sleep 600",
        0,
    )?;
    let reader = dir.join("reader.json");
    write(
        &reader,
        serde_json::json!({
            "metadata": {"name": "reader", "attempt": 0},
            "image": {"image": image},
            "command": ["sh", "-c", "while read l; do echo attached:$l; done"],
            "log_path": "reader-0.log",
            "stdin": true,
            "stdin_once": true,
            "linux": {},
        }),
    )?;
    let reader = reader.display().to_string();
    // 100 MiB at once under a 64 MiB limit; `exec`, so the killed process is the container's
    // own (a shell that outlived its killed child would exit 0, still reported OOMKilled).
    let hog = "exec dd if=/dev/zero of=/dev/null bs=100M count=1";
    let hog0 = ctr_json("hog0.json", "hog", 0, hog, 64 << 20)?;
    let hog1 = ctr_json(
        "hog1.json",
        "hog",
        1,
        "echo restarted; exec sleep 600",
        64 << 20,
    )?;

    c.crictl_ok(&["pull", &image])?;
    let pod = c.crictl_ok(&["runp", "--runtime", handler, &pod_json])?;
    let result = (|| {
        let start = |config: &str| c.create_and_start(&pod, config.as_ref(), pod_json.as_ref());
        start(&server)?;
        let client_id = start(&client)?;
        let mut logs = String::new();
        wait_until("the client to print the server's line", 120, || {
            logs = c.crictl_ok(&["logs", &client_id]).unwrap_or_default();
            logs.contains("from-the-server")
        })
        .map_err(|e| format!("{e}: the client's log {logs:?}"))?;

        pod_stats_checks(c, handler, &pod)?;

        // crictl attach: a line into a container's own stdin and its answer back. With
        // `stdin_once`, containerd closes the container's stdin when the attach ends, so the
        // container's loop ends and it exits 0.
        let reader = start(&reader)?;
        let mut attach = c.crictl_cmd(&["attach", "-i", &reader]);
        let out = crate::streaming::run_with_stdin(&mut attach, Some(b"line-in\n"))?;
        check(
            String::from_utf8_lossy(&out.stdout).contains("attached:line-in"),
            || format!("crictl attach -i: {:?} {}", out.status, text(&out)),
        )?;
        let state = exited(c, &reader, "{{.status.state}} {{.status.exitCode}}", 60)?;
        check(state == "CONTAINER_EXITED 0", || {
            format!("after its stdin closed the attached container is {state:?}")
        })?;

        let hog_id = start(&hog0)?;
        let template = "{{.status.state}} {{.status.reason}} {{.status.exitCode}}";
        let status = exited(c, &hog_id, template, 120)?;
        check(status == "CONTAINER_EXITED OOMKilled 137", || {
            format!("the hog ended as {status:?}")
        })?;
        // kubelet's restart: the same container again, attempt 1, in the same sandbox.
        let again = start(&hog1)?;
        let mut status = String::new();
        wait_until("the restarted container to run", 60, || {
            status = inspect(c, &again, "{{.status.state}}");
            status == "CONTAINER_RUNNING"
                && c.crictl_ok(&["logs", &again])
                    .is_ok_and(|l| l.contains("restarted"))
        })
        .map_err(|e| format!("{e}: {status}"))?;
        let attempt = inspect(c, &again, "{{.status.metadata.attempt}}");
        check(attempt == "1", || {
            format!("the restart's attempt is {attempt:?}")
        })
    })();
    let stopped = c.crictl_ok(&["stopp", &pod]);
    let removed = c.crictl_ok(&["rmp", &pod]);
    let pod_cgroup = Path::new("/sys/fs/cgroup").join(CGROUP_TOP).join(&name);
    let left: Vec<_> = std::fs::read_dir(&pod_cgroup)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name())
                .collect()
        })
        .unwrap_or_default();
    let _ = std::fs::remove_dir(&pod_cgroup);
    result?;
    stopped?;
    removed?;
    check(left.is_empty(), || {
        format!(
            "cgroups left in {} after rmp: {left:?}",
            pod_cgroup.display()
        )
    })
}

/// The cgroup the scenario's pods get their cgroup parents in (as kubelet's `kubepods`).
const CGROUP_TOP: &str = "microvm-cri-test";

/// PodSandboxStats (`crictl statsp`): containerd reads the pod's cgroup parent on the host, so
/// it shows CPU time and memory only if the pod's processes are in it; a microvm pod's VM is
/// (the jail's leaf is made there), so its working set holds the guest RAM the guest touched.
fn pod_stats_checks(c: &Cri, handler: &str, pod: &str) -> Result<(), String> {
    let stats = c.crictl_json(&["statsp", "-o", "json", "--id", pod])?;
    let memory = figure(&stats, "/stats/0/linux/memory/workingSetBytes/value");
    let cpu = figure(&stats, "/stats/0/linux/cpu/usageCoreNanoSeconds/value");
    eprintln!(
        "{handler} PodSandboxStats: working set {:.1} MiB, cpu {} ms",
        memory as f64 / f64::from(1 << 20),
        cpu / 1_000_000
    );
    let least = if handler == "microvm" { 16 << 20 } else { 1 };
    check(memory >= least && cpu > 0, || {
        format!("PodSandboxStats: working set {memory} (want at least {least}), cpu {cpu}: {stats}")
    })
}

/// Waits (up to `seconds`) for container `id` to exit; its status through `template`, which
/// starts with `{{.status.state}}`.
fn exited(c: &Cri, id: &str, template: &str, seconds: u64) -> Result<String, String> {
    let mut status = String::new();
    wait_until(&format!("container {id} to exit"), seconds, || {
        status = inspect(c, id, template);
        status.starts_with("CONTAINER_EXITED")
    })
    .map_err(|e| format!("{e}: {status}"))?;
    Ok(status)
}

fn inspect(c: &Cri, id: &str, template: &str) -> String {
    c.inspect_field("inspect", id, template)
        .unwrap_or_else(|e| e)
}

fn write(path: &std::path::Path, value: serde_json::Value) -> Result<String, String> {
    std::fs::write(path, value.to_string()).map_err(|e| e.to_string())?;
    Ok(path.display().to_string())
}
