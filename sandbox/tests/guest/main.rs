//! Guest tests: boot the real kernel with the static `microvm-agent` as init and a busybox ext4
//! image as a read-only disk, and drive containers through the sandbox client.
//!
//! The agent is built here (static, release, in `<target>/guest`) unless `MICROVM_AGENT` names
//! one; the VMM `microvm-vmm` comes from `MICROVM_BIN_DIR` or this test's target directory
//! (`cargo build --workspace --bins` first), the kernel from `MICROVM_KERNEL`. On a host whose KVM cannot
//! boot an unmodified guest the test binary re-runs itself inside the testbed, like
//! tests/tests/guest.rs.

mod artifacts;
mod helpers;
mod lifecycle;
mod processes;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use sandbox::agent_protocol::ttrpc::Code;
use sandbox::{
    Console, ContainerConfig, Disk, KernelParam, Mount, ProcessIo, Rootfs, RootfsSource, Sandbox,
    SandboxConfig, SandboxSettings, WindowSize,
};
use serde_json::json;

use artifacts::*;
use helpers::*;
use lifecycle::*;
use processes::*;

/// The environment variables the copy of this binary inside the testbed needs.
const RELAY_ENV: &[&str] = &[
    "MICROVM_KERNEL",
    "MICROVM_BIN_DIR",
    "MICROVM_AGENT",
    "AGENT_LOG",
    "AGENT_TEST_CONSOLE",
    "AGENT_TEST_MIB",
    "AGENT_TEST_TIMEOUT",
    "RUST_LOG",
    "RUST_BACKTRACE",
];

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // One VM at a time unless told otherwise: the testbed has 2 emulated CPUs, and parallel
    // guests there slow each other down several times over.
    args.test_threads.get_or_insert(1);
    // Without a kernel every test fails at once with the reason: do not build the agent first.
    let have_kernel = std::env::var_os("MICROVM_KERNEL").is_some();
    if !args.list && !testbed::in_testbed() && have_kernel {
        match build_agent() {
            // SAFETY: set before any other thread of this process exists.
            Ok(agent) => unsafe { std::env::set_var("MICROVM_AGENT", agent) },
            Err(e) => {
                eprintln!("guest tests: {e}");
                return ExitCode::from(101);
            }
        }
        if let Err(why) = vmm::host::check_can_boot_guests() {
            return testbed::relay_current_exe("guest tests", &why.to_string(), RELAY_ENV);
        }
    }
    let trials = vec![
        trial("agent_runs_processes_with_stdio_and_exit_codes", basics),
        trial("agent_exec_signals_terminal_stats_oom", exec_and_signals),
        trial(
            "agent_sandbox_settings_shared_namespaces_mounts_and_drop",
            settings_and_drop,
        ),
        trial("agent_panic_resets_the_vm", panic_resets_the_vm),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

type TestFn = fn(Env) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

struct Env {
    cfg: SandboxConfig,
    dir: PathBuf,
}

fn trial(name: &'static str, f: TestFn) -> Trial {
    Trial::test(name, move || {
        let art = Artifacts::get().map_err(Failed::from)?;
        let dir = tempfile::Builder::new()
            .prefix("agent-test-")
            .tempdir()
            .map_err(|e| Failed::from(e.to_string()))?;
        let console = dir.path().join("console.log");
        let mut cfg = SandboxConfig::new(&art.vmm, &art.kernel, &art.agent);
        cfg.disks.push(Disk {
            path: art.rootfs.clone(),
            read_only: true,
            rate_limit: None,
        });
        cfg.console = Console::File(console.clone());
        cfg.state_dir = Some(dir.path().join("s"));
        cfg.start_timeout = Duration::from_secs(90);
        if let Ok(level) = std::env::var("AGENT_LOG") {
            cfg.kernel_params.push(KernelParam::new("RUST_LOG", level));
        }
        let env = Env {
            cfg,
            dir: dir.path().to_path_buf(),
        };
        let started = Instant::now();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(async {
                let limit = std::env::var("AGENT_TEST_TIMEOUT").map_or(300, |v| v.parse().unwrap());
                tokio::time::timeout(Duration::from_secs(limit), f(env))
                    .await
                    .expect("the test timed out")
            })
        }));
        drop(rt);
        eprintln!("{name}: {:.1} s", started.elapsed().as_secs_f64());
        if outcome.is_err() || std::env::var_os("AGENT_TEST_CONSOLE").is_some() {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            eprintln!("--- {name}: console ---\n{text}--- end of console ---");
        }
        match outcome {
            Ok(()) => Ok(()),
            Err(p) => Err(Failed::from(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into()),
            )),
        }
    })
}
