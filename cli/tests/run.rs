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
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::*;

fn main() -> ExitCode {
    let args = match common::prepare() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let trials = vec![
        trial("run_image_config_streams_and_exit_codes", semantics),
        trial("run_ctrl_c_during_boot_and_after_start", ctrl_c),
        trial("run_env_workdir_user_stdin_and_tty", env_user_stdin_tty),
        trial(
            "run_tty_resize_and_terminal_restored",
            tty_resize_and_restore,
        ),
        trial("run_memory_limit", memory_limit),
        trial("run_detached_exec_stop_logs", detached),
        trial("pull_images_rmi", pull_images_rmi),
        trial("run_from_layout_archive_and_registry", image_sources),
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

/// SIGINT to `microvm run` while its VM boots ends the run at once: 130, the command never
/// ran, the VMM killed and reaped, nothing left with `--rm`. Once the container runs, SIGINT
/// goes to the container.
fn ctrl_c(env: &Env) {
    let img = env.img.layout_str();
    let mut during_boot =
        Watched::spawn(env.cmd(&["run", "--rm", img, "sh", "-c", "echo started; sleep 30"]));
    // As soon as the VMM runs (a guest boot takes seconds): microvm listens from before it
    // starts the VMM.
    let deadline = Instant::now() + TIMEOUT;
    while vmm_processes(&env.home).is_empty() {
        assert!(
            during_boot.child.try_wait().unwrap().is_none(),
            "microvm ended before its VMM started: {:?}",
            during_boot.finish()
        );
        assert!(
            Instant::now() < deadline,
            "no VMM started within {TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let signalled = Instant::now();
    during_boot.signal(libc::SIGINT);
    let o = during_boot.finish();
    let took = signalled.elapsed();
    assert_eq!(o.code, 130, "{o:?}");
    assert!(
        took < Duration::from_secs(15),
        "took {took:?} after SIGINT: {o:?}"
    );
    assert!(!o.stdout.contains("started"), "the command ran: {o:?}");
    assert!(
        o.stderr.contains("SIGINT while the VM was starting"),
        "{o:?}"
    );
    let left = vmm_processes(&env.home);
    assert!(left.is_empty(), "VMM processes left: {left:?}");
    let ps = env.microvm(&["ps", "-a", "-q"], None);
    assert_eq!((ps.code, ps.stdout.as_str()), (0, ""), "{ps:?}");

    // After the container started: the container's trap gets it.
    let running = Watched::spawn(env.cmd(&[
        "run",
        "--rm",
        img,
        "sh",
        "-c",
        "trap 'echo got-int; exit 7' INT; echo started; while true; do sleep 0.2; done",
    ]));
    let line = match running.lines.recv_timeout(TIMEOUT) {
        Ok(line) => line,
        Err(_) => panic!("no output: {:?}", running.finish()),
    };
    assert_eq!(line, "started");
    std::thread::sleep(Duration::from_secs(1));
    running.signal(libc::SIGINT);
    let o = running.finish();
    assert_eq!((o.code, o.stdout.as_str()), (7, "got-int\n"), "{o:?}");
    assert!(vmm_processes(&env.home).is_empty());
    let ps = env.microvm(&["ps", "-a", "-q"], None);
    assert_eq!((ps.code, ps.stdout.as_str()), (0, ""), "{ps:?}");
}

/// A `microvm` child whose stdout lines arrive as they are written.
struct Watched {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Watched {
    fn spawn(mut c: Command) -> Watched {
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap_or_else(|e| panic!("{c:?}: {e}"));
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(stdout).map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Watched {
            child,
            lines,
            stderr,
        }
    }

    fn signal(&self, signo: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signo) };
    }

    /// Waits for the end (killing it after [`TIMEOUT`]); the output not received yet.
    fn finish(mut self) -> Out {
        let code = wait_with_timeout(&mut self.child);
        let stdout: String = self.lines.iter().map(|l| l + "\n").collect();
        Out {
            code,
            stdout,
            stderr: self.stderr.join().unwrap(),
        }
    }
}

/// `-e` (value and from the host), `--env-file`, `-w`, `-u`, `--hostname`, `--entrypoint`;
/// the container's loopback is up (its flags, and a line over 127.0.0.1); `-i` streams stdin;
/// `-t` gives a pty.
fn env_user_stdin_tty(env: &Env) {
    let img = env.img.layout_str();
    let env_file = env.dir.join("env");
    std::fs::write(&env_file, "# a comment\nFROM_FILE=file-value\n").unwrap();
    let mut c = env.cmd(&[
        "run",
        "-e",
        "FOO=bar",
        "-e",
        "HOST_VAR",
        "--env-file",
        env_file.to_str().unwrap(),
        "-w",
        "/tmp",
        "-u",
        "1000:1000",
        "--hostname",
        "box1",
        "--entrypoint",
        "sh",
        img,
        "-c",
        "echo $FOO $HOST_VAR $FROM_FILE $IMG_VAR; pwd; id -u; id -g; hostname; touch /tmp/mine; \
         [ $(( $(cat /sys/class/net/lo/flags) & 1 )) = 1 ] && echo lo-up; \
         nc -l -p 7777 > /tmp/got & l=$!; sleep 1; echo over-lo | nc 127.0.0.1 7777 || kill $l; \
         wait; cat /tmp/got",
    ]);
    c.env("HOST_VAR", "from-host");
    let o = run_cmd(c, None);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(
        o.stdout, "bar from-host file-value from-image\n/tmp\n1000\n1000\nbox1\nlo-up\nover-lo\n",
        "{o:?}"
    );
    // A user by name, resolved in the image's /etc/passwd.
    let o = env.microvm(&["run", "-u", "tester", img, "id", "-u"], None);
    assert_eq!((o.code, o.stdout.as_str()), (0, "1000\n"), "{o:?}");

    let o = env.microvm(&["run", "-i", img, "cat"], Some(b"hi\n"));
    assert_eq!((o.code, o.stdout.as_str()), (0, "hi\n"), "{o:?}");

    // `script` gives microvm a terminal; the container's `tty` names its pty.
    let line = format!(
        "{} run -t {img} sh -c 'tty; test -t 1 && echo STDOUT-IS-A-TTY'",
        env!("CARGO_BIN_EXE_microvm")
    );
    let mut c = Command::new("script");
    c.args(["-qec", &line, "/dev/null"])
        .env("MICROVM_HOME", &env.home);
    let o = run_cmd(c, None);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("/dev/pts/"), "{o:?}");
    assert!(o.stdout.contains("STDOUT-IS-A-TTY"), "{o:?}");
}

/// A pty pair of our own: its slave is `microvm run -it`'s controlling terminal (stdin, stdout,
/// stderr). The container sees the slave's size, then the new size after the master is
/// resized (the kernel sends SIGWINCH to microvm, which resizes the guest pty, whose kernel
/// sends SIGWINCH to the container's shell). The slave is raw while the run lasts and its
/// settings are back as they were when microvm has exited.
fn tty_resize_and_restore(env: &Env) {
    let img = env.img.layout_str();
    let pty = Pty::open(30, 100);
    let before = pty.termios();
    assert!(
        before.c_lflag & (libc::ICANON | libc::ECHO) == (libc::ICANON | libc::ECHO),
        "a fresh pty is in canonical mode with echo"
    );
    // The trap is set before the first size is printed: a resize after that line is seen.
    let script = "trap 'echo new-size $(stty size); exit 0' WINCH; echo first-size $(stty size); \
        i=0; while [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; echo NO-WINCH; exit 1";
    let mut c = env.cmd(&["run", "--rm", "-it", img, "sh", "-c", script]);
    c.stdin(pty.slave_stdio())
        .stdout(pty.slave_stdio())
        .stderr(pty.slave_stdio());
    // SAFETY: setsid and ioctl are async-signal-safe; the child calls them before exec, after
    // its stdin became the slave.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, || {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = c.spawn().expect("start microvm run -it");
    let mut output = Vec::new();
    let seen = pty.read_until(&mut output, "first-size ", &mut child);
    let text = String::from_utf8_lossy(&output).into_owned();
    assert!(seen, "no first size: {text}");
    assert!(text.contains("first-size 30 100"), "{text}");
    let during = pty.termios();
    assert_eq!(
        during.c_lflag & (libc::ICANON | libc::ECHO),
        0,
        "the terminal is raw while the container runs"
    );
    pty.resize(42, 132);
    let seen = pty.read_until(&mut output, "new-size 42 132", &mut child);
    let status = wait_with_timeout(&mut child);
    pty.read_until(&mut output, "\u{0}never", &mut child);
    let text = String::from_utf8_lossy(&output).into_owned();
    assert!(seen, "the resize did not reach the container: {text}");
    assert_eq!(status, 0, "{text}");
    let after = pty.termios();
    assert_eq!(
        (
            after.c_iflag,
            after.c_oflag,
            after.c_cflag,
            after.c_lflag,
            after.c_cc
        ),
        (
            before.c_iflag,
            before.c_oflag,
            before.c_cflag,
            before.c_lflag,
            before.c_cc
        ),
        "the terminal settings are restored: {text}"
    );
}

/// A pseudo-terminal pair (the test holds both ends).
struct Pty {
    master: std::os::fd::OwnedFd,
    slave: std::os::fd::OwnedFd,
}

impl Pty {
    fn open(rows: u16, cols: u16) -> Pty {
        use std::os::fd::FromRawFd;
        let (mut master, mut slave) = (-1, -1);
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two descriptors into our variables; the name buffer and the
        // termios are optional (null), the size is a valid winsize.
        let r = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and are owned by nothing else.
        unsafe {
            Pty {
                master: std::os::fd::OwnedFd::from_raw_fd(master),
                slave: std::os::fd::OwnedFd::from_raw_fd(slave),
            }
        }
    }

    fn slave_stdio(&self) -> Stdio {
        Stdio::from(self.slave.try_clone().expect("dup the pty slave"))
    }

    fn termios(&self) -> libc::termios {
        use std::os::fd::AsRawFd;
        // SAFETY: termios is plain data that tcgetattr fills in.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a valid terminal descriptor and a valid termios.
        let r = unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) };
        assert_eq!(r, 0, "tcgetattr: {}", std::io::Error::last_os_error());
        t
    }

    /// What a terminal emulator does when its window changes.
    fn resize(&self, rows: u16, cols: u16) {
        use std::os::fd::AsRawFd;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a valid winsize.
        let r = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(r, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }

    /// Reads the master into `out` until it holds `pattern` (true), or until `child` has
    /// exited and nothing more comes, or [`TIMEOUT`] (false).
    fn read_until(
        &self,
        out: &mut Vec<u8>,
        pattern: &str,
        child: &mut std::process::Child,
    ) -> bool {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + TIMEOUT;
        let mut exited = false;
        while Instant::now() < deadline {
            if String::from_utf8_lossy(out).contains(pattern) {
                return true;
            }
            let mut fds = [libc::pollfd {
                fd: self.master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: poll on one valid pollfd we own.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 200) };
            if n > 0 && fds[0].revents & libc::POLLIN != 0 {
                let mut buf = [0u8; 4096];
                // SAFETY: reads into our buffer, at most its length.
                let got = unsafe {
                    libc::read(self.master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                };
                if got > 0 {
                    out.extend_from_slice(&buf[..got as usize]);
                    continue;
                }
            }
            if exited {
                return false;
            }
            // One more pass after the exit: what it wrote last is still in the pty.
            exited = child.try_wait().ok().flatten().is_some();
        }
        false
    }
}

/// The exit status of `child`; kills it after [`TIMEOUT`].
fn wait_with_timeout(child: &mut std::process::Child) -> i32 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("microvm did not end within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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
    let line = format!(
        "{} exec -t web sh -c 'tty; test -t 0 && echo STDIN-IS-A-TTY'",
        env!("CARGO_BIN_EXE_microvm")
    );
    let mut c = Command::new("script");
    c.args(["-qec", &line, "/dev/null"])
        .env("MICROVM_HOME", &env.home);
    let o = run_cmd(c, None);
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

/// A second run of the same image fetches and builds nothing; an OCI archive and a registry
/// (Debian's docker-registry on loopback, the image pushed with skopeo) work too.
fn image_sources(env: &Env) {
    let img = env.img.layout_str();
    let debug = |args: &[&str]| {
        let mut c = env.cmd(args);
        c.env("RUST_LOG", "warn,microvm=debug");
        run_cmd(c, None)
    };
    let fetched_nothing = "blobs_downloaded: 0, blobs_imported: 0 }, disk built: false";
    let o = debug(&["run", "--rm", img, "true"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.stderr.contains("Fetched {") && !o.stderr.contains(fetched_nothing),
        "{o:?}"
    );
    let o = debug(&["run", "--rm", img, "true"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.stderr.contains(fetched_nothing),
        "the second run fetched something: {o:?}"
    );

    let o = env.microvm(
        &[
            "run",
            "--rm",
            env.img.archive.to_str().unwrap(),
            "echo",
            "from-archive",
        ],
        None,
    );
    assert_eq!((o.code, o.stdout.as_str()), (0, "from-archive\n"), "{o:?}");

    let registry =
        test_support::registry::LoopbackRegistry::start(&env.dir, Duration::from_secs(30))
            .expect("loopback registry");
    let reference = format!("127.0.0.1:{}/busybox:t", registry.port);
    let push = Command::new("skopeo")
        .args(["copy", "-q", "--dest-tls-verify=false"])
        .arg(format!("oci:{img}:t"))
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo (apt-get install skopeo)");
    assert!(
        push.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&push.stderr)
    );
    let o = env.microvm(
        &["run", "--rm", "--insecure", &reference, "echo", "ok"],
        None,
    );
    assert_eq!((o.code, o.stdout.as_str()), (0, "ok\n"), "{o:?}");
}

/// `pull`, `images`, `rmi` on the store (no VM).
fn pull_images_rmi(env: &Env) {
    let img = env.img.layout_str();
    let o = env.microvm(&["pull", img], None);
    assert_eq!(o.code, 0, "{o:?}");
    let id = o.stdout.trim().to_string();
    assert!(id.starts_with("sha256:"), "{o:?}");
    assert!(
        !o.stderr.contains("0 blob(s) downloaded, 0 imported"),
        "{o:?}"
    );
    let o = env.microvm(&["pull", img], None);
    assert_eq!(o.stdout.trim(), id, "{o:?}");
    assert!(
        o.stderr.contains("0 blob(s) downloaded, 0 imported"),
        "{o:?}"
    );
    let o = env.microvm(&["images"], None);
    assert_eq!(o.code, 0, "{o:?}");
    let short = &id["sha256:".len().."sha256:".len() + 12];
    let line = o
        .stdout
        .lines()
        .find(|l| l.contains(short))
        .unwrap_or_else(|| panic!("{short} not listed: {o:?}"));
    let name = line.split_whitespace().next().unwrap().to_string();
    let o = env.microvm(&["rmi", &name], None);
    assert_eq!((o.code, o.stdout.trim()), (0, name.as_str()), "{o:?}");
    let o = env.microvm(&["images"], None);
    assert!(!o.stdout.contains(short), "{o:?}");
    let o = env.microvm(&["rmi", &name], None);
    assert_eq!(o.code, 1, "removing a missing image: {o:?}");
}
