//! The plan of the container's file system view, validated in the parent: the spec's mounts,
//! `/dev` nodes, masked and read-only paths, root propagation. `rootfs.rs` carries it out in
//! the child.

use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;
use nix::sys::stat::SFlag;
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount};

use crate::Error;

/// Parsed `mounts[].options`: flags to set, propagation changes, and the rest as file system
/// data (e.g. `mode=755`, `size=64m`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountOptions {
    pub flags: MsFlags,
    /// Propagation changes applied after the mount, in order (each with MS_REC when `r...`).
    pub propagation: Vec<MsFlags>,
    pub data: Vec<String>,
    /// `Some(recursive)` for `bind` / `rbind`.
    pub bind: Option<bool>,
}

/// Parses mount options the way `mount(8)` does: known flag names become `MS_*` flags (the
/// negative ones clear them), propagation names become propagation changes, everything else
/// is passed to the file system as data.
pub(crate) fn parse_mount_options(options: &[String]) -> Result<MountOptions, String> {
    let mut o = MountOptions {
        flags: MsFlags::empty(),
        propagation: Vec::new(),
        data: Vec::new(),
        bind: None,
    };
    for opt in options {
        let (set, clear) = match opt.as_str() {
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "silent" => (MsFlags::MS_SILENT, MsFlags::empty()),
            "loud" => (MsFlags::empty(), MsFlags::MS_SILENT),
            "bind" => {
                o.bind = Some(o.bind.unwrap_or(false));
                continue;
            }
            "rbind" => {
                o.bind = Some(true);
                continue;
            }
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                o.propagation
                    .push(propagation_flags(opt).expect("listed above"));
                continue;
            }
            "idmap" | "ridmap" | "rro" | "rrw" | "tmpcopyup" | "nosymfollow" | "symfollow" => {
                return Err(format!("mount option {opt:?} is not supported"))
            }
            _ => {
                o.data.push(opt.clone());
                continue;
            }
        };
        o.flags.insert(set);
        o.flags.remove(clear);
    }
    Ok(o)
}

/// `MS_*` propagation flags for `private`, `rshared`, ... (`r` adds MS_REC).
pub(crate) fn propagation_flags(name: &str) -> Option<MsFlags> {
    let (rec, base) = match name.strip_prefix('r') {
        Some(b @ ("private" | "shared" | "slave" | "unbindable")) => (MsFlags::MS_REC, b),
        _ => (MsFlags::empty(), name),
    };
    let flag = match base {
        "private" => MsFlags::MS_PRIVATE,
        "shared" => MsFlags::MS_SHARED,
        "slave" => MsFlags::MS_SLAVE,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        _ => return None,
    };
    Some(flag | rec)
}

/// What a mount entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MountKind {
    Bind {
        recursive: bool,
    },
    /// `cgroup` (or `cgroup2`): the container's cgroup v2 subtree, through its cgroup namespace.
    Cgroup2,
    /// Any other file system type: proc, sysfs, tmpfs, devpts, mqueue, ...
    Fs(String),
}

/// A validated mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountPlan {
    pub destination: PathBuf,
    pub source: Option<PathBuf>,
    pub kind: MountKind,
    pub options: MountOptions,
}

/// A device node to create under the container's `/dev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DevicePlan {
    pub path: PathBuf,
    pub kind: SFlag,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Everything about the container's file system view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RootfsPlan {
    pub mounts: Vec<MountPlan>,
    pub devices: Vec<DevicePlan>,
    pub masked_paths: Vec<PathBuf>,
    pub readonly_paths: Vec<PathBuf>,
    pub readonly_root: bool,
    /// Propagation applied to the whole tree before mounting (default rslave: the container's
    /// mounts never propagate back to the agent, the agent's later mounts may reach in).
    pub propagation: MsFlags,
    /// `rootfsPropagation: (r)shared`: made shared again after `pivot_root` (which needs a
    /// non-shared parent).
    pub shared_after_pivot: bool,
    /// A `devpts` is mounted at `/dev/pts`: `/dev/ptmx` links to it.
    pub has_devpts: bool,
}

/// The devices every container gets (OCI runtime spec, "Default Devices").
fn default_devices() -> Vec<DevicePlan> {
    [
        ("/dev/null", 1, 3),
        ("/dev/zero", 1, 5),
        ("/dev/full", 1, 7),
        ("/dev/random", 1, 8),
        ("/dev/urandom", 1, 9),
        ("/dev/tty", 5, 0),
    ]
    .into_iter()
    .map(|(path, major, minor)| DevicePlan {
        path: path.into(),
        kind: SFlag::S_IFCHR,
        major,
        minor,
        mode: 0o666,
        uid: 0,
        gid: 0,
    })
    .collect()
}

