//! A VM's cgroup v2 leaf: made with its limits, joined, killed and removed. cgroup v2 is
//! needed: on a host without it at `/sys/fs/cgroup` (this project's development machines have
//! v1) the binary re-runs itself inside the testbed.

mod probe;

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};

use jail::cgroup::{is_cgroup2, leaf_name, CgroupLimits, VmCgroup, HIERARCHY};
use jail::JailIds;
use libtest_mimic::{Arguments, Failed, Trial};
use probe::{field, Probe, ProbeSpec, EXIT_CODE};

fn main() -> ExitCode {
    if let Ok(mode) = std::env::var(probe::PROBE) {
        probe::run(&mode);
    }
    if let Ok(group) = std::env::var(STARTER_GROUP) {
        starter(&group);
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
        Trial::test(
            "stale_leaves_of_sigkilled_starters_go_at_the_next_start",
            || {
                stale_leaves_of_sigkilled_starters_go_at_the_next_start();
                Ok::<(), Failed>(())
            },
        ),
        Trial::test("a_nested_group_stays_beneath_the_hierarchy", || {
            a_nested_group_stays_beneath_the_hierarchy();
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

/// A pod's cgroup parent as the group (`<top>/burstable/pod-x`): every level is made with the
/// memory and pids controllers delegated, the leaf lands at the bottom; a group that would
/// leave the hierarchy (`..`, absolute, empty components) is refused and nothing is made.
fn a_nested_group_stays_beneath_the_hierarchy() {
    let top = TestGroup::new("nested");
    let group = format!("{}/burstable/pod-x", top.0);
    let leaf = VmCgroup::create(
        Path::new(HIERARCHY),
        &group,
        "vm3",
        CgroupLimits::for_vm(64, 1),
    )
    .unwrap();
    let bottom = Path::new(HIERARCHY).join(&group);
    assert_eq!(leaf.path(), bottom.join("vm3"));
    for level in [&top.0, &format!("{}/burstable", top.0), &group] {
        let control = fs::read_to_string(
            Path::new(HIERARCHY)
                .join(level)
                .join("cgroup.subtree_control"),
        )
        .unwrap();
        for controller in ["memory", "pids"] {
            assert!(control.contains(controller), "{level}: {control}");
        }
    }
    drop(leaf);
    assert!(!bottom.join("vm3").exists());
    for bad in [
        format!("{}/../escaped", top.0),
        format!("/{}", top.0),
        format!("{}//x", top.0),
        format!("{}/./x", top.0),
    ] {
        let made = VmCgroup::create(
            Path::new(HIERARCHY),
            &bad,
            "vm4",
            CgroupLimits::for_vm(64, 1),
        );
        assert!(made.is_err(), "{bad} was accepted");
    }
    assert!(!Path::new(HIERARCHY).join("escaped").exists());
    let _ = fs::remove_dir(&bottom);
    let _ = fs::remove_dir(Path::new(HIERARCHY).join(&top.0).join("burstable"));
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

/// Set (to the cgroup group) in a copy of this binary that plays a VM's starter: see [`starter`].
const STARTER_GROUP: &str = "JAIL_TEST_STARTER_GROUP";
/// The starter's id slots' directory.
const STARTER_IDS: &str = "JAIL_TEST_STARTER_IDS";
/// The id range of the stale-leaf test.
const IDS_BASE: u32 = 910_000_000;
const IDS_COUNT: u32 = 8;

/// A VM's starter as `sandbox` is one: takes ids, makes their leaf, prints its path, then
/// waits for stdin's end (the test SIGKILLs it first, so its leaf is never removed).
fn starter(group: &str) -> ! {
    let dir = PathBuf::from(std::env::var_os(STARTER_IDS).unwrap());
    let ids = JailIds::allocate_in(&dir, IDS_BASE, IDS_COUNT).unwrap();
    let leaf = VmCgroup::create_for(
        Path::new(HIERARCHY),
        group,
        &ids,
        CgroupLimits::for_vm(64, 1),
    )
    .unwrap();
    println!("{}", leaf.path().display());
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    std::process::exit(0);
}

/// Starts a [`starter`]; returns it and its leaf.
fn start_starter(group: &str, ids_dir: &Path) -> (Child, PathBuf) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(STARTER_GROUP, group)
        .env(STARTER_IDS, ids_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(!line.is_empty(), "the starter ended early");
    (child, PathBuf::from(line.trim_end()))
}

fn stale_leaves_of_sigkilled_starters_go_at_the_next_start() {
    let group = TestGroup::new("stale");
    let ids_dir = tempfile::tempdir().unwrap();
    let parent = Path::new(HIERARCHY).join(&group.0);
    let limits = CgroupLimits::for_vm(64, 1);
    // A VM being started: ids held, leaf made, no process in it yet. Its leaf must stay.
    let starting = JailIds::allocate_in(ids_dir.path(), IDS_BASE, IDS_COUNT).unwrap();
    let starting_leaf =
        VmCgroup::create_for(Path::new(HIERARCHY), &group.0, &starting, limits).unwrap();
    // Two starters SIGKILLed after making their leaves: both leaves stay behind, empty.
    let starters: Vec<_> = (0..2)
        .map(|_| start_starter(&group.0, ids_dir.path()))
        .collect();
    let mut stale = Vec::new();
    for (mut child, leaf) in starters {
        child.kill().unwrap();
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert!(leaf.is_dir(), "a SIGKILLed starter leaves its leaf");
        stale.push(leaf);
    }
    assert_eq!(
        stale,
        [1, 2].map(|slot| parent.join(leaf_name(IDS_BASE + slot)))
    );
    // A leaf of a free id that still has a process: never touched.
    let busy_name = leaf_name(IDS_BASE + 5);
    let busy = VmCgroup::create(Path::new(HIERARCHY), &group.0, &busy_name, limits).unwrap();
    let probe = Probe::start(&ProbeSpec {
        cgroup: Some(busy.path().to_path_buf()),
        join_only: true,
        ..Default::default()
    });
    // Something else in the group, empty: not a VM's leaf, never touched.
    let other = parent.join("other");
    fs::create_dir(&other).unwrap();

    // The next start takes the first free id (the first dead starter's: its leaf is replaced)
    // and removes the second's.
    let next = JailIds::allocate_in(ids_dir.path(), IDS_BASE, IDS_COUNT).unwrap();
    assert_eq!(next.uid(), IDS_BASE + 1);
    let next_leaf = VmCgroup::create_for(Path::new(HIERARCHY), &group.0, &next, limits).unwrap();
    assert_eq!(next_leaf.path(), stale[0]);
    assert!(
        !stale[1].exists(),
        "the stale leaf {} is left",
        stale[1].display()
    );
    assert!(
        starting_leaf.path().is_dir(),
        "a starting VM's leaf was removed"
    );
    assert!(busy.path().is_dir(), "a populated leaf was removed");
    assert_eq!(
        fs::read_to_string(busy.path().join("cgroup.procs"))
            .unwrap()
            .trim(),
        probe.host_pid.to_string()
    );
    assert!(other.is_dir());

    assert_eq!(probe.finish().code(), Some(EXIT_CODE));
    fs::remove_dir(&other).unwrap();
    drop((next_leaf, busy, starting_leaf));
}
