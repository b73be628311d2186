//! Exec, terminals, metrics, Update, kill.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::grpc::{grpc_task_update, LINUX_RESOURCES, WINDOWS_RESOURCES};
use crate::common::{check, sh, text, Containerd};

/// `ctr task exec` with and without a terminal, `ctr task ps` and `metrics`, and `ctr task
/// kill` ending an attached `ctr run` with 137.
pub fn exec_and_kill(c: &Containerd) -> Result<(), String> {
    let mut run = c
        .ctr_cmd(&c.run_args(
            // ctr's default spec has no /sys/fs/cgroup: mount it to read the limits inside.
            &[
                "--mount",
                "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro:nosuid",
            ],
            "execk",
            &["sleep", "1000"],
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let r = (|| {
        c.wait_status("execk", "RUNNING")?;
        let out = c.exec_sh("e1", "execk", "echo out; exit 5");
        check(
            out.status.code() == Some(5) && text(&out).contains("out"),
            || format!("exec: {:?} {}", out.status, text(&out)),
        )?;
        // With a terminal: ctr needs one itself, so run it under script(1); `timeout
        // --foreground` keeps ctr in the terminal's foreground group (else its tcsetattr stops
        // it with SIGTTOU).
        let sock = c.sock.display().to_string();
        let out = sh(&format!(
            "script -qec 'timeout --foreground 60 ctr -a {sock} -n default task exec -t --exec-id e2 execk \
             sh -c \"tty; exit 4\"' /dev/null"
        ));
        check(
            out.status.code() == Some(4) && text(&out).contains("/dev/pts/"),
            || {
                format!(
                    "exec -t: {:?} {}\ntasks: {}",
                    out.status,
                    text(&out),
                    text(&c.ctr(&["task", "ps", "execk"]))
                )
            },
        )?;
        let ps = c.ctr(&["task", "ps", "execk"]);
        check(
            ps.status.success() && text(&ps).lines().count() >= 2,
            || format!("task ps: {}", text(&ps)),
        )?;
        let m = c.ctr(&["task", "metrics", "execk"]);
        check(
            m.status.success() && text(&m).contains("pids.current"),
            || format!("task metrics: {}", text(&m)),
        )?;
        // Update (containerd's Tasks.Update; ctr 1.6 has no `task update`): new cgroup limits
        // in the guest, read back inside the container (its cgroup's path from
        // /proc/self/cgroup: with or without a cgroup namespace).
        let cg = |file: &str| {
            let out = c.exec_sh(
                &format!("cg-{}", file.replace('.', "-")),
                "execk",
                &format!("cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/{file}"),
            );
            (out.status.success(), text(&out).trim().to_string())
        };
        let before = cg("memory.max");
        check(before == (true, "max".to_string()), || {
            format!("memory.max before the update: {before:?}")
        })?;
        grpc_task_update(
            &c.sock,
            "execk",
            LINUX_RESOURCES,
            r#"{"memory":{"limit":52428800},"cpu":{"quota":20000}}"#,
        )
        .map_err(|e| format!("Tasks.Update: {e}"))?;
        let after = cg("memory.max");
        check(after == (true, "52428800".to_string()), || {
            format!("memory.max after `ctr task update --memory-limit 52428800`: {after:?}")
        })?;
        let cpu = cg("cpu.max");
        check(cpu == (true, "20000 100000".to_string()), || {
            format!("cpu.max after `ctr task update --cpu-quota 20000`: {cpu:?}")
        })?;
        let m = c.ctr(&["task", "metrics", "execk"]);
        check(text(&m).contains("52428800"), || {
            format!("task metrics after the update (memory limit): {}", text(&m))
        })?;
        // Not Linux resources: refused, nothing changes.
        let e = grpc_task_update(&c.sock, "execk", WINDOWS_RESOURCES, "{}").unwrap_err();
        check(
            e.contains("status 3") && e.contains("only runtime-spec LinuxResources"),
            || format!("Tasks.Update with WindowsResources: {e}"),
        )?;
        check(cg("memory.max") == (true, "52428800".to_string()), || {
            "memory.max changed by a refused update".into()
        })?;
        for cmd in ["pause", "resume", "checkpoint"] {
            let p = c.ctr(&["task", cmd, "execk"]);
            check(
                !p.status.success() && text(&p).contains("not implemented"),
                || format!("{cmd} must be unimplemented: {}", text(&p)),
            )?;
        }
        let k = c.ctr(&["task", "kill", "-s", "SIGKILL", "execk"]);
        check(k.status.success(), || format!("kill: {}", text(&k)))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = run.try_wait().map_err(|e| e.to_string())? {
                return check(status.code() == Some(137), || {
                    format!("ctr run after SIGKILL: {status:?}")
                });
            }
            if Instant::now() > deadline {
                return Err("ctr run did not end after kill".into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })();
    let _ = run.kill();
    let ran = run.wait_with_output().map(|o| text(&o)).unwrap_or_default();
    c.remove("execk");
    r.map_err(|e| format!("{e}\n--- the attached `ctr run` printed ---\n{ran}"))
}
