//! Host directories and tmpfs in the container: `-v HOSTPATH:CTRPATH[:ro|:rw]`,
//! `--mount type=bind|tmpfs,...` and `--tmpfs PATH[:OPTIONS]`, with docker's semantics.
//!
//! Host directories are shared live, both ways, through virtio-fs: the run's one share
//! (`sandbox::share`, one confined virtiofsd per VM) holds every bind source of the run; the
//! guest mounts it once and each directory is bind-mounted into the container (`ro` there too
//! for a read-only one, which the daemon's namespace already enforces on the host side). No host
//! tool ever reads a filesystem the guest wrote.
//!
//! Ownership: the container's uid/gid `g` is host id `SHARE_ID_BASE + g` on shared files (a user
//! namespace around the daemon, as docker's `--userns-remap`). A HOSTPATH that `-v` creates
//! belongs to the container's root; an existing one is written where its permissions let
//! those ids write, and host files of other owners show in the container as nobody (65534).

use std::os::unix::fs::chown;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use sandbox::share::SHARE_ID_BASE;
use serde::{Deserialize, Serialize};

/// A host directory to bind into the container (`-v` or `--mount type=bind`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub host: PathBuf,
    pub container: String,
    pub read_only: bool,
    /// `-v` creates a missing HOSTPATH; `--mount` refuses one, as docker does.
    pub create: bool,
}

/// A tmpfs in the container (`--tmpfs` or `--mount type=tmpfs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmpfsSpec {
    pub container: String,
    /// mount(8) options, docker's defaults (`nosuid,nodev,noexec`) applied.
    pub options: Vec<String>,
}

/// What `--mount` described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSpec {
    Bind(VolumeSpec),
    Tmpfs(TmpfsSpec),
}

/// A container mount as the run's plan records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlannedMount {
    /// Shared directory `index` of the run's share.
    Share {
        index: usize,
        container: String,
        read_only: bool,
    },
    Tmpfs {
        container: String,
        options: Vec<String>,
    },
}

fn check_container_path(container: &str) -> Result<(), String> {
    if !container.starts_with('/') || container.split('/').any(|c| c == "..") {
        return Err(format!(
            "the container path {container:?} must be absolute, without .."
        ));
    }
    if container.trim_end_matches('/').is_empty() {
        return Err("nothing can be mounted at /".into());
    }
    Ok(())
}

/// `-v HOSTPATH:CTRPATH[:ro|:rw]`.
pub fn parse(s: &str) -> Result<VolumeSpec, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (host, container, read_only) = match parts.as_slice() {
        [h, c] => (*h, *c, false),
        [h, c, "ro"] => (*h, *c, true),
        [h, c, "rw"] => (*h, *c, false),
        [_, _, opt] => return Err(format!("unknown volume option {opt:?} (use ro or rw)")),
        _ => return Err("expected HOSTPATH:CTRPATH[:ro|:rw]".into()),
    };
    if !host.starts_with('/') {
        return Err(format!(
            "the host path {host:?} must be absolute (named volumes are not supported)"
        ));
    }
    check_container_path(container)?;
    Ok(VolumeSpec {
        host: host.into(),
        container: container.into(),
        read_only,
        create: true,
    })
}

/// `--tmpfs PATH[:OPTIONS]` (options comma-separated, as docker takes them).
pub fn parse_tmpfs(s: &str) -> Result<TmpfsSpec, String> {
    let (container, options) = s.split_once(':').unwrap_or((s, ""));
    check_container_path(container)?;
    Ok(TmpfsSpec {
        container: container.into(),
        options: tmpfs_options(options.split(',').filter(|o| !o.is_empty())),
    })
}

/// docker's tmpfs defaults (`nosuid,nodev,noexec`) with the user's options on top (`exec`,
/// `suid`, `dev` lift a default).
fn tmpfs_options<'a>(user: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = ["nosuid", "nodev", "noexec"].map(String::from).into();
    for o in user {
        match o {
            "exec" | "suid" | "dev" => out.retain(|d| d != &format!("no{o}")),
            other => out.push(other.into()),
        }
    }
    out
}

fn parse_bool(key: &str, v: Option<&str>) -> Result<bool, String> {
    match v {
        None | Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(other) => Err(format!("{key}={other:?}: expected true or false")),
    }
}

