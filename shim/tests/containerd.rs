//! The shim driven by a real containerd (Debian's 1.6) through `ctr`, with real guests.
//!
//! A private containerd runs with its own root, state and socket in a short temporary
//! directory (on a tmpfs, so the overlayfs snapshotter works), with this crate's
//! `containerd-shim-microvm-v2` first on its PATH. A one-layer busybox image is built here as an
//! OCI archive and imported with `ctr images import`. Needs the VMM `microvm-vmm` (`cargo build
//! -p microvm-vmm`, found next to the shim binary, or `MICROVM_VMM`); the guest kernel
//! (`MICROVM_KERNEL`) and the static agent (`MICROVM_AGENT`) are found like the shim finds them when unset, the agent
//! built when missing. On a host whose KVM cannot boot an unmodified guest the test binary
//! re-runs itself inside the testbed.

mod common;
mod scenarios;

use std::process::ExitCode;
use std::time::Instant;

use libtest_mimic::{Arguments, Failed, Trial};

use common::{containerd, Containerd, CONTAINERD};

const RELAY_ENV: &[&str] = &[
    "MICROVM_KERNEL",
    "MICROVM_AGENT",
    "MICROVM_VMM",
    "MICROVM_VIRTIOFSD",
    "SHIM_TEST_LOG",
    "RUST_BACKTRACE",
];

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    if !args.list && !testbed::in_testbed() {
        // Found the way the shim finds them (or built, for the agent) unless named: `cargo
        // xtask test` sets only MICROVM_KERNEL.
        if let Err(e) = common::find_artifacts("containerd tests") {
            eprintln!("containerd tests: {e}");
            return ExitCode::from(101);
        }
        if let Err(why) = vmm::host::check_can_boot_guests() {
            return testbed::relay_current_exe("containerd tests", &why.to_string(), RELAY_ENV);
        }
    }
    // In this order (one at a time): the last checks that nothing is left behind.
    let scenarios: [(&'static str, Scenario); 9] = [
        (
            "ctr_run_output_exit_codes_events_in_a_vm",
            scenarios::basics::run_basics,
        ),
        (
            "ctr_exec_tty_kill_pids_metrics",
            scenarios::exec::exec_and_kill,
        ),
        (
            "two_containers_of_one_pod_share_a_vm",
            scenarios::pods::pod_of_two,
        ),
        (
            "pod_vm_size_oom_event_and_log_uris",
            scenarios::pods::pod_size_oom_logs,
        ),
        (
            "cri_pod_namespaces_stay_on_the_host",
            scenarios::cri::cri_shaped_pod,
        ),
        (
            "cri_pod_volumes_live_through_virtio_fs",
            scenarios::volumes::pod_volumes,
        ),
        (
            "cri_pod_serves_on_its_cni_address",
            scenarios::podnet::pod_on_its_cni_network,
        ),
        (
            "delete_after_the_shim_was_sigkilled",
            scenarios::cleanup::after_sigkill,
        ),
        ("nothing_is_left_behind", scenarios::cleanup::nothing_left),
    ];
    let trials = scenarios
        .into_iter()
        .map(|(name, f)| trial(name, f))
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(Ok(c)) = CONTAINERD.get() {
        c.stop();
    }
    conclusion.exit_code()
}

/// A scenario: a function of the shared private containerd.
type Scenario = fn(&Containerd) -> Result<(), String>;

fn trial(name: &'static str, f: Scenario) -> Trial {
    Trial::test(name, move || {
        let started = Instant::now();
        let c = containerd().map_err(Failed::from)?;
        let r = f(c);
        eprintln!("{name}: {:.1} s", started.elapsed().as_secs_f64());
        if r.is_err() {
            c.dump_logs();
        }
        r.map_err(Failed::from)
    })
}
