//! The filters compile, allow what each role does and kill the process on anything else.
//!
//! A filter in `Enforce` mode kills the whole process, so each case runs in a child: this test
//! binary re-executed with [`CHILD_ENV`] naming the case, which [`child_process_entry`] runs.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use super::ioctls::{FIONBIO, KVM_RUN};
use super::*;

const CHILD_ENV: &str = "VMM_SECCOMP_TEST_CHILD";

fn roles() -> [ThreadRole; 2] {
    [ThreadRole::EventLoop, ThreadRole::Vcpu]
}

#[test]
fn every_role_compiles_for_this_arch_with_any_devices() {
    for role in roles() {
        for devices in [DeviceSet::default(), DeviceSet::all()] {
            for mode in [SeccompMode::Enforce, SeccompMode::Log] {
                let f = ThreadFilter::new(role, devices, mode).unwrap();
                assert!(f.program.as_ref().is_some_and(|p| !p.is_empty()));
            }
            let off = ThreadFilter::new(role, devices, SeccompMode::Off).unwrap();
            assert!(off.program.is_none());
        }
    }
}

#[test]
fn lists_hold_only_what_the_role_and_devices_need() {
    let pid = std::process::id();
    for role in roles() {
        let widest = allowed(role, DeviceSet::all(), pid).unwrap();
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_mount,
            libc::SYS_setuid,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_kill,
            libc::SYS_seccomp,
            libc::SYS_prctl,
        ] {
            assert!(!widest.contains(forbidden), "{role}: syscall {forbidden}");
        }
        // Dangerous in general, narrowed by argument.
        for narrowed in [
            libc::SYS_ioctl,
            libc::SYS_mmap,
            libc::SYS_mprotect,
            libc::SYS_socket,
            libc::SYS_tgkill,
            libc::SYS_madvise,
            libc::SYS_fcntl,
        ] {
            assert!(
                widest.contains(narrowed) && !widest.allows_unconditionally(narrowed),
                "{role}: syscall {narrowed} must be allowed only with checked arguments"
            );
        }
        // Without the devices, their calls go.
        let bare = allowed(role, DeviceSet::default(), pid).unwrap();
        for device_call in [
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_sendmsg,
            libc::SYS_preadv,
        ] {
            assert!(!bare.contains(device_call), "{role}: syscall {device_call}");
        }
    }
    // A disk's rate limit timer is armed from both roles, and only when some disk has a limit.
    for role in roles() {
        let disk = DeviceSet {
            block: true,
            ..DeviceSet::default()
        };
        let plain = allowed(role, disk, pid).unwrap();
        assert!(!plain.contains(libc::SYS_timerfd_settime), "{role}");
        let limited = DeviceSet {
            block_rate_limit: true,
            ..disk
        };
        let limited = allowed(role, limited, pid).unwrap();
        assert!(
            limited.allows_unconditionally(libc::SYS_timerfd_settime),
            "{role}"
        );
    }
    let vcpu = allowed(ThreadRole::Vcpu, DeviceSet::all(), pid).unwrap();
    assert!(!vcpu.contains(libc::SYS_accept4) && !vcpu.contains(libc::SYS_unlink));
    assert!(!vcpu.contains(libc::SYS_epoll_wait));
}

/// How a child run of `case` ended, and what it printed.
struct ChildRun {
    status: std::process::ExitStatus,
    stdout: String,
}

impl ChildRun {
    fn killed_by_sigsys(&self) -> bool {
        self.status.signal() == Some(libc::SIGSYS)
    }
}

