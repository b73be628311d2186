//! The shim driven by a real containerd (Debian's 1.6) through `ctr`, with real guests.
//!
//! A private containerd runs with its own root, state and socket in a short temporary
//! directory (on a tmpfs, so the overlayfs snapshotter works), with this crate's
//! `containerd-shim-microvm-v2` first on its PATH. A one-layer busybox image is built here as an
//! OCI archive and imported with `ctr images import`. Needs `microvm` (`cargo build -p cli`,
//! found next to the shim binary, or `MICROVM_BIN`); the guest kernel (`MICROVM_KERNEL`) and
//! the static agent (`MICROVM_AGENT`) are found like the shim finds them when unset, the agent
//! built when missing. On a host whose KVM cannot boot an unmodified guest the test binary
//! re-runs itself inside the testbed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use sha2::{Digest, Sha256};

const RELAY_ENV: &[&str] = &[
    "MICROVM_KERNEL",
    "MICROVM_AGENT",
    "MICROVM_BIN",
    "SHIM_TEST_LOG",
    "RUST_BACKTRACE",
];
const RUNTIME: &str = "io.containerd.microvm.v2";
const IMAGE: &str = "docker.io/library/microvm-busybox:test";
const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-microvm-v2");

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    if !args.list && !testbed::in_testbed() {
        // Found the way the shim finds them (or built, for the agent) unless named: `cargo
        // xtask test` sets only MICROVM_KERNEL.
        if let Err(e) = find_artifacts() {
            eprintln!("containerd tests: {e}");
            return ExitCode::from(101);
        }
        if let Err(why) = vmm::host::check_can_boot_guests() {
            return testbed::relay_current_exe("containerd tests", &why.to_string(), RELAY_ENV);
        }
    }
    // In this order (one at a time): the last checks that nothing is left behind.
    let trials = vec![
        trial("ctr_run_output_exit_codes_events_in_a_vm", run_basics),
        trial("ctr_exec_tty_kill_pids_metrics", exec_and_kill),
        trial("two_containers_of_one_pod_share_a_vm", pod_of_two),
        trial("pod_vm_size_oom_event_and_log_uris", pod_size_oom_logs),
        trial("delete_after_the_shim_was_sigkilled", after_sigkill),
        trial("nothing_is_left_behind", nothing_left),
    ];
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(Ok(c)) = CONTAINERD.get() {
        c.stop();
    }
    conclusion.exit_code()
}

/// Sets MICROVM_KERNEL and MICROVM_AGENT where unset: `sandbox::locate`'s places, and for the
/// agent a build of it (`cargo xtask agent`'s command) when none is there.
fn find_artifacts() -> Result<(), String> {
    if std::env::var_os("MICROVM_KERNEL").is_none() {
        let k = sandbox::locate::kernel().map_err(|e| e.to_string())?;
        // SAFETY: set before any other thread of this process exists.
        unsafe { std::env::set_var("MICROVM_KERNEL", k) };
    }
    if std::env::var_os("MICROVM_AGENT").is_none() {
        let agent = match sandbox::locate::agent() {
            Ok(a) => a,
            Err(_) => {
                let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
                let target = Path::new(SHIM).ancestors().nth(2).unwrap();
                eprintln!("containerd tests: building the static agent");
                testbed::static_agent(root, target)?
            }
        };
        // SAFETY: as above.
        unsafe { std::env::set_var("MICROVM_AGENT", agent) };
    }
    Ok(())
}

fn trial(name: &'static str, f: fn(&Containerd) -> Result<(), String>) -> Trial {
    Trial::test(name, move || {
        let started = Instant::now();
        let c = containerd().map_err(Failed::from)?;
        let r = f(c);
        eprintln!("{name}: {:.1} s", started.elapsed().as_secs_f64());
        if r.is_err() {
            c.dump_logs();
        }
        r.map_err(Failed::from)
    })
}

// ---------------------------------------------------------------------------------------------
// The private containerd.

struct Containerd {
    dir: PathBuf,
    sock: PathBuf,
    config: PathBuf,
    child: Mutex<Option<Child>>,
}

static CONTAINERD: OnceLock<Result<Containerd, String>> = OnceLock::new();

