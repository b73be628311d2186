//! [`Testbed`]: one configured L1, its QEMU command line, the console relay and the markers
//! that delimit CMD's output.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::*;

/// A configured L1: build one with [`Testbed::new`] and the builder methods, then [`Testbed::run`].
#[derive(Debug, Clone)]
pub struct Testbed {
    cpu: String,
    memory_mib: u32,
    smp: u32,
    timeout: Duration,
    env: Vec<(String, OsString)>,
    shares: Vec<PathBuf>,
    /// Echo the raw console to stderr (`MICROVM_TESTBED_VERBOSE=1`).
    verbose: bool,
    /// A QEMU monitor on this unix socket (`MICROVM_TESTBED_MONITOR=PATH`), to look at a stuck
    /// L1 from outside (`info cpus`, `info registers -a`).
    monitor: Option<PathBuf>,
    /// L1 kernel trace events to record (`MICROVM_TESTBED_TRACE=kvm:kvm_exit,timer:hrtimer_start`).
    trace_events: Option<String>,
    /// A bad `MICROVM_TESTBED_*` value, reported by `run`.
    env_error: Option<String>,
}

impl Default for Testbed {
    fn default() -> Self {
        Self::new()
    }
}

impl Testbed {
    /// The defaults ([`DEFAULT_CPU`], [`DEFAULT_MEMORY_MIB`], [`DEFAULT_SMP`], [`DEFAULT_TIMEOUT`]),
    /// overridden by `MICROVM_TESTBED_CPU`, `MICROVM_TESTBED_MEM` (MiB) and `MICROVM_TESTBED_SMP`.
    /// With `MICROVM_TESTBED_VERBOSE=1`, L1's whole console is also copied to stderr, each line
    /// prefixed with the seconds since QEMU started (to debug L1 or see where its time goes).
    /// With `MICROVM_TESTBED_MONITOR=PATH`, QEMU's human monitor listens on that unix socket.
    /// With `MICROVM_TESTBED_TRACE=SYSTEM:EVENT,...`, L1's kernel records those trace events, and
    /// when CMD fails its stderr shows the trace around the longest quiet spell (where a nested
    /// guest stopped).
    pub fn new() -> Self {
        let mut tb = Testbed {
            cpu: DEFAULT_CPU.to_string(),
            memory_mib: DEFAULT_MEMORY_MIB,
            smp: DEFAULT_SMP,
            timeout: DEFAULT_TIMEOUT,
            env: Vec::new(),
            shares: Vec::new(),
            verbose: std::env::var_os("MICROVM_TESTBED_VERBOSE").is_some_and(|v| v == "1"),
            monitor: std::env::var_os("MICROVM_TESTBED_MONITOR").map(PathBuf::from),
            trace_events: None,
            env_error: None,
        };
        if let Some(events) = std::env::var_os("MICROVM_TESTBED_TRACE") {
            let events = events.to_string_lossy();
            let valid = |e: &str| {
                e.split_once(':').is_some_and(|(sys, name)| {
                    [sys, name].iter().all(|w| {
                        !w.is_empty() && w.bytes().all(|b| b == b'_' || b.is_ascii_alphanumeric())
                    })
                })
            };
            match events.split(',').all(valid) {
                true => tb.trace_events = Some(events.replace(',', " ")),
                false => {
                    tb.env_error = Some(format!(
                        "MICROVM_TESTBED_TRACE={events:?} is not a list of SYSTEM:EVENT names"
                    ))
                }
            }
        }
        if let Some(cpu) = std::env::var_os("MICROVM_TESTBED_CPU") {
            tb.cpu = cpu.to_string_lossy().into_owned();
        }
        for (var, field) in [
            ("MICROVM_TESTBED_MEM", &mut tb.memory_mib),
            ("MICROVM_TESTBED_SMP", &mut tb.smp),
        ] {
            if let Some(value) = std::env::var_os(var) {
                match value.to_str().and_then(|v| v.parse().ok()) {
                    Some(n) => *field = n,
                    None => tb.env_error = Some(format!("{var}={value:?} is not a number")),
                }
            }
        }
        tb
    }

    /// The QEMU CPU model (`-cpu`); it must include `svm` for `/dev/kvm` to exist in L1.
    pub fn cpu(mut self, model: impl Into<String>) -> Self {
        self.cpu = model.into();
        self
    }

    /// L1's memory in MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// L1's number of virtual CPUs.
    pub fn smp(mut self, cpus: u32) -> Self {
        self.smp = cpus;
        self
    }

    /// Sets a variable in CMD's environment. CMD starts with a clean environment: `PATH`,
    /// `HOME=/root`, `TERM=dumb` (these three can be overridden here), the variables set here,
    /// and `MICROVM_IN_TESTBED=1`.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// How long a run may take, L1's boot included, before QEMU is killed.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Shares the host folder `path` (absolute, existing) read-write into L1, at the same path, so
    /// files written there inside L1 (results, logs) are on this host afterwards. Files are
    /// written as root.
    pub fn share_rw(mut self, path: impl Into<PathBuf>) -> Self {
        self.shares.push(path.into());
        self
    }

