//! Containers created for real, as root, from a busybox root file system built here.
//!
//! The test process plays the guest agent: it is a child subreaper and one thread reaps every
//! child (`waitpid(-1)`), recording exit statuses that the tests wait for by pid.
//!
//! cgroup v2 is required. On a host without it at `/sys/fs/cgroup` (this project's development
//! machines have cgroup v1), the test binary re-runs itself, with the same arguments, inside the
//! testbed (an emulated host with cgroup2 mounted; see `testbed/`), all tests in one boot.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use container::{
    wait_status_to_exit_code, Container, CreateOptions, Error, NamespaceHolder, Spawned, Stdio,
};
use libtest_mimic::{Arguments, Failed, Trial};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{pipe2, Pid};
use oci_spec::runtime::{
    Linux, LinuxNamespaceType, LinuxResources, Mount, PosixRlimitBuilder, PosixRlimitType, Process,
    RootBuilder, Spec, UserBuilder,
};

/// Debugging aid: run here, with this cgroup2 directory as the root (e.g. a hybrid host's
/// `/sys/fs/cgroup/unified`, where the controller tests fail for lack of controllers).
const CGROUP_ROOT_VAR: &str = "CONTAINER_TESTS_CGROUP_ROOT";

/// How long a container process may take under the testbed's emulated CPU.
const WAIT: Duration = Duration::from_secs(120);

/// The environment variables the copy of this binary inside the testbed needs.
const RELAY_ENV: &[&str] = &["RUST_LOG", "RUST_BACKTRACE"];

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let here = std::env::var_os(CGROUP_ROOT_VAR).is_some();
    if !args.list && !here && !testbed::in_testbed() && !cgroup2_at_sys_fs_cgroup() {
        return testbed::relay_current_exe(
            "container runtime tests",
            "/sys/fs/cgroup is not cgroup v2 here",
            RELAY_ENV,
        );
    }
    if !args.list && !nix::unistd::geteuid().is_root() {
        eprintln!("container runtime tests: must run as root");
        return ExitCode::from(1);
    }
    let trials = vec![
        trial("pid_1_in_own_pid_namespace", pid_1_in_own_pid_namespace),
        trial("hostname_is_set", hostname_is_set),
        trial("user_uid_gid_and_additional_gids", user_ids),
        trial("env_cwd_umask_and_home", env_cwd_umask_home),
        trial("rlimits_apply", rlimits_apply),
        trial("readonly_root_refuses_writes", readonly_root),
        trial("masked_path_is_unreadable", masked_path),
        trial("exit_codes_0_1_and_137", exit_codes),
        trial("missing_binary_is_a_precise_error", missing_binary),
        trial("bad_specs_give_precise_errors", bad_specs),
        trial("stdin_eof_ends_cat", stdin_eof),
        trial("tty_through_the_pty_master", tty),
        trial("exec_into_running_container", exec_into_running),
        trial("two_containers_side_by_side", two_containers),
        trial("shared_pid_namespace_on_request", shared_pid_namespace),
        trial("memory_limit_oom_kill_is_observable", memory_oom),
        trial("pids_limit_is_enforced", pids_limit),
        trial("second_start_is_an_error", second_start),
        trial("signal_to_exited_pid_is_no_such_process", signal_exited),
        trial("seccomp_errno_and_kill", seccomp),
        trial("caps_nnp_oom_score_and_sysctl", process_attributes),
        trial("device_rules_are_enforced", device_rules),
        trial("namespace_holder_keeps_pod_namespaces", namespace_holder),
        trial("loopback_is_up_in_new_network_namespaces", loopback_up),
    ];
    if args.list {
        return libtest_mimic::run(&args, trials).exit_code();
    }
    let started = Instant::now();
    if let Err(e) = setup() {
        eprintln!("container runtime tests: setup failed: {e}");
        return ExitCode::from(1);
    }
    let conclusion = libtest_mimic::run(&args, trials);
    let _ = fs::remove_dir(cgroup_parent());
    let _ = fs::remove_dir_all(rootfs());
    eprintln!(
        "container runtime tests: {:.1} s inside {}",
        started.elapsed().as_secs_f64(),
        if testbed::in_testbed() {
            "the testbed"
        } else {
            "this host"
        }
    );
    conclusion.exit_code()
}

