//! The Linux namespaces of a container's spec, as the guest gets them.
//!
//! A namespace `path` in the spec names a namespace **on the host**: containerd's CRI plugin
//! puts the pod's CNI network namespace (`/var/run/netns/cni-…`) on the pod sandbox's spec, and
//! `/proc/<sandbox pid>/ns/{net,ipc,uts,pid}` on the spec of every other container of the pod.
//! Such a path means nothing inside the VM (or something else), so none is passed into the
//! guest. Each is handled here, on the host:
//!
//! - the sandbox's (or a pod's first container's) **network** path is the pod's host network
//!   namespace: it is returned, to be recorded on the pod (the pod's network device will be
//!   plugged in there), and the guest gets a fresh network namespace instead;
//! - `/proc/<pid>/ns/<type>` where `<pid>` is the pid the shim reported for a running
//!   container of this pod (Start answers with the guest pid, so that is what containerd puts
//!   there) means "that container's namespace": the guest spec gets the guest path the shim
//!   builds itself from that pid and type, so the container joins the sandbox's namespaces in
//!   the guest (network, IPC, UTS; PID with `shareProcessNamespace` or a target container);
//! - any other path is refused with an error naming it.
//!
//! A CRI pod (the `io.kubernetes.cri.container-type` annotation) must have network, PID and IPC
//! namespaces of its own: the CRI plugin leaves a namespace out of the sandbox's spec when the
//! pod asks for the host's (`hostNetwork` also drops UTS; `hostPID`, `hostIPC`), and the host's
//! namespaces do not exist in a microVM, so such a pod is refused with one clear error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// CRI's annotation saying what a container is to its pod.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

/// What a container is to its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// CRI's pod sandbox container (`container-type: sandbox`, the pause container): its
    /// namespaces are the pod's.
    Sandbox,
    /// A CRI container of a pod (`container-type: container`): joins the sandbox's namespaces.
    PodContainer,
    /// No CRI container type (`ctr run`): its spec's namespaces, fresh in the guest.
    Plain,
}

impl Role {
    pub fn of(spec: &Value) -> Role {
        match spec
            .pointer("/annotations")
            .and_then(|a| a.get(CONTAINER_TYPE_ANNOTATION))
            .and_then(Value::as_str)
        {
            Some("sandbox") => Role::Sandbox,
            Some(_) => Role::PodContainer,
            None => Role::Plain,
        }
    }

    fn is_cri(self) -> bool {
        self != Role::Plain
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// The pod wants one of the host's namespaces.
    #[error("{mode} pods cannot run in a microVM: {why}")]
    Host { mode: &'static str, why: String },
    #[error("linux.namespaces: the {typ} namespace path {path:?} {why}")]
    Path {
        typ: String,
        path: String,
        why: &'static str,
    },
    #[error("linux.namespaces: {0}")]
    Invalid(String),
    #[error("the pod's host network namespace {path}: {why}")]
    HostNetns { path: PathBuf, why: String },
}

/// What the pod around this container looks like to the rewrite.
pub struct PodView<'a> {
    /// Whether this is the pod's first container (whose namespaces are the pod's).
    pub first: bool,
    /// Whether `pid` is the (guest) pid of the init of a running container of this pod.
    pub running: &'a dyn Fn(u32) -> bool,
}

/// The kernel's name of a namespace type under `/proc/<pid>/ns/`.
fn proc_name(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "network" => "net",
        "ipc" => "ipc",
        "uts" => "uts",
        "pid" => "pid",
        "mount" => "mnt",
        "cgroup" => "cgroup",
        "user" => "user",
        "time" => "time",
        _ => return None,
    })
}

/// The pid in `/proc/<pid>/ns/<name>`, if `path` is exactly that (no `..`, no extra parts).
fn proc_ns_pid(path: &str, name: &str) -> Option<u32> {
    let rest = path.strip_prefix("/proc/")?;
    let (pid, ns) = rest.split_once('/')?;
    if ns != format!("ns/{name}") || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok().filter(|p| *p > 0)
}

/// The CRI pod option a missing namespace of this type stands for.
fn host_mode(typ: &str) -> Option<&'static str> {
    match typ {
        "network" => Some("hostNetwork"),
        "pid" => Some("hostPID"),
        "ipc" => Some("hostIPC"),
        _ => None,
    }
}