    /// Boots L1 and runs `cmd` (program and arguments, passed exactly) as root in `cwd` (a path on
    /// this host, an absolute one or one relative to this process's directory; the same path inside
    /// L1). CMD's stdin is `/dev/null`; its stdout and stderr, merged, are copied to this process's
    /// stdout line by line as they arrive. Returns CMD's exit status (128+N when killed by signal N;
    /// 126 when `cwd` is missing in L1, 127 when the program is not found).
    pub fn run<S: AsRef<OsStr>>(&self, cmd: &[S], cwd: &Path) -> Result<i32, Error> {
        let argv: Vec<&OsStr> = cmd.iter().map(AsRef::as_ref).collect();
        let plan = self.validate(&argv, cwd)?;
        let kernel = prepare()?;
        let work = tempfile::Builder::new()
            .prefix("microvm-testbed-")
            .tempdir()
            .map_err(|e| Error::io("cannot create a temporary folder", e))?;
        let nonce = nonce()?;
        let initrd = work.path().join("l1.cpio");
        self.write_initramfs(&initrd, &kernel, &argv, &plan, &nonce)?;

        let mut qemu = self.qemu_command(&kernel, &initrd, &plan.shares);
        let mut child = qemu
            .spawn()
            .map_err(|e| Error::io(format!("cannot start {QEMU}"), e))?;
        let stdout = child.stdout.take().expect("QEMU's stdout is piped");
        let (done_tx, done_rx) = mpsc::channel();
        let verbose = self.verbose.then(Instant::now);
        let reader = std::thread::spawn(move || {
            let console = relay_console(stdout, &nonce, verbose);
            let _ = done_tx.send(());
            console
        });

        let timed_out = matches!(
            done_rx.recv_timeout(self.timeout),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        if timed_out {
            let _ = child.kill();
        }
        let status = child
            .wait()
            .map_err(|e| Error::io(format!("cannot wait for {QEMU}"), e))?;
        let console = reader.join().expect("the console reader does not panic");
        if timed_out {
            print_tail(&console);
            return Err(Error::Timeout(self.timeout));
        }
        match console.exit_code() {
            Some(code) => Ok(code),
            None => {
                print_tail(&console);
                Err(Error::NoExitStatus { qemu: status })
            }
        }
    }

    fn validate(&self, argv: &[&OsStr], cwd: &Path) -> Result<Plan, Error> {
        if let Some(err) = &self.env_error {
            return Err(Error::Config(err.clone()));
        }
        if argv.is_empty() {
            return Err(Error::Config("no command to run".into()));
        }
        if let Some((key, _)) = self.env.iter().find(|(k, _)| !initramfs::valid_env_key(k)) {
            return Err(Error::Config(format!(
                "{key:?} is not a valid variable name"
            )));
        }
        if self.memory_mib < 256 || self.smp == 0 {
            return Err(Error::Config(format!(
                "{} MiB and {} CPUs is too small for L1",
                self.memory_mib, self.smp
            )));
        }
        let cwd = std::path::absolute(cwd)
            .map_err(|e| Error::io(format!("cannot make {} absolute", cwd.display()), e))?;
        if !cwd.is_dir() {
            return Err(Error::Config(format!(
                "{} is not a directory",
                cwd.display()
            )));
        }
        let mut shares = Vec::new();
        for path in &self.shares {
            if !path.is_absolute() || !path.is_dir() {
                return Err(Error::Config(format!(
                    "a read-write share must be an absolute path to a directory, not {}",
                    path.display()
                )));
            }
            // The 9p mount tag must be unique and at most 31 bytes.
            shares.push((format!("rw{}", shares.len()), path.clone()));
        }
        Ok(Plan { cwd, shares })
    }

    fn write_initramfs(
        &self,
        path: &Path,
        kernel: &kernel::L1Kernel,
        argv: &[&OsStr],
        plan: &Plan,
        nonce: &str,
    ) -> Result<(), Error> {
        let busybox =
            fs::read(BUSYBOX).map_err(|e| Error::io(format!("cannot read {BUSYBOX}"), e))?;
        let mut modules: Vec<Vec<String>> = Vec::new();
        let mut module_data = Vec::new();
        for group in kernel.module_groups()? {
            let mut names = Vec::new();
            for ko in group {
                let name = ko.file_name().unwrap_or_default().to_string_lossy();
                names.push(format!("{:03}-{name}", module_data.len() + 1));
                module_data.push(
                    fs::read(&ko)
                        .map_err(|e| Error::io(format!("cannot read {}", ko.display()), e))?,
                );
            }
            modules.push(names);
        }
        let env: Vec<(&str, &OsStr)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_os_str()))
            .collect();
        let shares: Vec<(String, &Path)> = plan
            .shares
            .iter()
            .map(|(t, p)| (t.clone(), p.as_path()))
            .collect();
        let modules_dir = kernel.modules_dir();
        let init = initramfs::init_script(&initramfs::InitSpec {
            modules: &modules,
            kernel_release: &kernel.release,
            host_modules_dir: &modules_dir,
            shares: &shares,
            env: &env,
            nonce,
            trace_events: self.trace_events.as_deref(),
        });
        let cmd = initramfs::cmd_script(&plan.cwd, argv);

