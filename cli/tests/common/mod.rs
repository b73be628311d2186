//! What the `microvm run` end-to-end test binaries share: the relay into the testbed, the test
//! image built from busybox-static, running the real `microvm` binary.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use test_support::host;
use test_support::image::{BuiltImage, BusyboxImage};

pub const RELAY_ENV: &[&str] = &[
    "MICROVM_KERNEL",
    "MICROVM_AGENT",
    "MICROVM_AGENT_LOG",
    "MICROVM_VIRTIOFSD",
    "MICROVM_CACHE",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "RUN_TEST_VERBOSE",
];

/// Parses the test arguments, finds the kernel and builds the agent, and relays this binary
/// into the testbed when this host cannot boot guests (then the relay's status is returned).
pub fn prepare() -> Result<Arguments, ExitCode> {
    let mut args = Arguments::from_args();
    args.test_threads.get_or_insert(1);
    if !args.list && !testbed::in_testbed() {
        if std::env::var_os("MICROVM_KERNEL").is_none() {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            let k = PathBuf::from(home).join(".cache/microvm/kernel/current/vmlinux");
            if !k.is_file() {
                eprintln!(
                    "run tests: no guest kernel: run `cargo xtask kernel` or set MICROVM_KERNEL"
                );
                return Err(ExitCode::from(101));
            }
            // SAFETY: set before any other thread of this process exists.
            unsafe { std::env::set_var("MICROVM_KERNEL", k) };
        }
        match build_agent() {
            // SAFETY: as above.
            Ok(agent) => unsafe { std::env::set_var("MICROVM_AGENT", agent) },
            Err(e) => {
                eprintln!("run tests: {e}");
                return Err(ExitCode::from(101));
            }
        }
        if let Err(why) = vmm::host::check_can_boot_guests() {
            return Err(testbed::relay_current_exe(
                "run tests",
                &why.to_string(),
                RELAY_ENV,
            ));
        }
    }
    Ok(args)
}

pub fn trial(name: &'static str, f: fn(&Env)) -> Trial {
    Trial::test(name, move || {
        let img = test_image().map_err(Failed::from)?;
        let dir = tempfile::Builder::new()
            .prefix("mvr-")
            .tempdir()
            .map_err(|e| Failed::from(e.to_string()))?;
        let env = Env {
            home: dir.path().join("h"),
            dir: dir.path().to_path_buf(),
            img,
        };
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&env)));
        eprintln!("{name}: {:.1} s", started.elapsed().as_secs_f64());
        if outcome.is_err() {
            // The console logs of the runs, for the reason.
            for entry in glob_consoles(&env.home.join("runs")) {
                let text = std::fs::read_to_string(&entry).unwrap_or_default();
                let tail = &text[text.len().saturating_sub(3000)..];
                eprintln!("--- {} ---\n{tail}", entry.display());
            }
        }
        outcome.map_err(|p| {
            Failed::from(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into()),
            )
        })
    })
}

pub fn glob_consoles(runs: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(runs)
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join("console.log"))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default()
}

pub struct Env {
    /// MICROVM_HOME of this test: its own image store and runs.
    pub home: PathBuf,
    pub dir: PathBuf,
    pub img: &'static BuiltImage,
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

pub const TIMEOUT: Duration = Duration::from_secs(600);

impl Env {
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_microvm"));
        c.args(args).env("MICROVM_HOME", &self.home);
        c
    }

    /// Runs `microvm ARGS` with `stdin`, to its end; kills it after [`TIMEOUT`].
    pub fn microvm(&self, args: &[&str], stdin: Option<&[u8]>) -> Out {
        run_cmd(self.cmd(args), stdin)
    }

    /// Runs `microvm ARGS` (one shell line) under `script`, which gives it a terminal.
    pub fn microvm_in_terminal(&self, args: &str) -> Out {
        let line = format!("{} {args}", env!("CARGO_BIN_EXE_microvm"));
        let mut c = Command::new("script");
        c.args(["-qec", &line, "/dev/null"])
            .env("MICROVM_HOME", &self.home);
        run_cmd(c, None)
    }
}

