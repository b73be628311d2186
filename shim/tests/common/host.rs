//! Host-side observations: VMM and shim processes.

/// Pids of the processes whose arguments (and whether it is a zombie) `pick` accepts.
fn pids_where(pick: impl Fn(&[&[u8]], bool) -> bool) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let zombie = std::fs::read_to_string(e.path().join("stat"))
            .unwrap_or_default()
            .contains(") Z ");
        if pick(&args, zombie) {
            pids.push(pid);
        }
    }
    pids
}

/// Pids of running VMMs (`microvm-vmm --config-fd 3`), one per VM: a jailed VMM is two
/// processes (the jail's supervisor and its child, PID 1 of the VM's PID namespace), and only
/// the one whose parent is not a VMM counts (a child left without its supervisor counts too).
pub fn vmm_pids() -> Vec<u32> {
    let vmms = pids_where(|args, zombie| !zombie && args[0].ends_with(b"microvm-vmm"));
    let parent = |pid: &u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(") ")?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    vmms.iter()
        .copied()
        .filter(|pid| !parent(pid).is_some_and(|p| vmms.contains(&p)))
        .collect()
}

/// Pids of shim processes (zombies included: containerd has not reaped them yet).
pub fn shim_pids() -> Vec<u32> {
    pids_where(|args, _| args[0].ends_with(b"containerd-shim-microvm-v2"))
}

/// Whether a running process has `arg` among its arguments.
pub fn processes_with_arg(arg: &str) -> bool {
    !pids_where(|args, zombie| !zombie && args.contains(&arg.as_bytes())).is_empty()
}

/// The shim's state (`/run/microvm-shim` and everything in it) and the shim sockets
/// (`/run/containerd/s/*`) that group or others could read or write: none should be. The one
/// exception is the pod's share root (`share`, 0755 behind the pod's 0700 directory): virtiofsd
/// reads it without privileges over root's files; it must not be writable.
pub fn state_open_to_others() -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut open = Vec::new();
    let mut check = |p: &std::path::Path| {
        if let Ok(m) = std::fs::symlink_metadata(p) {
            let mode = m.permissions().mode() & 0o777;
            let closed = match p.file_name().is_some_and(|n| n == "share") && m.is_dir() {
                true => 0o022,
                false => 0o077,
            };
            if mode & closed != 0 {
                open.push(format!("{} {mode:o}", p.display()));
            }
        }
    };
    let root = std::path::Path::new("/run/microvm-shim");
    check(root);
    let entries = |d: &std::path::Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(d)
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    for pod in entries(root) {
        check(&pod);
        entries(&pod).iter().for_each(|f| check(f));
    }
    entries(std::path::Path::new("/run/containerd/s"))
        .iter()
        .for_each(|f| check(f));
    open
}
