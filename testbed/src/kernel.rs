//! The L1 kernel: Debian's current `linux-image-<release>-amd64`, downloaded and unpacked (never
//! installed) into the cache, with the modules it needs resolved by `modprobe`.

use crate::{command_output, Error};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Modules `/init` loads, named as `modprobe` knows them; `modprobe --show-depends` adds their
/// dependencies in load order. `kvm-amd` gives `/dev/kvm` (real SVM, emulated by TCG); virtio-pci,
/// 9p and overlay let L1 mount this host's root. `vhost_vsock` is deliberately absent: this
/// project's VMM implements vsock itself.
pub(crate) const MODULES: &[&str] = &["kvm-amd", "virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// An unpacked kernel package in the cache.
#[derive(Debug)]
pub(crate) struct L1Kernel {
    /// The package's unpacked tree (`boot/`, `lib/modules/<release>/`, ...).
    pub root: PathBuf,
    /// `uname -r` of the kernel.
    pub release: String,
}

impl L1Kernel {
    pub(crate) fn vmlinuz(&self) -> PathBuf {
        self.root.join("boot").join(format!("vmlinuz-{}", self.release))
    }

    pub(crate) fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }

    /// The `.ko` files to load, dependencies first, each once.
    pub(crate) fn module_chain(&self) -> Result<Vec<PathBuf>, Error> {
        let out = command_output(
            Command::new("modprobe")
                // An empty configuration: the host's /etc/modprobe.d is about the host's kernel.
                .arg("-C")
                .arg(self.root.join("etc/modprobe.d"))
                .arg("-d")
                .arg(&self.root)
                .arg("-S")
                .arg(&self.release)
                .args(["--show-depends", "-a"])
                .args(MODULES),
        )?;
        let chain = parse_show_depends(&out);
        if chain.is_empty() {
            return Err(Error::Prerequisites(format!(
                "modprobe found none of {MODULES:?} for {}",
                self.release
            )));
        }
        Ok(chain)
    }
}

/// The cache entry of the current kernel package, fetched if missing.
pub(crate) fn ensure(cache: &Path) -> Result<L1Kernel, Error> {
    let dir = cache.join("testbed");
    let pkg = match current_package() {
        Ok(pkg) => pkg,
        Err(err) => match newest_cached(&dir) {
            Some(pkg) => {
                eprintln!("testbed: {err}; using the cached {pkg}");
                pkg
            }
            None => {
                // Perhaps the package lists were never downloaded.
                crate::apt_update()?;
                current_package()?
            }
        },
    };
    let root = dir.join(&pkg);
    if !root.is_dir() {
        fetch(&dir, &pkg)?;
    }
    let release = release_of(&root)?;
    Ok(L1Kernel { root, release })
}

/// The package `linux-image-amd64` depends on, e.g. `linux-image-6.1.0-56-amd64`.
fn current_package() -> Result<String, Error> {
    let out = command_output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    parse_depends(&out).ok_or_else(|| {
        Error::Prerequisites("`apt-cache depends linux-image-amd64` names no linux-image-<version> package".into())
    })
}

/// Picks the `Depends: linux-image-<digit>...` line of `apt-cache depends` output.
pub(crate) fn parse_depends(out: &str) -> Option<String> {
    out.lines().find_map(|l| {
        let l = l.trim().trim_start_matches('|');
        let pkg = l.strip_prefix("Depends:")?.trim();
        let version = pkg.strip_prefix("linux-image-")?;
        (version.starts_with(|c: char| c.is_ascii_digit()) && !pkg.contains(char::is_whitespace))
            .then(|| pkg.to_string())
    })
}

/// The `.ko` paths of `modprobe --show-depends` output, in order, each once (`builtin` lines and
/// module parameters dropped).
pub(crate) fn parse_show_depends(out: &str) -> Vec<PathBuf> {
    let mut chain: Vec<PathBuf> = Vec::new();
    for l in out.lines() {
        let mut words = l.split_whitespace();
        if words.next() != Some("insmod") {
            continue;
        }
        if let Some(path) = words.next().map(PathBuf::from) {
            if !chain.contains(&path) {
                chain.push(path);
            }
        }
    }
    chain
}

