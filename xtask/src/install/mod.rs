//! `cargo xtask install`: builds microvm and installs it on a node, independent of the source
//! tree afterwards:
//!
//! - `<prefix>/bin/`: `microvm`, `microvm-vmm`, `containerd-shim-microvm-v2` (0755);
//! - `<prefix>/share/microvm/vmlinux`: the guest kernel (0644);
//! - `<prefix>/lib/microvm/`: the static guest agent `microvm-agent` and, if
//!   `cargo xtask virtiofsd` built it, `virtiofsd` (0755);
//! - `<sysconfdir>/microvm/shim.toml`: the shim's config naming those files, and
//!   `runtimeclass.yaml` beside it;
//! - the containerd drop-in for the `microvm` handler (default
//!   `<sysconfdir>/containerd/conf.d/microvm.toml`).
//!
//! `<sysconfdir>` is `/etc` for the prefixes `/usr` and `/usr/local`, else `<prefix>/etc`.
//! These are the places `sandbox::locate` looks at, so `microvm run` needs no flags after an
//! install under `/usr/local` or `/usr`. Every file lands under `--destdir` when one is given.

mod files;
mod place;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub use files::ContainerdSyntax;
use files::{containerd_dropin, runtime_class, shim_toml, ShimPaths};
use place::{check_privilege, staged, Item, Source};

use crate::util::{cache_dir, run, target_dir, workspace_root};

#[derive(clap::Args)]
pub struct InstallArgs {
    /// Where the files are used from: binaries in PREFIX/bin, the kernel in
    /// PREFIX/share/microvm, the agent and virtiofsd in PREFIX/lib/microvm.
    #[arg(long, value_name = "DIR", default_value = "/usr/local")]
    pub prefix: PathBuf,
    /// Stage every file below DIR instead of `/` (for packaging); paths inside the files stay
    /// those of the target system.
    #[arg(long, value_name = "DIR")]
    pub destdir: Option<PathBuf>,
    /// Where to write the containerd drop-in for the `microvm` runtime handler
    /// [default: SYSCONFDIR/containerd/conf.d/microvm.toml].
    #[arg(long, value_name = "PATH", conflicts_with = "no_containerd_config")]
    pub containerd_config: Option<PathBuf>,
    /// Write no containerd drop-in.
    #[arg(long)]
    pub no_containerd_config: bool,
    /// The drop-in's syntax: 2 (containerd 1.6/1.7; 2.x migrates it on import) or 3 (2.x only).
    #[arg(long, value_name = "N", default_value = "2")]
    pub containerd_config_version: ContainerdSyntax,
    /// Build the host binaries in the dev profile (faster to build, slower to run).
    #[arg(long)]
    pub debug_build: bool,
    /// Replace files this installer did not write, or that changed since it wrote them.
    #[arg(long)]
    pub force: bool,
}

/// The built files an install copies.
pub struct Built {
    pub microvm: PathBuf,
    pub vmm: PathBuf,
    pub shim: PathBuf,
    pub agent: PathBuf,
    pub kernel: PathBuf,
    pub virtiofsd: Option<PathBuf>,
}

/// Where each installed file is used from on the target system.
pub struct Layout {
    prefix: PathBuf,
    sysconf: PathBuf,
}

impl Layout {
    pub fn new(prefix: &Path) -> Result<Self> {
        if !prefix.is_absolute() {
            bail!(
                "--prefix must be an absolute path, not {}",
                prefix.display()
            );
        }
        let sysconf = if prefix == Path::new("/usr") || prefix == Path::new("/usr/local") {
            PathBuf::from("/etc")
        } else {
            prefix.join("etc")
        };
        Ok(Self {
            prefix: prefix.to_path_buf(),
            sysconf,
        })
    }
    fn bin(&self, name: &str) -> PathBuf {
        self.prefix.join("bin").join(name)
    }
    fn lib(&self, name: &str) -> PathBuf {
        self.prefix.join("lib/microvm").join(name)
    }
    fn share(&self, name: &str) -> PathBuf {
        self.prefix.join("share/microvm").join(name)
    }
    fn etc(&self, name: &str) -> PathBuf {
        self.sysconf.join("microvm").join(name)
    }
    fn default_dropin(&self) -> PathBuf {
        self.sysconf.join("containerd/conf.d/microvm.toml")
    }
    fn manifest(&self) -> PathBuf {
        self.share("install-manifest.sha256")
    }
}

/// The files to install, in order (the binaries before the configs that name them).
fn plan(layout: &Layout, built: &Built, dropin: Option<(&Path, ContainerdSyntax)>) -> Vec<Item> {
    let copy = |path: PathBuf, from: &Path, mode| Item {
        path,
        source: Source::Copy(from.to_path_buf()),
        mode,
    };
    let text = |path: PathBuf, text: String| Item {
        path,
        source: Source::Text(text),
        mode: 0o644,
    };
    let mut items = vec![
        copy(layout.bin("microvm"), &built.microvm, 0o755),
        copy(layout.bin("microvm-vmm"), &built.vmm, 0o755),
        copy(layout.bin("containerd-shim-microvm-v2"), &built.shim, 0o755),
        copy(layout.lib("microvm-agent"), &built.agent, 0o755),
        copy(layout.share("vmlinux"), &built.kernel, 0o644),
    ];
    if let Some(v) = &built.virtiofsd {
        items.push(copy(layout.lib("virtiofsd"), v, 0o755));
    }
    let (kernel, agent, vmm, virtiofsd) = (
        layout.share("vmlinux"),
        layout.lib("microvm-agent"),
        layout.bin("microvm-vmm"),
        layout.lib("virtiofsd"),
    );
    let shim_config = shim_toml(&ShimPaths {
        kernel: &kernel,
        agent: &agent,
        vmm: &vmm,
        virtiofsd: built.virtiofsd.as_ref().map(|_| virtiofsd.as_path()),
    });
    items.push(text(layout.etc("shim.toml"), shim_config));
    items.push(text(layout.etc("runtimeclass.yaml"), runtime_class()));
    if let Some((path, syntax)) = dropin {
        let config = containerd_dropin(syntax, &layout.etc("shim.toml"));
        items.push(text(path.to_path_buf(), config));
    }
    items
}

