//! `microvm-vmm` given a config it must refuse: it exits non-zero with one clear line on stderr,
//! before any VM exists. On the host; no guest boots.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::process::{Command, Output, Stdio};

use command_fds::{CommandFdExt, FdMapping};

const VMM: &str = env!("CARGO_BIN_EXE_microvm-vmm");

/// Runs the VMM with `--config-fd 3` reading from a pipe that `feed` writes (from a thread, so
/// an endless feed cannot block the test).
fn with_piped_config(feed: impl FnOnce(std::io::PipeWriter) + Send + 'static) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    let mut cmd = Command::new(VMM);
    cmd.args(["--config-fd", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: OwnedFd::from(reader),
        child_fd: 3,
    }])
    .unwrap();
    let child = cmd.spawn().unwrap();
    // The parent's copy of the read end must go, or an endless feed never sees EPIPE.
    drop(cmd);
    let feeder = std::thread::spawn(move || feed(writer));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    out
}

fn with_config_file(json: &str) -> Output {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), json).unwrap();
    Command::new(VMM)
        .arg("--config")
        .arg(file.path())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Asserts status 1 and exactly one stderr line containing `says`; returns the line.
fn refused(out: &Output, says: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected:\n{stderr}");
    assert!(stderr.starts_with("microvm-vmm: "), "{stderr}");
    assert!(stderr.contains(says), "{says:?} expected in:\n{stderr}");
    assert!(out.stdout.is_empty(), "no console output expected");
    stderr
}

#[test]
fn an_unknown_field_is_refused() {
    let out = with_piped_config(|mut w| {
        w.write_all(br#"{"kernel": "/k", "cpus": 2}"#).unwrap();
    });
    refused(&out, "unknown field `cpus`");
}

#[test]
fn an_oversized_config_is_refused_without_reading_it_all() {
    // An endless stream: a reader without a cap would never return.
    let out = with_piped_config(|mut w| {
        let chunk = [b' '; 64 * 1024];
        while w.write_all(&chunk).is_ok() {}
    });
    refused(&out, "larger than 131072 bytes");
}

#[test]
fn a_missing_kernel_is_refused() {
    let config = serde_json::json!({
        "kernel": "/nonexistent/vmlinux",
        "vcpus": 1,
        "memory_mib": 64,
        "force": true,
    });
    let out = with_config_file(&config.to_string());
    refused(
        &out,
        "kernel /nonexistent/vmlinux does not exist or is not a file",
    );
}

#[test]
fn an_invalid_value_is_refused_with_its_field() {
    let out = with_config_file(r#"{"kernel": "vmlinux"}"#);
    refused(&out, "kernel must be an absolute path");
    let out = with_config_file(r#"{"kernel": "/k", "vcpus": 0}"#);
    refused(&out, "vcpus must be 1 to 32, not 0");
}

#[test]
fn a_descriptor_that_is_not_open_is_reported() {
    let out = Command::new(VMM)
        .args(["--config-fd", "57"])
        .output()
        .unwrap();
    refused(&out, "config descriptor 57 is not open");
}

#[test]
fn a_missing_config_file_is_reported() {
    let out = Command::new(VMM)
        .args(["--config", "/nonexistent/vm.json"])
        .output()
        .unwrap();
    refused(&out, "cannot open /nonexistent/vm.json");
}

#[test]
fn configuration_in_arguments_is_a_usage_error() {
    for args in [&["--kernel", "/k"][..], &[][..], &["--config-fd", "0"][..]] {
        let out = Command::new(VMM).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

/// On a PVM-only host the VMM refuses at once with the host line, unless the config's `force`
/// is set; then it gets as far as loading the (empty) kernel.
#[test]
fn the_host_check_follows_the_typed_force_field() {
    let kernel = tempfile::NamedTempFile::new().unwrap();
    let config = |force: bool| {
        serde_json::json!({ "kernel": kernel.path(), "memory_mib": 64, "force": force }).to_string()
    };
    let forced = with_config_file(&config(true));
    let line = refused(&forced, "");
    assert!(!line.contains("PVM"), "{line}");
    if std::path::Path::new("/dev/kvm").exists() {
        assert!(line.contains("cannot load kernel"), "{line}");
    }
    let plain = with_config_file(&config(false));
    if vmm::host::HostFacts::probe().check().is_err() {
        refused(&plain, "PVM without a PVM guest kernel");
    } else {
        let line = refused(&plain, "kernel");
        assert!(!line.contains("PVM"), "{line}");
    }
}