/// The most recently unpacked kernel in the cache, for when apt cannot name the current one.
fn newest_cached(dir: &Path) -> Option<String> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("linux-image-"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.file_name())))
        .max()
        .and_then(|(_, name)| name.into_string().ok())
}

fn release_of(root: &Path) -> Result<String, Error> {
    let modules = root.join("lib/modules");
    let mut releases: Vec<String> = fs::read_dir(&modules)
        .map_err(|e| Error::io(format!("cannot read {}", modules.display()), e))?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    match releases.len() {
        1 => Ok(releases.remove(0)),
        _ => Err(Error::Prerequisites(format!(
            "{} should hold exactly one kernel release, found {releases:?}",
            modules.display()
        ))),
    }
}

/// Downloads and unpacks `pkg` into `dir/pkg`. Works in a temporary folder beside it and renames
/// at the end, so an interrupted fetch leaves no half-unpacked kernel behind.
fn fetch(dir: &Path, pkg: &str) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    eprintln!("testbed: fetching the L1 kernel {pkg} into {}", dir.display());
    let tmp = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .map_err(|e| Error::io(format!("cannot create a temporary folder in {}", dir.display()), e))?;
    let download = || {
        let mut cmd = Command::new("apt-get");
        // apt drops privileges to `_apt` for downloads, which cannot write into a folder under
        // /root; as root, download as root instead of warning about it.
        if crate::is_root() {
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        command_output(cmd.args(["download", "-qq", pkg]).current_dir(tmp.path()))
    };
    if download().is_err() {
        // Stale package lists name a version the mirror no longer has.
        crate::apt_update()?;
        download()?;
    }
    let deb = fs::read_dir(tmp.path())
        .map_err(|e| Error::io("cannot list the downloaded package", e))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| Error::Prerequisites(format!("apt-get download {pkg} left no .deb")))?;
    let unpacked = tmp.path().join("root");
    command_output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let release = release_of(&unpacked)?;
    // The package has no modules.dep (its postinst makes one); modprobe needs it.
    if !unpacked.join("lib/modules").join(&release).join("modules.dep").exists() {
        command_output(Command::new("depmod").arg("-b").arg(&unpacked).arg(&release))?;
    }
    let dest = dir.join(pkg);
    if let Err(err) = fs::rename(&unpacked, &dest) {
        // Another run may have finished the same fetch first.
        if !dest.is_dir() {
            return Err(Error::io(format!("cannot move the kernel to {}", dest.display()), err));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_names_the_versioned_package() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(parse_depends(out).as_deref(), Some("linux-image-6.1.0-56-amd64"));
        let alternatives = "linux-image-amd64\n |Depends: linux-image-6.1.0-57-amd64\n  Depends: linux-image-6.1.0-57-amd64-unsigned\n";
        assert_eq!(parse_depends(alternatives).as_deref(), Some("linux-image-6.1.0-57-amd64"));
        assert_eq!(parse_depends("linux-image-amd64\n  Depends: linux-base\n"), None);
        assert_eq!(parse_depends(""), None);
    }

    #[test]
    fn show_depends_in_order_without_repeats() {
        let out = "\
insmod /c/lib/modules/6.1.0/kernel/virt/lib/irqbypass.ko \n\
insmod /c/lib/modules/6.1.0/kernel/arch/x86/kvm/kvm.ko \n\
insmod /c/lib/modules/6.1.0/kernel/arch/x86/kvm/kvm-amd.ko nested=0\n\
builtin virtio\n\
insmod /c/lib/modules/6.1.0/kernel/drivers/virtio/virtio_ring.ko \n\
insmod /c/lib/modules/6.1.0/kernel/arch/x86/kvm/kvm.ko \n";
        let chain = parse_show_depends(out);
        let names: Vec<_> = chain
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["irqbypass.ko", "kvm.ko", "kvm-amd.ko", "virtio_ring.ko"]);
    }
}
