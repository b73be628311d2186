//! A VM's cgroup v2 leaf: made with its limits, joined, killed and removed. cgroup v2 is
//! needed: on a host without it at `/sys/fs/cgroup` (this project's development machines have
//! v1) the binary re-runs itself inside the testbed.

mod probe;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitCode;

use jail::cgroup::{is_cgroup2, CgroupLimits, VmCgroup, HIERARCHY};
use libtest_mimic::{Arguments, Failed, Trial};
use probe::{field, Probe, ProbeSpec, EXIT_CODE};

fn main() -> ExitCode {
    if let Ok(mode) = std::env::var(probe::PROBE) {
        probe::run(&mode);
    }
    let args = Arguments::from_args();
    if !args.list && !testbed::in_testbed() && !is_cgroup2(Path::new(HIERARCHY)) {
        return testbed::relay_current_exe(
            "jail cgroup tests",
            "/sys/fs/cgroup is not cgroup v2 here",
            &[],
        );
    }
    let trials = vec![
        Trial::test("a_leaf_has_the_limits_and_goes_with_its_processes", || {
            a_leaf_has_the_limits_and_goes_with_its_processes();
            Ok::<(), Failed>(())
        }),
        Trial::test("a_jailed_vmm_and_its_supervisor_are_in_the_leaf", || {
            a_jailed_vmm_and_its_supervisor_are_in_the_leaf();
            Ok::<(), Failed>(())
        }),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

/// A group of this test's own, so the tests never touch the real `microvm` group.
struct TestGroup(String);

impl TestGroup {
    fn new(name: &str) -> Self {
        Self(format!("microvm-test-{name}-{}", std::process::id()))
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(Path::new(HIERARCHY).join(&self.0));
    }
}

fn a_leaf_has_the_limits_and_goes_with_its_processes() {
    let group = TestGroup::new("limits");
    let limits = CgroupLimits::for_vm(256, 2);
    assert_eq!(limits.memory_max, (256 + 128) << 20);
    assert_eq!(limits.pids_max, 18);
    let leaf = VmCgroup::create(Path::new(HIERARCHY), &group.0, "vm1", limits).unwrap();
    let path = leaf.path().to_path_buf();
    assert_eq!(path, Path::new(HIERARCHY).join(&group.0).join("vm1"));
    let read = |f: &str| fs::read_to_string(path.join(f)).unwrap().trim().to_string();
    assert_eq!(read("memory.max"), limits.memory_max.to_string());
    assert_eq!(read("pids.max"), "18");

    let probe = Probe::start(&ProbeSpec {
        cgroup: Some(path.clone()),
        join_only: true,
        ..Default::default()
    });
    let relative = path.strip_prefix(HIERARCHY).unwrap();
    assert_eq!(
        field(&probe.report, "cgroup"),
        format!("0::/{}", relative.display())
    );
    assert_eq!(read("cgroup.procs"), probe.host_pid.to_string());
    // A leftover leaf of the same name (its starter was killed) is replaced, its process
    // killed: the probe dies while it still waits for stdin.
    let again = VmCgroup::create(Path::new(HIERARCHY), &group.0, "vm1", limits).unwrap();
    assert_eq!(read("cgroup.procs"), "");
    assert_eq!(probe.finish().signal(), Some(libc::SIGKILL));
    drop(again);
    assert!(!path.exists(), "the leaf is removed on drop");
    drop(leaf);
}

fn a_jailed_vmm_and_its_supervisor_are_in_the_leaf() {
    let group = TestGroup::new("jail");
    let leaf = VmCgroup::create(
        Path::new(HIERARCHY),
        &group.0,
        "vm2",
        CgroupLimits::for_vm(64, 1),
    )
    .unwrap();
    let probe = Probe::start(&ProbeSpec {
        cgroup: Some(leaf.path().to_path_buf()),
        ..Default::default()
    });
    let procs = fs::read_to_string(leaf.path().join("cgroup.procs")).unwrap();
    let mut pids: Vec<u32> = procs.lines().map(|l| l.parse().unwrap()).collect();
    pids.sort();
    let mut want = vec![probe.supervisor.id(), probe.host_pid];
    want.sort();
    assert_eq!(pids, want);
    assert_eq!(probe.finish().code(), Some(EXIT_CODE));
    let path = leaf.path().to_path_buf();
    drop(leaf);
    assert!(!path.exists());
}