/// Validates one mount entry (`i` for the error text).
pub(crate) fn plan_mount(i: usize, m: &Mount) -> Result<MountPlan, Error> {
    let invalid = |msg: String| {
        Error::InvalidSpec(format!(
            "mounts[{i}] ({}): {msg}",
            m.destination().display()
        ))
    };
    let options = parse_mount_options(m.options().as_deref().unwrap_or_default()).map_err(|e| {
        Error::Unsupported(format!("mounts[{i}] ({}): {e}", m.destination().display()))
    })?;
    // Relative destinations are relative to the container's root (runtime-spec 1.1).
    let destination = Path::new("/").join(m.destination());
    if destination.components().any(|c| c == Component::ParentDir) {
        return Err(invalid("destination contains `..`".into()));
    }
    let typ = m.typ().as_deref().unwrap_or_default();
    let kind = if typ == "bind" || options.bind.is_some() {
        MountKind::Bind {
            recursive: options.bind.unwrap_or(false),
        }
    } else {
        match typ {
            "" | "none" => return Err(invalid("no type and no bind option".into())),
            "cgroup" | "cgroup2" => MountKind::Cgroup2,
            t => MountKind::Fs(t.to_string()),
        }
    };
    if let MountKind::Bind { .. } = kind {
        match m.source() {
            Some(s) if s.is_absolute() => {}
            Some(s) => {
                return Err(invalid(format!(
                    "bind source {} is not absolute (there is no bundle directory)",
                    s.display()
                )))
            }
            None => return Err(invalid("bind mount without a source".into())),
        }
    }
    Ok(MountPlan {
        destination,
        source: m.source().clone(),
        kind,
        options,
    })
}

/// Validates one `linux.devices` entry.
pub(crate) fn plan_device(i: usize, d: &LinuxDevice) -> Result<DevicePlan, Error> {
    let invalid = |msg: String| {
        Error::InvalidSpec(format!(
            "linux.devices[{i}] ({}): {msg}",
            d.path().display()
        ))
    };
    if !d.path().starts_with("/dev/") || d.path().components().any(|c| c == Component::ParentDir) {
        return Err(invalid("path must be under /dev/".into()));
    }
    let kind = match d.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        LinuxDeviceType::A => {
            return Err(invalid(
                "type `a` is only valid in resources.devices".into(),
            ))
        }
    };
    let (Ok(major), Ok(minor)) = (u64::try_from(d.major()), u64::try_from(d.minor())) else {
        return Err(invalid("negative major/minor".into()));
    };
    Ok(DevicePlan {
        path: d.path().clone(),
        kind,
        major,
        minor,
        mode: d.file_mode().unwrap_or(0o666) & 0o7777,
        uid: d.uid().unwrap_or(0),
        gid: d.gid().unwrap_or(0),
    })
}

