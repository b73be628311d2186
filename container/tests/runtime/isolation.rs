//! Namespaces (own, shared, held for a pod), loopback, device rules, memory and pids limits.

use crate::support::*;
use std::fs;

use container::NamespaceHolder;
use libtest_mimic::Failed;
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources};

pub fn pid_1_in_own_pid_namespace() -> Result<(), Failed> {
    let out = run(
        "pid1",
        spec(&[
            "sh",
            "-c",
            "echo pid=$$; cat /proc/1/comm; ls /proc | grep -c '^[0-9]'",
        ]),
    )?;
    expect_ok(&out)?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    check(lines.first() == Some(&"pid=1"), || format!("{out:?}"))?;
    check(lines.get(1) == Some(&"sh"), || {
        format!("/proc/1 is not the init: {out:?}")
    })?;
    // sh, ls, grep: only the container's own processes are visible.
    let n: u32 = lines.get(2).and_then(|n| n.parse().ok()).unwrap_or(99);
    check(n <= 4, || format!("{n} processes visible: {out:?}"))
}

pub fn shared_pid_namespace() -> Result<(), Failed> {
    let (first, first_init) = sleeper("pod-first", |_| {})?;
    let join = vec![
        (
            LinuxNamespaceType::Pid,
            first.namespace_path(LinuxNamespaceType::Pid).unwrap(),
        ),
        (
            LinuxNamespaceType::Ipc,
            first.namespace_path(LinuxNamespaceType::Ipc).unwrap(),
        ),
    ];
    let ipc_of_first = fs::read_link(&join[1].1).unwrap();
    let uts_of_first =
        fs::read_link(first.namespace_path(LinuxNamespaceType::Uts).unwrap()).unwrap();
    let s = spec(&[
        "sh",
        "-c",
        "cat /proc/1/cmdline | tr '\\0' ' '; echo; echo pid=$$; readlink /proc/self/ns/ipc; \
         readlink /proc/self/ns/uts",
    ]);
    let mut second = create_joining("pod-second", s, join).map_err(|e| e.to_string())?;
    let out = run_in(&mut second)?;
    second.destroy().map_err(|e| e.to_string())?;
    finish(first, first_init.pid)?;
    expect_ok(&out)?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    // The first container's init is PID 1 of the shared namespace; the second is not.
    check(
        lines.first().map(|l| l.trim()) == Some("sleep 1000"),
        || format!("{out:?}"),
    )?;
    check(
        lines
            .get(1)
            .is_some_and(|l| l.starts_with("pid=") && *l != "pid=1"),
        || format!("{out:?}"),
    )?;
    // IPC joined too; UTS (not requested) is the second container's own.
    check(lines.get(2) == ipc_of_first.to_str().as_ref(), || {
        format!("ipc: {out:?}")
    })?;
    check(lines.get(3) != uts_of_first.to_str().as_ref(), || {
        format!("uts: {out:?}")
    })
}

/// A namespace holder (the agent's pod sandbox): a container joining its PID and IPC
/// namespaces sees it as PID 1 and shares its IPC namespace; it outlives the container.
pub fn namespace_holder() -> Result<(), Failed> {
    let holder = NamespaceHolder::spawn(&[LinuxNamespaceType::Pid, LinuxNamespaceType::Ipc])
        .map_err(|e| format!("spawn: {e}"))?;
    let ipc = fs::read_link(format!("/proc/{}/ns/ipc", holder.pid())).unwrap();
    // The backgrounded sleep is orphaned when sh exits: the holder (PID 1 there) gets it.
    let s = spec(&[
        "sh",
        "-c",
        "cat /proc/1/comm; readlink /proc/self/ns/ipc; sleep 0.1 & exit 0",
    ]);
    let mut c = create_joining("held", s, holder.join_list()).map_err(|e| e.to_string())?;
    let out = run_in(&mut c)?;
    c.destroy().map_err(|e| e.to_string())?;
    expect_ok(&out)?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    check(lines.first() == Some(&"ns-holder"), || format!("{out:?}"))?;
    check(lines.get(1) == ipc.to_str().as_ref(), || {
        format!("ipc {ipc:?}: {out:?}")
    })?;
    check(holder.is_running(), || "the holder ended".into())?;
    let pid = holder.pid();
    holder.kill().map_err(|e| e.to_string())?;
    let code = wait_exit(pid)?;
    check(code == 137, || format!("holder exit {code}"))
}

