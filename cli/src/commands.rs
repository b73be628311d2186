//! The commands around runs and images: `ps`, `exec`, `stop`, `kill`, `logs`, `rm`, `pull`,
//! `images`, `rmi`.

use std::io::Write;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sandbox::agent_protocol::ttrpc::Code;
use sandbox::{ProcessIo, Sandbox};

use crate::run::{runtime, PullArgs};
use crate::state::{self, RunDir, RunRecord, Status};
use crate::ExitError;

const RPC_TIMEOUT: Duration = Duration::from_secs(60);

fn live(name: &str) -> Result<(RunDir, RunRecord)> {
    let (rd, r) = state::find(name)?;
    if !r.is_live() {
        bail!("run {} is not running ({})", r.name, r.status_text());
    }
    Ok((rd, r))
}

async fn connect(rd: &RunDir) -> Result<Sandbox> {
    Sandbox::connect(rd.vsock(), RPC_TIMEOUT)
        .await
        .with_context(|| format!("reach the run's VM at {}", rd.vsock().display()))
}

#[derive(clap::Args)]
pub struct PsArgs {
    /// Show ended runs too
    #[arg(short = 'a', long)]
    all: bool,
    /// Only the ids
    #[arg(short = 'q', long)]
    quiet: bool,
}

pub fn ps(args: PsArgs) -> Result<i32> {
    let runs = state::list()?;
    let mut out = std::io::stdout().lock();
    if !args.quiet {
        writeln!(
            out,
            "{:<12}  {:<20}  {:<30}  {:<24}  {:<20}  PORTS",
            "RUN ID", "NAME", "IMAGE", "COMMAND", "STATUS"
        )?;
    }
    for (_, r) in runs {
        if !args.all && !r.is_live() {
            continue;
        }
        if args.quiet {
            writeln!(out, "{}", r.id)?;
            continue;
        }
        let mut cmd = r.process.args.join(" ");
        if cmd.len() > 24 {
            cmd.truncate(21);
            cmd.push_str("...");
        }
        // docker shows a run's ports only while they are published.
        let ports: Vec<String> = match r.is_live() {
            true => r.ports.iter().map(ToString::to_string).collect(),
            false => Vec::new(),
        };
        writeln!(
            out,
            "{:<12}  {:<20}  {:<30}  {:<24}  {:<20}  {}",
            r.id,
            r.name,
            r.image,
            cmd,
            r.status_text(),
            ports.join(", ")
        )?;
    }
    Ok(0)
}

