//! `microvm run`'s arguments: the flags, their parsers and the environment they give.

use std::path::PathBuf;

use anyhow::{Context, Result};

use sandbox::{DiskRateLimit, TokenBucketConfig};

use crate::network;
use crate::volumes::{self, MountSpec, TmpfsSpec, VolumeSpec};

/// Guest memory on top of the container's limit: the kernel, the agent and the tmpfs overlay's
/// metadata.
pub const GUEST_OVERHEAD_MIB: u64 = 64;
/// The VM's memory when `--memory` is not given (no container limit then).
pub const DEFAULT_VM_MIB: u64 = 256;
pub(super) const MIN_VM_MIB: u64 = 128;

/// Where the kernel and the agent come from (found without flags; these override).
#[derive(clap::Args, Debug, Clone)]
pub struct VmArgs {
    /// The guest kernel [default: $MICROVM_KERNEL, else what `cargo xtask kernel` built]
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// The static guest agent [default: $MICROVM_AGENT, else what `cargo xtask agent` built]
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
}

/// How to reach a registry.
#[derive(clap::Args, Debug, Clone)]
pub struct PullArgs {
    /// Plain HTTP, no TLS verification, for this registry
    #[arg(long)]
    pub insecure: bool,
    /// No progress output while pulling
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl PullArgs {
    pub fn options(&self) -> image::PullOptions {
        image::PullOptions {
            insecure: self.insecure,
            username: std::env::var("MICROVM_REGISTRY_USER").ok(),
            password: std::env::var("MICROVM_REGISTRY_PASSWORD").ok(),
            progress: !self.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Run in the background; print the run's id
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Remove the run's state when it ends
    #[arg(long)]
    pub rm: bool,
    /// A name for the run (for exec, stop, logs, ...)
    #[arg(long)]
    pub name: Option<String>,
    /// Keep stdin open and stream it to the container
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the container a terminal (pty)
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Set a variable: KEY=VALUE, or KEY to pass this environment's value
    #[arg(short = 'e', long = "env", value_name = "KEY[=VALUE]")]
    pub env: Vec<String>,
    /// Read variables from a file (KEY=VALUE lines, # comments)
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Replace the image's entrypoint
    #[arg(long, value_name = "CMD")]
    pub entrypoint: Option<String>,
    /// Working directory inside the container
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User: name|uid[:group|gid]
    #[arg(short = 'u', long, value_name = "USER")]
    pub user: Option<String>,
    /// The container's hostname [default: the run id]
    #[arg(long, value_parser = network::parse_hostname)]
    pub hostname: Option<String>,
    /// CPUs: the VM's vCPUs (rounded up) and the container's CPU quota
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<f64>,
    /// Memory limit of the container (bare number: MiB; or 512k, 64m, 1g); the VM gets 64 MiB more
    #[arg(short = 'm', long, value_parser = parse_memory, value_name = "BYTES")]
    pub memory: Option<u64>,
    /// A host directory shared live (virtio-fs): HOSTPATH:CTRPATH[:ro|:rw]; HOSTPATH is created
    /// if missing
    #[arg(short = 'v', long = "volume", value_parser = volumes::parse, value_name = "HOST:CTR[:ro|:rw]")]
    pub volumes: Vec<VolumeSpec>,
    /// A mount: type=bind,source=HOSTDIR,target=CTRPATH[,readonly] or
    /// type=tmpfs,target=CTRPATH[,tmpfs-size=N][,tmpfs-mode=M]
    #[arg(long = "mount", value_parser = volumes::parse_mount, value_name = "SPEC")]
    pub mounts: Vec<MountSpec>,
    /// A tmpfs at CTRPATH (options as mount(8) takes them: size=64m,mode=1777,exec)
    #[arg(long = "tmpfs", value_parser = volumes::parse_tmpfs, value_name = "CTRPATH[:OPTS]")]
    pub tmpfs: Vec<TmpfsSpec>,
    /// The network: bridge (microvm's CNI network microvm0, the default) or none (no network
    /// device; host is not possible for a VM)
    #[arg(long = "network", alias = "net", value_parser = network::parse_mode, default_value = "bridge", value_name = "MODE")]
    pub network: network::Mode,
    /// Publish a container port on the host: [HOSTIP:]HOSTPORT:CTRPORT[/tcp|/udp]
    #[arg(short = 'p', long = "publish", value_parser = network::parse_publish, value_name = "[IP:]HOST:CTR[/PROTO]")]
    pub publish: Vec<network::Publish>,
    /// A DNS server for the container's /etc/resolv.conf (replaces the host's)
    #[arg(long = "dns", value_name = "IP")]
    pub dns: Vec<std::net::IpAddr>,
    /// An extra line of the container's /etc/hosts: NAME:IP
    #[arg(long = "add-host", value_parser = network::parse_add_host, value_name = "NAME:IP")]
    pub add_hosts: Vec<network::AddHost>,
    /// Rate-limit the VM's image disk (whole device, reads and writes together): bytes=N per
    /// second (512k, 10m, 1g) and/or ops=N requests per second, e.g. bytes=10m,ops=500
    #[arg(long = "disk-rate", value_parser = parse_disk_rate, value_name = "bytes=N,ops=N")]
    pub disk_rate: Option<DiskRateLimit>,
    /// Seconds the VM has to boot and its agent to answer before the run is given up
    #[arg(long = "boot-timeout", default_value_t = 180, value_parser = clap::value_parser!(u64).range(1..=3600), value_name = "SECONDS")]
    pub boot_timeout: u64,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub pull: PullArgs,
    /// Print the phases' durations on stderr when the run ends
    #[arg(long, hide = true)]
    pub timings: bool,
    /// The image: a registry reference, an OCI layout directory, or an OCI/docker archive
    pub image: String,
    /// The command (replaces the image's Cmd)
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub cmd: Vec<String>,
}

fn parse_cpus(s: &str) -> Result<f64, String> {
    let c: f64 = s.parse().map_err(|_| format!("bad CPU count {s:?}"))?;
    if !(0.01..=64.0).contains(&c) {
        return Err(format!("--cpus must be between 0.01 and 64, not {c}"));
    }
    Ok(c)
}

/// Bytes from "64" (MiB), "512k", "64m", "1g", "100b".
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let bytes = byte_size(s, 1 << 20, "memory size")?;
    if bytes < 6 << 20 {
        return Err(format!("memory limit {s:?} is below the minimum of 6 MiB"));
    }
    Ok(bytes)
}

/// A size with an optional unit (b, k, m, g, with or without "ib"); a bare number counts in
/// `bare_unit`. `what` names the value in errors.
fn byte_size(s: &str, bare_unit: u64, what: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let lower = lower.trim_end_matches("ib");
    let (num, mult) = match lower.char_indices().last() {
        Some((i, 'b')) => (&lower[..i], 1),
        Some((i, 'k')) => (&lower[..i], 1 << 10),
        Some((i, 'm')) => (&lower[..i], 1 << 20),
        Some((i, 'g')) => (&lower[..i], 1 << 30),
        _ => (lower, bare_unit),
    };
    let n: u64 = num.parse().map_err(|_| format!("bad {what} {s:?}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{what} {s:?} is too large"))
}

/// `--disk-rate bytes=N,ops=N`: per-second buckets (size N, refilled over one second).
pub fn parse_disk_rate(s: &str) -> Result<DiskRateLimit, String> {
    let per_second = |n: u64| TokenBucketConfig::new(n, 1000);
    let mut limit = DiskRateLimit::default();
    for item in s.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("--disk-rate wants bytes=N and/or ops=N, not {item:?}"))?;
        let (slot, n) = match key.trim() {
            "bytes" => (&mut limit.bandwidth, byte_size(value, 1, "byte rate")?),
            "ops" => (
                &mut limit.ops,
                value
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad operation rate {value:?}"))?,
            ),
            other => return Err(format!("--disk-rate has bytes= and ops=, not {other:?}")),
        };
        if n == 0 {
            return Err(format!(
                "--disk-rate {key}=0 would stop the disk; leave it out"
            ));
        }
        *slot = Some(per_second(n));
    }
    Ok(limit)
}