fn run_child(case: &str) -> ChildRun {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "seccomp::tests::child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, case)
        .output()
        .unwrap();
    ChildRun {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

/// Calls that no role may make, each with arguments that would be harmless if it went through.
const FORBIDDEN: &[&str] = &[
    "execve",
    "ptrace",
    "socket_packet",
    "socket_inet",
    "ioctl_tty",
    "ioctl_kvm_create_vm",
    "mmap_exec",
    "openat",
    "fcntl_dupfd",
    "spawn_thread",
    "kill_other_process",
];

#[test]
fn enforce_kills_the_process_on_a_forbidden_call_from_either_role() {
    for role in ["event", "vcpu"] {
        for call in FORBIDDEN {
            let run = run_child(&format!("{role}:enforce:{call}"));
            assert!(
                run.killed_by_sigsys(),
                "{role} thread, {call}: {:?}, stdout:\n{}",
                run.status,
                run.stdout
            );
            assert!(run.stdout.contains("ALLOWED-CALLS-OK"), "{role} {call}");
            assert!(!run.stdout.contains("SURVIVED"), "{role} {call}");
        }
    }
}

#[test]
fn enforce_lets_a_thread_make_its_calls_and_end_and_confines_only_that_thread() {
    for role in ["event", "vcpu"] {
        let run = run_child(&format!("{role}:enforce:none"));
        assert!(
            run.status.success(),
            "{role}: {:?}\n{}",
            run.status,
            run.stdout
        );
        assert!(run.stdout.contains("ALLOWED-CALLS-OK"), "{}", run.stdout);
        assert!(run.stdout.contains("SURVIVED"), "{}", run.stdout);
        // The main thread, which installed nothing, still opens files (no TSYNC).
        assert!(
            run.stdout.contains("MAIN-THREAD-UNFILTERED"),
            "{}",
            run.stdout
        );
    }
}

#[test]
fn log_and_off_modes_do_not_kill() {
    for mode in ["log", "off"] {
        for call in ["socket_inet", "openat", "ioctl_tty"] {
            let run = run_child(&format!("vcpu:{mode}:{call}"));
            assert!(run.status.success(), "{mode} {call}: {:?}", run.status);
            assert!(run.stdout.contains("SURVIVED"), "{mode} {call}");
        }
    }
}

/// The child's side: runs the case named by [`CHILD_ENV`]; does nothing in a normal test run.
#[test]
fn child_process_entry() {
    let Ok(case) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = case.split(':');
    let (role, mode, call) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap().to_string(),
    );
    let role = match role {
        "event" => ThreadRole::EventLoop,
        _ => ThreadRole::Vcpu,
    };
    let mode = match mode {
        "enforce" => SeccompMode::Enforce,
        "log" => SeccompMode::Log,
        _ => SeccompMode::Off,
    };
    // No core file for the expected SIGSYS.
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit with a valid, initialised struct.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    let filter = ThreadFilter::new(role, DeviceSet::all(), mode).unwrap();
    std::thread::spawn(move || {
        filter.install().unwrap();
        allowed_calls(role);
        say("ALLOWED-CALLS-OK\n");
        forbidden_call(&call);
        say("SURVIVED\n");
    })
    .join()
    .unwrap();
    if std::fs::read("/proc/self/status").is_ok() {
        say("MAIN-THREAD-UNFILTERED\n");
    }
}

/// Straight to fd 1: no stdout lock or capture in the way.
fn say(s: &str) {
    // SAFETY: writes `s`, a valid buffer, to stdout.
    unsafe { libc::write(1, s.as_ptr().cast(), s.len()) };
}

/// Calls each role makes (on bad descriptors where a real one would need a VM).
fn allowed_calls(role: ThreadRole) {
    // SAFETY: plain system calls on invalid descriptors or fresh anonymous memory; results
    // are only compared.
    unsafe {
        let request = match role {
            ThreadRole::Vcpu => KVM_RUN(),
            ThreadRole::EventLoop => FIONBIO,
        };
        assert_eq!(libc::ioctl(-1, request, 0), -1);
        assert_eq!(last_errno(), libc::EBADF);
        let sock = libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        assert!(sock >= 0);
        libc::close(sock);
        let p = libc::mmap(
            std::ptr::null_mut(),
            1 << 20,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        assert_eq!(libc::munmap(p, 1 << 20), 0);
        // A rate-limited disk arms its timer from either role.
        let disarm: libc::itimerspec = std::mem::zeroed();
        let r = libc::timerfd_settime(-1, 0, &disarm, std::ptr::null_mut());
        assert_eq!((r, last_errno()), (-1, libc::EBADF));
    }
    // The heap, a lock, the clock.
    let v: Vec<u64> = (0..100_000).collect();
    let m = std::sync::Mutex::new(v.len());
    assert_eq!(*m.lock().unwrap(), 100_000);
    let _ = std::time::Instant::now();
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Makes the forbidden call `call`; every one fails harmlessly if a filter lets it through.
fn forbidden_call(call: &str) {
    // SAFETY: each call gets valid pointers (NUL-terminated strings, null argv/envp) or
    // invalid descriptors; any result is ignored.
    unsafe {
        match call {
            "none" => {}
            "execve" => {
                let path = c"/nonexistent/microvm-seccomp-test";
                libc::execve(path.as_ptr(), std::ptr::null(), std::ptr::null());
            }
            "ptrace" => {
                libc::ptrace(libc::PTRACE_PEEKDATA, 1, 0, 0);
            }
            "socket_packet" => {
                let s = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
                if s >= 0 {
                    libc::close(s);
                }
            }
            "socket_inet" => {
                let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
                if s >= 0 {
                    libc::close(s);
                }
            }
            "ioctl_tty" => {
                libc::ioctl(-1, libc::TCGETS, 0);
            }
            "ioctl_kvm_create_vm" => {
                libc::ioctl(-1, 0xae01, 0);
            }
            "mmap_exec" => {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p != libc::MAP_FAILED {
                    libc::munmap(p, 4096);
                }
            }
            "fcntl_dupfd" => {
                let fd = libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 100);
                if fd >= 0 {
                    libc::close(fd);
                }
            }
            "openat" => {
                let _ = std::fs::File::open("/proc/self/status");
            }
            "spawn_thread" => {
                let _ = std::thread::Builder::new().spawn(|| {}).map(|h| h.join());
            }
            "kill_other_process" => {
                // Signal 0 to init: only a permission check, were it allowed.
                libc::syscall(libc::SYS_tgkill, 1, 1, 0);
            }
            other => panic!("unknown case {other}"),
        }
    }
}
