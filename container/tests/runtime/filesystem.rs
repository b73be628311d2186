//! The root file system: read-only root, masked paths, and paths resolved beneath the root.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use container::Error;
use libtest_mimic::Failed;
use oci_spec::runtime::{LinuxDevice, RootBuilder};

use crate::support::*;

pub fn readonly_root() -> Result<(), Failed> {
    let mut s = spec(&[
        "sh",
        "-c",
        "touch /should-not-exist; echo rc=$?; touch /dev/shm/ok && echo tmpfs-ok",
    ]);
    s.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(true)
            .build()
            .unwrap(),
    ));
    let out = run("ro", s)?;
    expect_ok(&out)?;
    check(
        out.stdout.contains("rc=1") && out.stdout.contains("tmpfs-ok"),
        || format!("{out:?}"),
    )?;
    check(out.stderr.contains("Read-only file system"), || {
        format!("{out:?}")
    })?;
    check(!rootfs().join("should-not-exist").exists(), || {
        "the file was created".into()
    })
}

pub fn masked_path() -> Result<(), Failed> {
    let mut s = spec(&[
        "sh",
        "-c",
        "cat /etc/secret; echo end; ls /etc/secret.d | wc -l",
    ]);
    linux(&mut s, |l| {
        let mut masked = l.masked_paths().clone().unwrap_or_default();
        masked.push("/etc/secret".into());
        masked.push("/etc/secret.d".into());
        l.set_masked_paths(Some(masked));
    });
    let out = run("masked", s)?;
    expect_ok(&out)?;
    check(!out.stdout.contains("TOPSECRET"), || {
        format!("secret visible: {out:?}")
    })?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    check(lines == ["end", "0"], || format!("{out:?}"))
}

/// A directory outside every container root, standing for the agent's own files: a
/// `marker` file and an executable `escape` script. Removed on drop.
struct OutsideDir(tempfile::TempDir);