pub(super) fn env_from_cli(args: &RunArgs) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for f in &args.env_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("env file {}", f.display()))?;
        for line in text.lines() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.extend(env_item(line));
        }
    }
    for e in &args.env {
        out.extend(env_item(e));
    }
    Ok(out)
}

/// `K=V` as is; a bare `K` takes this environment's value (and is dropped when unset, like
/// docker).
fn env_item(s: &str) -> Option<String> {
    if s.contains('=') {
        Some(s.to_string())
    } else {
        std::env::var(s).ok().map(|v| format!("{s}={v}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("64"), Ok(64 << 20));
        assert_eq!(parse_memory("64m"), Ok(64 << 20));
        assert_eq!(parse_memory("64MiB"), Ok(64 << 20));
        assert_eq!(parse_memory("1g"), Ok(1 << 30));
        assert_eq!(parse_memory("8192k"), Ok(8 << 20));
        assert!(parse_memory("5").is_err(), "below the minimum");
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("99999999999999g").is_err());
    }

    #[test]
    fn disk_rates() {
        let both = parse_disk_rate("bytes=10m,ops=500").unwrap();
        assert_eq!(both.bandwidth, Some(TokenBucketConfig::new(10 << 20, 1000)));
        assert_eq!(both.ops, Some(TokenBucketConfig::new(500, 1000)));
        let bytes = parse_disk_rate("bytes=4096").unwrap();
        assert_eq!((bytes.bandwidth.unwrap().size, bytes.ops), (4096, None));
        assert!(parse_disk_rate("ops=0").is_err());
        assert!(parse_disk_rate("iops=5").is_err());
        assert!(parse_disk_rate("bytes").is_err());
        assert!(parse_disk_rate("bytes=lots").is_err());
    }

    #[test]
    fn env_items() {
        assert_eq!(env_item("A=b=c"), Some("A=b=c".into()));
        std::env::set_var("MICROVM_TEST_ENV_ITEM", "v");
        assert_eq!(
            env_item("MICROVM_TEST_ENV_ITEM"),
            Some("MICROVM_TEST_ENV_ITEM=v".into())
        );
        assert_eq!(env_item("MICROVM_TEST_UNSET_VARIABLE"), None);
    }
}
