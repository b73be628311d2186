//! `microvm run`'s arguments: the flags, their parsers and the environment they give.

use std::path::PathBuf;

use anyhow::{Context, Result};

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
    #[arg(long)]
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
    let lower = s.trim().to_ascii_lowercase();
    let lower = lower.trim_end_matches("ib");
    let (num, mult) = match lower.char_indices().last() {
        Some((i, 'b')) => (&lower[..i], 1),
        Some((i, 'k')) => (&lower[..i], 1 << 10),
        Some((i, 'm')) => (&lower[..i], 1 << 20),
        Some((i, 'g')) => (&lower[..i], 1 << 30),
        _ => (lower, 1 << 20),
    };
    let n: u64 = num.parse().map_err(|_| format!("bad memory size {s:?}"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("memory size {s:?} is too large"))?;
    if bytes < 6 << 20 {
        return Err(format!("memory limit {s:?} is below the minimum of 6 MiB"));
    }
    Ok(bytes)
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
