//! The L1 kernel: Debian's current `linux-image-<release>-amd64`, downloaded and unpacked (never
//! installed) into the cache, with the modules it needs resolved by `modprobe`.

use crate::{command_output, Error};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Modules `/init` loads, named as `modprobe` knows them; `modprobe --show-depends` adds their
/// dependencies in load order. `kvm-amd` gives `/dev/kvm` (real SVM, emulated by TCG); virtio-pci,
/// 9p and overlay let L1 mount this host's root. The two groups are independent and load in
/// parallel. `vhost_vsock` is deliberately absent: this project's VMM implements vsock itself.
pub(crate) const MODULES: &[&[&str]] = &[
    &["kvm-amd"],
    &["virtio_pci", "9pnet_virtio", "9p", "overlay"],
];

/// An unpacked kernel package in the cache.
#[derive(Debug)]
pub(crate) struct L1Kernel {
    /// The package's unpacked tree (`boot/`, `lib/modules/<release>/`, ...).
    pub root: PathBuf,
    /// `uname -r` of the kernel.
    pub release: String,
}

impl L1Kernel {
    /// The image QEMU boots: the uncompressed `vmlinux` when it could be extracted (see
    /// [`extract_vmlinux`]), else the package's `vmlinuz`.
    pub(crate) fn image(&self) -> PathBuf {
        let vmlinux = self.root.join(VMLINUX);
        if vmlinux.is_file() {
            vmlinux
        } else {
            self.vmlinuz()
        }
    }

    fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    pub(crate) fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }

    /// The `.ko` files to load, in groups of [`MODULES`] that can load in parallel, each group
    /// dependencies first; every file once.
    pub(crate) fn module_groups(&self) -> Result<Vec<Vec<PathBuf>>, Error> {
        let mut groups: Vec<Vec<PathBuf>> = Vec::new();
        for names in MODULES {
            let chain = self.show_depends(names)?;
            if chain.is_empty() {
                return Err(Error::Prerequisites(format!(
                    "modprobe found none of {names:?} for {}",
                    self.release
                )));
            }
            // A group that needs a module of an earlier group must wait for it: load it after them.
            let seen: Vec<&PathBuf> = groups.iter().flatten().collect();
            if chain.iter().any(|ko| seen.contains(&ko)) {
                let rest: Vec<PathBuf> =
                    chain.into_iter().filter(|ko| !seen.contains(&ko)).collect();
                let mut all: Vec<PathBuf> = groups.drain(..).flatten().collect();
                all.extend(rest);
                groups.push(all);
            } else {
                groups.push(chain);
            }
        }
        Ok(groups)
    }

    fn show_depends(&self, names: &[&str]) -> Result<Vec<PathBuf>, Error> {
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
                .args(names),
        )?;
        Ok(parse_show_depends(&out))
    }
}

/// The cache entry of the current kernel package, fetched if missing.
pub(crate) fn ensure(cache: &Path) -> Result<L1Kernel, Error> {
    let dir = cache.join("testbed");
    let pkg = match current_package(&dir) {
        Ok(pkg) => pkg,
        Err(err) => match newest_cached(&dir) {
            Some(pkg) => {
                eprintln!("testbed: {err}; using the cached {pkg}");
                pkg
            }
            None => {
                // Perhaps the package lists were never downloaded.
                crate::apt_update()?;
                current_package(&dir)?
            }
        },
    };
    let root = dir.join(&pkg);
    if !root.is_dir() {
        fetch(&dir, &pkg)?;
    }
    let release = release_of(&root)?;
    let kernel = L1Kernel { root, release };
    if !kernel.root.join(VMLINUX).exists() && !kernel.root.join(NO_VMLINUX).exists() {
        // An entry unpacked by an older version of this code, or an interrupted extraction.
        extract_vmlinux(&kernel.root, &kernel.release);
    }
    Ok(kernel)
}

/// The uncompressed kernel, beside the package's `boot/` in the cache entry.
const VMLINUX: &str = "vmlinux-pvh";
/// Left instead when extracting it failed, so that it is not tried on every run.
const NO_VMLINUX: &str = "vmlinux-pvh.failed";

