//! The private containerd the scenarios drive, and the helpers they share.

pub mod grpc;
pub mod host;
pub mod image;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use self::image::build_image;

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

impl Containerd {
    pub fn start() -> Result<Containerd, String> {
        let kernel = std::env::var("MICROVM_KERNEL").map_err(|_| {
            "MICROVM_KERNEL is not set (export MICROVM_KERNEL=~/.cache/microvm/kernel/current/vmlinux)"
        })?;
        let agent = std::env::var("MICROVM_AGENT").map_err(|_| {
            "MICROVM_AGENT is not set (its path is what `cargo xtask agent` prints)"
        })?;
        let shim_dir = Path::new(SHIM).parent().unwrap().to_path_buf();
        let vmm = match std::env::var_os("MICROVM_VMM") {
            Some(p) => PathBuf::from(p),
            None => shim_dir.join("microvm-vmm"),
        };
        for p in [Path::new(&kernel), Path::new(&agent), &vmm] {
            if !p.is_file() {
                return Err(format!(
                    "{} is missing (cargo build -p microvm-vmm; cargo xtask agent)",
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
        // The pods' volumes (the volume scenario needs it; the others run without).
        let virtiofsd = match sandbox::locate::virtiofsd() {
            Ok(v) => format!("virtiofsd = {:?}\n", v.display().to_string()),
            Err(e) => {
                eprintln!("containerd tests: {e}");
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

    pub fn stop(&self) {
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
