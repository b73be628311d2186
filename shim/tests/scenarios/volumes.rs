//! A CRI-shaped pod's volumes, live through the pod's virtio-fs share: a hostPath directory
//! (both ways while the container runs), a hostPath file, a read-only hostPath, a configMap
//! directory laid out and updated as kubelet does (a `..data` symbolic link swapped), the
//! `/etc/hosts` and `/etc/resolv.conf` binds, the termination log; then hostile bind sources.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use super::cri::{run_cri_sandbox, run_detached};
use crate::common::{check, sh, text, wait_until, Containerd};

const NETNS: &str = "microvm-test-pod6";

/// kubelet's atomic writer: the files in a timestamped directory, `..data` renamed over to
/// point at it, each key a link through `..data`, the old directory removed.
fn write_config_map(dir: &Path, stamp: &str, value: &str) -> std::io::Result<()> {
    let data = dir.join(stamp);
    fs::create_dir(&data)?;
    fs::write(data.join("key"), value)?;
    let _ = fs::remove_file(dir.join("..data_tmp"));
    symlink(stamp, dir.join("..data_tmp"))?;
    let old = fs::read_link(dir.join("..data")).ok();
    fs::rename(dir.join("..data_tmp"), dir.join("..data"))?;
    if !dir.join("key").exists() {
        symlink("..data/key", dir.join("key"))?;
    }
    if let Some(old) = old {
        fs::remove_dir_all(dir.join(old))?;
    }
    Ok(())
}

fn mount_arg(src: &Path, dst: &str, mode: &str) -> [String; 2] {
    [
        "--mount".into(),
        format!(
            "type=bind,src={},dst={dst},options=rbind:{mode}",
            src.display()
        ),
    ]
}

/// Mount points beneath `dir` in the host's table.
fn mounts_beneath(dir: &Path) -> Vec<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = dir.to_str().unwrap();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(dir))
        .map(str::to_string)
        .collect()
}

