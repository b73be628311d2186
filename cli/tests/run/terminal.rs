//! The run and the terminal: signals during boot and after start, stdin, `-t`, resizes, and
//! the terminal's settings restored.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// SIGINT to `microvm run` while its VM boots ends the run at once: 130, the command never
/// ran, the VMM killed and reaped, nothing left with `--rm`. Once the container runs, SIGINT
/// goes to the container.
pub fn ctrl_c(env: &Env) {
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
pub fn env_user_stdin_tty(env: &Env) {
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
    let o = env.microvm_in_terminal(&format!(
        "run -t {img} sh -c 'tty; test -t 1 && echo STDOUT-IS-A-TTY'"
    ));
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("/dev/pts/"), "{o:?}");
    assert!(o.stdout.contains("STDOUT-IS-A-TTY"), "{o:?}");
}

/// A pty pair of our own: its slave is `microvm run -it`'s controlling terminal (stdin, stdout,
/// stderr). The container sees the slave's size, then the new size after the master is
/// resized (the kernel sends SIGWINCH to microvm, which resizes the guest pty, whose kernel
/// sends SIGWINCH to the container's shell). The slave is raw while the run lasts and its
/// settings are back as they were when microvm has exited.
pub fn tty_resize_and_restore(env: &Env) {
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
