//! `microvm run`: an image to a container in its own microVM, in the foreground or detached
//! (`-d`: a `microvm __monitor` process in its own session owns the VM).
//!
//! The run is planned here (image, user, command, spec, volume disks, VM size) and written to
//! `plan.json` in the run's directory; [`execute`] boots the VM and runs the container from the
//! plan, in this process or in the monitor.

mod args;
mod execute;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use args::{env_from_cli, DEFAULT_VM_MIB, GUEST_OVERHEAD_MIB, MIN_VM_MIB};
pub use args::{parse_disk_rate, PullArgs, RunArgs, VmArgs};
use execute::{execute, Ended, Stdio, Timings};

use crate::images;
use crate::network::{self, NetworkPlan};
use crate::spec::{self, Limits, ProcessTemplate};
use crate::state::{self, RunDir, RunRecord, Status};
use crate::volumes::{self, MountSpec, PlannedMount};
use crate::ExitError;

/// Everything [`execute`] needs, resolved; the monitor of a detached run reads it back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub id: String,
    /// The VMM binary (`microvm-vmm`).
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub agent: PathBuf,
    pub cpus: u8,
    pub memory_mib: u64,
    /// /dev/vda: the image (read-only).
    pub disks: Vec<(PathBuf, bool)>,
    /// `--disk-rate`: the rate limit of every disk.
    #[serde(default)]
    pub disk_rate: Option<sandbox::DiskRateLimit>,
    /// Host directories shared into the VM (virtio-fs), with read-only flags.
    pub shares: Vec<(PathBuf, bool)>,
    pub rootfs_fstype: String,
    pub spec: serde_json::Value,
    /// The container's mounts besides its rootfs.
    pub mounts: Vec<PlannedMount>,
    pub hostname: String,
    pub interactive: bool,
    pub tty: bool,
    pub memory_limit: Option<u64>,
    pub timings: bool,
    /// `--boot-timeout`: seconds for the VM to boot and its agent to answer.
    #[serde(default = "default_boot_timeout_s")]
    pub boot_timeout_s: u64,
    /// The run's network (bridge by default; a plan without one has none).
    #[serde(default = "no_network")]
    pub network: NetworkPlan,
}

fn default_boot_timeout_s() -> u64 {
    180
}

/// `--network`, `-p`, `--dns`, `--add-host`, checked before anything is made.
fn plan_network(args: &RunArgs) -> Result<NetworkPlan> {
    let plan = NetworkPlan {
        mode: args.network,
        publish: args.publish.clone(),
        dns: args.dns.clone(),
        add_hosts: args.add_hosts.clone(),
    };
    if plan.mode == network::Mode::None {
        if !plan.publish.is_empty() {
            bail!("-p needs a network: --network none has no ports to publish");
        }
        if !plan.dns.is_empty() {
            bail!("--dns needs a network: --network none has no DNS");
        }
        return Ok(plan);
    }
    for (i, p) in plan.publish.iter().enumerate() {
        if plan.publish[..i]
            .iter()
            .any(|q| (q.host_ip, q.host_port, q.protocol) == (p.host_ip, p.host_port, p.protocol))
        {
            bail!("host port {} is published twice", p.host_port);
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "--network bridge (the default) needs root: the CNI plugins make a bridge, veths and \
             NAT rules; run as root or use --network none"
        );
    }
    Ok(plan)
}

fn no_network() -> NetworkPlan {
    NetworkPlan {
        mode: network::Mode::None,
        ..Default::default()
    }
}

fn locate(vm: &VmArgs) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let kernel = match &vm.kernel {
        Some(k) => k.clone(),
        None => sandbox::locate::kernel()?,
    };
    let agent = match &vm.agent {
        Some(a) => a.clone(),
        None => sandbox::locate::agent()?,
    };
    for (what, p) in [("kernel", &kernel), ("agent", &agent)] {
        if !p.is_file() {
            bail!("the {what} {} does not exist or is not a file", p.display());
        }
    }
    let vmm = sandbox::locate::vmm()?;
    Ok((vmm, kernel, agent))
}