pub fn pod_volumes(c: &Containerd) -> Result<(), String> {
    let h = c.dir.join("volumes");
    let hostile = c.dir.join("hostile");
    let add = sh(&format!("ip netns add {NETNS}"));
    check(add.status.success(), || {
        format!("ip netns add: {}", text(&add))
    })?;
    let r = (|| {
        let io = |e: std::io::Error| e.to_string();
        for d in ["host", "ro", "cm"] {
            fs::create_dir_all(h.join(d)).map_err(io)?;
        }
        // emptyDir-like: writable by the pod's users (the pod's uid 0 is host uid 1000000000).
        fs::set_permissions(h.join("host"), fs::Permissions::from_mode(0o777)).map_err(io)?;
        fs::write(h.join("host/from-host"), "host-1").map_err(io)?;
        fs::write(h.join("app.conf"), "conf-file").map_err(io)?;
        fs::write(h.join("ro/keep"), "ro-file").map_err(io)?;
        fs::write(h.join("hosts"), "10.88.0.9 volpod\n").map_err(io)?;
        fs::write(h.join("resolv.conf"), "nameserver 10.96.0.10\n").map_err(io)?;
        // kubelet creates the termination log 0666.
        fs::write(h.join("termination-log"), "").map_err(io)?;
        fs::set_permissions(h.join("termination-log"), fs::Permissions::from_mode(0o666))
            .map_err(io)?;
        write_config_map(&h.join("cm"), "..2026_12_07_00_00_00.000000001", "v1").map_err(io)?;

        let mut app = run_cri_sandbox(c, "pod6", NETNS)?;
        for (src, dst, mode) in [
            ("host", "/data", "rw"),
            ("app.conf", "/etc/app.conf", "ro"),
            ("ro", "/ro", "ro"),
            ("cm", "/config", "ro"),
            ("hosts", "/etc/hosts", "rw"),
            ("resolv.conf", "/etc/resolv.conf", "ro"),
            ("termination-log", "/dev/termination-log", "rw"),
        ] {
            app.extend(mount_arg(&h.join(src), dst, mode));
        }
        run_detached(c, "pod6-app", &app)?;
        let sh_in = |id: &str, script: &str| text(&c.exec_sh(id, "pod6-app", script));

        let got = sh_in(
            "r1",
            "cat /data/from-host /etc/app.conf /ro/keep /etc/hosts /etc/resolv.conf /config/key",
        );
        check(
            got == "host-1conf-filero-file10.88.0.9 volpod\nnameserver 10.96.0.10\nv1",
            || format!("the volumes as the container reads them: {got:?}"),
        )?;
        // Live both ways while the container runs.
        fs::write(h.join("host/later"), "host-2").map_err(io)?;
        wait_until("the host's new file in the container", 60, || {
            sh_in("r2", "cat /data/later 2>&1") == "host-2"
        })?;
        let w = sh_in("w1", "echo guest-1 > /data/from-guest && echo ok");
        check(w.trim() == "ok", || format!("write in /data: {w}"))?;
        let back = fs::read_to_string(h.join("host/from-guest")).map_err(io)?;
        check(back == "guest-1\n", || {
            format!("the container's write on the host: {back:?}")
        })?;
        // Read-only: refused in the container, and nothing lands on the host.
        let w = sh_in(
            "w2",
            "echo x > /ro/new 2>&1; echo x > /etc/app.conf 2>&1; echo end",
        );
        check(w.matches("Read-only file system").count() == 2, || {
            format!("writes to ro volumes: {w}")
        })?;
        check(!h.join("ro/new").exists(), || "/ro/new on the host".into())?;
        check(
            fs::read_to_string(h.join("app.conf")).map_err(io)? == "conf-file",
            || "app.conf changed".into(),
        )?;
        // The termination log, written by the container, read on the host.
        let w = sh_in(
            "w3",
            "echo 'exited: done' > /dev/termination-log && echo ok",
        );
        check(w.trim() == "ok", || {
            format!("write the termination log: {w}")
        })?;
        let log = fs::read_to_string(h.join("termination-log")).map_err(io)?;
        check(log == "exited: done\n", || {
            format!("termination log: {log:?}")
        })?;
        // kubelet's configMap update: the new value shows in the running container.
        write_config_map(&h.join("cm"), "..2026_12_07_00_05_00.000000002", "v2").map_err(io)?;
        wait_until("the configMap update in the container", 60, || {
            sh_in("r3", "cat /config/key 2>&1") == "v2"
        })?;
        // Nothing was mounted on or beneath the volumes' host paths.
        let over = mounts_beneath(&h);
        check(over.is_empty(), || {
            format!("mounts on host paths: {over:?}")
        })?;

        // Hostile sources, in the same pod: refused before anything is mounted.
        fs::create_dir_all(hostile.join("vol")).map_err(io)?;
        symlink("/etc", hostile.join("vol/etc")).map_err(io)?;
        let before = mounts_beneath(Path::new("/"));
        for (src, why) in [
            (hostile.join("vol/etc"), "symbolic link"),
            (hostile.join("vol/etc/shadow"), "symbolic link"),
            (hostile.join("vol/../../../etc"), "`..`"),
        ] {
            let mut args = super::cri::cri_annotations("pod6", "container");
            args.extend(mount_arg(&src, "/mnt", "rw"));
            args.insert(0, "--rm".into());
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = c.ctr(&c.run_args(&a, "pod6-evil", &["true"]));
            check(!out.status.success() && text(&out).contains(why), || {
                format!("{} must be refused ({why}): {}", src.display(), text(&out))
            })?;
            c.remove("pod6-evil");
        }
        let after = mounts_beneath(Path::new("/"));
        check(before == after, || {
            format!("the mount table changed:\n{before:?}\n{after:?}")
        })?;
        // The pod still works.
        let got = sh_in("r4", "cat /data/from-guest");
        check(got == "guest-1\n", || {
            format!("after the refusals: {got:?}")
        })
    })();
    for id in ["pod6-evil", "pod6-app", "pod6"] {
        c.remove(id);
    }
    let _ = sh(&format!("ip netns del {NETNS}"));
    r
}
