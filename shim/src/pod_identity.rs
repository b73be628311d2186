//! Which containers may join a pod's VM.
//!
//! A container names its pod with the `io.kubernetes.cri.sandbox-id` annotation, and
//! containerd starts it through that pod's shim (the socket address is derived from
//! containerd's address, the containerd namespace and that id). The id alone would let any
//! container that names it be placed in the pod's VM, next to the pod's processes. The shim
//! therefore takes the pod's identity from its first container and checks every later one:
//!
//! 1. **containerd namespace**: containerd sends its namespace with every shim call (the
//!    `containerd-namespace-ttrpc` header); a Create from another namespace than the shim's is
//!    refused. (The socket address differs per namespace already; this is the second lock.)
//! 2. **kind**: a CRI pod (its first container has `container-type=sandbox`) takes only CRI
//!    containers (`container-type=container`) and never a second sandbox; a pod made without
//!    CRI (`ctr run`) takes only containers without a CRI container type. A CRI container
//!    cannot come first (CRI creates the sandbox before the pod's containers), and a sandbox
//!    container's `sandbox-id` must be its own container id (CRI names it so).
//! 3. **Kubernetes pod**: `io.kubernetes.cri.sandbox-name` and `-namespace` (CRI sets both on
//!    the sandbox and on each container, from the pod's metadata) must equal the first
//!    container's; both absent for `ctr`.
//!
//! Not covered: a client of containerd's API in the same containerd namespace can write all
//! these annotations itself. Such a client can already do anything to that namespace's
//! containers through containerd; the checks keep a container of another containerd
//! namespace, another Kubernetes pod, or another kind of pod out of the VM.

use std::collections::HashMap;

use serde_json::Value;

use crate::guest_spec::Role;
use crate::pod;

/// The ttRPC metadata key containerd puts its namespace under.
pub const NAMESPACE_HEADER: &str = "containerd-namespace-ttrpc";
pub const SANDBOX_NAME_ANNOTATION: &str = "io.kubernetes.cri.sandbox-name";
pub const SANDBOX_NAMESPACE_ANNOTATION: &str = "io.kubernetes.cri.sandbox-namespace";

/// What a pod is, from its first container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    /// Made by CRI (the first container is a CRI pod sandbox).
    cri: bool,
    sandbox_name: Option<String>,
    sandbox_namespace: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(
        "a request from containerd namespace {theirs:?} reached the shim of a pod in namespace \
         {ours:?}"
    )]
    Namespace { theirs: String, ours: String },
    #[error("container {id} cannot join pod {pod}: {why}")]
    Refused {
        id: String,
        pod: String,
        why: String,
    },
}

/// Refuses a request whose containerd namespace header names another namespace than `ours`.
pub fn check_namespace(
    metadata: &HashMap<String, Vec<String>>,
    ours: &str,
) -> Result<(), JoinError> {
    match metadata.get(NAMESPACE_HEADER).and_then(|v| v.first()) {
        Some(theirs) if theirs != ours => Err(JoinError::Namespace {
            theirs: theirs.clone(),
            ours: ours.into(),
        }),
        _ => Ok(()),
    }
}

fn annotation(spec: &Value, key: &str) -> Option<String> {
    spec.pointer("/annotations")
        .and_then(|a| a.get(key))
        .and_then(Value::as_str)
        .map(String::from)
}

