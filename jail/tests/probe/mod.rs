//! The process the tests jail: this same test binary, re-run with `JAIL_PROBE` set, which
//! `main` checks before anything else, so the jail is built in a fresh single-threaded process
//! as `microvm-vmm` builds it. It reports on stdout, then waits for stdin's end.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use jail::{Forked, Jail};

pub const PROBE: &str = "JAIL_PROBE";
const VISIBLE: &str = "JAIL_PROBE_VISIBLE";
const CGROUP: &str = "JAIL_PROBE_CGROUP";
const KEEP_NET: &str = "JAIL_PROBE_KEEP_NET";
/// PID 1's exit code once stdin ends.
pub const EXIT_CODE: i32 = 7;
pub const JAIL_ID: u32 = 900_999_001;

/// How the test wants the probe jailed.
#[derive(Default)]
pub struct ProbeSpec {
    pub visible: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    pub keep_network: bool,
    /// Only join the cgroup (no namespaces or identity change) and report.
    pub join_only: bool,
}

/// A running probe: the supervisor (the child the test started) and PID 1's pid on the host.
pub struct Probe {
    pub supervisor: Child,
    pub host_pid: u32,
    pub report: Vec<String>,
    _stdout: BufReader<ChildStdout>,
}

impl Probe {
    pub fn start(spec: &ProbeSpec) -> Probe {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env(PROBE, if spec.join_only { "join" } else { "jail" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(v) = &spec.visible {
            cmd.env(VISIBLE, v);
        }
        if let Some(c) = &spec.cgroup {
            cmd.env(CGROUP, c);
        }
        if spec.keep_network {
            cmd.env(KEEP_NET, "1");
        }
        let mut supervisor = cmd.spawn().unwrap();
        let mut stdout = BufReader::new(supervisor.stdout.take().unwrap());
        let mut report = Vec::new();
        loop {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).unwrap() > 0,
                "the probe ended: {report:?}"
            );
            let line = line.trim_end().to_string();
            if line == "ready" {
                break;
            }
            report.push(line);
        }
        let host_pid = field(&report, "host_pid").parse().unwrap();
        Probe {
            supervisor,
            host_pid,
            report,
            _stdout: stdout,
        }
    }

    /// Ends stdin, so PID 1 exits with [`EXIT_CODE`]; returns the supervisor's status.
    pub fn finish(mut self) -> std::process::ExitStatus {
        drop(self.supervisor.stdin.take());
        self.supervisor.wait().unwrap()
    }
}

/// The value of `key=` in the report.
pub fn field(report: &[String], key: &str) -> String {
    let prefix = format!("{key}=");
    report
        .iter()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key} in {report:?}"))
        .to_string()
}

/// Runs as the probe when `JAIL_PROBE` is set.
pub fn run(mode: &str) -> ! {
    if mode == "join" {
        let cgroup = PathBuf::from(std::env::var_os(CGROUP).unwrap());
        jail::cgroup::join_cgroup(&cgroup).unwrap();
        println!("host_pid={}", std::process::id());
        println!(
            "cgroup={}",
            fs::read_to_string("/proc/self/cgroup").unwrap().trim()
        );
        wait_for_stdin_end();
        std::process::exit(EXIT_CODE);
    }
    let mut jail = Jail::new(JAIL_ID, JAIL_ID).unwrap();
    jail.cgroup = std::env::var_os(CGROUP).map(PathBuf::from);
    jail.visible_dirs = std::env::var_os(VISIBLE)
        .map(PathBuf::from)
        .into_iter()
        .collect();
    jail.new_network_namespace = std::env::var_os(KEEP_NET).is_none();
    match jail.fork_into_pid_namespace().unwrap() {
        Forked::Supervisor(s) => s.wait().unwrap().relay(),
        Forked::Pid1(link) => {
            jail.isolate().unwrap();
            // Opened while /proc is reachable; read again after the jail is complete.
            let status = fs::File::open("/proc/self/status").unwrap();
            let host_pid = fs::read_link("/proc/self").unwrap();
            jail.confine(&link).unwrap();
            println!("host_pid={}", host_pid.display());
            println!("pid={}", std::process::id());
            let mut text = vec![0; 8192];
            let n = status.read_at(&mut text, 0).unwrap();
            for line in String::from_utf8_lossy(&text[..n]).lines() {
                if let Some((k, v)) = line.split_once(':') {
                    println!("status.{k}={}", v.trim());
                }
            }
            println!("root={}", tree(Path::new("/")).join(","));
            let write = fs::write("/new-file", "x").map_err(|e| e.raw_os_error());
            println!("root_write={write:?}");
            if let Some(v) = &jail.visible_dirs.first() {
                let write = fs::write(v.join("new-file"), "x").map_err(|e| e.raw_os_error());
                println!("visible_write={write:?}");
            }
            wait_for_stdin_end();
            std::process::exit(EXIT_CODE);
        }
    }
}

fn wait_for_stdin_end() {
    println!("ready");
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// Every path below `dir`, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        out.push(p.display().to_string());
        if p.is_dir() && !p.is_symlink() {
            out.extend(tree(&p));
        }
    }
    out
}
