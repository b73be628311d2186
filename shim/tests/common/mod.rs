//! The private containerd the scenarios drive, and the helpers they share.
// Each test binary (`containerd`, `cri`) uses part of this.
#![allow(dead_code)]

pub mod cri;
pub mod grpc;
pub mod host;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use test_support::image::BusyboxImage;

pub const RUNTIME: &str = "io.containerd.microvm.v2";
pub const IMAGE: &str = "docker.io/library/microvm-busybox:test";
pub const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-microvm-v2");

pub struct Containerd {
    /// Its root, state, socket, logs (a tmpfs).
    pub dir: PathBuf,
    /// Its gRPC socket.
    pub sock: PathBuf,
    /// The shim config the runs pass.
    pub config: PathBuf,
    child: Mutex<Option<Child>>,
}

pub static CONTAINERD: OnceLock<Result<Containerd, String>> = OnceLock::new();

pub fn containerd() -> Result<&'static Containerd, String> {
    CONTAINERD
        .get_or_init(Containerd::start)
        .as_ref()
        .map_err(Clone::clone)
}

pub fn sh(cmd: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run sh")
}

/// Sets MICROVM_KERNEL and MICROVM_AGENT where unset: `sandbox::locate`'s places, and for the
/// agent a build of it (`cargo xtask agent`'s command) when none is there.
pub fn find_artifacts(who: &str) -> Result<(), String> {
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
                eprintln!("{who}: building the static agent");
                testbed::static_agent(root, target)?
            }
        };
        // SAFETY: as above.
        unsafe { std::env::set_var("MICROVM_AGENT", agent) };
    }
    Ok(())
}

/// The shim's artifacts: MICROVM_KERNEL, MICROVM_AGENT (set by `main`) and the VMM.
fn artifacts() -> Result<(String, String, PathBuf), String> {
    let kernel = std::env::var("MICROVM_KERNEL").map_err(|_| {
        "MICROVM_KERNEL is not set (export MICROVM_KERNEL=~/.cache/microvm/kernel/current/vmlinux)"
    })?;
    let agent = std::env::var("MICROVM_AGENT")
        .map_err(|_| "MICROVM_AGENT is not set (its path is what `cargo xtask agent` prints)")?;
    let vmm = match std::env::var_os("MICROVM_VMM") {
        Some(p) => PathBuf::from(p),
        None => shim_dir().join("microvm-vmm"),
    };
    for p in [Path::new(&kernel), Path::new(&agent), &vmm] {
        if !p.is_file() {
            return Err(format!(
                "{} is missing (cargo build -p microvm-vmm; cargo xtask agent)",
                p.display()
            ));
        }
    }
    Ok((kernel, agent, vmm))
}

/// The folder of the shim binary (first on containerd's PATH).
pub fn shim_dir() -> PathBuf {
    Path::new(SHIM).parent().unwrap().to_path_buf()
}