fn trial(name: &'static str, f: fn() -> Result<(), Failed>) -> Trial {
    Trial::test(name, f)
}

fn cgroup2_at_sys_fs_cgroup() -> bool {
    statfs("/sys/fs/cgroup").is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
}

// ---- the agent's part: subreaper and reaper ----

/// Exit statuses collected by the reaper thread, by pid.
struct Reaper {
    statuses: Mutex<HashMap<i32, i32>>,
    changed: Condvar,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();
static ROOTFS: OnceLock<PathBuf> = OnceLock::new();

/// Subreaper, root file system, reaper thread (last: it reaps every child, `Command`'s too).
fn setup() -> Result<(), String> {
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| format!("PR_SET_CHILD_SUBREAPER: {e}"))?;
    let rootfs = build_rootfs().map_err(|e| format!("building the busybox rootfs: {e}"))?;
    ROOTFS.set(rootfs).expect("once");
    REAPER
        .set(Reaper {
            statuses: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
        })
        .ok()
        .expect("once");
    std::thread::spawn(|| loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) => record(pid.as_raw(), code << 8),
            Ok(WaitStatus::Signaled(pid, sig, core)) => {
                record(pid.as_raw(), sig as i32 | if core { 0x80 } else { 0 })
            }
            Ok(_) => {}
            Err(Errno::ECHILD) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("waitpid: {e}"),
        }
    });
    Ok(())
}

fn record(pid: i32, status: i32) {
    let r = REAPER.get().expect("reaper");
    r.statuses.lock().unwrap().insert(pid, status);
    r.changed.notify_all();
}

/// Waits for `pid` to be reaped; its exit code (128+signal for a signal).
fn wait_exit(pid: i32) -> Result<i32, Failed> {
    let r = REAPER.get().expect("reaper");
    let deadline = Instant::now() + WAIT;
    let mut statuses = r.statuses.lock().unwrap();
    loop {
        if let Some(status) = statuses.remove(&pid) {
            return Ok(wait_status_to_exit_code(status));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("pid {pid} did not exit within {WAIT:?}").into());
        }
        statuses = r.changed.wait_timeout(statuses, left).unwrap().0;
    }
}

/// A directory with `/bin/busybox`, a link per applet, `/etc/passwd`, `/etc/group` and a
/// secret file for the masking test.
fn build_rootfs() -> std::io::Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix("container-rootfs-")
        .tempdir()?
        .keep();
    for d in ["bin", "etc", "root", "proc", "sys", "dev", "tmp"] {
        fs::create_dir_all(dir.join(d))?;
    }
    fs::copy("/bin/busybox", dir.join("bin/busybox"))?;
    let list = Command::new("/bin/busybox").arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            symlink("busybox", dir.join("bin").join(applet))?;
        }
    }
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    fs::write(dir.join("etc/group"), "root:x:0:\n")?;
    fs::write(dir.join("etc/secret"), "TOPSECRET\n")?;
    fs::create_dir_all(dir.join("etc/secret.d"))?;
    fs::write(dir.join("etc/secret.d/key"), "TOPSECRET\n")?;
    Ok(dir)
}

fn rootfs() -> PathBuf {
    ROOTFS.get().expect("rootfs").clone()
}

fn cgroup_parent() -> PathBuf {
    let root = std::env::var_os(CGROUP_ROOT_VAR).unwrap_or_else(|| "/sys/fs/cgroup".into());
    PathBuf::from(root).join(format!("container-tests-{}", std::process::id()))
}

// ---- specs and running ----

