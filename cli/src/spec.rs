//! The OCI runtime spec (config.json) `microvm run` gives the guest agent: docker's defaults
//! (namespaces, capabilities, masked and read-only paths, the standard mounts, NOFILE) with the
//! process the image config and the command line ask for.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Docker's default capability set (moby `oci/caps/defaults.go`).
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The PATH a container gets when its image sets none (docker's).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The container's process, as the spec's `process` object needs it (also what `microvm exec`
/// reuses: environment, user and working directory of the run).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessTemplate {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub terminal: bool,
}

impl ProcessTemplate {
    /// The OCI `process` object.
    pub fn to_json(&self) -> Value {
        let caps = DEFAULT_CAPS;
        let mut user = json!({"uid": self.uid, "gid": self.gid});
        if !self.additional_gids.is_empty() {
            user["additionalGids"] = json!(self.additional_gids);
        }
        json!({
            "terminal": self.terminal,
            "user": user,
            "args": self.args,
            "env": self.env,
            "cwd": self.cwd,
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1_048_576u64, "soft": 1_048_576u64}],
            "noNewPrivileges": false,
        })
    }
}

/// Resource limits of the container's cgroup.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// CPUs as docker's `--cpus` (a quota of `cpus` × the period).
    pub cpus: Option<f64>,
}

/// docker's CFS period.
const CPU_PERIOD_US: u64 = 100_000;

/// The whole runtime spec.
pub fn runtime_spec(process: &ProcessTemplate, hostname: &str, limits: Limits) -> Value {
    let mut resources = json!({});
    if let Some(m) = limits.memory_bytes {
        // No swap in the guest anyway; swap = limit keeps the OOM killer the only way out.
        resources["memory"] = json!({"limit": m, "swap": m});
    }
    if let Some(c) = limits.cpus {
        resources["cpu"] = json!({
            "quota": (c * CPU_PERIOD_US as f64).round() as i64,
            "period": CPU_PERIOD_US,
        });
    }
    json!({
        "ociVersion": "1.0.2",
        "process": process.to_json(),
        "root": {"path": "rootfs", "readonly": false},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup2", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        ],
        "linux": {
            // A fresh network namespace: the container sees only a loopback device (down), like
            // docker's `--network none` but without `lo` up. The VM has no network device.
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network"}, {"type": "cgroup"},
            ],
            "resources": resources,
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    })
}

/// The process's environment: the image's, then PATH (if the image has none), HOSTNAME and TERM
/// (for a terminal), then the command line's `-e`/`--env-file` values; a later value of a
/// variable replaces an earlier one in place.
pub fn merge_env(
    image_env: &[String],
    hostname: &str,
    terminal: bool,
    cli: &[String],
) -> Vec<String> {
    let mut env: Vec<String> = Vec::new();
    let mut set = |kv: &str| {
        let key = kv.split_once('=').map_or(kv, |(k, _)| k);
        match env
            .iter_mut()
            .find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key)
        {
            Some(slot) => *slot = kv.to_string(),
            None => env.push(kv.to_string()),
        }
    };
    if !image_env.iter().any(|e| e.starts_with("PATH=")) {
        set(DEFAULT_PATH);
    }
    for e in image_env {
        set(e);
    }
    set(&format!("HOSTNAME={hostname}"));
    if terminal {
        set("TERM=xterm");
    }
    for e in cli {
        set(e);
    }
    env
}

/// docker's entrypoint/cmd rule: `--entrypoint` replaces the image's Entrypoint and drops its
/// Cmd; CMD on the command line replaces the image's Cmd.
pub fn command(
    image_entrypoint: &[String],
    image_cmd: &[String],
    entrypoint: Option<&str>,
    cmd: &[String],
) -> Vec<String> {
    let (entry, default_cmd): (Vec<String>, &[String]) = match entrypoint {
        Some("") => (Vec::new(), &[]),
        Some(e) => (vec![e.to_string()], &[]),
        None => (image_entrypoint.to_vec(), image_cmd),
    };
    let mut args = entry;
    if cmd.is_empty() {
        args.extend_from_slice(default_cmd);
    } else {
        args.extend_from_slice(cmd);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn entrypoint_and_cmd_follow_docker() {
        let ep = s(&["/entry"]);
        let cmd = s(&["default"]);
        assert_eq!(command(&ep, &cmd, None, &[]), s(&["/entry", "default"]));
        assert_eq!(command(&ep, &cmd, None, &s(&["x"])), s(&["/entry", "x"]));
        assert_eq!(command(&ep, &cmd, Some("sh"), &[]), s(&["sh"]));
        assert_eq!(
            command(&ep, &cmd, Some("sh"), &s(&["-c", "x"])),
            s(&["sh", "-c", "x"])
        );
        assert_eq!(command(&[], &cmd, None, &[]), s(&["default"]));
        assert_eq!(command(&ep, &cmd, Some(""), &s(&["ls"])), s(&["ls"]));
        assert!(command(&[], &[], None, &[]).is_empty());
    }

    #[test]
    fn env_is_merged_in_order() {
        let env = merge_env(&s(&["A=1", "PATH=/x"]), "h", true, &s(&["A=2", "B=3"]));
        assert_eq!(
            env,
            s(&["A=2", "PATH=/x", "HOSTNAME=h", "TERM=xterm", "B=3"])
        );
        let env = merge_env(&[], "h", false, &[]);
        assert_eq!(env, s(&[DEFAULT_PATH, "HOSTNAME=h"]));
    }

    #[test]
    fn spec_has_limits_and_docker_defaults() {
        let p = ProcessTemplate {
            args: s(&["true"]),
            env: vec![],
            cwd: "/".into(),
            uid: 1000,
            gid: 1000,
            additional_gids: vec![10],
            terminal: false,
        };
        let spec = runtime_spec(
            &p,
            "box",
            Limits {
                memory_bytes: Some(64 << 20),
                cpus: Some(1.5),
            },
        );
        assert_eq!(spec["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(spec["linux"]["resources"]["cpu"]["quota"], 150_000);
        assert_eq!(spec["process"]["user"]["additionalGids"], json!([10]));
        assert_eq!(spec["hostname"], "box");
        assert_eq!(
            spec["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            14
        );
        let spec = runtime_spec(&p, "box", Limits::default());
        assert_eq!(spec["linux"]["resources"], json!({}));
    }
}
