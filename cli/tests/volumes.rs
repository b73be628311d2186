//! End-to-end tests of `microvm run -v`, `--mount` and `--tmpfs`: host directories shared live
//! through virtio-fs (one confined virtiofsd per VM), with a guest that tries what a hostile
//! one would from inside a container: writes through symlinks planted on either side, `..`,
//! device nodes, setuid bits, a huge sparse file, writes to a read-only share.
//!
//! Same harness as tests/run.rs (the real `microvm`, kernel and agent; relayed into the testbed
//! where this host cannot boot guests). Needs virtiofsd (`cargo xtask virtiofsd`, or
//! `MICROVM_VIRTIOFSD`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::ExitCode;

mod common;

use common::*;

/// Host id of the container's root on shared files (`sandbox::share::SHARE_ID_BASE`).
const SHARE_ROOT_ID: u32 = 1_000_000_000;

fn main() -> ExitCode {
    let args = match common::prepare() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let trials = vec![
        trial("volumes_live_both_ways_and_hostile_guest", live_and_hostile),
        trial("volumes_mount_and_tmpfs_flags", mount_and_tmpfs),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

/// `microvm exec vol sh -c SCRIPT`: (exit code, stdout).
fn exec(env: &Env, script: &str) -> (i32, String) {
    let o = env.microvm(&["exec", "vol", "sh", "-c", script], None);
    (o.code, o.stdout)
}

/// Every path under `dir` whose name starts with `prefix` (symlinks not followed).
fn find_named(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().starts_with(prefix) {
            out.push(p.display().to_string());
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            find_named(&p, prefix, out);
        }
    }
}

/// One detached run with three shares: `made` (missing, so `-v` creates it), `rw` (existing,
/// given to the container's root) and `ro`. While the container runs: writes cross both ways;
/// the read-only share refuses writes; escapes through symlinks and `..` land nowhere outside
/// the shares; device nodes and setuid-root files cannot be made; a 1 GiB sparse file stays
/// sparse. (The old copy-back fails the live checks: it wrote back only when the run ended, and
/// allocated sparse files in full.)
fn live_and_hostile(env: &Env) {
    let img = env.img.layout_str();
    let (made, rw, ro) = (env.dir.join("made"), env.dir.join("rw"), env.dir.join("ro"));
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("f"), "read-only-content\n").unwrap();
    std::fs::create_dir_all(&rw).unwrap();
    std::os::unix::fs::chown(&rw, Some(SHARE_ROOT_ID), Some(SHARE_ROOT_ID)).unwrap();
    // Planted on the host side: links out of the share, and a root-owned program.
    std::os::unix::fs::symlink("/etc", rw.join("etc-link")).unwrap();
    std::os::unix::fs::symlink("../../../../../../..", rw.join("up")).unwrap();
    std::fs::write(rw.join("rootfile"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(rw.join("rootfile"), std::fs::Permissions::from_mode(0o755)).unwrap();

    let v = |p: &Path, c: &str| format!("{}:{c}", p.display());
    let o = env.microvm(
        &[
            "run",
            "-d",
            "--name",
            "vol",
            "-v",
            &v(&made, "/made"),
            "-v",
            &v(&rw, "/rw"),
            "-v",
            &v(&ro, "/ro:ro"),
            img,
            "sh",
            "-c",
            "while true; do sleep 1; done",
        ],
        None,
    );
    assert_eq!(o.code, 0, "{o:?}");
    let md = std::fs::metadata(&made).unwrap();
    assert!(md.is_dir(), "-v creates a missing HOSTPATH");
    assert_eq!((md.uid(), md.gid()), (SHARE_ROOT_ID, SHARE_ROOT_ID));

    // Live, both ways, while the container runs.
    std::fs::write(rw.join("h2g"), "host-to-guest\n").unwrap();
    assert_eq!(exec(env, "cat /rw/h2g"), (0, "host-to-guest\n".into()));
    assert_eq!(
        exec(env, "echo guest-to-host > /rw/g2h; echo m > /made/m").0,
        0
    );
    assert_eq!(
        std::fs::read_to_string(rw.join("g2h")).unwrap(),
        "guest-to-host\n"
    );
    let g2h = std::fs::metadata(rw.join("g2h")).unwrap();
    assert_eq!(
        g2h.uid(),
        SHARE_ROOT_ID,
        "the container's root is not host root"
    );
    assert_eq!(std::fs::read_to_string(made.join("m")).unwrap(), "m\n");
    // Same length: a size the guest cached (for up to virtiofsd's 1 s attribute timeout) does
    // not cut the new content short; the content itself is re-read at open.
    std::fs::write(rw.join("h2g"), "HOST-TO-GUEST\n").unwrap();
    assert_eq!(exec(env, "cat /rw/h2g"), (0, "HOST-TO-GUEST\n".into()));
    assert_eq!(exec(env, "rm /rw/h2g").0, 0);
    assert!(
        !rw.join("h2g").exists(),
        "a deletion in the guest reaches the host"
    );

    // Read-only: refused, also after a remount attempt.
    assert_eq!(exec(env, "cat /ro/f"), (0, "read-only-content\n".into()));
    assert_ne!(exec(env, "echo x > /ro/x").0, 0);
    assert_ne!(
        exec(env, "mount -o remount,rw /ro 2>/dev/null; echo x > /ro/x").0,
        0
    );
    assert_ne!(exec(env, "echo y >> /ro/f").0, 0);
    assert!(!ro.join("x").exists());
    assert_eq!(
        std::fs::read_to_string(ro.join("f")).unwrap(),
        "read-only-content\n"
    );

    // Escapes: through the host's planted links, links the guest plants, `..`.
    exec(
        env,
        "echo pwned > /rw/etc-link/mvescape-1; echo pwned > /rw/up/mvescape-2; \
         mkdir -p /rw/d; ln -s /etc /rw/d/l; echo pwned > /rw/d/l/mvescape-3; \
         ln -s ../../../../.. /rw/d/u; echo pwned > /rw/d/u/mvescape-4; \
         echo pwned > /rw/../mvescape-5; ln /rw/etc-link/passwd /rw/hard; true",
    );
    let mut found = Vec::new();
    for dir in [Path::new("/etc"), Path::new("/"), Path::new("/tmp")] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("mvescape") {
                    found.push(e.path().display().to_string());
                }
            }
        }
    }
    find_named(&env.dir, "mvescape", &mut found);
    assert!(found.is_empty(), "written outside the shares: {found:?}");
    assert!(
        !rw.join("hard").exists(),
        "a hard link to a file outside the share"
    );

    // No device node, no setuid-root file.
    assert_ne!(exec(env, "mknod /rw/null c 1 3").0, 0);
    assert!(std::fs::symlink_metadata(rw.join("null")).is_err());
    assert_ne!(exec(env, "chmod u+s /rw/rootfile").0, 0);
    assert_eq!(
        std::fs::metadata(rw.join("rootfile")).unwrap().mode() & 0o7777,
        0o755
    );
    exec(
        env,
        "echo x > /rw/mine; chown 0:0 /rw/mine; chmod 4755 /rw/mine; true",
    );
    let mine = std::fs::metadata(rw.join("mine")).unwrap();
    assert_ne!(mine.uid(), 0, "a guest-made file owned by host root");

    // Sparse stays sparse.
    assert_eq!(
        exec(
            env,
            "truncate -s 1073741823 /rw/sparse && printf x >> /rw/sparse && stat -c %s /rw/sparse"
        ),
        (0, "1073741824\n".into())
    );
    let sparse = std::fs::metadata(rw.join("sparse")).unwrap();
    assert_eq!(sparse.len(), 1 << 30);
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "a sparse file allocated {} bytes on the host",
        sparse.blocks() * 512
    );

    let o = env.microvm(&["rm", "-f", "vol"], None);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(
        std::fs::read_to_string(rw.join("g2h")).unwrap(),
        "guest-to-host\n",
        "the host's files stay as the guest left them"
    );
}