/// A container's new network namespace, and a pod holder's, have `lo` up (docker's behaviour
/// even with `--network none`): the UP bit in its flags, and a TCP connection over 127.0.0.1
/// between two processes of the container.
pub fn loopback_up() -> Result<(), Failed> {
    const IFF_UP: u32 = 0x1;
    let flags = |out: &Output| -> Result<u32, Failed> {
        let first = out.stdout.lines().next().unwrap_or_default();
        u32::from_str_radix(first.trim_start_matches("0x"), 16)
            .map_err(|_| format!("no flags in {out:?}").into())
    };
    // Our own network namespace is not the container's: its lo says nothing about the test.
    let here = fs::read_link("/proc/self/ns/net").unwrap();
    let out = run(
        "lo",
        spec(&[
            "sh",
            "-c",
            "cat /sys/class/net/lo/flags; readlink /proc/self/ns/net; \
             nc -l -p 7777 > /tmp/got & l=$!; sleep 1; echo over-lo | nc 127.0.0.1 7777 || kill $l; \
             wait; cat /tmp/got",
        ]),
    )?;
    expect_ok(&out)?;
    check(flags(&out)? & IFF_UP != 0, || {
        format!("lo is down: {out:?}")
    })?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    check(lines.get(1) != here.to_str().as_ref(), || {
        format!("the container shares the test's network namespace: {out:?}")
    })?;
    check(lines.get(2) == Some(&"over-lo"), || {
        format!("nothing came over 127.0.0.1: {out:?}")
    })?;

    let holder = NamespaceHolder::spawn(&[LinuxNamespaceType::Network])
        .map_err(|e| format!("spawn: {e}"))?;
    let s = spec(&["sh", "-c", "cat /sys/class/net/lo/flags"]);
    let mut c = create_joining("lo-held", s, holder.join_list()).map_err(|e| e.to_string())?;
    let out = run_in(&mut c);
    c.destroy().map_err(|e| e.to_string())?;
    let pid = holder.pid();
    holder.kill().map_err(|e| e.to_string())?;
    wait_exit(pid)?;
    let out = out?;
    expect_ok(&out)?;
    check(flags(&out)? & IFF_UP != 0, || {
        format!("lo of the holder's namespace is down: {out:?}")
    })
}