/// Builds the file system plan from the spec's parts.
pub(crate) fn plan_rootfs(
    mounts: &[Mount],
    devices: &[LinuxDevice],
    masked: &[String],
    readonly: &[String],
    readonly_root: bool,
    propagation: Option<&str>,
) -> Result<RootfsPlan, Error> {
    let mounts = mounts
        .iter()
        .enumerate()
        .map(|(i, m)| plan_mount(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let mut all_devices = default_devices();
    for (i, d) in devices.iter().enumerate() {
        let d = plan_device(i, d)?;
        all_devices.retain(|x| x.path != d.path);
        all_devices.push(d);
    }
    let absolute = |field: &str, v: &[String]| -> Result<Vec<PathBuf>, Error> {
        v.iter()
            .map(|p| {
                let path = PathBuf::from(p);
                if path.is_absolute() {
                    Ok(path)
                } else {
                    Err(Error::InvalidSpec(format!(
                        "linux.{field}: {p:?} is not absolute"
                    )))
                }
            })
            .collect()
    };
    let (propagation, shared_after_pivot) = match propagation.unwrap_or("") {
        "" => (MsFlags::MS_SLAVE | MsFlags::MS_REC, false),
        "shared" | "rshared" => (MsFlags::MS_SLAVE | MsFlags::MS_REC, true),
        p => match propagation_flags(p) {
            Some(f) => (f | MsFlags::MS_REC, false),
            None => {
                return Err(Error::InvalidSpec(format!(
                    "linux.rootfsPropagation {p:?}: want (r)private, (r)slave, (r)shared or (r)unbindable"
                )))
            }
        },
    };
    let has_devpts = mounts.iter().any(|m| {
        m.kind == MountKind::Fs("devpts".into()) && m.destination == Path::new("/dev/pts")
    });
    Ok(RootfsPlan {
        mounts,
        devices: all_devices,
        masked_paths: absolute("maskedPaths", masked)?,
        readonly_paths: absolute("readonlyPaths", readonly)?,
        readonly_root,
        propagation,
        shared_after_pivot,
        has_devpts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[&str]) -> Result<MountOptions, String> {
        parse_mount_options(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn mount_options_become_flags_propagation_and_data() {
        let o = opts(&[
            "nosuid",
            "noexec",
            "mode=755",
            "size=65536k",
            "ro",
            "rprivate",
        ])
        .unwrap();
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY
        );
        assert_eq!(o.data, vec!["mode=755", "size=65536k"]);
        assert_eq!(o.propagation, vec![MsFlags::MS_PRIVATE | MsFlags::MS_REC]);
        assert_eq!(o.bind, None);

        let o = opts(&["ro", "rw", "rbind", "nodev", "dev"]).unwrap();
        assert_eq!(o.flags, MsFlags::empty());
        assert_eq!(o.bind, Some(true));
        assert_eq!(opts(&["bind"]).unwrap().bind, Some(false));
        assert_eq!(opts(&["bind", "rbind"]).unwrap().bind, Some(true));

        let o = opts(&["newinstance", "ptmxmode=0666", "gid=5"]).unwrap();
        assert_eq!(o.data.join(","), "newinstance,ptmxmode=0666,gid=5");

        assert!(opts(&["idmap"]).unwrap_err().contains("idmap"));
    }

    #[test]
    fn propagation_names() {
        assert_eq!(propagation_flags("slave"), Some(MsFlags::MS_SLAVE));
        assert_eq!(
            propagation_flags("rshared"),
            Some(MsFlags::MS_SHARED | MsFlags::MS_REC)
        );
        assert_eq!(
            propagation_flags("runbindable"),
            Some(MsFlags::MS_UNBINDABLE | MsFlags::MS_REC)
        );
        assert_eq!(propagation_flags("rw"), None);
    }

    #[test]
    fn default_spec_mounts_are_planned() {
        let spec = oci_spec::runtime::Spec::default();
        let linux = spec.linux().as_ref().unwrap();
        let plan = plan_rootfs(
            spec.mounts().as_deref().unwrap(),
            &[],
            linux.masked_paths().as_deref().unwrap(),
            linux.readonly_paths().as_deref().unwrap(),
            true,
            None,
        )
        .unwrap();
        assert!(plan.has_devpts);
        assert_eq!(plan.propagation, MsFlags::MS_SLAVE | MsFlags::MS_REC);
        let kinds: Vec<_> = plan.mounts.iter().map(|m| m.kind.clone()).collect();
        assert!(kinds.contains(&MountKind::Fs("proc".into())));
        assert!(kinds.contains(&MountKind::Cgroup2));
        assert_eq!(plan.devices.len(), 6);
    }

    #[test]
    fn bad_mounts_are_rejected() {
        let bind_relative: Mount = serde_json::from_str(
            r#"{"destination":"/data","type":"bind","source":"data","options":["rbind"]}"#,
        )
        .unwrap();
        let e = plan_mount(3, &bind_relative).unwrap_err().to_string();
        assert!(
            e.contains("mounts[3] (/data)") && e.contains("not absolute"),
            "{e}"
        );

        let no_type: Mount = serde_json::from_str(r#"{"destination":"/x"}"#).unwrap();
        assert!(plan_mount(0, &no_type).is_err());

        let escape: Mount =
            serde_json::from_str(r#"{"destination":"/a/../../b","type":"tmpfs"}"#).unwrap();
        assert!(plan_mount(0, &escape).is_err());

        let bind: Mount = serde_json::from_str(
            r#"{"destination":"etc/hosts","type":"none","source":"/etc/hosts","options":["bind","ro"]}"#,
        )
        .unwrap();
        let p = plan_mount(0, &bind).unwrap();
        assert_eq!(p.kind, MountKind::Bind { recursive: false });
        assert_eq!(p.destination, Path::new("/etc/hosts"));
        assert_eq!(p.options.flags, MsFlags::MS_RDONLY);
    }

    #[test]
    fn devices_are_validated() {
        let d: LinuxDevice = serde_json::from_str(
            r#"{"path":"/dev/fuse","type":"c","major":10,"minor":229,"fileMode":8630}"#,
        )
        .unwrap();
        let p = plan_device(0, &d).unwrap();
        assert_eq!((p.major, p.minor, p.mode), (10, 229, 0o666));
        let outside: LinuxDevice =
            serde_json::from_str(r#"{"path":"/etc/x","type":"c","major":1,"minor":3}"#).unwrap();
        assert!(plan_device(0, &outside).is_err());
    }
}
