//! Containers created for real, as root, from a busybox root file system built here.
//!
//! The test process plays the guest agent: it is a child subreaper and one thread reaps every
//! child (`waitpid(-1)`), recording exit statuses that the tests wait for by pid.
//!
//! cgroup v2 is required. On a host without it at `/sys/fs/cgroup` (this project's development
//! machines have cgroup v1), the test binary re-runs itself, with the same arguments, inside the
//! testbed (an emulated host with cgroup2 mounted; see `testbed/`), all tests in one boot.

mod filesystem;
mod isolation;
mod lifecycle;
mod process;
mod support;

use std::fs;
use std::process::ExitCode;
use std::time::Instant;

use libtest_mimic::{Arguments, Failed, Trial};
use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};

use support::{cgroup_parent, rootfs, setup, CGROUP_ROOT_VAR, RELAY_ENV};

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let here = std::env::var_os(CGROUP_ROOT_VAR).is_some();
    if !args.list && !here && !testbed::in_testbed() && !cgroup2_at_sys_fs_cgroup() {
        return testbed::relay_current_exe(
            "container runtime tests",
            "/sys/fs/cgroup is not cgroup v2 here",
            RELAY_ENV,
        );
    }
    if !args.list && !nix::unistd::geteuid().is_root() {
        eprintln!("container runtime tests: must run as root");
        return ExitCode::from(1);
    }
    let trials = vec![
        trial(
            "pid_1_in_own_pid_namespace",
            isolation::pid_1_in_own_pid_namespace,
        ),
        trial("hostname_is_set", process::hostname_is_set),
        trial("user_uid_gid_and_additional_gids", process::user_ids),
        trial("env_cwd_umask_and_home", process::env_cwd_umask_home),
        trial("rlimits_apply", process::rlimits_apply),
        trial("readonly_root_refuses_writes", filesystem::readonly_root),
        trial("masked_path_is_unreadable", filesystem::masked_path),
        trial(
            "cwd_through_a_leaked_fd_is_refused",
            filesystem::cwd_through_a_leaked_fd,
        ),
        trial(
            "executable_through_a_leaked_fd_is_not_found",
            filesystem::executable_through_a_leaked_fd,
        ),
        trial(
            "image_symlinks_resolve_beneath_the_root",
            filesystem::image_symlinks_resolve_beneath_the_root,
        ),
        trial("exit_codes_0_1_and_137", lifecycle::exit_codes),
        trial(
            "missing_binary_is_a_precise_error",
            lifecycle::missing_binary,
        ),
        trial("bad_specs_give_precise_errors", lifecycle::bad_specs),
        trial("stdin_eof_ends_cat", process::stdin_eof),
        trial("tty_through_the_pty_master", process::tty),
        trial("exec_into_running_container", lifecycle::exec_into_running),
        trial("two_containers_side_by_side", lifecycle::two_containers),
        trial(
            "shared_pid_namespace_on_request",
            isolation::shared_pid_namespace,
        ),
        trial("memory_limit_oom_kill_is_observable", isolation::memory_oom),
        trial("pids_limit_is_enforced", isolation::pids_limit),
        trial("second_start_is_an_error", lifecycle::second_start),
        trial(
            "signal_to_exited_pid_is_no_such_process",
            lifecycle::signal_exited,
        ),
        trial("seccomp_errno_and_kill", process::seccomp),
        trial("caps_nnp_oom_score_and_sysctl", process::process_attributes),
        trial("device_rules_are_enforced", isolation::device_rules),
        trial(
            "namespace_holder_keeps_pod_namespaces",
            isolation::namespace_holder,
        ),
        trial(
            "loopback_is_up_in_new_network_namespaces",
            isolation::loopback_up,
        ),
    ];
    if args.list {
        return libtest_mimic::run(&args, trials).exit_code();
    }
    let started = Instant::now();
    if let Err(e) = setup() {
        eprintln!("container runtime tests: setup failed: {e}");
        return ExitCode::from(1);
    }
    let conclusion = libtest_mimic::run(&args, trials);
    let _ = fs::remove_dir(cgroup_parent());
    let _ = fs::remove_dir_all(rootfs());
    eprintln!(
        "container runtime tests: {:.1} s inside {}",
        started.elapsed().as_secs_f64(),
        if testbed::in_testbed() {
            "the testbed"
        } else {
            "this host"
        }
    );
    conclusion.exit_code()
}

fn trial(name: &'static str, f: fn() -> Result<(), Failed>) -> Trial {
    Trial::test(name, f)
}

fn cgroup2_at_sys_fs_cgroup() -> bool {
    statfs("/sys/fs/cgroup").is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC)
}
