//! `-v HOSTPATH:CTRPATH[:ro]` volumes: copy-in, copy-back.
//!
//! Each volume becomes an ext4 disk built from the host directory (`mke2fs -d`), attached to the
//! VM (read-only for `:ro`, and mounted `ro`, so the guest can write it neither through the
//! filesystem nor through the device) and mounted at CTRPATH. When the run ends and the VM is
//! gone, a rw volume's disk is read back with `debugfs rdump` and mirrored into HOSTPATH: new and
//! changed files copied, files the container deleted deleted. The host sees the container's
//! writes when the run ends, not while it runs; live sharing (virtio-fs) is future work.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// A parsed `-v`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub host: PathBuf,
    pub container: String,
    pub read_only: bool,
}

pub fn parse(s: &str) -> Result<VolumeSpec, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (host, container, read_only) = match parts.as_slice() {
        [h, c] => (*h, *c, false),
        [h, c, "ro"] => (*h, *c, true),
        [h, c, "rw"] => (*h, *c, false),
        [_, _, opt] => return Err(format!("unknown volume option {opt:?} (use ro or rw)")),
        _ => return Err("expected HOSTPATH:CTRPATH[:ro]".into()),
    };
    if !host.starts_with('/') {
        return Err(format!(
            "the host path {host:?} must be absolute (named volumes are not supported)"
        ));
    }
    if !container.starts_with('/') || container.split('/').any(|c| c == "..") {
        return Err(format!(
            "the container path {container:?} must be absolute, without .."
        ));
    }
    if container == "/" {
        return Err("a volume cannot be mounted at /".into());
    }
    Ok(VolumeSpec {
        host: host.into(),
        container: container.into(),
        read_only,
    })
}

/// Free space a rw volume's disk gets for the container's writes.
pub const RW_ROOM: u64 = 1 << 30;

/// Builds the volume's disk at `disk`.
pub fn build_disk(v: &VolumeSpec, disk: &Path) -> Result<()> {
    let md = fs::metadata(&v.host).with_context(|| format!("volume {}", v.host.display()))?;
    if !md.is_dir() {
        bail!(
            "volume {}: only directories can be volumes",
            v.host.display()
        );
    }
    let opts = image::disk::Ext4Options {
        free_bytes: if v.read_only { 0 } else { RW_ROOM },
        keep_root_owner: true,
        ..Default::default()
    };
    image::disk::ext4_with(&v.host, disk, &opts)
        .map(drop)
        .with_context(|| format!("volume {}", v.host.display()))
}