/// `--mount type=bind,source=S,target=T[,readonly]` or
/// `--mount type=tmpfs,target=T[,tmpfs-size=N][,tmpfs-mode=M]`.
pub fn parse_mount(s: &str) -> Result<MountSpec, String> {
    let (mut kind, mut source, mut target, mut read_only) = (None, None, None, false);
    let mut tmpfs = Vec::new();
    for field in s.split(',') {
        let (k, v) = match field.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (field, None),
        };
        let value = || v.ok_or_else(|| format!("--mount: {k} needs a value"));
        match k {
            "type" => kind = Some(value()?),
            "source" | "src" => source = Some(value()?),
            "target" | "destination" | "dst" => target = Some(value()?),
            "readonly" | "ro" => read_only = parse_bool(k, v)?,
            "tmpfs-size" => tmpfs.push(format!("size={}", value()?)),
            "tmpfs-mode" => tmpfs.push(format!("mode={}", value()?)),
            other => return Err(format!("--mount: unsupported field {other:?}")),
        }
    }
    let target = target.ok_or("--mount: target is missing")?;
    check_container_path(target)?;
    match kind {
        Some("bind") => {
            let source = source.ok_or("--mount: source is missing")?;
            if !source.starts_with('/') {
                return Err(format!("--mount: source {source:?} must be absolute"));
            }
            if !tmpfs.is_empty() {
                return Err("--mount: tmpfs options need type=tmpfs".into());
            }
            Ok(MountSpec::Bind(VolumeSpec {
                host: source.into(),
                container: target.into(),
                read_only,
                create: false,
            }))
        }
        Some("tmpfs") => {
            if source.is_some() {
                return Err("--mount: a tmpfs has no source".into());
            }
            if read_only {
                tmpfs.push("ro".into());
            }
            Ok(MountSpec::Tmpfs(TmpfsSpec {
                container: target.into(),
                options: tmpfs_options(tmpfs.iter().map(String::as_str)),
            }))
        }
        Some(other) => Err(format!(
            "--mount: type {other:?} is not supported (bind or tmpfs)"
        )),
        None => Err("--mount: type is missing (bind or tmpfs)".into()),
    }
}

/// docker's HOSTPATH handling: a missing `-v` source is created (owned by the container's root,
/// so the container can write it); a missing `--mount` source is an error; only directories
/// can be shared.
fn prepare_host_dir(v: &VolumeSpec) -> Result<()> {
    if !v.host.exists() {
        if !v.create {
            bail!("bind source path {} does not exist", v.host.display());
        }
        std::fs::create_dir_all(&v.host)
            .with_context(|| format!("create the volume {}", v.host.display()))?;
        chown(&v.host, Some(SHARE_ID_BASE), Some(SHARE_ID_BASE))
            .with_context(|| format!("give {} to the container's root", v.host.display()))?;
    }
    let md = std::fs::metadata(&v.host).with_context(|| format!("volume {}", v.host.display()))?;
    if !md.is_dir() {
        bail!(
            "volume {}: only directories can be shared (virtio-fs)",
            v.host.display()
        );
    }
    Ok(())
}

/// A shared host directory and whether it is read-only.
pub type Share = (PathBuf, bool);

/// The run's shared directories and container mounts, in the order given, the host
/// directories prepared.
pub fn plan(binds: &[VolumeSpec], tmpfs: &[TmpfsSpec]) -> Result<(Vec<Share>, Vec<PlannedMount>)> {
    let mut shares = Vec::new();
    let mut mounts = Vec::new();
    for v in binds {
        prepare_host_dir(v)?;
        mounts.push(PlannedMount::Share {
            index: shares.len(),
            container: v.container.clone(),
            read_only: v.read_only,
        });
        shares.push((v.host.clone(), v.read_only));
    }
    for t in tmpfs {
        mounts.push(PlannedMount::Tmpfs {
            container: t.container.clone(),
            options: t.options.clone(),
        });
    }
    Ok((shares, mounts))
}