        let write = || -> io::Result<()> {
            let file = io::BufWriter::new(fs::File::create(path)?);
            let mut cpio = ::initramfs::Cpio::new(file);
            for dir in ["bin", "dev", "proc", "sys", "modules", "testbed"] {
                cpio.dir(dir, 0o755)?;
            }
            // The kernel opens /dev/console for /init's stdio before /init mounts devtmpfs.
            cpio.char_dev("dev/console", 0o600, 5, 1)?;
            cpio.file("bin/busybox", 0o755, &busybox)?;
            for (name, data) in modules.iter().flatten().zip(&module_data) {
                cpio.file(&format!("modules/{name}"), 0o644, data)?;
            }
            cpio.file("testbed/cmd.sh", 0o644, &cmd)?;
            cpio.file("init", 0o755, &init)?;
            cpio.finish()?
                .into_inner()
                .map_err(|e| e.into_error())?
                .sync_all()
        };
        write().map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
    }

    fn qemu_command(
        &self,
        kernel: &kernel::L1Kernel,
        initrd: &Path,
        shares: &[(String, PathBuf)],
    ) -> Command {
        let mut qemu = Command::new(QEMU);
        qemu.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-accel", "tcg,thread=multi", "-cpu", &self.cpu])
        .args([
            "-smp",
            &self.smp.to_string(),
            "-m",
            &self.memory_mib.to_string(),
        ])
        .arg("-kernel")
        .arg(kernel.image())
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=1"])
        // The console, and with it CMD's output, on QEMU's stdout.
        .args(["-serial", "stdio"]);
        if let Some(path) = &self.monitor {
            let mut opt = OsString::from("unix:");
            opt.push(qemu_escape(path.as_os_str()));
            opt.push(",server=on,wait=off");
            qemu.arg("-monitor").arg(opt);
        }
        let mut virtfs = |path: &Path, tag: &str, readonly: bool| {
            let mut opt = OsString::from("local,path=");
            opt.push(qemu_escape(path.as_os_str()));
            opt.push(format!(
                ",mount_tag={tag},security_model=none,multidevs=remap"
            ));
            if readonly {
                opt.push(",readonly=on");
            }
            qemu.arg("-virtfs").arg(opt);
        };
        virtfs(Path::new("/"), "hostroot", true);
        for (tag, path) in shares {
            virtfs(path, tag, false);
        }
        // Stdin: nothing (QEMU would put a terminal in raw mode). Stderr: QEMU's own complaints.
        qemu.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        qemu
    }
}

/// A validated run.
struct Plan {
    cwd: PathBuf,
    shares: Vec<(String, PathBuf)>,
}

/// Copies CMD's output from the console to stdout as it arrives; returns the parsed console.
/// With `verbose`, also copies every raw line to stderr with the time since `verbose`.
fn relay_console(stdout: impl Read, nonce: &str, verbose: Option<Instant>) -> console::Console {
    let mut console = console::Console::new(nonce);
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if let Some(start) = verbose {
                    let raw = String::from_utf8_lossy(&line);
                    eprintln!(
                        "[L1 +{:7.3}s] {}",
                        start.elapsed().as_secs_f64(),
                        raw.trim_end_matches(['\r', '\n'])
                    );
                }
                if let Some(out) = console.feed(&line) {
                    let mut stdout = io::stdout().lock();
                    let _ = stdout.write_all(&out);
                    let _ = stdout.flush();
                }
            }
        }
    }
    console
}

fn print_tail(console: &console::Console) {
    let mut text = format!(
        "testbed: the last lines of L1's console (up to {}):\n",
        console::TAIL_LINES
    );
    for line in console.tail() {
        let _ = writeln!(text, "  | {}", String::from_utf8_lossy(line));
    }
    eprint!("{text}");
}

/// QEMU's option parser splits on `,`; a literal comma is written `,,`.
fn qemu_escape(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsStr::from_bytes(&out).to_os_string()
}

/// 16 random hex digits.
fn nonce() -> Result<String, Error> {
    let mut bytes = [0u8; 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("cannot read /dev/urandom", e))?;
    Ok(bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_option_commas_are_doubled() {
        assert_eq!(
            qemu_escape(OsStr::new("/a,b,,c")),
            OsString::from("/a,,b,,,,c")
        );
        assert_eq!(qemu_escape(OsStr::new("/plain")), OsString::from("/plain"));
    }

    #[test]
    fn nonces_differ() {
        let (a, b) = (nonce().unwrap(), nonce().unwrap());
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