/// Extracts the uncompressed `vmlinux` ELF from the package's `vmlinuz` (a bzImage) into
/// `root/vmlinux-pvh`, if the kernel has a PVH entry point (`CONFIG_PVH`, which Debian enables).
///
/// Why: booting the bzImage, SeaBIOS and the kernel's own decompressor (XZ, in Debian's case) run
/// under TCG, which takes about 5 s of every L1 boot. QEMU boots an ELF kernel with a PVH note
/// straight at its 32-bit entry point instead (a trivial run: about 6 s instead of 12 s). The
/// decompression happens once, natively (about 1 s), here. On failure L1 boots the bzImage.
fn extract_vmlinux(root: &Path, release: &str) {
    let config = root.join("boot").join(format!("config-{release}"));
    let result = match fs::read_to_string(&config) {
        Ok(text) if text.lines().any(|l| l == "CONFIG_PVH=y") => {
            decompress_bzimage(&root.join("boot").join(format!("vmlinuz-{release}")), root)
        }
        Ok(_) => Err("the kernel has no PVH entry point (CONFIG_PVH)".to_string()),
        Err(e) => Err(format!("cannot read {}: {e}", config.display())),
    };
    if let Err(why) = result {
        eprintln!("testbed: booting the compressed kernel (slower): {why}");
        let _ = fs::write(root.join(NO_VMLINUX), why);
    }
}

/// Decompresses a bzImage's payload into `dir/vmlinux-pvh` (atomically) with the host's `xz`,
/// `gzip` or `zstd`.
fn decompress_bzimage(bzimage: &Path, dir: &Path) -> Result<(), String> {
    let image = fs::read(bzimage).map_err(|e| format!("cannot read {}: {e}", bzimage.display()))?;
    let payload = bzimage_payload(&image).ok_or("not a bzImage with a payload")?;
    let tool: &[&str] = match payload {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => &["xz", "-dc", "--single-stream"],
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dcq"],
        _ => return Err("the payload's compression is not xz, gzip or zstd".into()),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".vmlinux-")
        .tempdir_in(dir)
        .map_err(|e| format!("cannot create a temporary folder in {}: {e}", dir.display()))?;
    let packed = tmp.path().join("payload");
    let unpacked = tmp.path().join("vmlinux");
    fs::write(&packed, payload).map_err(|e| format!("cannot write {}: {e}", packed.display()))?;
    let open = |p: &Path, create: bool| {
        if create {
            fs::File::create(p)
        } else {
            fs::File::open(p)
        }
        .map_err(|e| format!("cannot open {}: {e}", p.display()))
    };
    // The exit status is not checked: the payload ends with the kernel's 4-byte size, which gzip
    // calls "trailing garbage". The result is checked instead.
    Command::new(tool[0])
        .args(&tool[1..])
        .stdin(open(&packed, false)?)
        .stdout(open(&unpacked, true)?)
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("cannot run {}: {e}", tool[0]))?;
    let mut magic = [0u8; 4];
    fs::File::open(&unpacked)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .map_err(|e| format!("{} produced nothing: {e}", tool[0]))?;
    if magic != *b"\x7fELF" {
        return Err(format!("{} did not produce an ELF file", tool[0]));
    }
    fs::rename(&unpacked, dir.join(VMLINUX))
        .map_err(|e| format!("cannot rename {}: {e}", unpacked.display()))
}