/// The container mount for a planned one.
pub fn container_mount(m: &PlannedMount) -> sandbox::Mount {
    match m {
        PlannedMount::Share {
            index,
            container,
            read_only,
        } => sandbox::Mount {
            source: sandbox::share::guest_path(*index),
            destination: container.clone(),
            fstype: "bind".into(),
            options: if *read_only {
                vec!["rbind".into(), "ro".into()]
            } else {
                vec!["rbind".into()]
            },
        },
        PlannedMount::Tmpfs { container, options } => sandbox::Mount {
            source: "tmpfs".into(),
            destination: container.clone(),
            fstype: "tmpfs".into(),
            options: options.clone(),
        },
    }
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
                read_only: true,
                create: true,
            }
        );
        assert!(!parse("/a:/b").unwrap().read_only);
        assert!(!parse("/a:/b:rw").unwrap().read_only);
        assert!(parse("rel:/b").is_err());
        assert!(parse("/a:b").is_err());
        assert!(parse("/a:/b:rx").is_err());
        assert!(parse("/a:/").is_err());
        assert!(parse("/a:/x/../y").is_err());
        assert!(parse("/a").is_err());
    }

    #[test]
    fn mount_arguments() {
        assert_eq!(
            parse_mount("type=bind,source=/h,target=/c,readonly").unwrap(),
            MountSpec::Bind(VolumeSpec {
                host: "/h".into(),
                container: "/c".into(),
                read_only: true,
                create: false,
            })
        );
        let MountSpec::Bind(b) = parse_mount("type=bind,src=/h,dst=/c,ro=false").unwrap() else {
            panic!("not a bind");
        };
        assert!(!b.read_only);
        assert_eq!(
            parse_mount("type=tmpfs,target=/t,tmpfs-size=1m").unwrap(),
            MountSpec::Tmpfs(TmpfsSpec {
                container: "/t".into(),
                options: vec![
                    "nosuid".into(),
                    "nodev".into(),
                    "noexec".into(),
                    "size=1m".into()
                ],
            })
        );
        assert!(parse_mount("type=volume,source=x,target=/c").is_err());
        assert!(parse_mount("type=bind,source=rel,target=/c").is_err());
        assert!(parse_mount("type=bind,target=/c").is_err());
        assert!(parse_mount("type=bind,source=/h").is_err());
        assert!(parse_mount("type=bind,source=/h,target=/c,bogus=1").is_err());
        assert!(parse_mount("type=tmpfs,source=/h,target=/c").is_err());
    }

    #[test]
    fn tmpfs_arguments() {
        let t = parse_tmpfs("/run").unwrap();
        assert_eq!(t.options, ["nosuid", "nodev", "noexec"]);
        let t = parse_tmpfs("/run:exec,size=64k").unwrap();
        assert_eq!(t.options, ["nosuid", "nodev", "size=64k"]);
        assert!(parse_tmpfs("run").is_err());
        assert!(parse_tmpfs("/").is_err());
    }

    #[test]
    fn missing_sources() {
        let t = tempfile::tempdir().unwrap();
        let made = t.path().join("a/b");
        let v = parse(&format!("{}:/c", made.display())).unwrap();
        plan(&[v], &[]).unwrap();
        let md = std::fs::metadata(&made).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(md.is_dir());
        if nix_is_root() {
            assert_eq!((md.uid(), md.gid()), (SHARE_ID_BASE, SHARE_ID_BASE));
        }
        let MountSpec::Bind(m) = parse_mount(&format!(
            "type=bind,source={}/x,target=/c",
            t.path().display()
        ))
        .unwrap() else {
            panic!("not a bind");
        };
        let err = plan(&[m], &[]).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        assert!(!t.path().join("x").exists());
        let file = t.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let v = parse(&format!("{}:/c", file.display())).unwrap();
        assert!(plan(&[v], &[]).is_err(), "a file cannot be shared");
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn planned_mounts_become_container_mounts() {
        let m = container_mount(&PlannedMount::Share {
            index: 1,
            container: "/data".into(),
            read_only: true,
        });
        assert_eq!(m.source, "/run/shares/microvm/1");
        assert_eq!(m.fstype, "bind");
        assert!(m.options.contains(&"ro".to_string()));
        let m = container_mount(&PlannedMount::Tmpfs {
            container: "/t".into(),
            options: vec!["size=1m".into()],
        });
        assert_eq!((m.source.as_str(), m.fstype.as_str()), ("tmpfs", "tmpfs"));
    }
}
