//! Exit codes, precise errors, exec, several containers, repeated start and signals.

use crate::support::*;
use std::fs;

use container::{Container, Error, Stdio};
use libtest_mimic::Failed;
use oci_spec::runtime::{LinuxNamespaceType, Mount, Process, UserBuilder};

pub fn exit_codes() -> Result<(), Failed> {
    check(run("exit0", spec(&["true"]))?.code == 0, || "true".into())?;
    let out = run("exit1", spec(&["sh", "-c", "exit 1"]))?;
    check(out.code == 1, || format!("{out:?}"))?;
    let (c, init) = sleeper("exit137", |_| {})?;
    c.signal(init.pid, libc::SIGKILL)
        .map_err(|e| format!("signal: {e}"))?;
    let code = wait_exit(init.pid)?;
    c.destroy().map_err(|e| format!("destroy: {e}"))?;
    check(code == 137, || format!("SIGKILL gave {code}"))
}

pub fn missing_binary() -> Result<(), Failed> {
    for (args, want) in [
        (vec!["/bin/nope"], "executable not found: /bin/nope"),
        (vec!["nope", "arg"], "executable not found: nope"),
    ] {
        let mut c = create("missing", spec(&args)).map_err(|e| e.to_string())?;
        let (stdio, _read) = piped();
        match c.start(stdio) {
            Err(e @ Error::ExecutableNotFound { .. }) => {
                check(e.to_string() == want, || format!("{e}"))?;
                check(e.exit_code_hint() == Some(127), || "hint".into())?;
            }
            other => return Err(format!("{args:?}: {other:?}").into()),
        }
        check(c.init_pid().is_none(), || {
            "a failed start left an init".into()
        })?;
        c.destroy().map_err(|e| e.to_string())?;
    }
    let mut c = create("noexec", spec(&["/etc/passwd"])).map_err(|e| e.to_string())?;
    let err = c.start(Stdio::Fds {
        stdin: None,
        stdout: None,
        stderr: None,
    });
    check(
        matches!(&err, Err(Error::PermissionDenied { path }) if path == "/etc/passwd"),
        || format!("{err:?}"),
    )?;
    c.destroy().map_err(|e| e.to_string())?;
    Ok(())
}