/// The compressed kernel inside a bzImage: the boot protocol header (at 0x1f1) gives the size of
/// the real-mode setup, and `payload_offset`/`payload_length` (0x248/0x24c) locate the payload in
/// the protected-mode part that follows it.
pub(crate) fn bzimage_payload(image: &[u8]) -> Option<&[u8]> {
    let u32_at =
        |off: usize| Some(u32::from_le_bytes(image.get(off..off + 4)?.try_into().ok()?) as usize);
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let setup_sects = match *image.get(0x1f1)? {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    image.get(start..start.checked_add(u32_at(0x24c)?)?)
}

/// The package `linux-image-amd64` depends on, e.g. `linux-image-6.1.0-56-amd64`.
///
/// `apt-cache` takes about 2 s here (Debian's container images keep no `pkgcache.bin`), so the
/// answer is remembered in `dir/current-package` until apt's package lists change.
fn current_package(dir: &Path) -> Result<String, Error> {
    let record = dir.join("current-package");
    let lists_changed = fs::metadata(APT_LISTS).and_then(|m| m.modified()).ok();
    let recorded = fs::metadata(&record).and_then(|m| m.modified()).ok();
    if let (Some(lists), Some(recorded)) = (lists_changed, recorded) {
        if recorded >= lists {
            if let Ok(pkg) = fs::read_to_string(&record) {
                let pkg = pkg.trim();
                if pkg.starts_with("linux-image-") && dir.join(pkg).is_dir() {
                    return Ok(pkg.to_string());
                }
            }
        }
    }
    let out = command_output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    let pkg = parse_depends(&out).ok_or_else(|| {
        Error::Prerequisites(
            "`apt-cache depends linux-image-amd64` names no linux-image-<version> package".into(),
        )
    })?;
    // Best effort, written atomically: a missing record only costs the next run 2 s.
    if fs::create_dir_all(dir).is_ok() {
        if let Ok(mut tmp) = tempfile::NamedTempFile::new_in(dir) {
            if std::io::Write::write_all(&mut tmp, pkg.as_bytes()).is_ok() {
                let _ = tmp.persist(&record);
            }
        }
    }
    Ok(pkg)
}

/// apt's package lists: `apt-get update` replaces files in it, which changes its mtime.
const APT_LISTS: &str = "/var/lib/apt/lists";

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
    fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    eprintln!(
        "testbed: fetching the L1 kernel {pkg} into {}",
        dir.display()
    );
    let tmp = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .map_err(|e| {
            Error::io(
                format!("cannot create a temporary folder in {}", dir.display()),
                e,
            )
        })?;
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
    if !unpacked
        .join("lib/modules")
        .join(&release)
        .join("modules.dep")
        .exists()
    {
        command_output(
            Command::new("depmod")
                .arg("-b")
                .arg(&unpacked)
                .arg(&release),
        )?;
    }
    extract_vmlinux(&unpacked, &release);
    let dest = dir.join(pkg);
    if let Err(err) = fs::rename(&unpacked, &dest) {
        // Another run may have finished the same fetch first.
        if !dest.is_dir() {
            return Err(Error::io(
                format!("cannot move the kernel to {}", dest.display()),
                err,
            ));
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
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        let alternatives = "linux-image-amd64\n |Depends: linux-image-6.1.0-57-amd64\n  Depends: linux-image-6.1.0-57-amd64-unsigned\n";
        assert_eq!(
            parse_depends(alternatives).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        assert_eq!(
            parse_depends("linux-image-amd64\n  Depends: linux-base\n"),
            None
        );
        assert_eq!(parse_depends(""), None);
    }

    #[test]
    fn bzimage_payload_from_the_header() {
        let mut image = vec![0u8; 6 * 512 + 100];
        image[0x1f1] = 3; // setup sectors: the protected-mode part starts at 4 * 512
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&6u32.to_le_bytes());
        image[4 * 512 + 16..4 * 512 + 22].copy_from_slice(b"\xfd7zXZ\0");
        assert_eq!(bzimage_payload(&image), Some(&b"\xfd7zXZ\0"[..]));
        image[0x24c..0x250].copy_from_slice(&100_000u32.to_le_bytes());
        assert_eq!(bzimage_payload(&image), None, "payload past the end");
        image[0x202] = b'X';
        assert_eq!(bzimage_payload(&image), None, "no boot protocol header");
    }

    /// The real thing, when the L1 kernel is in the cache already.
    #[test]
    fn cached_kernel_payload_decompresses_to_elf() {
        let Some(pkg) = newest_cached(&crate::cache_dir().join("testbed")) else {
            eprintln!("no cached L1 kernel: skipped");
            return;
        };
        let root = crate::cache_dir().join("testbed").join(pkg);
        let release = release_of(&root).unwrap();
        let dir = tempfile::tempdir().unwrap();
        decompress_bzimage(
            &root.join("boot").join(format!("vmlinuz-{release}")),
            dir.path(),
        )
        .unwrap();
        let elf = fs::read(dir.path().join(VMLINUX)).unwrap();
        assert!(elf.starts_with(b"\x7fELF") && elf.len() > 10 << 20);
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
        assert_eq!(
            names,
            ["irqbypass.ko", "kvm.ko", "kvm-amd.ko", "virtio_ring.ko"]
        );
    }
}
