//! The VMM child process: `microvm-vmm`, started with its typed config on an inherited
//! descriptor (no configuration in its arguments), killed and reaped when the sandbox goes.

use std::ffi::CStr;
use std::fs;
use std::io::{Seek, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_protocol::agent as pb;
use agent_protocol::agent_ttrpc::AgentClient;
use agent_protocol::ttrpc::{self, context};
use command_fds::{CommandFdExt, FdMapping};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use vmm_api::VmConfig;

use crate::jail::VmJail;
use crate::{io, Console, Error, Result};

/// The descriptor the VMM reads its config from (`microvm-vmm --config-fd 3`).
pub const CONFIG_FD: i32 = 3;

/// A command that runs the VMM binary `vmm` as `microvm-vmm --config-fd 3`, with `config`
/// (validated here) as JSON in a sealed memfd on the child's descriptor 3. The memfd is
/// close-on-exec in this process, so no other child inherits it; the seals keep anyone from
/// changing the config after it was written. Stdio, process group and working directory are
/// the caller's to set.
pub fn vmm_command(vmm: &Path, config: &VmConfig) -> Result<Command> {
    let json = config
        .to_json()
        .map_err(|e| Error::Invalid(format!("VM config: {e}")))?;
    let memfd = sealed_memfd(&json).map_err(|e| Error::io("write the VM config to a memfd", e))?;
    let mut cmd = Command::new(vmm);
    cmd.arg("--config-fd").arg(CONFIG_FD.to_string());
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: memfd,
        child_fd: CONFIG_FD,
    }])
    .map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(cmd)
}

/// A memfd holding `data`, positioned at its start, sealed against every change.
fn sealed_memfd(data: &[u8]) -> std::io::Result<OwnedFd> {
    const NAME: &CStr = c"microvm-vm-config";
    let fd = memfd_create(NAME, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    let mut file = fs::File::from(fd);
    file.write_all(data)?;
    file.rewind()?;
    let seals = SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_SEAL;
    fcntl(&file, FcntlArg::F_ADD_SEALS(seals))?;
    Ok(file.into())
}

/// Starts the VMM for a sandbox: `config` on descriptor 3, stdin from /dev/null, console and
/// log as `console` says, in a process group of its own, with `state_dir` as its working
/// directory (which is how a shim recognises its VMM in /proc after a restart: the arguments
/// no longer name the sandbox).
pub(crate) fn spawn(
    vmm: &Path,
    config: &VmConfig,
    console: &Console,
    state_dir: &Path,
    netns: Option<&Path>,
) -> Result<Child> {
    // A relative program path would be looked up from the new working directory: resolve it
    // here first (a bare name is left to the PATH lookup).
    let vmm = if vmm.components().count() > 1 {
        std::path::absolute(vmm).map_err(|e| Error::io(format!("resolve {}", vmm.display()), e))?
    } else {
        vmm.to_path_buf()
    };
    let mut cmd = vmm_command(&vmm, config)?;
    cmd.stdin(Stdio::null()).current_dir(state_dir);
    // A process group of its own: a terminal's SIGINT, SIGQUIT or SIGTSTP goes to the
    // foreground group (the program that started the sandbox), never to the VMM, so that
    // program decides what a Ctrl-C does (end the sandbox, which kills the VMM on drop, or
    // forward it to the guest). No PR_SET_PDEATHSIG: it fires when the spawning *thread*
    // exits, and async runtimes start and end their threads at will.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    console.redirect(&mut cmd)?;
    if let Some(netns) = netns {
        enter_netns(&mut cmd, netns)?;
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("start {}", vmm.display()), e))?;
    tracing::debug!(pid = child.id(), "VMM started");
    Ok(child)
}

