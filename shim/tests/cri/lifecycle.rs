//! A pod's life through CRI with `crictl`, as kubelet lives it: RunPodSandbox, CreateContainer,
//! StartContainer, ExecSync, the CRI log file, ContainerStats, StopContainer, StopPodSandbox,
//! RemovePodSandbox; then nothing of the pod is left on the host.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::cri::{figure, Cri, BUSYBOX};
use crate::common::host::{shim_pids, vmm_pids};
use crate::common::{check, text, wait_until};
use crate::{streaming, World};

/// The app: prints a line (to the CRI log), then serves `pod-ok` on port 8080.
const APP: &str = "echo hello-from-cri; echo to-stderr >&2; exec nc -ll -p 8080 -e echo pod-ok";

/// The control: the same steps under runc, so a failure of the microvm handler is the shim's,
/// not the harness's or containerd's.
pub fn runc_control(w: &World, c: &Cri) -> Result<(), String> {
    pod_lifecycle(w, c, "runc")
}

/// The same steps under the microvm handler: one VMM for the pod while it runs, the container
/// inside the guest (its kernel command line is the VMM's), and after RemovePodSandbox no VMM,
/// shim, tap, network namespace, mount or shim state left.
pub fn microvm_pod(w: &World, c: &Cri) -> Result<(), String> {
    let vmms_before = vmm_pids().len();
    pod_lifecycle(w, c, "microvm")?;
    wait_until("the pod's VMM and shim to end", 60, || {
        vmm_pids().len() == vmms_before && shim_pids().is_empty()
    })
    .map_err(|e| format!("{e}: VMMs {:?}, shims {:?}", vmm_pids(), shim_pids()))?;
    let states: Vec<PathBuf> = entries(Path::new("/run/microvm-shim"));
    check(states.is_empty(), || format!("shim state left: {states:?}"))
}

pub(crate) fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

pub(crate) fn netns_files() -> BTreeSet<PathBuf> {
    entries(Path::new("/var/run/netns")).into_iter().collect()
}

/// Mount points naming `id` (rootfs mounts, the sandbox's shm, the netns bind).
pub(crate) fn mounts_of(id: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(id))
        .map(String::from)
        .collect()
}

fn pod_lifecycle(w: &World, c: &Cri, handler: &str) -> Result<(), String> {
    let name = format!("{handler}-{:?}", c.flavor).to_lowercase();
    let (dir, pod_json) = c.pod_config(&name, serde_json::json!({}))?;
    let logs = dir.join("logs");
    let ctr_json = dir.join("ctr.json");
    let image = w.registry.image(BUSYBOX);
    // A hostPath volume as kubelet passes it: a CRI mount (containerd makes it a bind mount).
    let volume = dir.join("volume");
    std::fs::create_dir_all(&volume).map_err(|e| e.to_string())?;
    // As kubelet makes an emptyDir: writable by the pod's users whatever uid they are on the
    // host (the microvm pod's uid 0 is host uid 1000000000, shim/README.md).
    std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| e.to_string())?;
    std::fs::write(volume.join("from-host"), "host-wrote\n").map_err(|e| e.to_string())?;
    std::fs::write(
        &ctr_json,
        serde_json::json!({
            "metadata": {"name": "app"},
            "image": {"image": image},
            "command": ["sh", "-c", APP],
            "log_path": "app.log",
            "mounts": [{"container_path": "/data", "host_path": volume}],
            // A capability beyond the default set, as a pod's securityContext adds it.
            "linux": {"security_context": {"capabilities": {"add_capabilities": ["NET_ADMIN"]}}},
        })
        .to_string(),
    )
    .map_err(|e| e.to_string())?;
    let netns_before = netns_files();

    c.crictl_ok(&["pull", &image])?;
    let pod = c.crictl_ok(&["runp", "--runtime", handler, pod_json.to_str().unwrap()])?;
    let r = (|| {
        let ctr = c.create_and_start(&pod, &ctr_json, &pod_json)?;
        running_pod_checks(c, handler, &pod, &ctr, &logs)?;
        cri_mount_checks(c, handler, &name, &ctr, &volume)?;
        streaming::exec_checks(c, &ctr)?;
        streaming::port_forward_checks(c, &pod)?;
        c.crictl_ok(&["stop", "--timeout", "2", &ctr])?;
        let state = c.inspect_field("inspect", &ctr, "{{.status.state}}")?;
        check(state == "CONTAINER_EXITED", || {
            format!("after StopContainer the container is {state}")
        })
    })();
    let stopped = c.crictl_ok(&["stopp", &pod]);
    let removed = c.crictl_ok(&["rmp", &pod]);
    r?;
    stopped?;
    removed?;
    let left = c.crictl_ok(&["pods", "-q"])?;
    check(!left.contains(&pod), || format!("pod {pod} still listed"))?;
    wait_until("the pod's network namespace to go", 60, || {
        netns_files() == netns_before
    })
    .map_err(|e| format!("{e}: before {netns_before:?}, now {:?}", netns_files()))?;
    let mounts = mounts_of(&pod);
    check(mounts.is_empty(), || {
        format!("mounts of the pod left: {mounts:?}")
    })
}

