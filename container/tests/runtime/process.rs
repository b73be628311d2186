//! The container process: hostname, user, env, cwd, umask, rlimits, capabilities, seccomp, stdio and terminals.

use crate::support::*;
use std::collections::HashMap;
use std::fs;
use std::io::Write;

use container::Stdio;
use libtest_mimic::Failed;
use nix::fcntl::OFlag;
use nix::unistd::pipe2;
use oci_spec::runtime::{PosixRlimitBuilder, PosixRlimitType, UserBuilder};

pub fn hostname_is_set() -> Result<(), Failed> {
    let mut s = spec(&["hostname"]);
    s.set_hostname(Some("box-1".into()));
    let out = run("hostname", s)?;
    expect_ok(&out)?;
    check(out.stdout.trim() == "box-1", || format!("{out:?}"))
}

pub fn user_ids() -> Result<(), Failed> {
    let mut s = spec(&["grep", "-E", "^(Uid|Gid|Groups):", "/proc/self/status"]);
    process(&mut s, |p| {
        p.set_user(
            UserBuilder::default()
                .uid(1000u32)
                .gid(1001u32)
                .additional_gids(vec![10u32, 20])
                .build()
                .unwrap(),
        );
    });
    let out = run("user", s)?;
    expect_ok(&out)?;
    let norm: Vec<String> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    check(
        norm.contains(&"Uid: 1000 1000 1000 1000".to_string()),
        || format!("{out:?}"),
    )?;
    check(
        norm.contains(&"Gid: 1001 1001 1001 1001".to_string()),
        || format!("{out:?}"),
    )?;
    check(norm.contains(&"Groups: 10 20".to_string()), || {
        format!("{out:?}")
    })
}

pub fn env_cwd_umask_home() -> Result<(), Failed> {
    let mut s = spec(&[
        "sh",
        "-c",
        "echo $FOO; pwd; umask; echo $HOME; stat -c %a /var/work",
    ]);
    process(&mut s, |p| {
        p.set_env(Some(vec!["PATH=/bin".into(), "FOO=bar baz".into()]));
        p.set_cwd("/var/work/dir".into());
        let mut u = p.user().clone();
        u.set_umask(Some(0o027));
        p.set_user(u);
    });
    let out = run("env", s)?;
    expect_ok(&out)?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    // The missing cwd was created, 0755 like runc.
    check(
        lines == ["bar baz", "/var/work/dir", "0027", "/root", "755"],
        || format!("{out:?}"),
    )
}

pub fn rlimits_apply() -> Result<(), Failed> {
    let mut s = spec(&["sh", "-c", "ulimit -n; grep 'open files' /proc/self/limits"]);
    process(&mut s, |p| {
        p.set_rlimits(Some(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .soft(123u64)
            .hard(456u64)
            .build()
            .unwrap()]));
    });
    let out = run("rlimits", s)?;
    expect_ok(&out)?;
    let mut lines = out.stdout.lines();
    check(lines.next() == Some("123"), || format!("{out:?}"))?;
    let limits: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    check(limits.get(3..5) == Some(&["123", "456"][..]), || {
        format!("{out:?}")
    })
}

pub fn process_attributes() -> Result<(), Failed> {
    let mut s = spec(&[
        "sh",
        "-c",
        "grep -E '^(CapBnd|CapEff|NoNewPrivs):' /proc/self/status; cat /proc/self/oom_score_adj; \
         cat /proc/sys/net/ipv4/ip_forward",
    ]);
    process(&mut s, |p| {
        p.set_oom_score_adj(Some(500));
    });
    linux(&mut s, |l| {
        l.set_sysctl(Some(HashMap::from([(
            "net.ipv4.ip_forward".to_string(),
            "1".to_string(),
        )])));
    });
    let out = run("attrs", s)?;
    expect_ok(&out)?;
    let norm: Vec<String> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    // The default spec's set: CAP_KILL (5), CAP_NET_BIND_SERVICE (10), CAP_AUDIT_WRITE (29).
    let mask = format!("{:016x}", (1u64 << 5) | (1 << 10) | (1 << 29));
    for want in [
        format!("CapBnd: {mask}"),
        format!("CapEff: {mask}"),
        "NoNewPrivs: 1".into(),
        "500".into(),
        "1".into(),
    ] {
        check(norm.contains(&want), || {
            format!("{want:?} missing: {out:?}")
        })?;
    }
    Ok(())
}

pub fn seccomp() -> Result<(), Failed> {
    let profile = r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
        "syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":1},
                    {"names":["sync"],"action":"SCMP_ACT_KILL_PROCESS"},
                    {"names":["not_a_syscall"],"action":"SCMP_ACT_KILL"}]}"#;
    let with_profile = |args: &[&str]| {
        let mut s = spec(args);
        linux(&mut s, |l| {
            l.set_seccomp(Some(serde_json::from_str(profile).unwrap()));
        });
        s
    };
    let out = run(
        "seccomp-errno",
        with_profile(&["sh", "-c", "mkdir /tmp/sc-dir; echo rc=$?"]),
    )?;
    check(
        out.stdout.contains("rc=1") && out.stderr.contains("Operation not permitted"),
        || format!("{out:?}"),
    )?;
    // (Not uname: static glibc calls it at startup.)
    let out = run("seccomp-kill", with_profile(&["sync"]))?;
    check(out.code == 128 + libc::SIGSYS, || format!("sync: {out:?}"))
}

pub fn stdin_eof() -> Result<(), Failed> {
    let mut c = create("cat", spec(&["cat"])).map_err(|e| e.to_string())?;
    let (in_r, in_w) = pipe2(OFlag::O_CLOEXEC).unwrap();
    let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC).unwrap();
    let reader = collect(out_r);
    let spawned = c
        .start(Stdio::Fds {
            stdin: Some(in_r),
            stdout: Some(out_w),
            stderr: None,
        })
        .map_err(|e| e.to_string())?;
    let mut w = fs::File::from(in_w);
    w.write_all(b"hello through stdin\n").unwrap();
    drop(w); // EOF: cat must end
    let code = wait_exit(spawned.pid)?;
    let out = reader.join().unwrap();
    c.destroy().map_err(|e| e.to_string())?;
    check(code == 0 && out == "hello through stdin\n", || {
        format!("{code} {out:?}")
    })
}

pub fn tty() -> Result<(), Failed> {
    let mut c = create(
        "tty",
        spec(&["sh", "-c", "tty; stty size; test -t 0 && echo stdin-is-tty"]),
    )
    .map_err(|e| e.to_string())?;
    let spawned = c
        .start(Stdio::Terminal {
            rows: 33,
            cols: 101,
        })
        .map_err(|e| e.to_string())?;
    let master = spawned.pty_master.ok_or("no pty master")?;
    // Reading the master ends with EIO once the slave's last holder exited.
    let reader = collect(master);
    let code = wait_exit(spawned.pid)?;
    let out = reader.join().unwrap().replace('\r', "");
    c.destroy().map_err(|e| e.to_string())?;
    let lines: Vec<&str> = out.lines().collect();
    check(code == 0, || format!("exit {code}: {out:?}"))?;
    check(
        lines.first().is_some_and(|l| l.starts_with("/dev/pts/")),
        || format!("{out:?}"),
    )?;
    check(
        lines.get(1) == Some(&"33 101") && lines.get(2) == Some(&"stdin-is-tty"),
        || format!("{out:?}"),
    )
}
