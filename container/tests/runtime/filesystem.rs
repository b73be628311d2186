//! The root file system: read-only root, masked paths, and paths resolved beneath the root.

use crate::support::*;
use libtest_mimic::Failed;
use oci_spec::runtime::RootBuilder;

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