/// While the pod runs: ExecSync, the CRI log file and `crictl logs`, ContainerStats, the pod's
/// CNI address answering from the container, and for microvm the container inside the VM.
fn running_pod_checks(
    c: &Cri,
    handler: &str,
    pod: &str,
    ctr: &str,
    logs: &Path,
) -> Result<(), String> {
    exec_checks(c, handler, ctr)?;
    // containerd writes the CRI log file from the shim's stdout and stderr FIFOs.
    let log_file = logs.join("app.log");
    let mut last = String::new();
    wait_until("the CRI log file to have both lines", 60, || {
        last = std::fs::read_to_string(&log_file).unwrap_or_default();
        last.contains(" stdout F hello-from-cri") && last.contains(" stderr F to-stderr")
    })
    .map_err(|e| format!("{e}: {} holds {last:?}", log_file.display()))?;
    let printed = c.crictl_ok(&["logs", ctr])?;
    check(printed.contains("hello-from-cri"), || {
        format!("crictl logs printed {printed:?}")
    })?;
    let stats = c.crictl_json(&["stats", "-o", "json", "--id", ctr])?;
    let working_set = figure(&stats, "/stats/0/memory/workingSetBytes/value");
    check(working_set > 0, || format!("ContainerStats: {stats}"))?;
    let ip = c.pod_ip(pod)?;
    check(ip.starts_with(&c.pod_prefix()), || {
        format!(
            "the pod's address {ip:?} is not on the CNI network {}",
            c.subnet()
        )
    })?;
    let mut got = None;
    wait_until(&format!("{ip}:8080 to answer pod-ok"), 60, || {
        got = answer(&ip);
        got.as_deref().is_some_and(|a| a.trim() == "pod-ok")
    })
    .map_err(|e| format!("{e} (last answer {got:?})"))
}

/// What containerd's CRI plugin mounts reaches the container: the hostPath volume, live both
/// ways, and the pod's `/etc/hostname` and `/etc/resolv.conf` (bind mounts of files containerd
/// writes on the host).
fn cri_mount_checks(
    c: &Cri,
    handler: &str,
    pod_name: &str,
    ctr: &str,
    volume: &Path,
) -> Result<(), String> {
    let script = "cat /data/from-host; echo ctr-wrote >/data/from-ctr; cat /etc/hostname; \
                  grep -c nameserver /etc/resolv.conf";
    let seen = c.crictl_ok(&["exec", "--sync", ctr, "/bin/sh", "-c", script])?;
    let lines: Vec<&str> = seen.lines().collect();
    check(
        lines.len() == 3
            && lines[0] == "host-wrote"
            && lines[1] == pod_name
            && lines[2].parse::<u32>().is_ok_and(|n| n > 0),
        || format!("the container saw {seen:?} (volume line, hostname, nameservers)"),
    )?;
    let written = std::fs::read_to_string(volume.join("from-ctr")).unwrap_or_default();
    check(written == "ctr-wrote\n", || {
        format!("the host sees {written:?} where the container wrote into the volume")
    })?;
    // Its owner on the host: root under runc; under microvm the pod's root is mapped.
    let owner = std::fs::metadata(volume.join("from-ctr"))
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .map_err(|e| e.to_string())?;
    let want = if handler == "microvm" {
        1_000_000_000
    } else {
        0
    };
    check(owner == want, || {
        format!("the container's file is owned by host uid {owner}, not {want}")
    })?;
    // A change on the host is seen while the container runs (a live share, not a copy), once
    // the guest's cached attributes expire (virtiofsd's cache=auto: 1 s).
    std::fs::write(volume.join("from-host"), "host-changed\n").map_err(|e| e.to_string())?;
    let mut seen = String::new();
    wait_until("the host's change to show in the container", 20, || {
        seen = c
            .crictl_ok(&["exec", "--sync", ctr, "/bin/cat", "/data/from-host"])
            .unwrap_or_default();
        seen == "host-changed"
    })
    .map_err(|e| format!("{e}: the container reads {seen:?}"))
}

pub(crate) fn answer(ip: &str) -> Option<String> {
    answer_at(&format!("{ip}:8080"))
}

/// What a server at `addr` (`IP:PORT`) sends before it closes, if it accepts.
pub(crate) fn answer_at(addr: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut got = String::new();
    s.read_to_string(&mut got).ok()?;
    Some(got)
}

/// ExecSync: output and a non-zero exit, an added capability at work (both handlers), and for
/// microvm the guest kernel's command line and the pod's VMM.
fn exec_checks(c: &Cri, handler: &str, ctr: &str) -> Result<(), String> {
    let sync_sh = |script: &str| {
        let args = [
            "exec",
            "--sync",
            "--timeout",
            "120",
            ctr,
            "/bin/sh",
            "-c",
            script,
        ];
        c.crictl(&args)
    };
    let out = sync_sh("echo exec-ok; exit 0");
    let exec = String::from_utf8_lossy(&out.stdout).trim().to_string();
    check(out.status.success() && exec == "exec-ok", || {
        format!("ExecSync: {:?} {}", out.status, text(&out))
    })?;
    // crictl folds the exit code into its own status 1 and names it in its message.
    let out = sync_sh("exit 3");
    check(
        !out.status.success() && text(&out).contains("exited with 3"),
        || format!("ExecSync of `exit 3`: {:?} {}", out.status, text(&out)),
    )?;
    // CAP_NET_ADMIN reaches the container, and the kernel it runs on has bridges (critest's
    // capability and privileged specs do this).
    let out = sync_sh("brctl addbr mvtest0 && brctl delbr mvtest0 && echo bridge-ok");
    check(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "bridge-ok",
        || {
            format!(
                "brctl addbr with CAP_NET_ADMIN: {:?} {}",
                out.status,
                text(&out)
            )
        },
    )?;
    if handler != "microvm" {
        return Ok(());
    }
    // The container runs on the guest kernel: its command line is the VMM's default.
    let cmdline = c.crictl_ok(&["exec", "--sync", ctr, "/bin/cat", "/proc/cmdline"])?;
    check(cmdline.contains(sandbox::vmm_api::DEFAULT_CMDLINE), || {
        format!("the container's kernel command line is {cmdline:?}")
    })?;
    check(!vmm_pids().is_empty(), || "no VMM runs for the pod".into())
}