/// Rewrites `linux.namespaces` of `spec` for the guest (see the module documentation).
/// Returns the host network namespace path the spec named for the pod, if any.
pub fn rewrite(
    spec: &mut Value,
    role: Role,
    pod: &PodView<'_>,
) -> Result<Option<PathBuf>, NamespaceError> {
    let Some(namespaces) = spec.pointer_mut("/linux/namespaces") else {
        return refuse_missing(role, &[]);
    };
    let Some(namespaces) = namespaces.as_array_mut() else {
        return Err(NamespaceError::Invalid("not a list".into()));
    };
    let types: Vec<String> = namespaces
        .iter()
        .map(|ns| {
            ns.get("type")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        })
        .collect();
    refuse_missing(role, &types)?;
    let mut host_netns = None;
    for ns in namespaces.iter_mut() {
        let typ = ns
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let Some(path) = ns
            .get("path")
            .and_then(Value::as_str)
            .filter(|p| !p.is_empty())
        else {
            continue;
        };
        let path = path.to_string();
        let path_err = |why| NamespaceError::Path {
            typ: typ.clone(),
            path: path.clone(),
            why,
        };
        let guest = match typ.as_str() {
            // The sandbox's network namespace is the pod's, on the host.
            "network" if role == Role::Sandbox || (role == Role::Plain && pod.first) => {
                if !path.starts_with('/') {
                    return Err(path_err("is not absolute"));
                }
                host_netns = Some(PathBuf::from(&path));
                None
            }
            "pid" | "ipc" if role == Role::Sandbox => {
                return Err(NamespaceError::Host {
                    mode: host_mode(&typ).unwrap_or("host namespace"),
                    why: format!(
                        "the pod sandbox's spec joins the {typ} namespace {path:?}, a host \
                         namespace; the pod's own must be created in the VM"
                    ),
                })
            }
            "network" | "ipc" | "uts" | "pid" => {
                let name = proc_name(&typ).unwrap_or_default();
                match proc_ns_pid(&path, name) {
                    Some(pid) if (pod.running)(pid) => Some(format!("/proc/{pid}/ns/{name}")),
                    _ => {
                        return Err(path_err(
                            "names no running container of this pod (only \
                             /proc/<pid>/ns/<type> of one of the pod's containers can be \
                             joined in a microVM)",
                        ))
                    }
                }
            }
            "mount" => return Err(path_err("cannot be joined: each container has its own")),
            _ => return Err(path_err("cannot be joined in a microVM")),
        };
        let obj = ns
            .as_object_mut()
            .ok_or_else(|| NamespaceError::Invalid("an entry is not an object".into()))?;
        match guest {
            Some(p) => obj.insert("path".into(), Value::String(p)),
            None => obj.remove("path"),
        };
    }
    Ok(host_netns)
}

/// Refuses a CRI container without its own network, PID or IPC namespace (the host's).
fn refuse_missing(role: Role, types: &[String]) -> Result<Option<PathBuf>, NamespaceError> {
    if !role.is_cri() {
        return Ok(None);
    }
    for typ in ["network", "pid", "ipc"] {
        if !types.iter().any(|t| t == typ) {
            let mode = host_mode(typ).unwrap_or_default();
            return Err(NamespaceError::Host {
                mode,
                why: format!(
                    "the {} spec has no {typ} namespace, which is how containerd's CRI plugin \
                     asks for the host's ({mode}: true); a microVM has no access to the host's \
                     {typ} namespace",
                    if role == Role::Sandbox {
                        "pod sandbox's"
                    } else {
                        "container's"
                    }
                ),
            });
        }
    }
    Ok(None)
}

/// Checks on the host that `path` is a network namespace (`NS_GET_NSTYPE`), so a pod naming
/// something else fails at once with a clear error.
pub fn check_host_netns(path: &Path) -> Result<(), NamespaceError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |why: String| NamespaceError::HostNetns {
        path: path.to_path_buf(),
        why,
    };
    // Non-blocking: a FIFO named here must not hang the shim.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| err(e.to_string()))?;
    // NS_GET_NSTYPE = _IO(0xb7, 0x3).
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl without an argument on a descriptor we own; it only returns a value.
    let typ = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE) };
    if typ < 0 {
        return Err(err(format!(
            "not a namespace ({})",
            std::io::Error::last_os_error()
        )));
    }
    if typ != libc::CLONE_NEWNET {
        return Err(err("a namespace, but not a network namespace".into()));
    }
    Ok(())
}

/// Leaves the network namespace out of a pod sandbox's guest spec: the sandbox then runs in the
/// VM's own network namespace, where the pod's interface is (`ConfigureNetwork` sets it up
/// there), and the pod's containers join it through the sandbox's pid as usual. The spec's
/// network sysctls (containerd 2.x sets `net.ipv4.ip_unprivileged_port_start` and
/// `net.ipv4.ping_group_range` on every sandbox) go too: they are the pod network's, so the VM's
/// network namespace gets them, from [`network_sysctls`] through `CreateSandbox`.
pub fn use_vm_network(spec: &mut Value) {
    if let Some(list) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
    {
        list.retain(|ns| ns.get("type").and_then(Value::as_str) != Some("network"));
    }
    if let Some(sysctl) = spec
        .pointer_mut("/linux/sysctl")
        .and_then(Value::as_object_mut)
    {
        sysctl.retain(|key, _| !is_network_sysctl(key));
    }
}

fn is_network_sysctl(key: &str) -> bool {
    key.starts_with("net.") || key.starts_with("net/")
}

/// The spec's network sysctls (`net.*`), for the VM's network namespace when the pod's sandbox
/// runs there (see [`use_vm_network`]). The agent checks each name and value again.
pub fn network_sysctls(spec: &Value) -> BTreeMap<String, String> {
    spec.pointer("/linux/sysctl")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter(|(key, _)| is_network_sysctl(key))
        .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_string())))
        .collect()
}
