//! A pod shaped as containerd's CRI plugin makes one, through `ctr`: CRI's annotations and
//! namespace paths (Debian has no crictl).

use crate::common::host::vmm_pids;
use crate::common::{check, sh, text, Containerd};

/// The pod's host network namespace (`ip netns add`), as CNI's `/var/run/netns/cni-…`.
const NETNS: &str = "microvm-test-pod3";

pub fn cri_annotations(pod: &str, container_type: &str) -> Vec<String> {
    [
        format!("io.kubernetes.cri.container-type={container_type}"),
        format!("io.kubernetes.cri.sandbox-id={pod}"),
        "io.kubernetes.cri.sandbox-name=web".into(),
        "io.kubernetes.cri.sandbox-namespace=default".into(),
    ]
    .into_iter()
    .flat_map(|a| ["--annotation".to_string(), a])
    .collect()
}

/// `ctr run -d` of `sleep 1000` with these extra arguments, then waits until it runs.
pub fn run_detached(c: &Containerd, id: &str, extra: &[String]) -> Result<(), String> {
    run_detached_cmd(c, id, extra, &["sleep", "1000"])
}

/// `ctr run -d` of `cmd` with these extra arguments, then waits until it runs.
pub fn run_detached_cmd(
    c: &Containerd,
    id: &str,
    extra: &[String],
    cmd: &[&str],
) -> Result<(), String> {
    let mut before: Vec<&str> = vec!["-d"];
    before.extend(extra.iter().map(String::as_str));
    let out = c.ctr(&c.run_args(&before, id, cmd));
    check(out.status.success(), || {
        format!("ctr run -d {id}: {}", text(&out))
    })?;
    c.wait_status(id, "RUNNING")
}

/// Runs CRI's sandbox `pod` (`sleep 1000`) on the host network namespace `netns` (under
/// /var/run/netns) and returns the `ctr run` arguments of a container of that pod joining the
/// sandbox's network, IPC, UTS and PID namespaces, as CRI writes them.
pub fn run_cri_sandbox(c: &Containerd, pod: &str, netns: &str) -> Result<Vec<String>, String> {
    let mut sandbox = cri_annotations(pod, "sandbox");
    sandbox.extend([
        "--with-ns".into(),
        format!("network:/var/run/netns/{netns}"),
    ]);
    run_detached(c, pod, &sandbox)?;
    let pid = task_pid(c, pod)?;
    let mut app = cri_annotations(pod, "container");
    for (typ, name) in [
        ("network", "net"),
        ("ipc", "ipc"),
        ("uts", "uts"),
        ("pid", "pid"),
    ] {
        app.extend(["--with-ns".into(), format!("{typ}:/proc/{pid}/ns/{name}")]);
    }
    Ok(app)
}

/// The PID column of `ctr task ls` for a task (the guest pid the shim reported).
pub fn task_pid(c: &Containerd, id: &str) -> Result<String, String> {
    let ls = text(&c.ctr(&["task", "ls"]));
    ls.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.first() == Some(&id))
        .and_then(|w| w.get(1).map(|p| p.to_string()))
        .ok_or_else(|| format!("no pid of {id} in:\n{ls}"))
}

/// `ctr run --rm` with these extra arguments must fail with `message`.
fn refused(c: &Containerd, id: &str, mut extra: Vec<String>, message: &str) -> Result<(), String> {
    extra.insert(0, "--rm".into());
    let args: Vec<&str> = extra.iter().map(String::as_str).collect();
    let out = c.ctr(&c.run_args(&args, id, &["true"]));
    check(
        !out.status.success() && text(&out).contains(message),
        || {
            format!(
                "{id} must be refused ({message}): {:?} {}",
                out.status,
                text(&out)
            )
        },
    )
}

/// The sandbox names a host network namespace, which the guest never sees (it used to fail
/// RunPodSandbox: the path does not exist in the VM); a container of the pod joins the
/// sandbox's network, IPC, UTS and PID namespaces by `/proc/<sandbox pid>/ns/...`, as CRI
/// writes them, and sees the same namespaces as the sandbox in the guest. A container of
/// another Kubernetes pod cannot join the VM; a hostNetwork sandbox (no network namespace) and
/// a sandbox asking for more memory than the shim config allows are refused with one clear
/// error each, before any VM boots.
pub fn cri_shaped_pod(c: &Containerd) -> Result<(), String> {
    let add = sh(&format!("ip netns add {NETNS}"));
    check(add.status.success(), || {
        format!("ip netns add (apt-get install iproute2): {}", text(&add))
    })?;
    let r = (|| {
        let app = run_cri_sandbox(c, "pod3", NETNS)?;
        run_detached(c, "pod3-app", &app)?;
        let links = "for t in net ipc uts pid; do readlink /proc/self/ns/$t; done";
        let of_sandbox = text(&c.exec_sh("ns", "pod3", links));
        let of_app = text(&c.exec_sh("ns", "pod3-app", links));
        check(
            of_sandbox.lines().count() == 4 && of_sandbox == of_app,
            || format!("namespaces of the sandbox:\n{of_sandbox}and of the app:\n{of_app}"),
        )?;
        // Not the VM's own namespaces: PID 1 of the shared PID namespace is the sandbox's
        // init, not the guest agent.
        let init = text(&c.exec_sh("init", "pod3-app", "tr '\\0' ' ' < /proc/1/cmdline"));
        check(init.trim() == "sleep 1000", || {
            format!("PID 1 seen by the app: {init:?}")
        })?;
        // A container of another Kubernetes pod naming this sandbox id.
        let mut intruder = cri_annotations("pod3", "container");
        intruder.extend([
            "--annotation".into(),
            "io.kubernetes.cri.sandbox-name=db".into(),
        ]);
        refused(c, "pod3-intruder", intruder, "cannot join pod pod3")?;
        // Refused before any VM boots: a hostNetwork pod, a pod larger than the config allows.
        let vmms = vmm_pids().len();
        let mut host_net = cri_annotations("pod4", "sandbox");
        host_net.push("--net-host".into());
        refused(
            c,
            "pod4",
            host_net,
            "hostNetwork pods cannot run in a microVM",
        )?;
        let mut huge = cri_annotations("pod5", "sandbox");
        huge.extend([
            "--annotation".into(),
            "io.kubernetes.cri.sandbox-memory=1099511627776".into(),
        ]);
        refused(c, "pod5", huge, "max_memory_mib")?;
        check(vmm_pids().len() == vmms, || {
            "a VM was booted for a refused pod".into()
        })
    })();
    for id in ["pod5", "pod4", "pod3-intruder", "pod3-app", "pod3"] {
        c.remove(id);
    }
    let _ = sh(&format!("ip netns del {NETNS}"));
    r
}
