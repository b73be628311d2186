//! Each jail step's effect, checked on a process jailed for real (this test binary re-run as a
//! probe; see `probe/`): as root on this host, no guest needed.

mod probe;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitCode;

use libtest_mimic::{Arguments, Failed, Trial};
use probe::{field, Probe, ProbeSpec, EXIT_CODE, JAIL_ID};

fn main() -> ExitCode {
    if let Ok(mode) = std::env::var(probe::PROBE) {
        probe::run(&mode);
    }
    let args = Arguments::from_args();
    if !args.list && !nix::unistd::geteuid().is_root() {
        eprintln!("jail step tests: must run as root");
        return ExitCode::from(1);
    }
    let trials = vec![
        Trial::test(
            "every_step_applies_to_pid_1",
            wrap(every_step_applies_to_pid_1),
        ),
        Trial::test(
            "the_network_namespace_is_kept_for_taps",
            wrap(the_network_namespace_is_kept_for_taps),
        ),
        Trial::test(
            "killing_the_supervisor_kills_pid_1",
            wrap(killing_the_supervisor_kills_pid_1),
        ),
        Trial::test("a_signal_death_is_relayed", wrap(a_signal_death_is_relayed)),
        Trial::test("bad_jails_are_refused", wrap(bad_jails_are_refused)),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

fn wrap(f: fn()) -> impl FnOnce() -> Result<(), Failed> + Send + 'static {
    move || {
        f();
        Ok(())
    }
}

fn ns_inode(pid: &str, ns: &str) -> u64 {
    fs::metadata(format!("/proc/{pid}/ns/{ns}")).unwrap().ino()
}

fn every_step_applies_to_pid_1() {
    // A directory the VMM needs (its sockets' one), under /tmp, which the new root's tmpfs
    // is assembled on: it must still be reached.
    let dir = tempfile::Builder::new()
        .prefix("jail-visible-")
        .tempdir_in("/tmp")
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(dir.path().join("sock"), "").unwrap();
    let mounts_before = fs::read_to_string("/proc/self/mountinfo").unwrap();

    let probe = Probe::start(&ProbeSpec {
        visible: Some(dir.path().to_path_buf()),
        ..Default::default()
    });
    let r = &probe.report;
    let pid = probe.host_pid.to_string();
    assert_eq!(field(r, "pid"), "1", "PID 1 of its own namespace");
    let id = JAIL_ID.to_string();
    let ids = format!("{id}\t{id}\t{id}\t{id}");
    assert_eq!(field(r, "status.Uid"), ids);
    assert_eq!(field(r, "status.Gid"), ids);
    assert_eq!(field(r, "status.Groups"), "");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            field(r, &format!("status.{set}")),
            "0000000000000000",
            "{set}"
        );
    }
    assert_eq!(field(r, "status.NoNewPrivs"), "1");
    // The root holds the visible directory's path and nothing else, read-only.
    let mut expected = Vec::new();
    let mut path = String::new();
    for part in dir.path().strip_prefix("/").unwrap().components() {
        path = format!("{path}/{}", part.as_os_str().to_string_lossy());
        expected.push(path.clone());
    }
    expected.push(format!("{}/sock", dir.path().display()));
    assert_eq!(field(r, "root"), expected.join(","));
    assert_eq!(
        field(r, "root_write"),
        format!("Err(Some({}))", libc::EROFS)
    );
    assert_eq!(
        field(r, "visible_write"),
        format!("Err(Some({}))", libc::EROFS)
    );
    // From outside: its own namespaces, the host's mount table untouched.
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        assert_ne!(ns_inode(&pid, ns), ns_inode("self", ns), "{ns}");
    }
    let root = fs::metadata(format!("/proc/{pid}/root")).unwrap();
    let host_root = fs::metadata("/").unwrap();
    assert_ne!((root.dev(), root.ino()), (host_root.dev(), host_root.ino()));
    assert_eq!(
        fs::read_to_string("/proc/self/mountinfo").unwrap(),
        mounts_before
    );
    // The supervisor dropped its privileges too.
    let sup = fs::read_to_string(format!("/proc/{}/status", probe.supervisor.id())).unwrap();
    assert!(sup.contains(&format!("Uid:\t{ids}\n")), "{sup}");
    assert!(sup.contains("CapEff:\t0000000000000000\n"), "{sup}");
    assert!(sup.contains("NoNewPrivs:\t1\n"), "{sup}");

    let status = probe.finish();
    assert_eq!(status.code(), Some(EXIT_CODE));
    assert!(!dir.path().join("new-file").exists());
}

fn the_network_namespace_is_kept_for_taps() {
    let probe = Probe::start(&ProbeSpec {
        keep_network: true,
        ..Default::default()
    });
    let pid = probe.host_pid.to_string();
    assert_eq!(ns_inode(&pid, "net"), ns_inode("self", "net"));
    assert_ne!(ns_inode(&pid, "mnt"), ns_inode("self", "mnt"));
    assert_eq!(field(&probe.report, "root"), "");
    assert_eq!(probe.finish().code(), Some(EXIT_CODE));
}

/// What the sandbox does to end a VM: SIGKILL to the process it started.
fn killing_the_supervisor_kills_pid_1() {
    let mut probe = Probe::start(&ProbeSpec::default());
    let pid1 = probe.host_pid;
    probe.supervisor.kill().unwrap();
    assert_eq!(
        probe.supervisor.wait().unwrap().signal(),
        Some(libc::SIGKILL)
    );
    // PID 1 goes with it (its parent-death signal); wait for its /proc entry to go.
    while fs::metadata(format!("/proc/{pid1}")).is_ok() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn a_signal_death_is_relayed() {
    let probe = Probe::start(&ProbeSpec::default());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(probe.host_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(probe.finish().signal(), Some(libc::SIGKILL));
}

fn bad_jails_are_refused() {
    assert!(jail::Jail::new(0, 5).is_err());
    assert!(jail::Jail::new(5, 0).is_err());
    for bad in ["relative", "/", "/tmp/../etc"] {
        let err = jail::steps::build_root(&[bad.into()]).unwrap_err();
        assert!(err.to_string().contains(bad), "{err}");
    }
}
