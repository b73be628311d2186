//! `microvm-agent`: the guest's PID 1. It mounts the kernel filesystems, reaps every child,
//! serves the host's ttRPC requests on vsock port 1024 and process stdio streams on port 1025,
//! and resets the VM on `Shutdown` or on a panic. See README.md.

mod etc_files;
mod forward;
mod init;
mod mounts;
mod network;
mod oom;
mod reaper;
mod service;
mod stdio;

use std::sync::{Arc, Mutex};

use agent_protocol::{AGENT_PORT, FORWARD_PORT, READY_BOOT_MARKER, STDIO_PORT};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

fn main() {
    let pid1 = std::process::id() == 1;
    let args: Vec<String> = std::env::args().collect();
    if pid1 && args.get(1).map(String::as_str) != Some(init::SWITCHED_ARG) {
        // Only returns on failure: then the agent runs on from the initramfs.
        let exe = args.first().map_or("/init", String::as_str);
        let Err(e) = init::leave_initramfs(exe);
        eprintln!("microvm-agent: cannot leave the initramfs ({e}); staying on it");
    }
    if pid1 {
        // The Rust runtime ignores SIGPIPE, and an ignored signal stays ignored in every
        // process the agent execs. PID 1 itself is never killed by a signal it has no handler
        // for, so the default disposition is safe here (writes to closed pipes still fail with
        // EPIPE).
        // SAFETY: setting a signal disposition to SIG_DFL before any other thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // /dev first: the console lives there (the initramfs has a /dev/console node too).
    let mounted = if pid1 {
        init::mount_kernel_filesystems()
    } else {
        Ok(())
    };
    init_logging();
    tracing::info!(
        "microvm-agent starting ({} ms since boot)",
        init::uptime_ms()
    );
    init::install_panic_hook();
    if let Err(e) = mounted {
        tracing::error!("cannot set up the guest: {e}");
        init::reboot();
    }
    if !pid1 {
        tracing::warn!("not running as PID 1: no mounts, and Shutdown exits instead of resetting");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().max(2)))
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(serve()) {
        tracing::error!("{e}");
    }
    init::reboot();
}

/// Logs to the console; `RUST_LOG` (a kernel command-line word `RUST_LOG=debug` reaches PID 1's
/// environment) filters, `info` by default.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    match init::open_console() {
        Ok(console) => builder.with_writer(Mutex::new(console)).init(),
        Err(_) => builder.with_writer(std::io::stderr).init(),
    }
}

async fn serve() -> Result<(), String> {
    let reaper = Arc::new(reaper::Reaper::default());
    // Handle SIGCHLD before the first child can exist.
    tokio::spawn(reaper::run(reaper.clone()));
    tokio::task::yield_now().await;
    let oom = Arc::new(oom::OomWatcher::new().map_err(|e| format!("inotify: {e}"))?);
    tokio::spawn({
        let oom = oom.clone();
        async move { oom.run().await }
    });
    let panic_after_health = init::cmdline_has(init::PANIC_AFTER_HEALTH_FLAG);
    if panic_after_health {
        tracing::warn!(
            "{} on the kernel command line: this agent will panic (test only)",
            init::PANIC_AFTER_HEALTH_FLAG
        );
    }
    let state = Arc::new(service::State::new(reaper, oom, panic_after_health));

    let stdio = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, STDIO_PORT))
        .map_err(|e| format!("cannot listen on vsock port {STDIO_PORT}: {e}"))?;
    tokio::spawn({
        let state = state.clone();
        async move {
            loop {
                match stdio.accept().await {
                    Ok((stream, _)) => {
                        let state = state.clone();
                        tokio::spawn(async move { state.accept_stdio(stream).await });
                    }
                    Err(e) => {
                        tracing::warn!("stdio accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        }
    });

    let forwards = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, FORWARD_PORT))
        .map_err(|e| format!("cannot listen on vsock port {FORWARD_PORT}: {e}"))?;
    tokio::spawn(forward::serve(forwards));

    let service = agent_protocol::agent_ttrpc::create_agent(Arc::new(service::Agent(state)));
    let mut server = agent_protocol::ttrpc::r#async::Server::new()
        .bind(&format!("vsock://-1:{AGENT_PORT}"))
        .map_err(|e| format!("cannot listen on vsock port {AGENT_PORT}: {e}"))?
        .register_service(service);
    server
        .start()
        .await
        .map_err(|e| format!("cannot start the ttRPC server: {e}"))?;
    init::boot_marker(READY_BOOT_MARKER);
    tracing::info!(
        "microvm-agent {} ready: ttRPC on vsock port {AGENT_PORT}, stdio on {STDIO_PORT}, port forwards on {FORWARD_PORT} ({} ms since boot)",
        env!("CARGO_PKG_VERSION"),
        init::uptime_ms()
    );
    std::future::pending::<()>().await;
    Ok(())
}