/// Makes `cmd`'s child enter the network namespace at `netns` (an nsfs file such as
/// `/var/run/netns/NAME` or `/proc/PID/ns/net`) before it executes, so that it opens taps
/// there by name. The file is opened here, close-on-exec, so a bad path fails before the fork;
/// the child only calls `setns(2)` on the inherited descriptor.
pub(crate) fn enter_netns(cmd: &mut Command, netns: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let ns = fs::File::open(netns)
        .map_err(|e| Error::io(format!("open the network namespace {}", netns.display()), e))?;
    // SAFETY: the closure only calls setns(2), which is async-signal-safe, on a descriptor the
    // closure owns (kept open until the child executes or fails); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// The VMM child process: killed, reaped and its sockets removed when dropped. A sandbox
/// reached through [`Sandbox::connect`] has no child and leaves the VMM and its sockets alone.
pub(crate) struct Vmm {
    pub(crate) child: Option<Child>,
    pub(crate) uds: PathBuf,
    /// The jail's ids and cgroup leaf: released after the child is reaped.
    pub(crate) jail: Option<VmJail>,
}

impl Vmm {
    /// Kills the VMM (its jail's supervisor, whose death kills the jailed VMM too) and reaps
    /// it, then removes its sockets and its cgroup leaf (which waits for the jailed process to
    /// be gone) and frees its ids.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            remove_sockets(&self.uds);
        }
        self.jail = None;
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Retries CONNECT to the agent port until `Health` answers.
pub(crate) async fn connect_agent(
    vmm: &mut Vmm,
    console: &Console,
    timeout: Duration,
) -> Result<AgentClient> {
    let started = Instant::now();
    loop {
        if let Some(status) = vmm.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            vmm.child = None;
            return Err(Error::VmmExited {
                status,
                console: console_tail(console),
            });
        }
        if started.elapsed() > timeout {
            return Err(Error::AgentTimeout {
                timeout,
                console: console_tail(console),
            });
        }
        let attempt = async {
            let s = io::connect_port(&vmm.uds, agent_protocol::AGENT_PORT)
                .await
                .ok()?;
            let client = AgentClient::new(ttrpc::r#async::Client::new(
                ttrpc::r#async::transport::Socket::from(s),
            ));
            client
                .health(
                    context::with_timeout(2_000_000_000),
                    &pb::HealthRequest::new(),
                )
                .await
                .ok()?;
            Some(client)
        };
        if let Ok(Some(client)) = tokio::time::timeout(Duration::from_secs(3), attempt).await {
            tracing::debug!("agent answered after {:?}", started.elapsed());
            return Ok(client);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last 4 KiB of the console file, if the console goes to one, without the guest's escape
/// sequences and control characters.
pub(crate) fn console_tail(console: &Console) -> String {
    match console {
        Console::File(p) => crate::console_text::tail(p, 4096),
        _ => String::new(),
    }
}

/// Removes the VMM's vsock socket and the `<socket>_<port>` listeners beside it.
pub(crate) fn remove_sockets(uds: &Path) {
    let _ = fs::remove_file(uds);
    let (Some(dir), Some(name)) = (uds.parent(), uds.file_name()) else {
        return;
    };
    let prefix = format!("{}_", name.to_string_lossy());
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        for name in ["vsock.sock", "vsock.sock_5000", "other"] {
            fs::write(dir.path().join(name), "").unwrap();
        }
        remove_sockets(&uds);
        let left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec!["other".to_string()]);
    }

    #[test]
    fn the_config_memfd_is_sealed() {
        let fd = sealed_memfd(b"{}").unwrap();
        let seals = SealFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GET_SEALS).unwrap());
        assert!(seals.contains(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW));
        assert!(seals.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL));
        let mut file = fs::File::from(fd);
        let err = file.write_all(b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        assert!(file.set_len(0).is_err());
    }

    /// The child finds the config, and only it, on descriptor 3, from its start.
    #[test]
    fn the_vmm_reads_its_config_on_descriptor_3() {
        let dir = tempfile::tempdir().unwrap();
        let fake_vmm = dir.path().join("fake-vmm");
        fs::write(&fake_vmm, "#!/bin/sh\necho \"$@\"; cat <&3\n").unwrap();
        let mut perms = fs::metadata(&fake_vmm).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        fs::set_permissions(&fake_vmm, perms).unwrap();
        let mut config = VmConfig::new("/k/vmlinux");
        config.memory_mib = 512;
        // A script just written can be busy (ETXTBSY) while another test's fork still holds
        // its descriptor: try again.
        let out = (0..50)
            .find_map(
                |_| match vmm_command(&fake_vmm, &config).unwrap().output() {
                    Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                        std::thread::sleep(Duration::from_millis(10));
                        None
                    }
                    other => Some(other.unwrap()),
                },
            )
            .expect("the script stayed busy");
        assert!(out.status.success());
        let stdout = String::from_utf8(out.stdout).unwrap();
        let (args, json) = stdout.split_once('\n').unwrap();
        assert_eq!(args, "--config-fd 3");
        assert_eq!(VmConfig::from_json(json.as_bytes()).unwrap(), config);
    }

    /// A child spawned through `enter_netns` runs in that namespace (root and `ip` needed,
    /// as for the hostnet tests).
    #[test]
    fn the_child_runs_in_the_given_network_namespace() {
        use std::os::unix::fs::MetadataExt;
        let name = format!("sbx-ns-{}", std::process::id());
        let ip = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        ip(&["netns", "add", &name]);
        let path = PathBuf::from(format!("/var/run/netns/{name}"));
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let entered = enter_netns(&mut cmd, &path).map(|()| cmd.spawn());
        let mut child = entered.unwrap().unwrap();
        let child_ns = fs::metadata(format!("/proc/{}/ns/net", child.id())).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let want = fs::metadata(&path).unwrap();
        let ours = fs::metadata("/proc/self/ns/net").unwrap();
        ip(&["netns", "del", &name]);
        assert_eq!((child_ns.dev(), child_ns.ino()), (want.dev(), want.ino()));
        assert_ne!(child_ns.ino(), ours.ino());
        // A missing namespace fails before anything is started.
        let mut cmd = Command::new("true");
        let err = enter_netns(&mut cmd, &path).unwrap_err();
        assert!(err.to_string().contains("network namespace"), "{err}");
    }

    #[test]
    fn an_invalid_config_starts_nothing() {
        let mut config = VmConfig::new("relative/vmlinux");
        config.vcpus = 2;
        let err = vmm_command(Path::new("/bin/true"), &config).unwrap_err();
        assert!(
            err.to_string().contains("kernel must be an absolute path"),
            "{err}"
        );
    }
}