#[derive(clap::Args)]
pub struct ExecArgs {
    /// Stream stdin to the process
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Give the process a terminal
    #[arg(short = 't', long)]
    tty: bool,
    /// Extra variables: KEY=VALUE or KEY
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Working directory [default: the run's]
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// The run's name or id
    run: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    cmd: Vec<String>,
}

pub fn exec(args: ExecArgs) -> Result<i32> {
    let (rd, r) = live(&args.run)?;
    let mut process = r.process.clone();
    process.args = args.cmd.clone();
    process.terminal = args.tty;
    if let Some(w) = &args.workdir {
        process.cwd = w.clone();
    }
    let extra: Vec<String> = args
        .env
        .iter()
        .filter_map(|e| {
            if e.contains('=') {
                Some(e.clone())
            } else {
                std::env::var(e).ok().map(|v| format!("{e}={v}"))
            }
        })
        .collect();
    let hostname = process
        .env
        .iter()
        .find_map(|e| e.strip_prefix("HOSTNAME="))
        .unwrap_or_default()
        .to_string();
    process.env = crate::spec::merge_env(&process.env, &hostname, args.tty, &extra);
    let exec_id = format!("exec-{}", state::new_id()?);
    let rt = runtime()?;
    rt.block_on(async {
        let sb = connect(&rd).await?;
        let stdin = std::io::stdin();
        let terminal = args.tty.then(|| {
            sandbox::window_size(&stdin.as_fd())
                .unwrap_or(sandbox::WindowSize { rows: 24, cols: 80 })
        });
        let mut raw = None;
        if args.tty && args.interactive {
            raw = crate::term::RawMode::enter(stdin.as_fd())?;
        }
        let io = ProcessIo {
            stdin: if args.interactive {
                Some(stdin.as_fd().try_clone_to_owned()?)
            } else {
                None
            },
            stdout: Some(std::io::stdout().as_fd().try_clone_to_owned()?),
            stderr: if args.tty {
                None
            } else {
                Some(std::io::stderr().as_fd().try_clone_to_owned()?)
            },
            terminal,
        };
        let json = serde_json::to_vec(&process.to_json())?;
        let p = match sb.exec(&r.id, &exec_id, &json, io).await {
            Ok(p) => p,
            Err(e) if matches!(e.code(), Some(Code::NOT_FOUND | Code::PERMISSION_DENIED)) => {
                drop(raw);
                let code = if e.code() == Some(Code::NOT_FOUND) {
                    127
                } else {
                    126
                };
                return Err(ExitError::new(code, e.to_string()).into());
            }
            Err(e) => return Err(e.into()),
        };
        let mut tasks = vec![sb.forward_signals(&r.id, &exec_id)?];
        if args.tty && sandbox::window_size(&stdin.as_fd()).is_some() {
            tasks.push(sb.forward_window_size(&r.id, &exec_id, stdin.as_fd())?);
        }
        let exit = p.wait().await;
        for t in tasks {
            t.abort();
        }
        drop(raw);
        Ok(exit?.code)
    })
}

#[derive(clap::Args)]
pub struct StopArgs {
    /// Seconds to wait after SIGTERM before SIGKILL
    #[arg(short = 't', long = "time", default_value_t = 10)]
    time: u64,
    #[arg(required = true)]
    runs: Vec<String>,
}

/// Waits until the run's owner recorded its end or is gone.
fn wait_ended(rd: &RunDir, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match rd.read() {
            Ok(r) if r.is_live() => {}
            _ => return true,
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn stop(args: StopArgs) -> Result<i32> {
    let rt = runtime()?;
    for name in &args.runs {
        let (rd, r) = state::find(name)?;
        if r.is_live() {
            rt.block_on(async {
                let sb = connect(&rd).await?;
                for (sig, wait) in [
                    (libc::SIGTERM, Duration::from_secs(args.time)),
                    (libc::SIGKILL, Duration::from_secs(30)),
                ] {
                    match sb.signal(&r.id, "", sig, false).await {
                        Ok(()) => {}
                        // Already ended: the owner is shutting the VM down.
                        Err(e) if e.code() == Some(Code::NOT_FOUND) => {}
                        Err(e) => tracing::debug!("signal {sig}: {e}"),
                    }
                    if wait_ended(&rd, wait) {
                        return Ok(());
                    }
                }
                // The owner did not finish: end the VM from here.
                sb.shutdown(Duration::from_secs(30)).await?;
                if !wait_ended(&rd, Duration::from_secs(30)) {
                    bail!("run {} did not end", r.name);
                }
                anyhow::Ok(())
            })?;
        }
        println!("{}", r.name);
    }
    Ok(0)
}

#[derive(clap::Args)]
pub struct KillArgs {
    /// Signal: a name (KILL, SIGTERM) or a number
    #[arg(short = 's', long = "signal", default_value = "KILL")]
    signal: String,
    #[arg(required = true)]
    runs: Vec<String>,
}

pub fn signal_number(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("bad signal number {n}");
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    Ok(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "WINCH" => libc::SIGWINCH,
        "ALRM" => libc::SIGALRM,
        "PIPE" => libc::SIGPIPE,
        _ => bail!("unknown signal {s:?}"),
    })
}

pub fn kill(args: KillArgs) -> Result<i32> {
    let sig = signal_number(&args.signal)?;
    let rt = runtime()?;
    for name in &args.runs {
        let (rd, r) = live(name)?;
        rt.block_on(async {
            let sb = connect(&rd).await?;
            sb.signal(&r.id, "", sig, false).await?;
            anyhow::Ok(())
        })?;
        println!("{}", r.name);
    }
    Ok(0)
}

#[derive(clap::Args)]
pub struct LogsArgs {
    run: String,
}

pub fn logs(args: LogsArgs) -> Result<i32> {
    let (rd, r) = state::find(&args.run)?;
    if !r.detached {
        bail!(
            "run {} was attached to a terminal: its output went there, no logs were kept",
            r.name
        );
    }
    for (path, mut sink) in [
        (
            rd.stdout_log(),
            Box::new(std::io::stdout()) as Box<dyn Write>,
        ),
        (rd.stderr_log(), Box::new(std::io::stderr())),
    ] {
        match std::fs::read(&path) {
            Ok(b) => sink.write_all(&b)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        }
        sink.flush()?;
    }
    Ok(0)
}

#[derive(clap::Args)]
pub struct RmArgs {
    /// Stop a running run first
    #[arg(short = 'f', long)]
    force: bool,
    #[arg(required = true)]
    runs: Vec<String>,
}

pub fn rm(args: RmArgs) -> Result<i32> {
    for name in &args.runs {
        let (rd, r) = state::find(name)?;
        if r.is_live() {
            if !args.force {
                bail!("run {} is running: stop it first, or use rm -f", r.name);
            }
            stop(StopArgs {
                time: 0,
                runs: vec![r.id.clone()],
            })?;
        }
        if r.status != Status::Exited && !r.is_live() {
            // Its owner died (a SIGKILLed `microvm run` or monitor): its VM may still run, out
            // of everyone's reach. End it through its agent.
            let rt = runtime()?;
            let ended = rt.block_on(async {
                let sb = connect(&rd).await?;
                sb.shutdown(Duration::from_secs(30)).await?;
                anyhow::Ok(())
            });
            if let Err(e) = ended {
                tracing::debug!("run {}: no VM to end: {e:#}", r.name);
            }
        }
        // A run whose owner died (killed, a crashed host process) still has its network. One
        // that cannot be removed keeps the run, unless -f.
        if let Err(e) = crate::network::detach(&rd.path) {
            if !args.force {
                bail!(
                    "run {}: its network cannot be removed ({e:#}); `microvm rm -f` removes \
                     the run anyway",
                    r.name
                );
            }
            eprintln!(
                "microvm: run {}: network not entirely removed: {e:#}",
                r.name
            );
        }
        std::fs::remove_dir_all(&rd.path)
            .with_context(|| format!("remove {}", rd.path.display()))?;
        println!("{}", r.name);
    }
    Ok(0)
}

#[derive(clap::Args)]
pub struct PullCmd {
    #[command(flatten)]
    pull: PullArgs,
    /// A registry reference, an OCI layout directory or an archive
    image: String,
}

pub fn pull(args: PullCmd) -> Result<i32> {
    let store = crate::images::open_store(args.pull.options().progress)?;
    let (img, fetched) = runtime()?.block_on(store.ensure(&args.image, &args.pull.options()))?;
    if !args.pull.quiet {
        eprintln!(
            "{}: {} blob(s) downloaded, {} imported",
            args.image, fetched.blobs_downloaded, fetched.blobs_imported
        );
    }
    println!("{}", img.id);
    Ok(0)
}

pub fn images() -> Result<i32> {
    let store = crate::images::open_store(false)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<50}  {:<19}  SIZE", "NAME", "IMAGE ID")?;
    for img in store.list()? {
        let short = img.id.trim_start_matches("sha256:");
        let short = &short[..short.len().min(12)];
        let size = format!("{:.1} MB", img.size as f64 / 1e6);
        if img.names.is_empty() {
            writeln!(out, "{:<50}  {:<19}  {size}", "<none>", short)?;
        }
        for n in &img.names {
            writeln!(out, "{n:<50}  {short:<19}  {size}")?;
        }
    }
    Ok(0)
}

#[derive(clap::Args)]
pub struct RmiArgs {
    #[arg(required = true)]
    images: Vec<String>,
}

pub fn rmi(args: RmiArgs) -> Result<i32> {
    let store = crate::images::open_store(false)?;
    for i in &args.images {
        let used: Vec<String> = state::list()?
            .into_iter()
            .filter(|(_, r)| r.status != Status::Exited && r.image == *i)
            .map(|(_, r)| r.name)
            .collect();
        if !used.is_empty() {
            bail!("image {i} is used by running runs: {}", used.join(", "));
        }
        store.remove(i)?;
        println!("{i}");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(signal_number("KILL").unwrap(), 9);
        assert_eq!(signal_number("sigterm").unwrap(), 15);
        assert_eq!(signal_number("10").unwrap(), 10);
        assert!(signal_number("0").is_err());
        assert!(signal_number("BOGUS").is_err());
    }
}
