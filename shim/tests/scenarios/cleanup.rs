//! What containerd does after a shim died, and what must be left afterwards.

use std::process::{Command, Stdio};

use crate::common::host::{shim_pids, vmm_pids};
use crate::common::{check, text, wait_until, Containerd, SHIM};

/// SIGKILL the shim: containerd's cleanup (the shim binary's `delete`) kills the VMM and
/// removes the pod's state; `delete` run again by hand is a harmless no-op.
pub fn after_sigkill(c: &Containerd) -> Result<(), String> {
    let out = c.ctr(&c.run_args(&["-d"], "killed", &["sleep", "1000"]));
    check(out.status.success(), || {
        format!("ctr run -d: {}", text(&out))
    })?;
    c.wait_status("killed", "RUNNING")?;
    check(vmm_pids().len() == 1, || format!("VMMs: {:?}", vmm_pids()))?;
    let shims = shim_pids();
    check(shims.len() == 1, || format!("shims: {shims:?}"))?;
    // SAFETY: SIGKILL to the shim process found above.
    unsafe { libc::kill(shims[0] as i32, libc::SIGKILL) };
    wait_until("containerd to see the task stopped", 60, || {
        let ls = text(&c.ctr(&["task", "ls"]));
        !ls.contains("RUNNING")
    })?;
    let _ = c.ctr(&["task", "delete", "killed"]);
    let _ = c.ctr(&["container", "delete", "killed"]);
    wait_until("the VMM to be killed", 60, || vmm_pids().is_empty())?;
    let bundle = c
        .dir
        .join("state/io.containerd.runtime.v2.task/default/killed");
    let _ = std::fs::create_dir_all(&bundle);
    for _ in 0..2 {
        let out = Command::new(SHIM)
            .args(["-namespace", "default", "-id", "killed", "-address"])
            .arg(&c.sock)
            .arg("-bundle")
            .arg(&bundle)
            .arg("delete")
            .env("TTRPC_ADDRESS", c.dir.join("c.sock.ttrpc"))
            .current_dir(&bundle)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        check(out.status.success(), || {
            format!("shim delete: {:?} {}", out.status, text(&out))
        })?;
    }
    let _ = std::fs::remove_dir(&bundle);
    Ok(())
}

/// After all of the above: no VMM or shim process, no pod state directory, no shim socket, no
/// rootfs mount left.
pub fn nothing_left(c: &Containerd) -> Result<(), String> {
    let _ = c;
    wait_until("no VMM and no shim process", 60, || {
        vmm_pids().is_empty() && shim_pids().is_empty()
    })?;
    let states: Vec<_> = std::fs::read_dir("/run/microvm-shim")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    check(states.is_empty(), || format!("pod state left: {states:?}"))?;
    let sockets: Vec<_> = std::fs::read_dir("/run/containerd/s")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    check(sockets.is_empty(), || {
        format!("shim sockets left: {sockets:?}")
    })?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let ours: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains("/rootfs") && l.contains(&*c.dir.to_string_lossy()))
        .collect();
    check(ours.is_empty(), || format!("rootfs mounts left: {ours:?}"))
}
