//! `cargo xtask testbed [OPTIONS] -- CMD [ARGS...]`: runs CMD as root in the current directory
//! inside the emulated nested-KVM host (see the `testbed` crate) and exits with its status.

use anyhow::{Context, Result};
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct TestbedArgs {
    /// QEMU CPU model for L1 [default: $MICROVM_TESTBED_CPU, else qemu64,+svm,+npt]
    #[arg(long, value_name = "MODEL")]
    cpu: Option<String>,
    /// L1's memory in MiB [default: $MICROVM_TESTBED_MEM, else 4096]
    #[arg(long, value_name = "MIB")]
    mem: Option<u32>,
    /// L1's virtual CPUs [default: $MICROVM_TESTBED_SMP, else 1]
    #[arg(long, value_name = "N")]
    smp: Option<u32>,
    /// Sets a variable in CMD's environment (repeatable)
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, OsString)>,
    /// Shares a host folder read-write into L1 at the same path (repeatable)
    #[arg(long = "share-rw", value_name = "DIR")]
    share_rw: Vec<PathBuf>,
    /// Kills L1 after this many seconds, boot included [default: 2400]
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// The command and its arguments, after `--`
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<OsString>,
}

fn parse_env(s: &str) -> Result<(String, OsString), String> {
    let (k, v) = s.split_once('=').ok_or("expected KEY=VALUE")?;
    Ok((k.to_string(), v.into()))
}

/// Runs the command; returns its exit status, 124 if the testbed timed out, 125 if L1 ended
/// without reporting one.
pub fn run(args: &TestbedArgs) -> Result<i32> {
    let mut tb = testbed::Testbed::new();
    if let Some(cpu) = &args.cpu {
        tb = tb.cpu(cpu);
    }
    if let Some(mem) = args.mem {
        tb = tb.memory_mib(mem);
    }
    if let Some(smp) = args.smp {
        tb = tb.smp(smp);
    }
    if let Some(secs) = args.timeout {
        tb = tb.timeout(Duration::from_secs(secs));
    }
    for (k, v) in &args.env {
        tb = tb.env(k, v);
    }
    for dir in &args.share_rw {
        let dir = std::path::absolute(dir).with_context(|| format!("{}", dir.display()))?;
        tb = tb.share_rw(dir);
    }
    let cwd = std::env::current_dir().context("cannot get the current directory")?;
    match tb.run(&args.cmd, &cwd) {
        Ok(code) => Ok(code),
        Err(err @ testbed::Error::Timeout(_)) => {
            eprintln!("cargo xtask testbed: {err}");
            Ok(124)
        }
        Err(err @ testbed::Error::NoExitStatus { .. }) => {
            eprintln!("cargo xtask testbed: {err}");
            Ok(125)
        }
        Err(err) => Err(err.into()),
    }
}