fn containerd() -> Result<&'static Containerd, String> {
    CONTAINERD
        .get_or_init(Containerd::start)
        .as_ref()
        .map_err(Clone::clone)
}

fn sh(cmd: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run sh")
}

impl Containerd {
    fn start() -> Result<Containerd, String> {
        let kernel = std::env::var("MICROVM_KERNEL").map_err(|_| {
            "MICROVM_KERNEL is not set (export MICROVM_KERNEL=~/.cache/microvm/kernel/current/vmlinux)"
        })?;
        let agent = std::env::var("MICROVM_AGENT").map_err(|_| {
            "MICROVM_AGENT is not set (its path is what `cargo xtask agent` prints)"
        })?;
        let shim_dir = Path::new(SHIM).parent().unwrap().to_path_buf();
        let microvm = match std::env::var_os("MICROVM_BIN") {
            Some(p) => PathBuf::from(p),
            None => shim_dir.join("microvm"),
        };
        for p in [Path::new(&kernel), Path::new(&agent), &microvm] {
            if !p.is_file() {
                return Err(format!(
                    "{} is missing (cargo build -p cli; cargo xtask agent)",
                    p.display()
                ));
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("ctd")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?
            .keep();
        // tmpfs: overlayfs cannot use the testbed's overlay root as its upper layer.
        let out = sh(&format!("mount -t tmpfs tmpfs {}", dir.display()));
        if !out.status.success() {
            return Err(format!(
                "mount a tmpfs: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let sock = dir.join("c.sock");
        let shim_toml = dir.join("shim.toml");
        let level = std::env::var("SHIM_TEST_LOG").unwrap_or_else(|_| "info".into());
        std::fs::write(
            &shim_toml,
            format!(
                "kernel = {kernel:?}\nagent = {agent:?}\nmicrovm = {:?}\nmemory_mib = 256\n\
                 log_level = {level:?}\nslots = 4\n",
                microvm.display().to_string()
            ),
        )
        .map_err(|e| e.to_string())?;
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n\
                 [debug]\n  level = \"debug\"\n",
                d = dir.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("containerd.log")).map_err(|e| e.to_string())?;
        let path = format!(
            "{}:{}",
            shim_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("start containerd (apt-get install containerd): {e}"))?;
        let c = Containerd {
            dir,
            sock,
            config: shim_toml,
            child: Mutex::new(Some(child)),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !c.ctr(&["version"]).status.success() {
            if Instant::now() > deadline {
                c.dump_logs();
                return Err("containerd did not answer within 120 s".into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let archive = c.dir.join("image.tar");
        build_image(&archive)?;
        let out = c.ctr(&["images", "import", archive.to_str().unwrap()]);
        if !out.status.success() {
            return Err(format!("ctr images import: {}", text(&out)));
        }
        Ok(c)
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.arg("300")
            .arg("ctr")
            .arg("-a")
            .arg(&self.sock)
            .arg("-n")
            .arg("default")
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().expect("run ctr")
    }

    /// `ctr run` with this runtime and the shim config, the image and `args` after it.
    fn run_args<'a>(&'a self, before: &[&'a str], id: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["run", "--runtime", RUNTIME, "--runtime-config-path"];
        v.push(self.config.to_str().unwrap());
        v.extend_from_slice(before);
        v.push(IMAGE);
        v.push(id);
        v.extend_from_slice(cmd);
        v
    }

    fn dump_logs(&self) {
        let log = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(200);
        eprintln!(
            "--- containerd.log (end) ---\n{}\n---",
            lines[start..].join("\n")
        );
        for entry in std::fs::read_dir("/run/microvm-shim")
            .into_iter()
            .flatten()
            .flatten()
        {
            let console = std::fs::read_to_string(entry.path().join("console.log"));
            if let Ok(c) = console {
                let start = c.len().saturating_sub(3000);
                eprintln!(
                    "--- {}/console.log (end) ---\n{}\n---",
                    entry.path().display(),
                    &c[start..]
                );
            }
        }
    }

    fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            // SAFETY: SIGTERM to the containerd we started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        let _ = sh(&format!(
            "umount -R {d} 2>/dev/null; rmdir {d}",
            d = self.dir.display()
        ));
    }

    /// Polls `ctr task ls` until the task has `status` (or the timeout).
    fn wait_status(&self, id: &str, status: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let out = self.ctr(&["task", "ls"]);
            let ls = text(&out);
            let line = ls.lines().find(|l| l.split_whitespace().next() == Some(id));
            if line.is_some_and(|l| l.contains(status)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("task {id} never became {status}:\n{ls}"));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Kills and deletes the task (if there is one) and the container.
    fn remove(&self, id: &str) {
        let ls = text(&self.ctr(&["task", "ls"]));
        if ls.lines().any(|l| l.split_whitespace().next() == Some(id)) {
            let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
            let _ = self.wait_status(id, "STOPPED");
            let _ = self.ctr(&["task", "delete", id]);
        }
        let _ = self.ctr(&["container", "delete", id]);
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

// ---------------------------------------------------------------------------------------------
// The test image: busybox-static in one layer, as an OCI archive.

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn build_image(out: &Path) -> Result<(), String> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("busybox not found (apt-get install busybox-static)")?;
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| e.to_string())?;
    let mut layer = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, name: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        b.append_data(&mut h, name, std::io::empty())
    };
    for d in ["bin", "dev", "proc", "sys", "tmp", "etc", "root", "run"] {
        dir(&mut layer, d).map_err(|e| e.to_string())?;
    }
    let mut f = std::fs::File::open(busybox).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(bytes.len() as u64);
    h.set_mtime(0);
    layer
        .append_data(&mut h, "bin/busybox", bytes.as_slice())
        .map_err(|e| e.to_string())?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet == "busybox" {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_mtime(0);
        layer
            .append_link(&mut h, format!("bin/{applet}"), "busybox")
            .map_err(|e| e.to_string())?;
    }
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(passwd.len() as u64);
    h.set_mtime(0);
    layer
        .append_data(&mut h, "etc/passwd", &passwd[..])
        .map_err(|e| e.to_string())?;
    let layer = layer.into_inner().map_err(|e| e.to_string())?;
    let layer_digest = sha256_hex(&layer);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    })
    .to_string()
    .into_bytes();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{}", sha256_hex(&config)), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{layer_digest}"), "size": layer.len()}],
    })
    .to_string()
    .into_bytes();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{}", sha256_hex(&manifest)),
                       "size": manifest.len(),
                       "platform": {"architecture": "amd64", "os": "linux"},
                       "annotations": {"io.containerd.image.name": IMAGE,
                                       "org.opencontainers.image.ref.name": "test"}}],
    })
    .to_string()
    .into_bytes();
    let mut archive = tar::Builder::new(Vec::new());
    let mut add = |name: String, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        archive.append_data(&mut h, name, data)
    };
    add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(|e| e.to_string())?;
    add("index.json".into(), &index).map_err(|e| e.to_string())?;
    for blob in [&layer, &config, &manifest] {
        add(format!("blobs/sha256/{}", sha256_hex(blob)), blob).map_err(|e| e.to_string())?;
    }
    let bytes = archive.into_inner().map_err(|e| e.to_string())?;
    std::fs::write(out, bytes).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Host-side observations.