/// A fresh directory under /tmp with a tmpfs on it (overlayfs cannot use the testbed's overlay
/// root as its upper layer), short enough for socket paths.
pub fn private_dir(prefix: &str) -> Result<PathBuf, String> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .map_err(|e| e.to_string())?
        .keep();
    let out = sh(&format!("mount -t tmpfs tmpfs {}", dir.display()));
    if !out.status.success() {
        return Err(format!(
            "mount a tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(dir)
}

/// Writes `<dir>/shim.toml`, the shim config every run passes, and returns its path.
pub fn write_shim_config(dir: &Path) -> Result<PathBuf, String> {
    let (kernel, agent, vmm) = artifacts()?;
    let shim_toml = dir.join("shim.toml");
    let level = std::env::var("SHIM_TEST_LOG").unwrap_or_else(|_| "info".into());
    // The pods' volumes (CRI's /etc/hosts and friends, the volume scenario); the ctr scenarios
    // without volumes run without it.
    let virtiofsd = match sandbox::locate::virtiofsd() {
        Ok(v) => format!("virtiofsd = {:?}\n", v.display().to_string()),
        Err(e) => {
            eprintln!("shim tests: {e}");
            String::new()
        }
    };
    std::fs::write(
        &shim_toml,
        format!(
            "kernel = {kernel:?}\nagent = {agent:?}\nvmm = {:?}\nmemory_mib = 256\n\
             log_level = {level:?}\nslots = 4\n{virtiofsd}",
            vmm.display().to_string()
        ),
    )
    .map_err(|e| e.to_string())?;
    Ok(shim_toml)
}

/// Starts `binary --config <dir>/config.toml` (logging to `<dir>/containerd.log`) with the
/// shim's folder, then `path_first` (if any), first on its PATH.
pub fn spawn_containerd(
    binary: &Path,
    dir: &Path,
    path_first: Option<&Path>,
) -> Result<Child, String> {
    let log = std::fs::File::create(dir.join("containerd.log")).map_err(|e| e.to_string())?;
    let mut path = shim_dir().into_os_string();
    if let Some(p) = path_first {
        path.push(":");
        path.push(p);
    }
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    Command::new(binary)
        .arg("--config")
        .arg(dir.join("config.toml"))
        .env("PATH", path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .map_err(|e| {
            format!(
                "start {} (apt-get install containerd): {e}",
                binary.display()
            )
        })
}

/// The last `lines` lines of `<dir>/containerd.log` and the end of every pod VM's console.
pub fn dump_logs(dir: &Path, lines: usize) {
    let log = std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
    let all: Vec<&str> = log.lines().collect();
    let start = all.len().saturating_sub(lines);
    eprintln!(
        "--- containerd.log (end) ---\n{}\n---",
        all[start..].join("\n")
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

/// SIGTERM to a containerd we started, then unmounts and removes its directory.
pub fn stop_containerd(child: &Mutex<Option<Child>>, dir: &Path) {
    if let Some(mut child) = child.lock().unwrap().take() {
        // SAFETY: SIGTERM to the containerd we started.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    }
    remove_private_dir(dir);
}

/// Unmounts and removes a [`private_dir`].
pub fn remove_private_dir(dir: &Path) {
    let _ = sh(&format!(
        "umount -R {d} 2>/dev/null; rmdir {d}",
        d = dir.display()
    ));
}

impl Containerd {
    pub fn start() -> Result<Containerd, String> {
        let dir = private_dir("ctd")?;
        let sock = dir.join("c.sock");
        let shim_toml = write_shim_config(&dir)?;
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n\
                 [debug]\n  level = \"debug\"\n",
                d = dir.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let child = spawn_containerd(Path::new("containerd"), &dir, None)?;
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
        let image = BusyboxImage {
            containerd_name: Some(IMAGE.into()),
            ref_name: "test".into(),
            ..Default::default()
        }
        .write(&c.dir.join("image"))
        .map_err(|e| format!("build the busybox image: {e}"))?;
        let out = c.ctr(&["images", "import", image.archive.to_str().unwrap()]);
        if !out.status.success() {
            return Err(format!("ctr images import: {}", text(&out)));
        }
        Ok(c)
    }

    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
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

    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().expect("run ctr")
    }

    /// `ctr task exec --exec-id EXEC_ID ID sh -c SCRIPT`.
    pub fn exec_sh(&self, exec_id: &str, id: &str, script: &str) -> Output {
        self.ctr(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script])
    }

    /// `ctr run` with this runtime and the shim config, the image and `args` after it.
    pub fn run_args<'a>(
        &'a self,
        before: &[&'a str],
        id: &'a str,
        cmd: &[&'a str],
    ) -> Vec<&'a str> {
        let mut v = vec!["run", "--runtime", RUNTIME, "--runtime-config-path"];
        v.push(self.config.to_str().unwrap());
        v.extend_from_slice(before);
        v.push(IMAGE);
        v.push(id);
        v.extend_from_slice(cmd);
        v
    }

    pub fn dump_logs(&self) {
        dump_logs(&self.dir, 200);
    }

    pub fn stop(&self) {
        stop_containerd(&self.child, &self.dir);
    }

    /// Polls `ctr task ls` until the task has `status` (or the timeout).
    pub fn wait_status(&self, id: &str, status: &str) -> Result<(), String> {
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
    pub fn remove(&self, id: &str) {
        let ls = text(&self.ctr(&["task", "ls"]));
        if ls.lines().any(|l| l.split_whitespace().next() == Some(id)) {
            let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
            let _ = self.wait_status(id, "STOPPED");
            let _ = self.ctr(&["task", "delete", id]);
        }
        let _ = self.ctr(&["container", "delete", id]);
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        if Instant::now() > deadline {
            return Err(format!("timed out after {secs} s waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Starts `ctr events` (stopped and read by [`EventLog::topics`]).
pub struct EventLog(Child);

impl EventLog {
    pub fn start(c: &Containerd) -> Result<EventLog, String> {
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
    pub fn topics(mut self, id: &str) -> Result<(String, Vec<String>), String> {
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