/// `microvm run`. Returns the container's exit status.
pub fn run(args: RunArgs) -> Result<i32> {
    if let Err(e) = vmm::host::check_can_boot_guests() {
        return Err(ExitError::new(125, format!("{e}")).into());
    }
    let started = Instant::now();
    if let Some(n) = &args.name {
        state::check_name(n)?;
        if let Ok((_, r)) = state::find(n) {
            if r.name == *n {
                bail!(
                    "the name {n:?} is in use by run {}; remove it with `microvm rm {n}`",
                    r.id
                );
            }
        }
    }
    if args.tty && args.detach && args.interactive {
        bail!("-d with -i has no stdin to stream; use `microvm exec -it` into the run");
    }
    let network = plan_network(&args)?;
    let (vmm, kernel, agent) = locate(&args.vm)?;
    let rt = runtime()?;
    let store = images::open_store(args.pull.options().progress)?;
    let img = rt.block_on(images::prepare(&store, &args.image, &args.pull.options()))?;
    tracing::debug!(
        "image {}: Fetched {{ blobs_downloaded: {}, blobs_imported: {} }}, disk built: {}",
        img.id,
        img.fetched.blobs_downloaded,
        img.fetched.blobs_imported,
        img.disk_built
    );
    let cfg = img.config.config().clone().unwrap_or_default();
    let strings = |v: &Option<Vec<String>>| v.clone().unwrap_or_default();
    let command = spec::command(
        &strings(cfg.entrypoint()),
        &strings(cfg.cmd()),
        args.entrypoint.as_deref(),
        &args.cmd,
    );
    if command.is_empty() {
        bail!("no command: the image has neither Entrypoint nor Cmd; give one");
    }
    let user_text = args
        .user
        .clone()
        .or_else(|| cfg.user().clone())
        .unwrap_or_default();
    let user = images::resolve_user(&store, &img, &user_text)?;
    let id = state::new_id()?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("run-{}", &id[..8]));
    let hostname = args.hostname.clone().unwrap_or_else(|| id.clone());
    let cwd = args
        .workdir
        .clone()
        .or_else(|| cfg.working_dir().clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        bail!("the working directory {cwd:?} must be absolute");
    }
    let process = ProcessTemplate {
        args: command,
        env: spec::merge_env(
            &strings(cfg.env()),
            &hostname,
            args.tty,
            &env_from_cli(&args)?,
        ),
        cwd,
        uid: user.uid,
        gid: user.gid,
        additional_gids: user.additional_gids.clone(),
        terminal: args.tty,
    };
    let limits = Limits {
        memory_bytes: args.memory,
        cpus: args.cpus,
    };
    let rd = RunDir::new(&id)?;
    // The VMM's vsock socket and its `_<port>` listeners must fit a unix socket path.
    let longest = rd.vsock().as_os_str().len() + "_4294967295".len();
    if longest > 107 {
        bail!(
            "the run directory {} is too long for unix socket paths (108 bytes); set \
             MICROVM_HOME to a shorter directory",
            rd.path.display()
        );
    }
    rd.create()?;
    let record = RunRecord {
        id: id.clone(),
        name,
        image: args.image.clone(),
        image_id: img.id.clone(),
        created_unix: state::now_unix(),
        status: Status::Created,
        exit_code: None,
        owner_pid: Some(std::process::id()),
        detached: args.detach,
        remove: args.rm,
        note: None,
        process: process.clone(),
        ports: network.publish.clone(),
    };
    rd.write(&record)?;
    // From here on a failure must not leave a half-made run behind.
    let planned = (|| -> Result<Plan> {
        let disks = vec![(img.disk.clone(), true)];
        let mut binds = args.volumes.clone();
        let mut tmpfs = args.tmpfs.clone();
        for m in &args.mounts {
            match m {
                MountSpec::Bind(b) => binds.push(b.clone()),
                MountSpec::Tmpfs(t) => tmpfs.push(t.clone()),
            }
        }
        let (shares, mounts) = volumes::plan(&binds, &tmpfs)?;
        let memory_mib = match args.memory {
            Some(b) => (b.div_ceil(1 << 20) + GUEST_OVERHEAD_MIB).max(MIN_VM_MIB),
            None => DEFAULT_VM_MIB,
        };
        Ok(Plan {
            id: id.clone(),
            vmm,
            kernel,
            agent,
            cpus: args.cpus.map_or(1, |c| c.ceil() as u8),
            memory_mib,
            disks,
            disk_rate: args.disk_rate,
            shares,
            rootfs_fstype: img.fstype.clone(),
            spec: {
                let mut spec = spec::runtime_spec(&process, &hostname, limits);
                network::hosts::bind_hosts_files(&mut spec);
                if network.mode == network::Mode::Bridge {
                    network::share_guest_network(&mut spec);
                }
                spec
            },
            mounts,
            hostname,
            interactive: args.interactive,
            tty: args.tty,
            memory_limit: args.memory,
            timings: args.timings,
            boot_timeout_s: args.boot_timeout,
            network,
        })
    })();
    let plan = match planned {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&rd.path);
            return Err(e);
        }
    };
    rd.write(&record)?;
    state::write_atomic(&rd.plan_path(), &serde_json::to_vec_pretty(&plan)?)?;
    let prepare = started.elapsed();
    if args.detach {
        return detach(&rd, &record);
    }
    let mut timings = Timings {
        start: Some(started),
        prepare,
        ..Default::default()
    };
    let outcome = rt.block_on(execute(&plan, &rd, Stdio::Foreground, &mut timings));
    drop(rt);
    finish(&rd, &plan, outcome, &mut timings)
}

/// The async runtime of `run` and the run commands.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")
}