pub fn bad_specs() -> Result<(), Failed> {
    // Invalid JSON.
    let e = container::parse_spec("{\"ociVersion\": \"1.0.2\", \"process\": ").unwrap_err();
    check(
        matches!(e, Error::InvalidSpec(_)) && e.to_string().contains("line 1"),
        || e.to_string(),
    )?;

    // Bad user.
    let mut s = spec(&["true"]);
    process(&mut s, |p| {
        p.set_user(UserBuilder::default().uid(u32::MAX).build().unwrap());
    });
    let e = create("baduser", s).unwrap_err();
    check(e.to_string().contains("process.user"), || e.to_string())?;

    // Bind source missing: caught at create.
    let mut s = spec(&["true"]);
    let m: Mount = serde_json::from_str(
        r#"{"destination":"/data","type":"bind","source":"/nonexistent/src","options":["rbind"]}"#,
    )
    .unwrap();
    s.mounts_mut().as_mut().unwrap().push(m);
    let e = create("badbind", s).unwrap_err();
    check(
        e.to_string()
            .contains("bind source /nonexistent/src does not exist"),
        || e.to_string(),
    )?;

    // An unknown file system type: caught by the child's mount step.
    let mut s = spec(&["true"]);
    let m: Mount =
        serde_json::from_str(r#"{"destination":"/x","type":"nosuchfs","source":"none"}"#).unwrap();
    s.mounts_mut().as_mut().unwrap().push(m);
    let mut c = create("badfs", s).map_err(|e| e.to_string())?;
    match c.start(Stdio::Fds {
        stdin: None,
        stdout: None,
        stderr: None,
    }) {
        Err(Error::Setup { step, message }) => check(
            step == "mount" && message.contains("/x") && message.contains("nosuchfs"),
            || format!("{step}: {message}"),
        )?,
        other => return Err(format!("nosuchfs: {other:?}").into()),
    }
    c.destroy().map_err(|e| e.to_string())?;

    // cwd that is a file.
    let mut s = spec(&["true"]);
    process(&mut s, |p| {
        p.set_cwd("/etc/passwd".into());
    });
    let mut c = create("badcwd", s).map_err(|e| e.to_string())?;
    match c.start(Stdio::Fds {
        stdin: None,
        stdout: None,
        stderr: None,
    }) {
        Err(Error::Setup { step, message }) => {
            check(step == "cwd" && message.contains("ENOTDIR"), || {
                format!("{step}: {message}")
            })?
        }
        other => return Err(format!("bad cwd: {other:?}").into()),
    }
    c.destroy().map_err(|e| e.to_string())?;
    Ok(())
}

pub fn exec_into_running() -> Result<(), Failed> {
    let (c, init) = sleeper("exec", |s| {
        s.set_hostname(Some("exec-host".into()));
    })?;
    let out = exec_in(
        &c,
        &[
            "sh",
            "-c",
            "hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; echo pid=$$",
        ],
    )?;
    expect_ok(&out)?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    check(lines.first() == Some(&"exec-host"), || format!("{out:?}"))?;
    check(lines.get(1).map(|l| l.trim()) == Some("sleep 1000"), || {
        format!("{out:?}")
    })?;
    check(lines.get(2).is_some_and(|l| *l != "pid=1"), || {
        format!("{out:?}")
    })?;
    // The exec'd process ran in the container's cgroup.
    check(
        c.pids().map_err(|e| e.to_string())? == vec![init.pid],
        || "pids".into(),
    )?;
    // An exec of a missing binary is the same precise error as for start.
    let mut p = Process::default();
    p.set_args(Some(vec!["/bin/nope".into()]));
    let e = c
        .exec(
            &p,
            Stdio::Fds {
                stdin: None,
                stdout: None,
                stderr: None,
            },
        )
        .unwrap_err();
    check(matches!(e, Error::ExecutableNotFound { .. }), || {
        e.to_string()
    })?;
    let id = c.id().to_string();
    c.signal_all(libc::SIGKILL).map_err(|e| e.to_string())?;
    check(wait_exit(init.pid)? == 137, || "init".into())?;
    // The init is gone: exec is refused.
    let e = c
        .exec(
            &p,
            Stdio::Fds {
                stdin: None,
                stdout: None,
                stderr: None,
            },
        )
        .unwrap_err();
    check(
        matches!(&e, Error::NotRunning { id: i } if *i == id),
        || e.to_string(),
    )?;
    c.destroy().map_err(|e| e.to_string())?;
    Ok(())
}

pub fn two_containers() -> Result<(), Failed> {
    let (a, a_init) = sleeper("side-a", |s| {
        s.set_hostname(Some("alpha".into()));
    })?;
    let (b, b_init) = sleeper("side-b", |s| {
        s.set_hostname(Some("beta".into()));
    })?;
    let probe = [
        "sh",
        "-c",
        "hostname; ls /proc | grep -c '^[0-9]'; cat /proc/1/cmdline | tr '\\0' ' '",
    ];
    let oa = exec_in(&a, &probe)?;
    let ob = exec_in(&b, &probe)?;
    expect_ok(&oa)?;
    expect_ok(&ob)?;
    check(
        oa.stdout.starts_with("alpha\n") && ob.stdout.starts_with("beta\n"),
        || format!("{oa:?} {ob:?}"),
    )?;
    let ns =
        |c: &Container| fs::read_link(c.namespace_path(LinuxNamespaceType::Pid).unwrap()).unwrap();
    check(ns(&a) != ns(&b), || "same pid namespace".into())?;
    check(a.cgroup_path() != b.cgroup_path(), || "same cgroup".into())?;
    check(
        a.pids().unwrap() == vec![a_init.pid] && b.pids().unwrap() == vec![b_init.pid],
        || "pids".into(),
    )?;
    finish(a, a_init.pid)?;
    finish(b, b_init.pid)?;
    Ok(())
}

pub fn second_start() -> Result<(), Failed> {
    let (mut c, init) = sleeper("twice", |_| {})?;
    let e = c
        .start(Stdio::Fds {
            stdin: None,
            stdout: None,
            stderr: None,
        })
        .unwrap_err();
    check(
        matches!(e, Error::AlreadyStarted { pid, .. } if pid == init.pid),
        || e.to_string(),
    )?;
    finish(c, init.pid)?;
    Ok(())
}

pub fn signal_exited() -> Result<(), Failed> {
    let mut c = create("sig", spec(&["true"])).map_err(|e| e.to_string())?;
    let out = run_in(&mut c)?;
    expect_ok(&out)?;
    let pid = c.init_pid().unwrap();
    let e = c.signal(pid, libc::SIGTERM).unwrap_err();
    check(
        matches!(e, Error::NoSuchProcess { pid: p } if p == pid),
        || e.to_string(),
    )?;
    // A pid that is not the container's.
    let e = c.signal(1, 0).unwrap_err();
    check(matches!(e, Error::NoSuchProcess { pid: 1 }), || {
        e.to_string()
    })?;
    let e = c.signal(pid, 12345).unwrap_err();
    check(matches!(e, Error::InvalidSignal(12345)), || e.to_string())?;
    c.destroy().map_err(|e| e.to_string())?;
    Ok(())
}