/// The default spec (proc, /dev tmpfs, devpts, shm, mqueue, sysfs, cgroup; all six
/// namespaces; masked and read-only /proc paths; no_new_privs), a writable root, `args`.
fn spec(args: &[&str]) -> Spec {
    let mut spec = Spec::default();
    spec.set_hostname(Some("ctr".into()));
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(false)
            .build()
            .unwrap(),
    ));
    process(&mut spec, |p| {
        p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
        p.set_env(Some(vec!["PATH=/bin".into(), "TERM=dumb".into()]));
    });
    spec
}

fn process(spec: &mut Spec, f: impl FnOnce(&mut Process)) {
    let mut p = spec.process().clone().unwrap();
    f(&mut p);
    spec.set_process(Some(p));
}

fn linux(spec: &mut Spec, f: impl FnOnce(&mut Linux)) {
    f(spec.linux_mut().as_mut().unwrap());
}

fn resources(spec: &mut Spec, json: &str) {
    let r: LinuxResources = serde_json::from_str(json).unwrap();
    linux(spec, |l| {
        l.set_resources(Some(r));
    });
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

fn create(name: &str, spec: Spec) -> Result<Container, Error> {
    create_joining(name, spec, vec![])
}

fn create_joining(
    name: &str,
    spec: Spec,
    join_namespaces: Vec<(LinuxNamespaceType, PathBuf)>,
) -> Result<Container, Error> {
    let id = format!("{name}-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    Container::create(CreateOptions {
        id,
        rootfs: rootfs(),
        spec,
        cgroup_parent: cgroup_parent(),
        join_namespaces,
    })
}

/// A process's exit code and output.
#[derive(Debug)]
struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Reads a pipe to EOF on a thread.
fn collect(fd: OwnedFd) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = fs::File::from(fd).read_to_string(&mut s);
        s
    })
}

/// Pipes for stdout and stderr, and the readers.
fn piped() -> (Stdio, impl FnOnce() -> (String, String)) {
    let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC).unwrap();
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).unwrap();
    let (o, e) = (collect(out_r), collect(err_r));
    let stdio = Stdio::Fds {
        stdin: None,
        stdout: Some(out_w),
        stderr: Some(err_w),
    };
    (stdio, move || (o.join().unwrap(), e.join().unwrap()))
}

/// Starts the container's init with piped output and waits for it.
fn run_in(c: &mut Container) -> Result<Output, Failed> {
    let (stdio, read) = piped();
    let spawned = c.start(stdio).map_err(|e| format!("start: {e}"))?;
    let code = wait_exit(spawned.pid)?;
    let (stdout, stderr) = read();
    Ok(Output {
        code,
        stdout,
        stderr,
    })
}

/// Create, start, wait, destroy.
fn run(name: &str, spec: Spec) -> Result<Output, Failed> {
    let mut c = create(name, spec).map_err(|e| format!("create: {e}"))?;
    let out = run_in(&mut c);
    c.destroy().map_err(|e| format!("destroy: {e}"))?;
    out
}

/// Runs `process` in `c` and waits for it.
fn exec_in(c: &Container, args: &[&str]) -> Result<Output, Failed> {
    let mut p = Process::default();
    p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
    p.set_env(Some(vec!["PATH=/bin".into()]));
    let (stdio, read) = piped();
    let spawned = c.exec(&p, stdio).map_err(|e| format!("exec: {e}"))?;
    let code = wait_exit(spawned.pid)?;
    let (stdout, stderr) = read();
    Ok(Output {
        code,
        stdout,
        stderr,
    })
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(what().into())
    }
}

fn expect_ok(out: &Output) -> Result<(), Failed> {
    check(out.code == 0, || format!("exit code {}: {out:?}", out.code))
}

/// Starts `sleep 1000` as a container's init.
fn sleeper(name: &str, spec_fn: impl FnOnce(&mut Spec)) -> Result<(Container, Spawned), Failed> {
    let mut s = spec(&["sleep", "1000"]);
    spec_fn(&mut s);
    let mut c = create(name, s).map_err(|e| format!("create: {e}"))?;
    let spawned = c
        .start(Stdio::Fds {
            stdin: None,
            stdout: None,
            stderr: None,
        })
        .map_err(|e| format!("start: {e}"))?;
    Ok((c, spawned))
}

