//! `critest` (cri-tools' CRI validation suite) with the `runc` handler and then the `microvm`
//! handler, the test images from the loopback registry (`--test-images-file`). The goal the
//! issue sets: every spec that passes under runc passes under microvm.
//!
//! Under the testbed's emulated CPU a full run takes hours, so two focused runs: the PodSandbox
//! and Container basics (`CRITEST_FOCUS` replaces that focus, a ginkgo regular expression), and,
//! with `CRITEST_SECURITY_CONTEXT` set, the Security Context specs, where the pods that ask for
//! the host's network, IPC or PID namespace are refused by microvm by design and must fail with
//! the shim's own refusal.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::cri::{Cri, BUSYBOX};
use crate::common::{check, text};
use crate::World;

/// The specs run by default: PodSandbox and Container "basic operations".
pub const FOCUS: &str = r"(PodSandbox|Container) runtime should support basic operations";

/// The Security Context specs (run as users and groups, read-only root, privileged,
/// capabilities, masked paths, seccomp, no_new_privs, namespaces).
pub const SECURITY_CONTEXT: &str = "Security Context";

/// Specs microvm fails on purpose: a VM cannot share the host's namespaces, so the shim refuses
/// such a pod with this message (`shim/src/guest_spec`).
const BY_DESIGN: &[&str] = &[
    "NamespaceOption runtime should support HostNetwork is true",
    "NamespaceOption runtime should support HostIpc is true",
    "NamespaceOption runtime should support HostPID",
];
const REFUSAL: &str = "pods cannot run in a microVM";

/// What one critest run gave: spec name to its state (`passed`, `failed`, `skipped`, ...) and
/// each failure's message.
struct Run {
    states: BTreeMap<String, String>,
    failures: BTreeMap<String, String>,
}

impl Run {
    fn count(&self, state: &str) -> usize {
        self.states.values().filter(|s| *s == state).count()
    }

    fn summary(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped of {}",
            self.count("passed"),
            self.states.len() - self.count("passed") - self.count("skipped"),
            self.count("skipped"),
            self.states.len()
        )
    }
}

pub fn basics(w: &World, c: &Cri) -> Result<(), String> {
    let focus = std::env::var("CRITEST_FOCUS").unwrap_or_else(|_| FOCUS.into());
    compare(w, c, "basics", &focus, &[])
}

pub fn security_context(w: &World, c: &Cri) -> Result<(), String> {
    compare(w, c, "security-context", SECURITY_CONTEXT, BY_DESIGN)
}

/// critest with `focus` under runc, then under microvm: every spec that passes under runc must
/// pass under microvm, except those in `by_design`, which must fail with [`REFUSAL`].
fn compare(w: &World, c: &Cri, name: &str, focus: &str, by_design: &[&str]) -> Result<(), String> {
    let dir = c.dir.join("critest").join(name);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let images = dir.join("images.yaml");
    let image = w.registry.image(BUSYBOX);
    std::fs::write(
        &images,
        format!("defaultTestContainerImage: {image}\nwebServerTestImage: {image}\n"),
    )
    .map_err(|e| e.to_string())?;
    let runc = critest(w, c, &dir, &images, focus, "runc")?;
    let microvm = critest(w, c, &dir, &images, focus, "microvm")?;
    eprintln!(
        "critest {:?} focus {focus:?}: runc {}; microvm {}",
        c.flavor,
        runc.summary(),
        microvm.summary()
    );
    for (handler, run) in [("runc", &runc), ("microvm", &microvm)] {
        for (spec, state) in run
            .states
            .iter()
            .filter(|(_, s)| !matches!(s.as_str(), "passed" | "skipped"))
        {
            let why = run.failures.get(spec).map(String::as_str).unwrap_or("");
            eprintln!("critest {:?} {handler}: {state}: {spec}: {why}", c.flavor);
        }
    }
    check(runc.count("passed") > 0, || {
        format!("no spec passed under runc: {}", runc.summary())
    })?;
    let refused = |spec: &str| by_design.iter().any(|d| spec.ends_with(d));
    let gaps: Vec<String> = runc
        .states
        .iter()
        .filter(|(spec, state)| {
            *state == "passed"
                && !refused(spec)
                && microvm.states.get(*spec).map(String::as_str) != Some("passed")
        })
        .map(|(spec, _)| {
            let why = microvm.failures.get(spec).map(String::as_str).unwrap_or("");
            format!("{spec}: {why}")
        })
        .collect();
    check(gaps.is_empty(), || {
        format!(
            "passed under runc, not under microvm ({}):\n{}",
            microvm.summary(),
            gaps.join("\n")
        )
    })?;
    // A spec microvm refuses by design must have run, and failed with the shim's refusal (not
    // passed, and not failed for some other reason).
    let wrong: Vec<String> = microvm
        .states
        .iter()
        .filter(|(spec, state)| refused(spec) && *state != "skipped")
        .filter(|(spec, _)| {
            !microvm
                .failures
                .get(*spec)
                .is_some_and(|why| why.contains(REFUSAL))
        })
        .map(|(spec, state)| format!("{spec}: {state}"))
        .collect();
    check(wrong.is_empty(), || {
        format!(
            "refused by design, but not with {REFUSAL:?}:\n{}",
            wrong.join("\n")
        )
    })
}

/// One critest run with `handler`; its ginkgo JSON report read back.
fn critest(
    w: &World,
    c: &Cri,
    dir: &Path,
    images: &Path,
    focus: &str,
    handler: &str,
) -> Result<Run, String> {
    let report = dir.join(format!("{handler}.json"));
    let out = Command::new("timeout")
        .arg("7200")
        .arg(&w.peers.critest)
        .arg(format!("--runtime-endpoint={}", c.endpoint()))
        .arg(format!("--image-endpoint={}", c.endpoint()))
        .arg(format!("--runtime-handler={handler}"))
        .arg(format!("--test-images-file={}", images.display()))
        .arg(format!("--ginkgo.focus={focus}"))
        .arg(format!("--ginkgo.json-report={}", report.display()))
        .args(["--ginkgo.no-color", "--ginkgo.timeout=2h"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run critest: {e}"))?;
    let json = std::fs::read_to_string(&report).map_err(|e| {
        format!(
            "critest ({handler}) wrote no report {}: {e}\n{}",
            report.display(),
            text(&out)
        )
    })?;
    let suites: serde_json::Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
    let mut run = Run {
        states: BTreeMap::new(),
        failures: BTreeMap::new(),
    };
    for spec in suites
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["SpecReports"].as_array().into_iter().flatten())
        .filter(|s| s["LeafNodeType"] == "It")
    {
        let mut name: Vec<&str> = spec["ContainerHierarchyTexts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str())
            .collect();
        name.extend(spec["LeafNodeText"].as_str());
        let name = name.join(" ");
        let state = spec["State"].as_str().unwrap_or("unknown").to_string();
        if let Some(m) = spec["Failure"]["Message"].as_str() {
            let start: Vec<&str> = m.lines().take(6).collect();
            run.failures.insert(name.clone(), start.join(" | "));
        }
        run.states.insert(name, state);
    }
    Ok(run)
}