impl OutsideDir {
    fn new() -> Result<Self, Failed> {
        let dir = tempfile::Builder::new()
            .prefix("container-outside-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        fs::write(dir.path().join("marker"), "OUTSIDE-THE-ROOT\n").unwrap();
        let script = dir.path().join("escape");
        fs::write(&script, "#!/bin/sh\necho ESCAPED\n").unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// What is in it besides `marker` and `escape`: anything a container made there.
    fn strays(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "marker" && n != "escape")
            .collect();
        names.sort();
        names
    }
}

/// Starts `c` with piped output; a process that ran is waited for and its output returned
/// as the error (the test expected the start to fail).
fn start_expecting_failure(c: &mut container::Container) -> Result<Error, Failed> {
    let (stdio, read) = piped();
    match c.start(stdio) {
        Err(e) => Ok(e),
        Ok(spawned) => {
            let code = wait_exit(spawned.pid)?;
            let (stdout, stderr) = read();
            Err(format!("the container ran (exit {code}): {stdout:?} {stderr:?}").into())
        }
    }
}

/// runc's CVE-2024-21626: a cwd of `/proc/self/fd/N`, where N is a directory fd the agent
/// had open (close-on-exec, so still open until `execve`), put the workload outside its
/// root. The cwd is resolved inside the root without magic links, and the agent's fds are
/// closed before it is: the start fails at the cwd step.
pub fn cwd_through_a_leaked_fd() -> Result<(), Failed> {
    let outside = OutsideDir::new()?;
    let held = fs::File::open(outside.path()).map_err(|e| e.to_string())?;
    let mut s = spec(&["sh", "-c", "cat marker; pwd"]);
    process(&mut s, |p| {
        p.set_cwd(format!("/proc/self/fd/{}", held.as_raw_fd()).into());
    });
    let mut c = create("cwd-leak", s).map_err(|e| e.to_string())?;
    let result = start_expecting_failure(&mut c);
    c.destroy().map_err(|e| e.to_string())?;
    match result? {
        Error::Setup { step, message } => check(step == "cwd", || format!("{step}: {message}")),
        other => Err(format!("expected a cwd error: {other:?}").into()),
    }
}

/// The same leak through the executable: `/proc/self/fd/N/escape` named a script in a
/// directory the agent held open, and `execve` ran it. The agent's fds are closed before the
/// lookup: the executable is not found.
pub fn executable_through_a_leaked_fd() -> Result<(), Failed> {
    let outside = OutsideDir::new()?;
    let held = fs::File::open(outside.path()).map_err(|e| e.to_string())?;
    let exe = format!("/proc/self/fd/{}/escape", held.as_raw_fd());
    let mut c = create("exe-leak", spec(&[&exe])).map_err(|e| e.to_string())?;
    let result = start_expecting_failure(&mut c);
    c.destroy().map_err(|e| e.to_string())?;
    match result? {
        Error::ExecutableNotFound { path } => check(path == exe, || path),
        other => Err(format!("expected ExecutableNotFound: {other:?}").into()),
    }
}

/// An image whose symlinks aim at a host directory, absolutely and through `..` chains, for
/// a mount destination, a device node's directory and a masked path: each lands beneath the
/// root (at the host path's twin inside it), and nothing is made in the host directory.
pub fn image_symlinks_resolve_beneath_the_root() -> Result<(), Failed> {
    let outside = OutsideDir::new()?;
    let root = copy_of_rootfs().map_err(|e| format!("rootfs: {e}"))?;
    let result = symlinked_image_run(&root, outside.path());
    let _ = fs::remove_dir_all(&root);
    let out = result?;
    expect_ok(&out)?;
    check(outside.strays().is_empty(), || {
        format!("made outside the root: {:?}", outside.strays())
    })?;
    // Inside the container, the twin has the host directory's absolute path.
    let want = format!(
        "{}/vol tmpfs\nnode c 1:3\nmasked:\nmarker: inside\n",
        outside.path().display()
    );
    check(out.stdout == want, || format!("want {want:?}: {out:?}"))
}

fn symlinked_image_run(root: &Path, outside: &Path) -> Result<Output, Failed> {
    let up = "../".repeat(12);
    let rel = outside.strip_prefix("/").unwrap();
    // The host directory's twin inside the root, with a marker of its own.
    let twin = root.join(rel);
    fs::create_dir_all(&twin).unwrap();
    fs::write(twin.join("marker"), "inside\n").unwrap();
    fs::write(twin.join("secret"), "SECRET\n").unwrap();
    symlink(outside, root.join("mnt-link")).unwrap();
    symlink(format!("{up}{}", rel.display()), root.join("dev/sub")).unwrap();
    symlink(
        format!("/..{}/secret", outside.display()),
        root.join("etc/mask-me"),
    )
    .unwrap();

    let mut s = spec(&[
        "sh",
        "-c",
        "grep -o ' /[^ ]*/vol tmpfs' /proc/self/mounts | sed 's/^ //'; \
         stat -c 'node %F %t:%T' /dev/sub/node2 | sed 's/character special file/c/'; \
         echo masked:$(cat /etc/mask-me); \
         echo marker: $(cat /dev/sub/marker)",
    ]);
    // No tmpfs over /dev: the nodes go into the image's own /dev, where the symlink is.
    s.mounts_mut()
        .as_mut()
        .unwrap()
        .retain(|m| m.destination() != Path::new("/dev"));
    let tmpfs: oci_spec::runtime::Mount =
        serde_json::from_str(r#"{"destination":"/mnt-link/vol","type":"tmpfs","source":"tmpfs"}"#)
            .unwrap();
    s.mounts_mut().as_mut().unwrap().push(tmpfs);
    let nodes: Vec<LinuxDevice> = serde_json::from_str(
        r#"[{"path": "/dev/sub/node2", "type": "c", "major": 1, "minor": 3, "fileMode": 438}]"#,
    )
    .unwrap();
    linux(&mut s, |l| {
        l.set_devices(Some(nodes));
        let mut masked = l.masked_paths().clone().unwrap_or_default();
        masked.push("/etc/mask-me".into());
        l.set_masked_paths(Some(masked));
    });
    let mut c = create_with_root("symlinked", s, root.to_path_buf(), vec![])
        .map_err(|e| format!("create: {e}"))?;
    let out = run_in(&mut c);
    c.destroy().map_err(|e| format!("destroy: {e}"))?;
    out
}
