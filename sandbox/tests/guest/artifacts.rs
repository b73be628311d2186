//! The artifacts the guest tests need: the VMM, kernel, agent, and a busybox rootfs image.

use super::*;

pub(crate) struct Artifacts {
    pub(crate) vmm: PathBuf,
    pub(crate) kernel: PathBuf,
    pub(crate) agent: PathBuf,
    pub(crate) rootfs: PathBuf,
}

impl Artifacts {
    pub(crate) fn get() -> Result<&'static Artifacts, String> {
        static ART: OnceLock<Result<Artifacts, String>> = OnceLock::new();
        ART.get_or_init(Self::make).as_ref().map_err(Clone::clone)
    }

    fn make() -> Result<Artifacts, String> {
        let kernel = std::env::var_os("MICROVM_KERNEL")
            .map(PathBuf::from)
            .ok_or(
                "MICROVM_KERNEL is not set: build the guest kernel with `cargo xtask kernel` and \
             point MICROVM_KERNEL at it, or run `cargo xtask test`",
            )?;
        let bin_dir = match std::env::var_os("MICROVM_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => target_dir()?.join(profile_dir()?),
        };
        let vmm = bin_dir.join("microvm-vmm");
        let agent = PathBuf::from(std::env::var_os("MICROVM_AGENT").ok_or("MICROVM_AGENT unset")?);
        for p in [&kernel, &vmm, &agent] {
            if !p.is_file() {
                return Err(format!(
                    "{} is missing (run `cargo build --workspace --bins` and `cargo xtask kernel`)",
                    p.display()
                ));
            }
        }
        let rootfs = busybox_image()?;
        Ok(Artifacts {
            vmm,
            kernel,
            agent,
            rootfs,
        })
    }
}

/// `<target>` from this executable's path, `<target>/<profile>/deps/guest-<hash>`.
pub(crate) fn target_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .ok_or_else(|| "cannot locate the target directory".into())
}

pub(crate) fn profile_dir() -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    exe.ancestors()
        .nth(2)
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| "cannot locate the profile directory".into())
}

/// Builds the static agent (the documented command) unless `MICROVM_AGENT` names one.
pub(crate) fn build_agent() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace root")?;
    if std::env::var_os("MICROVM_AGENT").is_none() {
        eprintln!("guest tests: building the static agent");
    }
    testbed::static_agent(root, &target_dir()?)
}

/// An ext4 image with busybox-static and its applets in /bin, made once per test process.
pub(crate) fn busybox_image() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("agent-test-rootfs-{}", std::process::id()));
    let root = dir.join("root");
    let _ = std::fs::remove_dir_all(&dir);
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("busybox not found (apt-get install busybox-static)")?;
    std::fs::copy(busybox, bin.join("busybox")).map_err(|e| e.to_string())?;
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| e.to_string())?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    for d in ["dev", "proc", "sys", "tmp", "etc", "root", "run", "data"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .map_err(|e| e.to_string())?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n").map_err(|e| e.to_string())?;
    std::fs::write(root.join("etc/resolv.conf"), "").map_err(|e| e.to_string())?;
    let image = dir.join("busybox.ext4");
    // An existing file keeps mkfs.ext4 from announcing that it creates one.
    std::fs::File::create(&image).map_err(|e| e.to_string())?;
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&root)
        .arg(&image)
        .arg("32M")
        .status()
        .map_err(|e| format!("mkfs.ext4 (e2fsprogs): {e}"))?;
    if !status.success() {
        return Err("mkfs.ext4 failed".into());
    }
    Ok(image)
}
