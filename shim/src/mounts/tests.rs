//! Pod volumes on the host: sources opened without links, entries attached and detached, the
//! share's propagation into a slave namespace (virtiofsd's), the spec rewritten in place.
//! Mounting needs root: without it the tests say so and pass vacuously.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use super::host::{self, Kind};
use super::*;

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("not root: mounts are not tested here");
    }
    root
}

fn refused(path: &str) -> String {
    host::open_source(path).unwrap_err().to_string()
}

#[test]
fn sources_are_opened_without_following_links() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fs::create_dir(d.join("vol")).unwrap();
    fs::write(d.join("vol/hosts"), "x").unwrap();
    // A link planted under a directory the spec names, to /etc (where shadow is).
    std::os::unix::fs::symlink("/etc", d.join("vol/etc")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", d.join("vol/shadow")).unwrap();
    let s = |p: &str| d.join(p).to_str().unwrap().to_string();

    assert_eq!(host::open_source(&s("vol")).unwrap().kind, Kind::Directory);
    assert_eq!(host::open_source(&s("vol/hosts")).unwrap().kind, Kind::File);
    let e = refused(&s("vol/etc"));
    assert!(e.contains("symbolic link"), "{e}");
    let e = refused(&format!("{}/shadow", s("vol/etc")));
    assert!(e.contains("symbolic link"), "{e}");
    let e = refused(&s("vol/shadow"));
    assert!(e.contains("symbolic link"), "{e}");
    let e = refused(&format!("{}/../../etc", s("vol")));
    assert!(e.contains("`..`"), "{e}");
    assert!(refused("etc/hosts").contains("not an absolute path"));
    assert!(refused(&s("missing")).contains("does not exist"));
    // Magic links too.
    assert!(refused("/proc/self/root/etc").contains("symbolic link"));
    let sock = d.join("sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let e = refused(sock.to_str().unwrap());
    assert!(e.contains("only directories and regular files"), "{e}");
}

/// A process in a mount namespace that is a slave of ours, as virtiofsd's is.
struct SlaveNamespace(Child);

impl SlaveNamespace {
    fn start() -> Self {
        let mut cmd = Command::new("sleep");
        cmd.arg("1000").stdin(Stdio::null());
        // SAFETY: raw system calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_SLAVE,
                        std::ptr::null(),
                    ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        SlaveNamespace(cmd.spawn().unwrap())
    }

    /// `path` as the process sees it.
    fn path(&self, path: &Path) -> std::path::PathBuf {
        Path::new(&format!("/proc/{}/root", self.0.id())).join(path.strip_prefix("/").unwrap())
    }
}

impl Drop for SlaveNamespace {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A new tmpfs on the new directory `dir` with one file in it.
fn tmpfs_with(dir: &Path, file: &str, text: &str) -> std::path::PathBuf {
    fs::create_dir(dir).unwrap();
    let flags = rustix::mount::MountFlags::empty();
    rustix::mount::mount("tmpfs", dir, "tmpfs", flags, None).unwrap();
    fs::write(dir.join(file), text).unwrap();
    dir.to_path_buf()
}

fn bind(dest: &str, source: &Path, options: &[&str]) -> Value {
    json!({"destination": dest, "type": "bind", "source": source, "options": options})
}

#[test]
fn volumes_reach_the_share_live_and_go_away_cleanly() {
    if !root() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    fs::create_dir(&state).unwrap();
    let vol = t.path().join("vol");
    let ro = t.path().join("ro");
    let hosts = t.path().join("hosts");
    for d in [&vol, &ro] {
        fs::create_dir(d).unwrap();
    }
    fs::write(vol.join("a"), "from host").unwrap();
    fs::write(ro.join("b"), "read only").unwrap();
    fs::write(&hosts, "127.0.0.1 pod\n").unwrap();
    // The ro volume is a shared mount on the host (as under systemd), so later host mounts
    // beneath it can reach an `rslave` clone.
    rustix::mount::mount_bind(&ro, &ro).unwrap();
    rustix::mount::mount_change(&ro, rustix::mount::MountPropagationFlags::PRIVATE).unwrap();
    rustix::mount::mount_change(&ro, rustix::mount::MountPropagationFlags::SHARED).unwrap();
    // A submount under the ro volume: covered by rbind (and read-only with it).
    let sub = tmpfs_with(&ro.join("sub"), "c", "in a submount");

    let mut share = PodShare::create(&state).unwrap();
    let daemon = SlaveNamespace::start();
    let mut spec = json!({"mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        bind("/data", &vol, &["rbind", "rprivate", "rw"]),
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        bind("/etc/hosts", &hosts, &["bind"]),
        bind("/ro", &ro, &["rbind", "ro", "rslave"]),
    ]});
    let binds = open_binds(&spec).unwrap();
    assert_eq!(binds.len(), 3);
    share.attach("c1", &mut spec, binds).unwrap();

    // The spec keeps its order; bind sources are the entries' guest paths, propagation gone.
    let m = spec["mounts"].as_array().unwrap();
    let dests: Vec<&str> = m
        .iter()
        .map(|m| m["destination"].as_str().unwrap())
        .collect();
    assert_eq!(dests, ["/proc", "/data", "/dev", "/etc/hosts", "/ro"]);
    assert_eq!(m[1]["source"], "/run/shares/microvm/0");
    assert_eq!(m[1]["options"], json!(["rbind", "rw"]));
    assert_eq!(m[3]["source"], "/run/shares/microvm/1");
    assert_eq!(m[4]["source"], "/run/shares/microvm/2");
    assert_eq!(m[4]["options"], json!(["rbind", "ro"]));
    assert_eq!(m[0]["source"], "proc");

    let root = sandbox::share::share_root(&state);
    // Seen in the slave namespace (virtiofsd's view), attached after it was made.
    let seen = |p: &str| fs::read_to_string(daemon.path(&root.join(p)));
    assert_eq!(seen("0/a").unwrap(), "from host");
    assert_eq!(seen("1").unwrap(), "127.0.0.1 pod\n");
    assert_eq!(seen("2/b").unwrap(), "read only");
    assert_eq!(seen("2/sub/c").unwrap(), "in a submount");
    // Live both ways; read-only where asked, submounts included.
    fs::write(vol.join("later"), "1").unwrap();
    assert_eq!(seen("0/later").unwrap(), "1");
    fs::write(daemon.path(&root.join("0/back")), "2").unwrap();
    assert_eq!(fs::read_to_string(vol.join("back")).unwrap(), "2");
    for p in ["2/new", "2/sub/new"] {
        let e = fs::write(daemon.path(&root.join(p)), "x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{p}");
    }
    // Host mounts under an `rslave` source arrive.
    tmpfs_with(&ro.join("late"), "d", "late");
    assert_eq!(seen("2/late/d").unwrap(), "late");

    // Delete: the entries go, in both namespaces; the host files stay.
    share.detach("c1");
    assert!(!root.join("0").exists() && !root.join("1").exists());
    assert!(seen("0/a").is_err());
    assert_eq!(fs::read_to_string(vol.join("a")).unwrap(), "from host");
    // The pod's end: a second container's entry is detached with the root, and removing the
    // state directory leaves the volume's files alone.
    let mut spec2 = json!({"mounts": [bind("/v", &vol, &["rbind"])]});
    let binds = open_binds(&spec2).unwrap();
    share.attach("c2", &mut spec2, binds).unwrap();
    assert_eq!(spec2["mounts"][0]["source"], "/run/shares/microvm/3");
    remove_state_dir(&state);
    assert!(!state.exists());
    assert_eq!(fs::read_to_string(vol.join("a")).unwrap(), "from host");
    assert_eq!(fs::read_to_string(sub.join("c")).unwrap(), "in a submount");
    rustix::mount::unmount(&ro, rustix::mount::UnmountFlags::DETACH).unwrap();
}

#[test]
fn a_refused_source_refuses_the_whole_spec() {
    let t = tempfile::tempdir().unwrap();
    let ok = t.path().join("ok");
    fs::create_dir(&ok).unwrap();
    std::os::unix::fs::symlink("/etc", t.path().join("link")).unwrap();
    let spec = json!({"mounts": [
        bind("/ok", &ok, &["rbind"]),
        bind("/bad", &t.path().join("link"), &["rbind"]),
    ]});
    let e = open_binds(&spec).unwrap_err().to_string();
    assert!(e.contains("link") && e.contains("symbolic link"), "{e}");
    let spec = json!({"mounts": [{"destination": "/x", "type": "bind"}]});
    let e = open_binds(&spec).unwrap_err().to_string();
    assert!(e.contains("without a source"), "{e}");
    // No share: binds are refused, a spec without any is fine.
    let spec = json!({"mounts": [bind("/ok", &ok, &["rbind"])]});
    let e = refuse_without_share(&open_binds(&spec).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("virtiofsd"), "{e}");
    refuse_without_share(&open_binds(&json!({"mounts": []})).unwrap()).unwrap();
}