/// Builds what the install copies: the host binaries (release unless `debug`), the static
/// agent, the guest kernel (from the cache when built before); virtiofsd only if cached.
fn build(debug: bool) -> Result<Built> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).arg("build");
    if !debug {
        cmd.arg("--release");
    }
    cmd.args(["-p", "microvm", "-p", "microvm-vmm", "-p", "shim"]);
    for bin in ["microvm", "microvm-vmm", "containerd-shim-microvm-v2"] {
        cmd.args(["--bin", bin]);
    }
    run(&mut cmd)?;
    let out = target_dir().join(if debug { "debug" } else { "release" });
    let virtiofsd = cache_dir().join(format!(
        "virtiofsd-{}/bin/virtiofsd",
        crate::virtiofsd::VERSION
    ));
    Ok(Built {
        microvm: out.join("microvm"),
        vmm: out.join("microvm-vmm"),
        shim: out.join("containerd-shim-microvm-v2"),
        agent: crate::agent::build()?,
        kernel: crate::kernel::build(&crate::kernel::KernelArgs {
            source: None,
            jobs: None,
        })?,
        virtiofsd: virtiofsd.is_file().then_some(virtiofsd),
    })
}

/// An absolute form of a path the user typed.
fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolve {}", path.display()))
}

/// Installs `built` as `args` say; returns what to tell the user.
fn install_built(args: &InstallArgs, built: &Built) -> Result<String> {
    let layout = Layout::new(&args.prefix)?;
    let destdir = args.destdir.as_deref().map(absolute).transpose()?;
    let destdir = destdir.as_deref();
    let dropin = match (&args.containerd_config, args.no_containerd_config) {
        (_, true) => None,
        (Some(p), false) => Some(absolute(p)?),
        (None, false) => Some(layout.default_dropin()),
    };
    let items = plan(
        &layout,
        built,
        dropin
            .as_deref()
            .map(|p| (p, args.containerd_config_version)),
    );
    let targets: Vec<PathBuf> = items.iter().map(|i| staged(destdir, &i.path)).collect();
    let target_refs: Vec<&Path> = targets.iter().map(PathBuf::as_path).collect();
    check_privilege(place::euid()?, destdir, &target_refs)?;
    place::place(&items, destdir, &layout.manifest(), args.force)?;
    let mut out = match destdir {
        Some(d) => format!("installed below {}:\n", d.display()),
        None => String::from("installed:\n"),
    };
    out.push_str(&summary(
        &layout,
        &items,
        dropin.as_deref(),
        built.virtiofsd.is_some(),
    ));
    Ok(out)
}

fn summary(layout: &Layout, items: &[Item], dropin: Option<&Path>, virtiofsd: bool) -> String {
    let mut out = String::new();
    for item in items {
        out.push_str(&format!("  {}\n", item.path.display()));
    }
    if !virtiofsd {
        out.push_str(
            "virtiofsd was not installed (volumes and CRI mounts need it): run \
             `cargo xtask virtiofsd`, then install again\n",
        );
    }
    let standard = layout.sysconf == Path::new("/etc");
    if !standard {
        out.push_str(&format!(
            "`microvm run` looks for the kernel and agent under /usr/local and /usr: set \
             MICROVM_KERNEL={} MICROVM_AGENT={}\n",
            layout.share("vmlinux").display(),
            layout.lib("microvm-agent").display()
        ));
    }
    if let Some(dropin) = dropin {
        let dir = dropin.parent().unwrap_or(Path::new("/")).display();
        out.push_str(&format!(
            "containerd: {} declares the runtime handler `microvm`.\n  \
             containerd 2.x: its default config imports /etc/containerd/conf.d/*.toml; if yours \
             has its own `imports`, add \"{dir}/*.toml\" to them.\n  \
             containerd 1.6/1.7: add this line at the top of /etc/containerd/config.toml \
             (`version = 2`):\n    imports = [\"{dir}/*.toml\"]\n  \
             then restart containerd (systemctl restart containerd).\n",
            dropin.display()
        ));
    }
    out.push_str(&format!(
        "Kubernetes: kubectl apply -f {} (a RuntimeClass with handler `microvm`), then set \
         `runtimeClassName: microvm` in a pod spec:\n{}",
        layout.etc("runtimeclass.yaml").display(),
        runtime_class()
    ));
    out
}

pub fn install(args: &InstallArgs) -> Result<()> {
    // Refuse a system prefix as a user before building for minutes.
    let layout = Layout::new(&args.prefix)?;
    let destdir = args.destdir.as_deref().map(absolute).transpose()?;
    let early = [layout.bin("microvm"), layout.etc("shim.toml")];
    let early: Vec<PathBuf> = early
        .iter()
        .map(|p| staged(destdir.as_deref(), p))
        .collect();
    let early_refs: Vec<&Path> = early.iter().map(PathBuf::as_path).collect();
    check_privilege(place::euid()?, destdir.as_deref(), &early_refs)?;
    let built = build(args.debug_build)?;
    print!("{}", install_built(args, &built)?);
    Ok(())
}

#[cfg(test)]
mod tests;