/// Admits container `id` (its `spec`) into the pod, whose identity is `pod` (`None` before
/// its first container). Returns the pod's identity.
pub fn admit(pod: Option<&PodIdentity>, id: &str, spec: &Value) -> Result<PodIdentity, JoinError> {
    let role = Role::of(spec);
    let me = PodIdentity {
        cri: role != Role::Plain,
        sandbox_name: annotation(spec, SANDBOX_NAME_ANNOTATION),
        sandbox_namespace: annotation(spec, SANDBOX_NAMESPACE_ANNOTATION),
    };
    let pod_id = pod::grouping(spec, id);
    let refuse = |why: String| JoinError::Refused {
        id: id.into(),
        pod: pod_id.clone(),
        why,
    };
    match (pod, role) {
        (None, Role::PodContainer) => Err(refuse(
            "a CRI container cannot come before its pod's sandbox container".into(),
        )),
        (None, Role::Sandbox) if pod_id != id => Err(refuse(format!(
            "a pod sandbox container must be named after its sandbox (sandbox-id {pod_id})"
        ))),
        (None, _) => Ok(me),
        (Some(_), Role::Sandbox) => Err(refuse("the pod has its sandbox container already".into())),
        (Some(p), _) if p.cri != me.cri => Err(refuse(if p.cri {
            "the pod was made by CRI and this container was not".into()
        } else {
            "this CRI container names a pod that was not made by CRI".into()
        })),
        (Some(p), _) if *p != me => Err(refuse(format!(
            "its Kubernetes pod ({}) is not the VM's ({})",
            me.describe(),
            p.describe()
        ))),
        (Some(p), _) => Ok(p.clone()),
    }
}

impl PodIdentity {
    fn describe(&self) -> String {
        let or_none = |s: &Option<String>| s.clone().unwrap_or_else(|| "none".into());
        format!(
            "sandbox-namespace {}, sandbox-name {}",
            or_none(&self.sandbox_namespace),
            or_none(&self.sandbox_name)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cri(container_type: &str, pod: &str, name: &str, ns: &str) -> Value {
        json!({"annotations": {
            "io.kubernetes.cri.container-type": container_type,
            pod::SANDBOX_ID_ANNOTATION: pod,
            SANDBOX_NAME_ANNOTATION: name,
            SANDBOX_NAMESPACE_ANNOTATION: ns,
        }})
    }

    #[test]
    fn a_cri_pod_takes_only_its_own_containers() {
        let pod = admit(None, "sb1", &cri("sandbox", "sb1", "web", "default")).unwrap();
        let ok = admit(Some(&pod), "c1", &cri("container", "sb1", "web", "default")).unwrap();
        assert_eq!(ok, pod);
        // Another Kubernetes pod naming this sandbox id.
        for (name, ns) in [("db", "default"), ("web", "other")] {
            let e = admit(Some(&pod), "c2", &cri("container", "sb1", name, ns))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("cannot join pod sb1") && e.contains("Kubernetes pod"),
                "{e}"
            );
        }
        // A second sandbox, a container without CRI's annotations.
        assert!(admit(Some(&pod), "sb2", &cri("sandbox", "sb1", "web", "default")).is_err());
        let plain = json!({"annotations": {pod::SANDBOX_ID_ANNOTATION: "sb1"}});
        let e = admit(Some(&pod), "c3", &plain).unwrap_err().to_string();
        assert!(e.contains("made by CRI"), "{e}");
    }

    #[test]
    fn a_pod_must_start_with_its_own_sandbox() {
        let e = admit(None, "c1", &cri("container", "sb1", "web", "default"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("before its pod's sandbox"), "{e}");
        let e = admit(None, "sb9", &cri("sandbox", "sb1", "web", "default"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("named after its sandbox"), "{e}");
    }

    #[test]
    fn ctr_pods_take_ctr_containers_only() {
        let plain = json!({"annotations": {pod::SANDBOX_ID_ANNOTATION: "pod1"}});
        let pod = admit(None, "pod1", &plain).unwrap();
        admit(Some(&pod), "pod1-b", &plain).unwrap();
        let e = admit(
            Some(&pod),
            "c1",
            &cri("container", "pod1", "web", "default"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not made by CRI"), "{e}");
    }

    #[test]
    fn requests_from_another_containerd_namespace_are_refused() {
        let md = |ns: &str| HashMap::from([(NAMESPACE_HEADER.to_string(), vec![ns.to_string()])]);
        check_namespace(&md("k8s.io"), "k8s.io").unwrap();
        check_namespace(&HashMap::new(), "k8s.io").unwrap();
        let e = check_namespace(&md("default"), "k8s.io")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"default\"") && e.contains("\"k8s.io\""), "{e}");
    }
}
