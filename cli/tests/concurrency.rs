//! Many `microvm run`s at once, with real guests: N detached runs started together (half of
//! them with a live volume each), and N `run --rm` of one image into an empty image store. All
//! start, all answer, none sees another's files, and once they are removed nothing is left: no
//! VMM, monitor or virtiofsd, no socket, mount or held lock under `MICROVM_HOME`, no run
//! directory.
//!
//! Runs where `run.rs` runs (inside the testbed on a host whose KVM cannot boot guests). The
//! image is built with `test-support`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;

use test_support::host;
use test_support::image::{BuiltImage, BusyboxImage};

mod common;

use common::{prepare, run_cmd, trial, without_boot_retry, Env, Out};

/// Runs started at once. Each start costs the testbed's one-vCPU L1 about 30 s of CPU with the
/// debug binaries the tests use (README, "Many VMs at once"), and a VM whose agent does not
/// answer within 180 s is given up: four fit with room to spare on a loaded machine.
const N: usize = 4;

fn main() -> ExitCode {
    let args = match prepare() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let trials = vec![
        trial("concurrent_detached_runs_isolated_and_removed", detached),
        trial("concurrent_run_rm_into_an_empty_store", run_rm_cold),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

/// The busybox image of these tests (its own, from `test-support`), built once.
fn image() -> &'static BuiltImage {
    static IMAGE: OnceLock<BuiltImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mvc-image-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        BusyboxImage::default()
            .write(&dir)
            .expect("build the busybox image")
    })
}

/// `microvm ARGS` for each of `0..N` at the same time (one thread each); the outcomes in order.
fn all_at_once(env: &Env, args: impl Fn(usize) -> Vec<String> + Sync) -> Vec<Out> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let argv = args(i);
                s.spawn(move || {
                    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                    run_cmd(env.cmd(&argv), None)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// N `run -d` together, every second one with its own volume; each container writes its
/// number into its own `/tmp` (all share one cached root disk) and, where it has one, its
/// volume. Then each is asked (exec) what it sees, then all are removed together.
fn detached(env: &Env) {
    let img = image().layout_str().to_string();
    let volume = |i: usize| env.dir.join(format!("vol{i}"));
    let started = all_at_once(env, |i| {
        let mut argv = vec!["run".into(), "-d".into(), "--name".into(), format!("c{i}")];
        if i % 2 == 0 {
            argv.extend(["-v".into(), format!("{}:/data", volume(i).display())]);
        }
        let script = format!(
            "echo {i} >/tmp/mine-{i}; [ -d /data ] && echo {i} >/data/mine-{i}; exec sleep 600"
        );
        argv.extend([img.clone(), "sh".into(), "-c".into(), script]);
        argv
    });
    for (i, o) in started.iter().enumerate() {
        assert_eq!(o.code, 0, "run -d c{i}: {o:?}");
    }
    let ps = env.microvm(&["ps"], None);
    for i in 0..N {
        assert!(
            ps.stdout
                .lines()
                .any(|l| l.contains(&format!("c{i}")) && l.contains("running")),
            "c{i} is not running: {ps:?}"
        );
    }
    assert_eq!(
        host::processes_named("microvm-vmm")
            .iter()
            .filter(|p| p
                .cwd
                .as_deref()
                .is_some_and(|c| c.starts_with(canon(&env.home))))
            .count(),
        N,
        "one VMM per run"
    );

    // Each answers, and sees only its own files: in its /tmp (the root disk is shared, its
    // writes are not) and in its volume.
    for i in 0..N {
        let mut listing = String::new();
        // The container writes its files right after it starts: wait for them.
        for _ in 0..100 {
            let o = env.microvm(
                &[
                    "exec",
                    &format!("c{i}"),
                    "sh",
                    "-c",
                    "ls /tmp; ls /data 2>/dev/null; true",
                ],
                None,
            );
            assert_eq!(o.code, 0, "exec c{i}: {o:?}");
            listing = o.stdout;
            let want = if i % 2 == 0 { 2 } else { 1 };
            if listing.matches(&format!("mine-{i}")).count() >= want {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let mut names: Vec<&str> = listing.lines().collect();
        names.sort();
        let expected: Vec<String> = if i % 2 == 0 {
            vec![format!("mine-{i}"), format!("mine-{i}")]
        } else {
            vec![format!("mine-{i}")]
        };
        assert_eq!(names, expected, "c{i} sees other files");
        if i % 2 == 0 {
            let on_host: Vec<_> = std::fs::read_dir(volume(i))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(on_host, vec![format!("mine-{i}")], "volume of c{i}");
        }
    }

    let removed = all_at_once(env, |i| vec!["rm".into(), "-f".into(), format!("c{i}")]);
    for (i, o) in removed.iter().enumerate() {
        assert_eq!(o.code, 0, "rm -f c{i}: {o:?}");
    }
    assert_nothing_left(env);
}

/// N `run --rm` of one image at once into an empty store: one import wins, the others wait for
/// it or use it; each container prints its own number and only its own file.
fn run_rm_cold(env: &Env) {
    let img = image().layout_str().to_string();
    let outs = all_at_once(env, |i| {
        let script = format!("echo {i} >/tmp/mine-{i}; ls /tmp; cat /tmp/mine-*");
        vec![
            "run".into(),
            "--rm".into(),
            img.clone(),
            "sh".into(),
            "-c".into(),
            script,
        ]
    });
    for (i, o) in outs.iter().enumerate() {
        assert_eq!(o.code, 0, "run --rm #{i}: {o:?}");
        assert_eq!(o.stdout, format!("mine-{i}\n{i}\n"), "run --rm #{i}: {o:?}");
        // Progress lines of the import go to stderr; the boot retry warning is allowed.
        let stderr = without_boot_retry(&o.stderr);
        assert!(!stderr.contains("rror"), "run --rm #{i}: {o:?}");
    }
    // One image stored, however many runs imported it at once (NAME, IMAGE ID, SIZE).
    let images = env.microvm(&["images"], None);
    assert_eq!(images.code, 0, "{images:?}");
    let mut ids: Vec<&str> = images
        .stdout
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    ids.dedup();
    assert_eq!(ids.len(), 1, "one stored image: {images:?}");
    assert_nothing_left(env);
}

/// No run, and nothing of one, is left under `MICROVM_HOME`.
fn assert_nothing_left(env: &Env) {
    let ps = env.microvm(&["ps", "-a", "-q"], None);
    assert_eq!((ps.code, ps.stdout.as_str()), (0, ""), "runs left: {ps:?}");
    let runs = env.home.join("runs");
    let left: Vec<PathBuf> = std::fs::read_dir(&runs)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "run directories left: {left:?}");
    let procs = host::processes_under(&env.home);
    assert!(procs.is_empty(), "processes left: {procs:?}");
    let procs = host::processes_under(&env.dir);
    assert!(procs.is_empty(), "processes left: {procs:?}");
    let sockets = host::sockets_under(&env.home);
    assert!(sockets.is_empty(), "sockets left: {sockets:?}");
    let mounts = host::mounts_under(&env.dir);
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    let locks = host::locked_files_under(&env.home);
    assert!(locks.is_empty(), "locks still held: {locks:?}");
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}