/// Copies a rw volume's disk back into its host directory (after the VM ended).
pub fn sync_back(disk: &Path, host: &Path, scratch: &Path) -> Result<()> {
    let staging = scratch.join(format!(
        "sync-{}",
        disk.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    let o = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", staging.display()))
        .arg(disk)
        .stdin(Stdio::null())
        .output()
        .context("run debugfs (e2fsprogs)")?;
    if !o.status.success() {
        bail!(
            "debugfs rdump {} failed: {}",
            disk.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    // mke2fs made lost+found; it is not the container's unless the host had one.
    if !host.join("lost+found").exists() {
        let _ = fs::remove_dir_all(staging.join("lost+found"));
    }
    mirror(&staging, host)
        .with_context(|| format!("copy the volume back into {}", host.display()))?;
    fs::remove_dir_all(&staging)?;
    Ok(())
}

fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let (ma, mb) = (fs::metadata(a)?, fs::metadata(b)?);
    if ma.len() != mb.len() {
        return Ok(false);
    }
    let (mut fa, mut fb) = (fs::File::open(a)?, fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

fn remove_any(p: &Path) -> Result<()> {
    let md = p.symlink_metadata()?;
    if md.is_dir() {
        fs::remove_dir_all(p)?;
    } else {
        fs::remove_file(p)?;
    }
    Ok(())
}

/// Makes `dst` hold what `src` holds: new and changed entries copied, missing ones removed.
pub fn mirror(src: &Path, dst: &Path) -> Result<()> {
    let mut names = std::collections::HashSet::new();
    for e in fs::read_dir(src)? {
        let e = e?;
        names.insert(e.file_name());
        let (s, d) = (e.path(), dst.join(e.file_name()));
        let sm = s.symlink_metadata()?;
        let dm = d.symlink_metadata().ok();
        let same_type = dm
            .as_ref()
            .is_some_and(|dm| dm.file_type() == sm.file_type());
        if dm.is_some() && !same_type {
            remove_any(&d)?;
        }
        if sm.is_dir() {
            if !same_type {
                fs::create_dir(&d)?;
            }
            mirror(&s, &d)?;
            fs::set_permissions(&d, sm.permissions())?;
        } else if sm.file_type().is_symlink() {
            let target = fs::read_link(&s)?;
            if same_type && fs::read_link(&d)? == target {
                continue;
            }
            if same_type {
                fs::remove_file(&d)?;
            }
            std::os::unix::fs::symlink(&target, &d)?;
        } else if sm.is_file() {
            if !same_type || !same_content(&s, &d)? {
                if same_type {
                    // Replace rather than write through: a read-only file or a hardlink on the
                    // host must not be changed in place.
                    fs::remove_file(&d)?;
                }
                fs::copy(&s, &d)?;
            }
            let mode = sm.mode() & 0o7777;
            if d.symlink_metadata()?.mode() & 0o7777 != mode {
                fs::set_permissions(&d, fs::Permissions::from_mode(mode))?;
            }
        }
        // Devices, fifos and sockets made in the guest are not copied back.
    }
    for e in fs::read_dir(dst)? {
        let e = e?;
        if !names.contains(&e.file_name()) {
            remove_any(&e.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_arguments() {
        let v = parse("/data:/mnt/d:ro").unwrap();
        assert_eq!(
            v,
            VolumeSpec {
                host: "/data".into(),
                container: "/mnt/d".into(),
                read_only: true
            }
        );
        assert!(!parse("/a:/b").unwrap().read_only);
        assert!(parse("rel:/b").is_err());
        assert!(parse("/a:b").is_err());
        assert!(parse("/a:/b:rx").is_err());
        assert!(parse("/a:/").is_err());
        assert!(parse("/a:/x/../y").is_err());
        assert!(parse("/a").is_err());
    }

    #[test]
    fn mirror_copies_changes_and_deletions() {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        fs::create_dir_all(src.join("new/deep")).unwrap();
        fs::write(src.join("changed"), "new").unwrap();
        fs::write(src.join("same"), "same").unwrap();
        fs::write(src.join("new/deep/f"), "f").unwrap();
        std::os::unix::fs::symlink("same", src.join("link")).unwrap();
        fs::create_dir_all(dst.join("gone-dir")).unwrap();
        fs::write(dst.join("gone-dir/x"), "x").unwrap();
        fs::write(dst.join("gone"), "x").unwrap();
        fs::write(dst.join("changed"), "old").unwrap();
        fs::write(dst.join("same"), "same").unwrap();
        mirror(&src, &dst).unwrap();
        assert_eq!(fs::read_to_string(dst.join("changed")).unwrap(), "new");
        assert_eq!(fs::read_to_string(dst.join("new/deep/f")).unwrap(), "f");
        assert_eq!(fs::read_link(dst.join("link")).unwrap(), Path::new("same"));
        assert!(!dst.join("gone").exists() && !dst.join("gone-dir").exists());
    }

    /// Needs e2fsprogs: a tree through a disk and back is unchanged.
    #[test]
    fn disk_round_trip() {
        let t = tempfile::tempdir().unwrap();
        let host = t.path().join("host");
        fs::create_dir_all(host.join("sub")).unwrap();
        fs::write(host.join("sub/a"), "a").unwrap();
        let disk = t.path().join("v.ext4");
        let v = VolumeSpec {
            host: host.clone(),
            container: "/v".into(),
            read_only: false,
        };
        build_disk(&v, &disk).unwrap();
        fs::write(host.join("later"), "host-only").unwrap();
        sync_back(&disk, &host, t.path()).unwrap();
        assert_eq!(fs::read_to_string(host.join("sub/a")).unwrap(), "a");
        assert!(!host.join("later").exists(), "the disk is the truth");
        assert!(!host.join("lost+found").exists());
    }
}