/// Kills everything in the container, waits for the init, destroys it.
fn finish(c: Container, init: i32) -> Result<i32, Failed> {
    c.signal_all(libc::SIGKILL)
        .map_err(|e| format!("signal_all: {e}"))?;
    let code = wait_exit(init)?;
    c.destroy().map_err(|e| format!("destroy: {e}"))?;
    Ok(code)
}

// ---- the tests ----

fn pid_1_in_own_pid_namespace() -> Result<(), Failed> {
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

fn hostname_is_set() -> Result<(), Failed> {
    let mut s = spec(&["hostname"]);
    s.set_hostname(Some("box-1".into()));
    let out = run("hostname", s)?;
    expect_ok(&out)?;
    check(out.stdout.trim() == "box-1", || format!("{out:?}"))
}

fn user_ids() -> Result<(), Failed> {
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

fn env_cwd_umask_home() -> Result<(), Failed> {
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

fn rlimits_apply() -> Result<(), Failed> {
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

fn readonly_root() -> Result<(), Failed> {
    let mut s = spec(&[
        "sh",
        "-c",
        "touch /should-not-exist; echo rc=$?; touch /dev/shm/ok && echo tmpfs-ok",
    ]);
    s.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(true)
            .build()
            .unwrap(),
    ));
    let out = run("ro", s)?;
    expect_ok(&out)?;
    check(
        out.stdout.contains("rc=1") && out.stdout.contains("tmpfs-ok"),
        || format!("{out:?}"),
    )?;
    check(out.stderr.contains("Read-only file system"), || {
        format!("{out:?}")
    })?;
    check(!rootfs().join("should-not-exist").exists(), || {
        "the file was created".into()
    })
}

fn masked_path() -> Result<(), Failed> {
    let mut s = spec(&[
        "sh",
        "-c",
        "cat /etc/secret; echo end; ls /etc/secret.d | wc -l",
    ]);
    linux(&mut s, |l| {
        let mut masked = l.masked_paths().clone().unwrap_or_default();
        masked.push("/etc/secret".into());
        masked.push("/etc/secret.d".into());
        l.set_masked_paths(Some(masked));
    });
    let out = run("masked", s)?;
    expect_ok(&out)?;
    check(!out.stdout.contains("TOPSECRET"), || {
        format!("secret visible: {out:?}")
    })?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    check(lines == ["end", "0"], || format!("{out:?}"))
}

fn exit_codes() -> Result<(), Failed> {
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

fn missing_binary() -> Result<(), Failed> {
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

fn bad_specs() -> Result<(), Failed> {
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

fn stdin_eof() -> Result<(), Failed> {
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

fn tty() -> Result<(), Failed> {
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

fn exec_into_running() -> Result<(), Failed> {
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

fn two_containers() -> Result<(), Failed> {
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

fn shared_pid_namespace() -> Result<(), Failed> {
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

/// A BPF device filter on the container's cgroup: deny everything but the defaults and
/// /dev/kmsg for writing. The nodes exist (linux.devices); opening them is what is filtered.
fn device_rules() -> Result<(), Failed> {
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

/// A namespace holder (the agent's pod sandbox): a container joining its PID and IPC
/// namespaces sees it as PID 1 and shares its IPC namespace; it outlives the container.
fn namespace_holder() -> Result<(), Failed> {
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
fn loopback_up() -> Result<(), Failed> {
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

fn memory_oom() -> Result<(), Failed> {
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

fn pids_limit() -> Result<(), Failed> {
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

fn second_start() -> Result<(), Failed> {
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

fn signal_exited() -> Result<(), Failed> {
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

fn seccomp() -> Result<(), Failed> {
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

fn process_attributes() -> Result<(), Failed> {
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
