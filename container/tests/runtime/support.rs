//! The test process as the guest agent (subreaper, reaper thread), the busybox root file
//! system, and helpers to build specs and run containers.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use container::{wait_status_to_exit_code, Container, CreateOptions, Error, Spawned, Stdio};
use libtest_mimic::Failed;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{pipe2, Pid};
use oci_spec::runtime::{Linux, LinuxNamespaceType, LinuxResources, Process, RootBuilder, Spec};

/// Debugging aid: run here, with this cgroup2 directory as the root (e.g. a hybrid host's
/// `/sys/fs/cgroup/unified`, where the controller tests fail for lack of controllers).
pub const CGROUP_ROOT_VAR: &str = "CONTAINER_TESTS_CGROUP_ROOT";

/// How long a container process may take under the testbed's emulated CPU.
pub const WAIT: Duration = Duration::from_secs(120);

/// The environment variables the copy of this binary inside the testbed needs.
pub const RELAY_ENV: &[&str] = &["RUST_LOG", "RUST_BACKTRACE"];

// ---- the agent's part: subreaper and reaper ----

/// Exit statuses collected by the reaper thread, by pid.
struct Reaper {
    statuses: Mutex<HashMap<i32, i32>>,
    changed: Condvar,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

static ROOTFS: OnceLock<PathBuf> = OnceLock::new();

/// Subreaper, root file system, reaper thread (last: it reaps every child, `Command`'s too).
pub fn setup() -> Result<(), String> {
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

pub fn record(pid: i32, status: i32) {
    let r = REAPER.get().expect("reaper");
    r.statuses.lock().unwrap().insert(pid, status);
    r.changed.notify_all();
}

/// Waits for `pid` to be reaped; its exit code (128+signal for a signal).
pub fn wait_exit(pid: i32) -> Result<i32, Failed> {
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

/// A fresh copy of the shared root file system, for a test that changes it (`Command` cannot
/// be used once the reaper thread runs, so it is copied rather than built).
pub fn copy_of_rootfs() -> std::io::Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix("container-rootfs-")
        .tempdir()?
        .keep();
    copy_tree(&rootfs(), &dir)?;
    Ok(dir)
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            symlink(fs::read_link(&src)?, &dst)?;
        } else if kind.is_dir() {
            fs::create_dir(&dst)?;
            copy_tree(&src, &dst)?;
        } else {
            fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

pub fn rootfs() -> PathBuf {
    ROOTFS.get().expect("rootfs").clone()
}

pub fn cgroup_parent() -> PathBuf {
    let root = std::env::var_os(CGROUP_ROOT_VAR).unwrap_or_else(|| "/sys/fs/cgroup".into());
    PathBuf::from(root).join(format!("container-tests-{}", std::process::id()))
}

// ---- specs and running ----

/// The default spec (proc, /dev tmpfs, devpts, shm, mqueue, sysfs, cgroup; all six
/// namespaces; masked and read-only /proc paths; no_new_privs), a writable root, `args`.
pub fn spec(args: &[&str]) -> Spec {
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

pub fn process(spec: &mut Spec, f: impl FnOnce(&mut Process)) {
    let mut p = spec.process().clone().unwrap();
    f(&mut p);
    spec.set_process(Some(p));
}

pub fn linux(spec: &mut Spec, f: impl FnOnce(&mut Linux)) {
    f(spec.linux_mut().as_mut().unwrap());
}

pub fn resources(spec: &mut Spec, json: &str) {
    let r: LinuxResources = serde_json::from_str(json).unwrap();
    linux(spec, |l| {
        l.set_resources(Some(r));
    });
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

pub fn create(name: &str, spec: Spec) -> Result<Container, Error> {
    create_joining(name, spec, vec![])
}

pub fn create_joining(
    name: &str,
    spec: Spec,
    join_namespaces: Vec<(LinuxNamespaceType, PathBuf)>,
) -> Result<Container, Error> {
    create_with_root(name, spec, rootfs(), join_namespaces)
}

/// A container on a root file system of the test's own (one it may plant symlinks in).
pub fn create_with_root(
    name: &str,
    spec: Spec,
    rootfs: PathBuf,
    join_namespaces: Vec<(LinuxNamespaceType, PathBuf)>,
) -> Result<Container, Error> {
    let id = format!("{name}-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    Container::create(CreateOptions {
        id,
        rootfs,
        spec,
        cgroup_parent: cgroup_parent(),
        join_namespaces,
    })
}

/// A process's exit code and output.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Reads a pipe to EOF on a thread.
pub fn collect(fd: OwnedFd) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = fs::File::from(fd).read_to_string(&mut s);
        s
    })
}

/// Pipes for stdout and stderr, and the readers.
pub fn piped() -> (Stdio, impl FnOnce() -> (String, String)) {
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
pub fn run_in(c: &mut Container) -> Result<Output, Failed> {
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
pub fn run(name: &str, spec: Spec) -> Result<Output, Failed> {
    let mut c = create(name, spec).map_err(|e| format!("create: {e}"))?;
    let out = run_in(&mut c);
    c.destroy().map_err(|e| format!("destroy: {e}"))?;
    out
}

/// Runs `process` in `c` and waits for it.
pub fn exec_in(c: &Container, args: &[&str]) -> Result<Output, Failed> {
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

pub fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), Failed> {
    if cond {
        Ok(())
    } else {
        Err(what().into())
    }
}

pub fn expect_ok(out: &Output) -> Result<(), Failed> {
    check(out.code == 0, || format!("exit code {}: {out:?}", out.code))
}

/// Starts `sleep 1000` as a container's init.
pub fn sleeper(
    name: &str,
    spec_fn: impl FnOnce(&mut Spec),
) -> Result<(Container, Spawned), Failed> {
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
pub fn finish(c: Container, init: i32) -> Result<i32, Failed> {
    c.signal_all(libc::SIGKILL)
        .map_err(|e| format!("signal_all: {e}"))?;
    let code = wait_exit(init)?;
    c.destroy().map_err(|e| format!("destroy: {e}"))?;
    Ok(code)
}