/// A BPF device filter on the container's cgroup: deny everything but the defaults and
/// /dev/kmsg for writing. The nodes exist (linux.devices); opening them is what is filtered.
pub fn device_rules() -> Result<(), Failed> {
    let mut s = spec(&[
        "sh",
        "-c",
        "echo x > /dev/null && echo null:ok; \
         echo x > /dev/lc && echo lc:opened; \
         echo container-tests-device-rules > /dev/kmsg2 && echo kmsg-write:ok; \
         dd if=/dev/kmsg2 of=/dev/null bs=8192 count=1 && echo kmsg-read:opened; true",
    ]);
    resources(
        &mut s,
        r#"{"devices": [{"allow": false, "access": "rwm"},
                        {"allow": true, "type": "c", "major": 1, "minor": 11, "access": "w"}]}"#,
    );
    let nodes: Vec<oci_spec::runtime::LinuxDevice> = serde_json::from_str(
        r#"[{"path": "/dev/lc", "type": "c", "major": 10, "minor": 237, "fileMode": 438},
            {"path": "/dev/kmsg2", "type": "c", "major": 1, "minor": 11, "fileMode": 438}]"#,
    )
    .unwrap();
    linux(&mut s, |l| {
        l.set_devices(Some(nodes));
    });
    let out = run("devices", s)?;
    expect_ok(&out)?;
    check(out.stdout == "null:ok\nkmsg-write:ok\n", || {
        format!("allowed: /dev/null rw, /dev/kmsg2 w only: {out:?}")
    })?;
    let denied = |name: &str| {
        out.stderr
            .lines()
            .any(|l| l.contains(name) && l.contains("Operation not permitted"))
    };
    check(denied("/dev/lc") && denied("kmsg2"), || {
        format!("EPERM expected for /dev/lc and reading /dev/kmsg2: {out:?}")
    })?;

    // update() replaces the filter of a running container (the old one is detached, or the
    // last step would still allow the write).
    let (c, init) = sleeper("devices-update", |s| {
        let nodes: Vec<oci_spec::runtime::LinuxDevice> = serde_json::from_str(
            r#"[{"path": "/dev/kmsg2", "type": "c", "major": 1, "minor": 11, "fileMode": 438}]"#,
        )
        .unwrap();
        linux(s, |l| {
            l.set_devices(Some(nodes));
        });
    })?;
    let write_kmsg = [
        "sh",
        "-c",
        "echo container-tests-update > /dev/kmsg2 && echo written",
    ];
    let before = exec_in(&c, &write_kmsg)?;
    let allow: LinuxResources = serde_json::from_str(
        r#"{"devices": [{"allow": false, "access": "rwm"},
                        {"allow": true, "type": "c", "major": 1, "minor": 11, "access": "w"}]}"#,
    )
    .unwrap();
    c.update(&allow).map_err(|e| format!("update: {e}"))?;
    let after = exec_in(&c, &write_kmsg)?;
    let deny: LinuxResources =
        serde_json::from_str(r#"{"devices": [{"allow": false, "access": "rwm"}]}"#).unwrap();
    c.update(&deny).map_err(|e| format!("update: {e}"))?;
    let again = exec_in(&c, &write_kmsg)?;
    finish(c, init.pid)?;
    check(
        before.stdout.is_empty() && before.stderr.contains("Operation not permitted"),
        || format!("before update: {before:?}"),
    )?;
    check(after.stdout == "written\n", || {
        format!("after allowing c 1:11 w: {after:?}")
    })?;
    check(
        again.stdout.is_empty() && again.stderr.contains("Operation not permitted"),
        || format!("after denying again (old filter detached): {again:?}"),
    )
}

pub fn memory_oom() -> Result<(), Failed> {
    // The shell keeps the whole 64 MiB string: far above the 16 MiB limit.
    let mut s = spec(&[
        "sh",
        "-c",
        "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo survived ${#x}",
    ]);
    resources(&mut s, r#"{"memory":{"limit":16777216,"swap":16777216}}"#);
    let mut c = create("oom", s).map_err(|e| e.to_string())?;
    let stats = c.stats().map_err(|e| e.to_string())?;
    check(stats.memory_limit == Some(16 << 20), || {
        format!("{stats:?}")
    })?;
    check(c.memory_events_path().ends_with("memory.events"), || {
        "path".into()
    })?;
    let out = run_in(&mut c)?;
    let kills = c.oom_kill_count().map_err(|e| e.to_string())?;
    c.destroy().map_err(|e| e.to_string())?;
    check(out.code == 137, || format!("exit {}: {out:?}", out.code))?;
    check(!out.stdout.contains("survived"), || format!("{out:?}"))?;
    check(kills >= 1, || format!("oom_kill {kills}"))
}

pub fn pids_limit() -> Result<(), Failed> {
    let mut s = spec(&[
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6 7 8; do sleep 30 & done; echo all-started",
    ]);
    resources(&mut s, r#"{"pids":{"limit":4}}"#);
    let mut c = create("pids", s).map_err(|e| e.to_string())?;
    let (stdio, read) = piped();
    let spawned = c.start(stdio).map_err(|e| e.to_string())?;
    let code = wait_exit(spawned.pid)?;
    let (stdout, stderr) = read();
    c.destroy().map_err(|e| e.to_string())?;
    check(!stdout.contains("all-started") && code != 0, || {
        format!("{code} {stdout:?} {stderr:?}")
    })?;
    check(stderr.contains("fork"), || format!("{stderr:?}"))
}