/// `--mount type=bind,...,readonly`, `--tmpfs PATH:OPTS`, `--mount type=tmpfs`, and docker's
/// refusal of a missing `--mount` source (nothing created).
fn mount_and_tmpfs(env: &Env) {
    let img = env.img.layout_str();
    let src = env.dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), "bound\n").unwrap();
    let missing = env.dir.join("missing");
    let o = env.microvm(
        &[
            "run",
            "--rm",
            "--mount",
            &format!("type=bind,source={},target=/m", missing.display()),
            img,
            "true",
        ],
        None,
    );
    assert_eq!(o.code, 125, "{o:?}");
    assert!(o.stderr.contains("does not exist"), "{o:?}");
    assert!(!missing.exists());

    let script = "cat /m/f; if echo x > /m/y 2>/dev/null; then echo M-WRITABLE; fi; \
        grep -E ' /(t|u) ' /proc/mounts | cut -d' ' -f2-4; echo t > /t/f && cat /t/f";
    let o = env.microvm(
        &[
            "run",
            "--rm",
            "--mount",
            &format!("type=bind,source={},target=/m,readonly", src.display()),
            "--tmpfs",
            "/t:size=1m,exec",
            "--mount",
            "type=tmpfs,target=/u,tmpfs-size=65536",
            img,
            "sh",
            "-c",
            script,
        ],
        None,
    );
    assert_eq!(o.code, 0, "{o:?}");
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines[0], "bound", "{o:?}");
    assert!(!o.stdout.contains("M-WRITABLE"), "{o:?}");
    let t = lines
        .iter()
        .find(|l| l.starts_with("/t "))
        .expect("/t mounted");
    assert!(t.starts_with("/t tmpfs rw,nosuid,nodev"), "{t}");
    assert!(!t.contains("noexec") && t.contains("size=1024k"), "{t}");
    let u = lines
        .iter()
        .find(|l| l.starts_with("/u "))
        .expect("/u mounted");
    assert!(u.contains("noexec") && u.contains("size=64k"), "{u}");
    assert_eq!(lines.last(), Some(&"t"), "{o:?}");
    assert!(!src.join("y").exists());
}
