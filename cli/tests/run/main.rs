//! End-to-end tests of `microvm run` and the run commands: the real binary, the real guest
//! kernel and agent, images built here from Debian's busybox-static (an OCI image layout
//! written by `test-support`, an OCI archive of it, and the same image pushed to
//! Debian's `docker-registry` on loopback with `skopeo`).
//!
//! Needs the guest kernel (`MICROVM_KERNEL`, else `~/.cache/microvm/kernel/current/vmlinux`);
//! the static agent is built here unless `MICROVM_AGENT` names one. On a host whose KVM cannot
//! boot guests the binary re-runs itself inside the testbed (like sandbox/tests/guest.rs). Each
//! `microvm run` boots one VM; the scenarios are grouped to keep that number small.

use std::io::Read;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

#[path = "../common/mod.rs"]
mod common;
mod images;
mod terminal;

use common::*;

fn main() -> ExitCode {
    let args = match common::prepare() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let trials = vec![
        trial("run_image_config_streams_and_exit_codes", semantics),
        trial("run_ctrl_c_during_boot_and_after_start", terminal::ctrl_c),
        trial(
            "run_env_workdir_user_stdin_and_tty",
            terminal::env_user_stdin_tty,
        ),
        trial(
            "run_tty_resize_and_terminal_restored",
            terminal::tty_resize_and_restore,
        ),
        trial("run_memory_limit", memory_limit),
        trial("run_boot_timeout_gives_up_cleanly", boot_timeout),
        trial("run_detached_exec_stop_logs", detached),
        trial("pull_images_rmi", images::pull_images_rmi),
        trial(
            "run_from_layout_archive_and_registry",
            images::image_sources,
        ),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

// ---------------------------------------------------------------------------------------------
// The scenarios.

/// The image's Cmd and Env; stdout and stderr apart and complete; exit codes 3, 137 (killed),
/// 127 (missing executable), 126 (not executable); SIGTERM forwarded; `--rm` leaves nothing.
fn semantics(env: &Env) {
    let img = env.img.layout_str();
    let o = env.microvm(&["run", "--rm", img], None);
    assert_eq!(o.code, 3, "{o:?}");
    assert_eq!(o.stdout, "out-from-image\n", "{o:?}");
    assert_eq!(without_boot_retry(&o.stderr), "err-line\n", "{o:?}");
    let ps = env.microvm(&["ps", "-a", "-q"], None);
    assert_eq!(
        (ps.code, ps.stdout.as_str()),
        (0, ""),
        "--rm left a run: {ps:?}"
    );

    // SIGTERM to `microvm run` reaches the container (its trap runs); killed from outside
    // (`microvm kill`, SIGKILL by default): 137.
    let mut c = env.cmd(&[
        "run",
        "--name",
        "victim",
        img,
        "sh",
        "-c",
        "trap 'echo got-term' TERM; echo before; while true; do sleep 0.2; done",
    ]);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let (stdout, stderr) = (drain(Box::new(stdout)), drain(Box::new(stderr)));
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let ps = env.microvm(&["ps"], None);
        if ps.stdout.contains("victim") && ps.stdout.contains("running") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the run never showed as running: {ps:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_secs(3));
    let k = env.microvm(&["kill", "victim"], None);
    assert_eq!((k.code, k.stdout.as_str()), (0, "victim\n"), "{k:?}");
    let o = Out {
        code: child.wait().unwrap().code().unwrap_or(-1),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (137, "before\ngot-term\n"),
        "{o:?}"
    );

    let o = env.microvm(&["run", img, "/bin/no-such-program"], None);
    assert_eq!(o.code, 127, "{o:?}");
    assert!(o.stderr.contains("/bin/no-such-program"), "{o:?}");
    let o = env.microvm(&["run", "--rm", img, "/etc/notexec"], None);
    assert_eq!(o.code, 126, "{o:?}");
    assert!(o.stderr.contains("/etc/notexec"), "{o:?}");
    // Both runs without --rm are listed as exited, with their status.
    let ps = env.microvm(&["ps", "-a"], None);
    assert!(
        ps.stdout.contains("exited (137)") && ps.stdout.contains("exited (127)"),
        "{ps:?}"
    );
}

/// `--memory 64`: a workload that allocates more is OOM-killed (137) and microvm says so.
/// (Volumes: tests/volumes.rs.)
fn memory_limit(env: &Env) {
    let img = env.img.layout_str();
    let script = "cat /sys/fs/cgroup/memory.max; exec dd if=/dev/zero of=/dev/null bs=100M count=1";
    let o = env.microvm(&["run", "--memory", "64", img, "sh", "-c", script], None);
    assert_eq!(o.code, 137, "{o:?}");
    assert_eq!(o.stdout, "67108864\n", "{o:?}");
    assert!(o.stderr.contains("out of memory"), "{o:?}");
}

/// `-d` returns once the container runs; `ps`, `exec`, `kill -s`, `stop`, `logs`, `rm`.
fn detached(env: &Env) {
    let img = env.img.layout_str();
    let o = env.microvm(
        &[
            "run",
            "-d",
            "--name",
            "web",
            img,
            "sh",
            "-c",
            "echo started; echo to-stderr >&2; trap 'echo got-usr1' USR1; \
             trap 'echo got-term; exit 0' TERM; while true; do sleep 0.2; done",
        ],
        None,
    );
    assert_eq!((o.code, o.stdout.as_str()), (0, "web\n"), "{o:?}");
    let ps = env.microvm(&["ps"], None);
    assert!(
        ps.stdout.contains("web") && ps.stdout.contains("running"),
        "{ps:?}"
    );
    let o = env.microvm(&["run", "--name", "web", img, "true"], None);
    assert_eq!(o.code, 125, "a second run named web: {o:?}");

    let o = env.microvm(&["exec", "web", "sh", "-c", "echo $IMG_VAR; exit 5"], None);
    assert_eq!((o.code, o.stdout.as_str()), (5, "from-image\n"), "{o:?}");
    let o = env.microvm(&["exec", "-i", "web", "cat"], Some(b"through-exec\n"));
    assert_eq!((o.code, o.stdout.as_str()), (0, "through-exec\n"), "{o:?}");
    let o = env.microvm(&["exec", "web", "/bin/nope"], None);
    assert_eq!(o.code, 127, "{o:?}");

    // exec -t: a pty for the exec'd process (`script` gives microvm a terminal).
    let o = env.microvm_in_terminal("exec -t web sh -c 'tty; test -t 0 && echo STDIN-IS-A-TTY'");
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.stdout.contains("/dev/pts/") && o.stdout.contains("STDIN-IS-A-TTY"),
        "{o:?}"
    );

    let o = env.microvm(&["kill", "-s", "USR1", "web"], None);
    assert_eq!(o.code, 0, "{o:?}");
    std::thread::sleep(Duration::from_secs(2));
    let o = env.microvm(&["stop", "web"], None);
    assert_eq!((o.code, o.stdout.as_str()), (0, "web\n"), "{o:?}");
    let ps = env.microvm(&["ps", "-a"], None);
    assert!(ps.stdout.contains("exited (0)"), "{ps:?}");
    let o = env.microvm(&["logs", "web"], None);
    assert_eq!(o.stdout, "started\ngot-usr1\ngot-term\n", "{o:?}");
    assert_eq!(without_boot_retry(&o.stderr), "to-stderr\n", "{o:?}");
    let o = env.microvm(&["exec", "web", "true"], None);
    assert_ne!(o.code, 0, "exec into an ended run: {o:?}");
    let o = env.microvm(&["rm", "web"], None);
    assert_eq!(o.code, 0, "{o:?}");
    let ps = env.microvm(&["ps", "-a", "-q"], None);
    assert_eq!(ps.stdout, "", "{ps:?}");
}

/// `--boot-timeout`: a VM whose agent never answers (busybox's `init` booted in the agent's
/// place) is given up after that many seconds, with 125 and the reason; the VMM is gone and
/// `--rm` leaves no run.
fn boot_timeout(env: &Env) {
    let img = env.img.layout_str();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("busybox-static");
    let o = env.microvm(
        &[
            "run",
            "--rm",
            "--boot-timeout",
            "5",
            "--agent",
            busybox,
            img,
            "true",
        ],
        None,
    );
    assert_eq!(o.code, 125, "{o:?}");
    assert!(
        o.stderr.contains("did not answer within 5s"),
        "the reason: {o:?}"
    );
    assert_eq!(vmm_processes(&env.home), Vec::<String>::new());
    let ps = env.microvm(&["ps", "-a", "-q"], None);
    assert_eq!((ps.code, ps.stdout.as_str()), (0, ""), "{ps:?}");
    let o = env.microvm(&["run", "--boot-timeout", "0", img, "true"], None);
    assert_eq!(o.code, 125, "{o:?}");
    assert!(o.stderr.contains("--boot-timeout"), "{o:?}");
}
