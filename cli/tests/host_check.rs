//! `microvm boot` on a host whose KVM cannot boot an unmodified guest: one clear line, non-zero
//! status, within a second, and nothing else attempted. On a host with hardware
//! virtualization, the same binary must not refuse.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn boot_refuses_or_proceeds_according_to_the_host() {
    let facts = vmm::host::HostFacts::probe();
    let kernel = tempfile::NamedTempFile::new().unwrap();
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_microvm"))
        .args(["boot", "--kernel"])
        .arg(kernel.path())
        .output()
        .unwrap();
    let elapsed = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if facts.check().is_err() {
        assert_eq!(out.status.code(), Some(1));
        assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
        assert_eq!(stderr.lines().count(), 1, "one line expected:\n{stderr}");
        assert!(
            stderr.contains("PVM without a PVM guest kernel"),
            "{stderr}"
        );
    } else {
        // Not refused for the host; it fails later, on the empty kernel file.
        assert!(!stderr.contains("PVM"), "{stderr}");
        assert!(stderr.contains("kernel"), "{stderr}");
    }
}

#[test]
fn force_skips_the_host_check_and_reports_the_real_problem() {
    let kernel = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_microvm"))
        .args(["boot", "--force", "--kernel"])
        .arg(kernel.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(!stderr.contains("PVM"), "{stderr}");
    assert!(stderr.contains("cannot load kernel"), "{stderr}");
}

#[test]
fn bad_arguments_are_refused_before_anything_runs() {
    for args in [
        &["boot", "--kernel", "/k", "--disk", "/d,rx"][..],
        &["boot", "--kernel", "/k", "--vsock", "2,/tmp/x"][..],
        &["boot", "--kernel", "/k", "--cpus", "nope"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_microvm"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

/// `microvm run` on a host that cannot boot guests: one line, status 125, before touching the
/// image (which does not exist here).
#[test]
fn run_refuses_on_a_host_that_cannot_boot_guests() {
    if vmm::host::check_can_boot_guests().is_ok() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_microvm"))
        .args(["run", "/nonexistent-image", "true"])
        .env("MICROVM_HOME", home.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected:\n{stderr}");
    assert!(
        stderr.contains("cannot run an unmodified guest"),
        "{stderr}"
    );
}

#[test]
fn run_usage_errors_are_125() {
    for args in [
        &["run"][..],
        &["run", "--memory", "lots", "img"][..],
        &["run", "-v", "relative:/x", "img"][..],
        &["run", "--cpus", "0", "img"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_microvm"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125), "{args:?}");
    }
}
