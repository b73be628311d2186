//! The daemon's confinement and the live share, with a real virtiofsd (root needed).

use super::*;

/// The virtiofsd to test with, if this runs as root and one is built; else says what is not
/// tested.
fn root_and_virtiofsd(what: &str) -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: {what} is not tested here");
        return None;
    }
    match crate::locate::virtiofsd() {
        Ok(b) => Some(b),
        Err(_) => {
            eprintln!("no virtiofsd built: {what} is not tested here");
            None
        }
    }
}

/// A temporary directory holding `host` (a directory to share) and `state` (a VM's state
/// directory), both made; the first item keeps them alive.
fn one_share_dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let host = t.path().join("host");
    fs::create_dir(&host).unwrap();
    let state = t.path().join("state");
    fs::create_dir(&state).unwrap();
    (t, host, state)
}

/// The daemon starts confined and answers vhost-user: it runs in a user namespace with the
/// share's id map and in a mount namespace of its own. Needs root and a built virtiofsd
/// (`cargo xtask virtiofsd`); says so and passes vacuously otherwise.
#[test]
fn daemon_starts_confined_and_answers() {
    let Some(binary) = root_and_virtiofsd("the daemon's confinement") else {
        return;
    };
    let (_t, host, state) = one_share_dirs();
    let shares = [SharedDir {
        host: host.clone(),
        read_only: false,
    }];
    let d = Virtiofsd::spawn(&binary, &state, &shares, false, &Console::Inherit).unwrap();
    let pid = d.child.id();
    let uid_map = fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
    assert_eq!(
        uid_map.split_whitespace().collect::<Vec<_>>(),
        ["0", "1000000000", "65536"]
    );
    let ns = |p: &str| fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(ns(&pid.to_string()), ns("self"));
    // The VMM's frontend connects and negotiates (owner, features, protocol features, the
    // queue count).
    let dev = vmm::devices::virtio::fs::Fs::new(SHARE_TAG, &d.socket).unwrap();
    use vmm::devices::virtio::VirtioDevice;
    assert_ne!(
        dev.core().avail_features() & (1 << 32),
        0,
        "VIRTIO_F_VERSION_1"
    );
    assert_eq!(dev.core().device_type(), 26);
    // The serving process (virtiofsd's sandboxed child) sees only the share root as `/`,
    // runs as the mapped root, and has no CAP_MKNOD (27) nor CAP_SETFCAP (31).
    let kids = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let child = kids
        .split_whitespace()
        .next()
        .expect("virtiofsd's serving child");
    let mut root: Vec<_> = fs::read_dir(format!("/proc/{child}/root/"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    root.sort();
    assert_eq!(root, ["0"]);
    let status = fs::read_to_string(format!("/proc/{child}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(field("Uid:"), SHARE_ID_BASE.to_string());
    let caps = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
    assert_eq!(caps & (1 << 27 | 1 << 31), 0, "CapEff {caps:#x}");
    // The host's mount table is untouched: the share root is a plain directory here.
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(state.join("share").to_str().unwrap()));
}

/// A live share: directories mounted under the share root after the daemon started reach
/// its confined view (userns, its own mount namespaces, pivot_root). Root and a built
/// virtiofsd needed, as above.
#[test]
fn a_live_share_sees_later_mounts() {
    let Some(binary) = root_and_virtiofsd("the live share") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let host = t.path().join("host");
    fs::create_dir(&host).unwrap();
    fs::write(host.join("f"), "later").unwrap();
    let state = t.path().join("state");
    fs::create_dir(&state).unwrap();
    let root = share_root(&state);
    fs::create_dir(&root).unwrap();
    let c = |p: &Path| cstr(p).unwrap();
    let none = std::ptr::null::<libc::c_char>();
    /// Detaches the share root (and what is under it) however the test ends.
    struct Detach(CString);
    impl Drop for Detach {
        fn drop(&mut self) {
            // SAFETY: umount2 of this test's own mount point.
            unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
        }
    }
    // SAFETY: mount(2) on paths of this test's temporary directory.
    unsafe {
        for (src, flags) in [
            (c(&root).as_ptr(), libc::MS_BIND),
            (none, libc::MS_PRIVATE),
            (none, libc::MS_SHARED),
        ] {
            let r = libc::mount(src, c(&root).as_ptr(), none, flags, std::ptr::null());
            assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        }
    }
    let _detach = Detach(c(&root));
    assert!(Virtiofsd::spawn(
        &binary,
        &state,
        &[SharedDir {
            host: host.clone(),
            read_only: false
        }],
        true,
        &Console::Inherit
    )
    .is_err());
    let d = Virtiofsd::spawn(&binary, &state, &[], true, &Console::Inherit).unwrap();
    // Serving (its sandbox set up) once the frontend has negotiated.
    let _dev = vmm::devices::virtio::fs::Fs::new(SHARE_TAG, &d.socket).unwrap();
    let pid = d.child.id();
    let kids = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let child = kids.split_whitespace().next().expect("the serving child");
    fs::create_dir(root.join("0")).unwrap();
    // SAFETY: as above.
    let r = unsafe {
        libc::mount(
            c(&host).as_ptr(),
            c(&root.join("0")).as_ptr(),
            none,
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0);
    let seen = fs::read_to_string(format!("/proc/{child}/root/0/f"));
    assert_eq!(seen.unwrap(), "later");
}

#[test]
fn guest_layout() {
    assert_eq!(guest_path(2), "/run/shares/microvm/2");
    let m = guest_mount();
    assert_eq!(
        (m.source.as_str(), m.fstype.as_str()),
        (SHARE_TAG, "virtiofs")
    );
    assert!(guest_path(0).starts_with(&m.destination));
}

/// Under a strict umask (077) the share's root and mount points still come out 0755, and the
/// daemon, an unmapped id in its user namespace, still starts and answers. Runs itself again in
/// a child process, since the umask is the whole process's.
#[test]
fn share_layout_is_searchable_under_umask_077() {
    let Some(binary) = root_and_virtiofsd("the share layout's modes") else {
        return;
    };
    if !test_support::alone_in_process("share::tests::share_layout_is_searchable_under_umask_077") {
        return;
    }
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    let (_t, host, state) = one_share_dirs();
    let shares = [SharedDir {
        host,
        read_only: true,
    }];
    let d = Virtiofsd::spawn(&binary, &state, &shares, false, &Console::Inherit).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let root = share_root(&state);
    for dir in [root.clone(), root.join("0")] {
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "{} is {mode:o}", dir.display());
    }
    // The daemon got past its checks of the share root and serves.
    let dev = vmm::devices::virtio::fs::Fs::new(SHARE_TAG, &d.socket).unwrap();
    use vmm::devices::virtio::VirtioDevice;
    assert_eq!(dev.core().device_type(), 26);
}