/// After the VM is gone: record the end, print timings, remove the run with `--rm`. Returns
/// the exit status.
fn finish(rd: &RunDir, plan: &Plan, outcome: Result<Ended>, t: &mut Timings) -> Result<i32> {
    let record = rd.read()?;
    // The network goes with the VM. If some of it cannot be removed, the run's directory keeps
    // the record (even with --rm) so that `microvm rm` can retry.
    let mut keep = false;
    if let Err(e) = network::detach(&rd.path) {
        eprintln!(
            "microvm: the run's network was not entirely removed ({e:#}); `microvm rm {}` retries",
            record.name
        );
        keep = true;
    }
    let (code, note) = match &outcome {
        Ok(e) => (e.code, e.note.clone()),
        Err(e) => (125, Some(format!("{e:#}"))),
    };
    if let Ok(e) = &outcome {
        if let Some(n) = &e.note {
            eprintln!("microvm: {n}");
        }
    }
    rd.update(|r| {
        r.status = Status::Exited;
        r.exit_code = Some(code);
        r.note = note.clone();
    })?;
    if plan.timings {
        let total = t.start.map_or(Duration::ZERO, |s| s.elapsed());
        let vmm_setup = vmm_setup_ms(rd);
        let to_agent = t.sandbox_start.as_secs_f64() * 1000.0 - vmm_setup.unwrap_or(0.0);
        eprintln!(
            "microvm timings: prepare {:.1} ms, vmm setup {} ms, kernel to agent ready {:.1} ms, \
             container start {:.1} ms, workload {:.1} ms, teardown {:.1} ms, total {:.1} ms",
            t.prepare.as_secs_f64() * 1000.0,
            vmm_setup.map_or("?".into(), |v| format!("{v:.1}")),
            to_agent,
            t.container_start.as_secs_f64() * 1000.0,
            t.workload.as_secs_f64() * 1000.0,
            t.teardown.as_secs_f64() * 1000.0,
            total.as_secs_f64() * 1000.0,
        );
    }
    if record.remove && !keep {
        let _ = std::fs::remove_dir_all(&rd.path);
    }
    match outcome {
        Ok(e) => Ok(e.code),
        Err(e) => Err(ExitError::new(125, format!("{e:#}")).into()),
    }
}

/// The VMM's "first KVM_RUN at X ms" from the console log: its setup time.
fn vmm_setup_ms(rd: &RunDir) -> Option<f64> {
    let text = std::fs::read_to_string(rd.console()).ok()?;
    let at = text.find("first KVM_RUN at ")? + "first KVM_RUN at ".len();
    text[at..].split_whitespace().next()?.parse().ok()
}

/// `run -d`: starts the monitor in its own session and returns once the container runs.
fn detach(rd: &RunDir, record: &RunRecord) -> Result<i32> {
    let exe = std::env::current_exe().context("find this executable")?;
    let log = crate::state::open_log(&rd.monitor_log())?;
    let mut cmd = Command::new(exe);
    cmd.arg("__monitor")
        .arg(&rd.path)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the child only calls it before exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("start the monitor")?;
    let pid = child.id();
    rd.update(|r| r.owner_pid = Some(pid))?;
    // The monitor is not waited for: it outlives this process (init reaps it).
    drop(child);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let r = rd.read()?;
        match r.status {
            Status::Running => {
                println!("{}", record.name);
                return Ok(0);
            }
            Status::Exited => {
                let note = r.note.unwrap_or_default();
                if r.exit_code == Some(125) {
                    return Err(ExitError::new(125, note).into());
                }
                // It ran and ended already (for example a missing executable).
                if !note.is_empty() {
                    eprintln!("microvm: {note}");
                }
                println!("{}", record.name);
                return Ok(r.exit_code.unwrap_or(125));
            }
            Status::Created if !state::pid_alive(pid) => {
                let log = std::fs::read_to_string(rd.monitor_log()).unwrap_or_default();
                bail!("the monitor of run {} died: {}", record.id, log.trim());
            }
            Status::Created if Instant::now() > deadline => {
                bail!("run {} did not start within 300 s", record.id);
            }
            Status::Created => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `microvm __monitor RUNDIR`: owns a detached run's VM until the container ends.
pub fn monitor(dir: PathBuf) -> Result<i32> {
    let rd = RunDir { path: dir };
    let plan: Plan =
        serde_json::from_slice(&std::fs::read(rd.plan_path())?).context("read the run's plan")?;
    rd.update(|r| r.owner_pid = Some(std::process::id()))?;
    // `microvm stop` ends the container through the agent; the monitor itself ignores the
    // terminal signals it could still get.
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let mut t = Timings::default();
    let rt = runtime()?;
    let outcome = rt.block_on(execute(&plan, &rd, Stdio::Detached, &mut t));
    drop(rt);
    finish(&rd, &plan, outcome, &mut t)
}