/// Pids of running VMM processes (`microvm boot ...`).
fn vmm_pids() -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_vmm = args.len() > 1
            && args[0].ends_with(b"microvm")
            && args[1] == b"boot"
            && !std::fs::read_to_string(e.path().join("stat"))
                .unwrap_or_default()
                .contains(") Z ");
        if is_vmm {
            pids.push(pid);
        }
    }
    pids
}

fn shim_pids() -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if cmdline
            .split(|b| *b == 0)
            .next()
            .is_some_and(|a0| a0.ends_with(b"containerd-shim-microvm-v2"))
        {
            pids.push(pid);
        }
    }
    pids
}

/// Whether a running process has `arg` among its arguments.
fn processes_with_arg(arg: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let zombie = std::fs::read_to_string(e.path().join("stat"))
                .unwrap_or_default()
                .contains(") Z ");
            !zombie && cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes())
        })
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        if Instant::now() > deadline {
            return Err(format!("timed out after {secs} s waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

/// `ctr run --rm` prints the workload's output from a guest kernel; exit codes 0 and 3 come
/// through; `ctr events` shows create, start, exit, delete in that order.
fn run_basics(c: &Containerd) -> Result<(), String> {
    let mut events = c
        .ctr_cmd(&["events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(500));
    let host_release = text(&sh("uname -r")).trim().to_string();
    let out = c.ctr(&c.run_args(&["--rm"], "basic1", &["sh", "-c", "echo X; uname -r"]));
    let printed = text(&out);
    check(out.status.code() == Some(0), || {
        format!("ctr run exited {:?}: {printed}", out.status)
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    check(lines.first() == Some(&"X"), || {
        format!("expected X first: {printed}")
    })?;
    let guest_release = lines.get(1).copied().unwrap_or("");
    check(
        !guest_release.is_empty() && guest_release != host_release,
        || format!("guest kernel {guest_release:?} vs host {host_release:?}: not in a VM?"),
    )?;
    check(
        !Path::new("/run/containerd/runc/default/basic1").exists(),
        || "runc state exists: runc ran it".into(),
    )?;
    let out = c.ctr(&c.run_args(&["--rm"], "basic3", &["sh", "-c", "echo three >&2; exit 3"]));
    check(out.status.code() == Some(3), || {
        format!("exit 3 came back as {:?}: {}", out.status, text(&out))
    })?;
    check(
        String::from_utf8_lossy(&out.stderr).contains("three"),
        || format!("stderr lost: {}", text(&out)),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: SIGTERM to the `timeout ctr events` child we started.
    unsafe { libc::kill(events.id() as i32, libc::SIGTERM) };
    let mut log = String::new();
    events
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .map_err(|e| e.to_string())?;
    let _ = events.wait();
    let topics: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("basic1"))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("/tasks/")))
        .collect();
    check(
        topics
            == [
                "/tasks/create",
                "/tasks/start",
                "/tasks/exit",
                "/tasks/delete",
            ],
        || format!("task events of basic1: {topics:?}\n{log}"),
    )
}

/// `ctr task exec` with and without a terminal, `ctr task ps` and `metrics`, and `ctr task
/// kill` ending an attached `ctr run` with 137.
fn exec_and_kill(c: &Containerd) -> Result<(), String> {
    let mut run = c
        .ctr_cmd(&c.run_args(
            // ctr's default spec has no /sys/fs/cgroup: mount it to read the limits inside.
            &[
                "--mount",
                "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro:nosuid",
            ],
            "execk",
            &["sleep", "1000"],
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let r = (|| {
        c.wait_status("execk", "RUNNING")?;
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "execk",
            "sh",
            "-c",
            "echo out; exit 5",
        ]);
        check(
            out.status.code() == Some(5) && text(&out).contains("out"),
            || format!("exec: {:?} {}", out.status, text(&out)),
        )?;
        // With a terminal: ctr needs one itself, so run it under script(1); `timeout
        // --foreground` keeps ctr in the terminal's foreground group (else its tcsetattr stops
        // it with SIGTTOU).
        let sock = c.sock.display().to_string();
        let out = sh(&format!(
            "script -qec 'timeout --foreground 60 ctr -a {sock} -n default task exec -t --exec-id e2 execk \
             sh -c \"tty; exit 4\"' /dev/null"
        ));
        check(
            out.status.code() == Some(4) && text(&out).contains("/dev/pts/"),
            || {
                format!(
                    "exec -t: {:?} {}\ntasks: {}",
                    out.status,
                    text(&out),
                    text(&c.ctr(&["task", "ps", "execk"]))
                )
            },
        )?;
        let ps = c.ctr(&["task", "ps", "execk"]);
        check(
            ps.status.success() && text(&ps).lines().count() >= 2,
            || format!("task ps: {}", text(&ps)),
        )?;
        let m = c.ctr(&["task", "metrics", "execk"]);
        check(
            m.status.success() && text(&m).contains("pids.current"),
            || format!("task metrics: {}", text(&m)),
        )?;
        // Update (containerd's Tasks.Update; ctr 1.6 has no `task update`): new cgroup limits
        // in the guest, read back inside the container (its cgroup's path from
        // /proc/self/cgroup: with or without a cgroup namespace).
        let cg = |file: &str| {
            let out = c.ctr(&[
                "task",
                "exec",
                "--exec-id",
                &format!("cg-{}", file.replace('.', "-")),
                "execk",
                "sh",
                "-c",
                &format!("cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/{file}"),
            ]);
            (out.status.success(), text(&out).trim().to_string())
        };
        let before = cg("memory.max");
        check(before == (true, "max".to_string()), || {
            format!("memory.max before the update: {before:?}")
        })?;
        grpc_task_update(
            &c.sock,
            "execk",
            LINUX_RESOURCES,
            r#"{"memory":{"limit":52428800},"cpu":{"quota":20000}}"#,
        )
        .map_err(|e| format!("Tasks.Update: {e}"))?;
        let after = cg("memory.max");
        check(after == (true, "52428800".to_string()), || {
            format!("memory.max after `ctr task update --memory-limit 52428800`: {after:?}")
        })?;
        let cpu = cg("cpu.max");
        check(cpu == (true, "20000 100000".to_string()), || {
            format!("cpu.max after `ctr task update --cpu-quota 20000`: {cpu:?}")
        })?;
        let m = c.ctr(&["task", "metrics", "execk"]);
        check(text(&m).contains("52428800"), || {
            format!("task metrics after the update (memory limit): {}", text(&m))
        })?;
        // Not Linux resources: refused, nothing changes.
        let e = grpc_task_update(&c.sock, "execk", WINDOWS_RESOURCES, "{}").unwrap_err();
        check(
            e.contains("status 3") && e.contains("only runtime-spec LinuxResources"),
            || format!("Tasks.Update with WindowsResources: {e}"),
        )?;
        check(cg("memory.max") == (true, "52428800".to_string()), || {
            "memory.max changed by a refused update".into()
        })?;
        for cmd in ["pause", "resume", "checkpoint"] {
            let p = c.ctr(&["task", cmd, "execk"]);
            check(
                !p.status.success() && text(&p).contains("not implemented"),
                || format!("{cmd} must be unimplemented: {}", text(&p)),
            )?;
        }
        let k = c.ctr(&["task", "kill", "-s", "SIGKILL", "execk"]);
        check(k.status.success(), || format!("kill: {}", text(&k)))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = run.try_wait().map_err(|e| e.to_string())? {
                return check(status.code() == Some(137), || {
                    format!("ctr run after SIGKILL: {status:?}")
                });
            }
            if Instant::now() > deadline {
                return Err("ctr run did not end after kill".into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })();
    let _ = run.kill();
    let ran = run.wait_with_output().map(|o| text(&o)).unwrap_or_default();
    c.remove("execk");
    r.map_err(|e| format!("{e}\n--- the attached `ctr run` printed ---\n{ran}"))
}

const LINUX_RESOURCES: &str = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";
const WINDOWS_RESOURCES: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/WindowsResources";

/// containerd's `Tasks.Update` over its gRPC socket (Debian's ctr 1.6.20 has no `task
/// update`; containerd passes the request to the shim's Task.Update as it does for CRI's
/// UpdateContainerResources). One unary gRPC call on HTTP/2: the request is
/// `containerd.services.tasks.v1.UpdateTaskRequest` {container_id = 1, resources = 2}, which
/// has the shim API's `UpdateTaskRequest` field numbers, so that type encodes it.
fn grpc_task_update(sock: &Path, id: &str, type_url: &str, json: &str) -> Result<(), String> {
    use containerd_shim_protos::api::UpdateTaskRequest;
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::protobuf::{Message, MessageField};
    let req = UpdateTaskRequest {
        id: id.into(),
        resources: MessageField::some(Any {
            type_url: type_url.into(),
            value: json.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let body = req.write_to_bytes().map_err(|e| e.to_string())?;
    // gRPC message framing: not compressed, big-endian length.
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let e = |what: &str, err: &dyn std::fmt::Display| format!("{what}: {err}");
        let stream = tokio::net::UnixStream::connect(sock)
            .await
            .map_err(|x| e("connect", &x))?;
        let (client, conn) = h2::client::handshake(stream)
            .await
            .map_err(|x| e("HTTP/2 handshake", &x))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut client = client.ready().await.map_err(|x| e("HTTP/2", &x))?;
        let request = http::Request::builder()
            .method("POST")
            .uri("http://containerd/containerd.services.tasks.v1.Tasks/Update")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("containerd-namespace", "default")
            .body(())
            .map_err(|x| e("request", &x))?;
        let (response, mut send) = client
            .send_request(request, false)
            .map_err(|x| e("send", &x))?;
        send.send_data(bytes::Bytes::from(framed), true)
            .map_err(|x| e("send", &x))?;
        let (parts, mut body) = response.await.map_err(|x| e("response", &x))?.into_parts();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|x| e("response body", &x))?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body
            .trailers()
            .await
            .map_err(|x| e("trailers", &x))?
            .unwrap_or_default();
        // A trailers-only reply (errors) carries the status in the headers.
        let get = |k: &str| {
            trailers
                .get(k)
                .or_else(|| parts.headers.get(k))
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        match get("grpc-status").as_str() {
            "0" => Ok(()),
            code => Err(format!(
                "gRPC status {code} (HTTP {}): {}",
                parts.status,
                get("grpc-message")
            )),
        }
    })
}

/// Two containers with one sandbox-id annotation: one shim, one VMM; removing the first leaves
/// the second running; removing the second ends the VM.
fn pod_of_two(c: &Containerd) -> Result<(), String> {
    let ann = "io.kubernetes.cri.sandbox-id=pod1";
    let vmms_before = vmm_pids().len();
    let r = (|| {
        for id in ["pod1", "pod1-b"] {
            let out = c.ctr(&c.run_args(&["-d", "--annotation", ann], id, &["sleep", "1000"]));
            check(out.status.success(), || {
                format!("ctr run -d {id}: {}", text(&out))
            })?;
            c.wait_status(id, "RUNNING")?;
        }
        let vmms = vmm_pids().len() - vmms_before;
        check(vmms == 1, || format!("{vmms} VMMs for one pod"))?;
        check(shim_pids().len() == 1, || {
            format!("shims: {:?}", shim_pids())
        })?;
        c.remove("pod1");
        let out = c.ctr(&["task", "exec", "--exec-id", "x", "pod1-b", "echo", "alive"]);
        check(text(&out).contains("alive"), || {
            format!("second container after the first left: {}", text(&out))
        })?;
        check(vmm_pids().len() - vmms_before == 1, || {
            "the VM went away with the first container".into()
        })?;
        c.remove("pod1-b");
        wait_until("the pod's VMM to end", 60, || {
            vmm_pids().len() == vmms_before
        })
    })();
    c.remove("pod1");
    c.remove("pod1-b");
    r
}

/// Starts `ctr events` (stopped and read by [`EventLog::topics`]).
struct EventLog(Child);

impl EventLog {
    fn start(c: &Containerd) -> Result<EventLog, String> {
        let child = c
            .ctr_cmd(&["events"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(EventLog(child))
    }

    /// Stops it; returns the whole log and the `/tasks/...` topics of lines naming `id`.
    fn topics(mut self, id: &str) -> Result<(String, Vec<String>), String> {
        std::thread::sleep(Duration::from_secs(1));
        // SAFETY: SIGTERM to the `timeout ctr events` child we started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let mut log = String::new();
        self.0
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut log)
            .map_err(|e| e.to_string())?;
        let _ = self.0.wait();
        let topics = log
            .lines()
            .filter(|l| l.contains(&format!("\"{id}\"")))
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("/tasks/")))
            .map(String::from)
            .collect();
        Ok((log, topics))
    }
}

/// One pod VM for: its size from CRI's sandbox annotations (MemTotal, nproc in the guest);
/// an OOM kill under `--memory-limit` (exit 137, `/tasks/oom` before `/tasks/exit`, the output
/// printed before the kill arrives); `--log-uri file://` and `binary://` (a logger script).
fn pod_size_oom_logs(c: &Containerd) -> Result<(), String> {
    let pod = "io.kubernetes.cri.sandbox-id=pod2";
    let events = EventLog::start(c)?;
    let r = (|| {
        // The first container sizes the VM: 256 MiB (shim config) + 128 MiB, 1 + 1 vCPU.
        let out = c.ctr(&c.run_args(
            &[
                "-d",
                "--annotation",
                pod,
                "--annotation",
                "io.kubernetes.cri.sandbox-memory=134217728",
                "--annotation",
                "io.kubernetes.cri.sandbox-cpu-quota=50000",
                "--annotation",
                "io.kubernetes.cri.sandbox-cpu-period=100000",
            ],
            "pod2",
            &["sleep", "1000"],
        ));
        check(out.status.success(), || {
            format!("ctr run -d pod2: {}", text(&out))
        })?;
        c.wait_status("pod2", "RUNNING")?;
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "size",
            "pod2",
            "sh",
            "-c",
            "nproc; grep MemTotal /proc/meminfo",
        ]);
        let size = text(&out);
        let mut words = size.split_whitespace();
        let nproc = words.next().and_then(|w| w.parse::<u32>().ok());
        let mem_kib = words.nth(1).and_then(|w| w.parse::<u64>().ok());
        check(nproc == Some(2), || format!("nproc in the pod VM: {size}"))?;
        // MemTotal is the RAM less what the kernel keeps: above 256 MiB, at most 384 MiB.
        check(
            mem_kib.is_some_and(|k| k > 300 << 10 && k <= 384 << 10),
            || format!("MemTotal of a 384 MiB pod VM: {size}"),
        )?;

        // OOM: dd's 64 MiB buffer under a 32 MiB limit. dd is the container's init (exec),
        // so its SIGKILL is the task's exit.
        let out = c.ctr(&c.run_args(
            &["--rm", "--annotation", pod, "--memory-limit", "33554432"],
            "pod2-oom",
            &[
                "sh",
                "-c",
                "echo before; exec dd if=/dev/zero of=/dev/null bs=64M count=1",
            ],
        ));
        check(out.status.code() == Some(137), || {
            format!(
                "OOM-killed container exited {:?}: {}",
                out.status,
                text(&out)
            )
        })?;
        check(
            String::from_utf8_lossy(&out.stdout).contains("before"),
            || format!("output before the OOM kill lost: {}", text(&out)),
        )?;

        // file://: both streams appended to the file.
        let log = c.dir.join("logs/file.log");
        let out = c.ctr(&c.run_args(
            &[
                "--rm",
                "--annotation",
                pod,
                "--log-uri",
                &format!("file://{}", log.display()),
            ],
            "pod2-file",
            &["sh", "-c", "echo to-stdout; echo to-stderr >&2"],
        ));
        check(out.status.success(), || {
            format!("ctr run --log-uri file://: {}", text(&out))
        })?;
        wait_until("the file:// log", 30, || {
            let t = std::fs::read_to_string(&log).unwrap_or_default();
            t.contains("to-stdout\n") && t.contains("to-stderr\n")
        })
        .map_err(|e| format!("{e}: {:?}", std::fs::read_to_string(&log)))?;

        // binary://: a logger script (fd 3 stdout, fd 4 stderr, fd 5 ready).
        let script = c.dir.join("logger.sh");
        let bin_out = c.dir.join("binary.log");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n\
                 echo \"id=$CONTAINER_ID ns=$CONTAINER_NAMESPACE $1=$2\" > {o}.env\n\
                 exec 5>&-\n\
                 /bin/cat <&3 > {o}.stdout &\n\
                 /bin/cat <&4 > {o}.stderr\n\
                 wait\n",
                o = bin_out.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        let out = c.ctr(&c.run_args(
            &[
                "--rm",
                "--annotation",
                pod,
                "--log-uri",
                &format!("binary://{}?tag=web", script.display()),
            ],
            "pod2-bin",
            &["sh", "-c", "echo to-stdout; echo to-stderr >&2"],
        ));
        check(out.status.success(), || {
            format!("ctr run --log-uri binary://: {}", text(&out))
        })?;
        let read = |ext: &str| {
            std::fs::read_to_string(format!("{}.{ext}", bin_out.display())).unwrap_or_default()
        };
        wait_until("the logging binary's files", 30, || {
            read("stdout") == "to-stdout\n" && read("stderr") == "to-stderr\n"
        })
        .map_err(|e| {
            format!(
                "{e}: stdout {:?} stderr {:?} env {:?}",
                read("stdout"),
                read("stderr"),
                read("env")
            )
        })?;
        check(read("env") == "id=pod2-bin ns=default tag=web\n", || {
            format!(
                "logging binary's environment and arguments: {:?}",
                read("env")
            )
        })?;
        wait_until("the logging binary to end", 30, || {
            !processes_with_arg(&script.to_string_lossy())
        })?;

        // stdin: ctr writes its stdin into the FIFO and, at its end, calls CloseIO, which must
        // close the process's stdin in the guest; otherwise `cat` never ends (ctr_cmd's
        // `timeout` would fail the test).
        let mut child = c
            .ctr_cmd(&c.run_args(
                &["--rm", "--annotation", pod],
                "pod2-stdin",
                &["sh", "-c", "cat; echo stdin-closed"],
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(b"line-one\nline-two\n")
            .map_err(|e| e.to_string())?;
        drop(stdin);
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        check(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout) == "line-one\nline-two\nstdin-closed\n",
            || format!("ctr run -i with piped stdin: {}", text(&out)),
        )
    })();
    c.remove("pod2");
    let (log, topics) = events.topics("pod2-oom")?;
    r?;
    let oom = topics.iter().position(|t| t == "/tasks/oom");
    let exit = topics.iter().position(|t| t == "/tasks/exit");
    check(oom.is_some() && exit.is_some() && oom < exit, || {
        format!("task events of pod2-oom (want /tasks/oom before /tasks/exit): {topics:?}\n{log}")
    })
}

/// SIGKILL the shim: containerd's cleanup (the shim binary's `delete`) kills the VMM and
/// removes the pod's state; `delete` run again by hand is a harmless no-op.
fn after_sigkill(c: &Containerd) -> Result<(), String> {
    let out = c.ctr(&c.run_args(&["-d"], "killed", &["sleep", "1000"]));
    check(out.status.success(), || {
        format!("ctr run -d: {}", text(&out))
    })?;
    c.wait_status("killed", "RUNNING")?;
    check(vmm_pids().len() == 1, || format!("VMMs: {:?}", vmm_pids()))?;
    let shims = shim_pids();
    check(shims.len() == 1, || format!("shims: {shims:?}"))?;
    // SAFETY: SIGKILL to the shim process found above.
    unsafe { libc::kill(shims[0] as i32, libc::SIGKILL) };
    wait_until("containerd to see the task stopped", 60, || {
        let ls = text(&c.ctr(&["task", "ls"]));
        !ls.contains("RUNNING")
    })?;
    let _ = c.ctr(&["task", "delete", "killed"]);
    let _ = c.ctr(&["container", "delete", "killed"]);
    wait_until("the VMM to be killed", 60, || vmm_pids().is_empty())?;
    let bundle = c
        .dir
        .join("state/io.containerd.runtime.v2.task/default/killed");
    let _ = std::fs::create_dir_all(&bundle);
    for _ in 0..2 {
        let out = Command::new(SHIM)
            .args(["-namespace", "default", "-id", "killed", "-address"])
            .arg(&c.sock)
            .arg("-bundle")
            .arg(&bundle)
            .arg("delete")
            .env("TTRPC_ADDRESS", c.dir.join("c.sock.ttrpc"))
            .current_dir(&bundle)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        check(out.status.success(), || {
            format!("shim delete: {:?} {}", out.status, text(&out))
        })?;
    }
    let _ = std::fs::remove_dir(&bundle);
    Ok(())
}

/// After all of the above: no VMM or shim process, no pod state directory, no shim socket, no
/// rootfs mount left.
fn nothing_left(c: &Containerd) -> Result<(), String> {
    let _ = c;
    wait_until("no VMM and no shim process", 60, || {
        vmm_pids().is_empty() && shim_pids().is_empty()
    })?;
    let states: Vec<_> = std::fs::read_dir("/run/microvm-shim")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    check(states.is_empty(), || format!("pod state left: {states:?}"))?;
    let sockets: Vec<_> = std::fs::read_dir("/run/containerd/s")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    check(sockets.is_empty(), || {
        format!("shim sockets left: {sockets:?}")
    })?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let ours: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains("/rootfs") && l.contains(&*c.dir.to_string_lossy()))
        .collect();
    check(ours.is_empty(), || format!("rootfs mounts left: {ours:?}"))
}