pub fn run_cmd(mut c: Command, stdin: Option<&[u8]>) -> Out {
    if std::env::var_os("RUN_TEST_VERBOSE").is_some() {
        eprintln!("+ {c:?}");
    }
    let started = Instant::now();
    let mut child = c
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    let feeder = stdin.map(|data| {
        let mut w = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        })
    });
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            panic!("{c:?} did not end within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let o = Out {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    if std::env::var_os("RUN_TEST_VERBOSE").is_some() {
        eprintln!("  ({:.1} s) {o:?}", started.elapsed().as_secs_f64());
    }
    o
}

// ---------------------------------------------------------------------------------------------
// The test image: busybox-static in one layer, written as an OCI image layout and an archive.

/// The image's config: Env, a default Cmd that prints to both streams and exits 3.
pub const IMAGE_CMD: &str = "echo out-$IMG_VAR; echo err-line >&2; exit 3";

/// The image of these tests, built once: besides busybox, a user `tester` (1000) with a home of
/// its own, a `/data` directory and a file that is not a program (`/etc/notexec`).
pub fn test_image() -> Result<&'static BuiltImage, String> {
    static IMG: OnceLock<Result<BuiltImage, String>> = OnceLock::new();
    IMG.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mvr-image-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        test_image_spec()
            .write(&dir)
            .map_err(|e| format!("building the test image: {e}"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn test_image_spec() -> BusyboxImage {
    let mut dirs: Vec<(String, u32, u64)> = ["etc", "root", "dev", "proc", "sys", "run", "data"]
        .into_iter()
        .map(|d| (d.to_string(), 0o755, 0))
        .collect();
    dirs.extend([
        ("tmp".into(), 0o1777, 0),
        ("home".into(), 0o755, 0),
        ("home/tester".into(), 0o755, 1000),
    ]);
    BusyboxImage {
        env: vec!["PATH=/bin".into(), "IMG_VAR=from-image".into()],
        cmd: vec!["sh".into(), "-c".into(), IMAGE_CMD.into()],
        dirs,
        files: vec![
            (
                "etc/passwd".into(),
                b"root:x:0:0:root:/root:/bin/sh\ntester:x:1000:1000:tester:/home/tester:/bin/sh\n"
                    .to_vec(),
                0o644,
            ),
            (
                "etc/group".into(),
                b"root:x:0:\ntester:x:1000:\n".to_vec(),
                0o644,
            ),
            ("etc/notexec".into(), b"not a program\n".to_vec(), 0o644),
        ],
        ref_name: "t".into(),
        ..Default::default()
    }
}

/// Builds the static agent (what `cargo xtask agent` does) unless `MICROVM_AGENT` names one.
pub fn build_agent() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let target = exe
        .ancestors()
        .nth(3)
        .ok_or("cannot locate the target directory")?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace root")?;
    testbed::static_agent(root, target)
}

/// `stderr` without `microvm run`'s announced retry of a VM that triple-faulted during early
/// boot (the open bug in the README): a multi-line WARN from "the VM did not start" to
/// "retrying once". Everything else stays, so the container's own stderr is still compared
/// exactly.
pub fn without_boot_retry(stderr: &str) -> String {
    let mut out = String::new();
    let mut in_warning = false;
    for line in stderr.split_inclusive('\n') {
        if !in_warning && line.contains("WARN") && line.contains("the VM did not start (") {
            in_warning = true;
        }
        if in_warning {
            if line.trim_end().ends_with("retrying once") {
                in_warning = false;
            }
            continue;
        }
        out.push_str(line);
    }
    out
}

/// The VMM processes (`microvm-vmm ...`) working in a directory under `home` (the sandbox
/// starts the VMM in the run's directory), as their command lines.
pub fn vmm_processes(home: &Path) -> Vec<String> {
    let home = std::fs::canonicalize(home).unwrap_or_else(|_| home.to_path_buf());
    host::processes_named("microvm-vmm")
        .into_iter()
        .filter(|p| p.cwd.as_deref().is_some_and(|d| d.starts_with(&home)))
        .map(|p| p.args.join(" "))
        .collect()
}
