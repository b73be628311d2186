//! Tests that change what a whole process shares (its umask, or reaping any child with
//! `waitpid(-1)`) and so must not run beside other tests of the same binary.

use std::process::Command;

/// Set, to the test's path, in the re-run of [`alone_in_process`].
const ALONE: &str = "MICROVM_TEST_ALONE";

/// Call first in such a test, with its full path as `--exact` takes it (`module::tests::name`).
/// In the test binary's normal run this runs the binary again with only that test, asserts the
/// re-run passed and returns false: the caller then returns. In the re-run it returns true:
/// the caller does its work, alone in its process.
pub fn alone_in_process(test: &str) -> bool {
    if std::env::var_os(ALONE).is_some_and(|v| v == test) {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let status = Command::new(exe)
        .args(["--exact", test, "--test-threads=1"])
        .env(ALONE, test)
        .status()
        .expect("run the test binary again");
    assert!(
        status.success(),
        "{test}, run in a process of its own, failed: {status}"
    );
    false
}
