//! The configuration files `cargo xtask install` writes: the shim's `shim.toml` (naming the
//! installed kernel, agent, VMM and virtiofsd), the containerd drop-in for the `microvm`
//! runtime handler, and the Kubernetes RuntimeClass that selects it.

use std::path::Path;

/// The first line of every file the installer generates.
pub const HEADER: &str = "# Written by `cargo xtask install` (microvm).";

/// The runtime handler's name, in containerd's config and in the RuntimeClass.
pub const HANDLER: &str = "microvm";

/// containerd's runtime type for the shim binary `containerd-shim-microvm-v2`.
pub const RUNTIME_TYPE: &str = "io.containerd.microvm.v2";

/// Where the shim finds its host-side files once installed.
pub struct ShimPaths<'a> {
    pub kernel: &'a Path,
    pub agent: &'a Path,
    pub vmm: &'a Path,
    /// None when virtiofsd was not built: the shim then looks it up itself (and a pod without
    /// one refuses host bind mounts).
    pub virtiofsd: Option<&'a Path>,
}

/// A TOML basic string: the path quoted, with `"` and `\` escaped.
fn toml_string(path: &Path) -> String {
    let mut out = String::from("\"");
    for c in path.display().to_string().chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The shim's configuration (the keys of `shim::config::ShimConfig`); the VM size and limits
/// are left at the shim's defaults, listed as comments for the operator to change.
pub fn shim_toml(paths: &ShimPaths) -> String {
    let mut text = format!(
        "{HEADER}\n# The containerd shim's configuration (containerd passes its path as the runtime\n\
         # option ConfigPath). A reinstall replaces this file only while it is unchanged.\n\
         kernel = {}\nagent = {}\nvmm = {}\n",
        toml_string(paths.kernel),
        toml_string(paths.agent),
        toml_string(paths.vmm),
    );
    match paths.virtiofsd {
        Some(v) => text.push_str(&format!("virtiofsd = {}\n", toml_string(v))),
        None => text.push_str(
            "# virtiofsd was not installed (`cargo xtask virtiofsd`, then install again);\n\
             # without it a pod's VM refuses host bind mounts.\n",
        ),
    }
    text.push_str(
        "# A pod's VM size before its own limits are added, and the most it may have:\n\
         # cpus = 1\n# memory_mib = 256\n# max_cpus = 8\n# max_memory_mib = 8192\n\
         # log_level = \"info\"\n",
    );
    text
}

/// The syntax of a containerd config file (`version = N` at its top).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ContainerdSyntax {
    /// `version = 2`: containerd 1.6 and 1.7 (2.x migrates it when importing).
    #[value(name = "2")]
    V2,
    /// `version = 3`: containerd 2.x only.
    #[value(name = "3")]
    V3,
}

/// The containerd drop-in declaring the `microvm` runtime handler.
pub fn containerd_dropin(syntax: ContainerdSyntax, shim_toml: &Path) -> String {
    let (version, table) = match syntax {
        ContainerdSyntax::V2 => (
            2,
            "plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes",
        ),
        ContainerdSyntax::V3 => (
            3,
            "plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes",
        ),
    };
    format!(
        "{HEADER}\n# The `{HANDLER}` runtime handler: pods whose RuntimeClass names it run in microVMs.\n\
         # The pod annotations carry the pod's sandbox id and size to the shim.\n\
         version = {version}\n\n\
         [{table}.{HANDLER}]\n  runtime_type = \"{RUNTIME_TYPE}\"\n  \
         pod_annotations = [\"io.kubernetes.cri.*\"]\n\n\
         [{table}.{HANDLER}.options]\n  ConfigPath = {}\n",
        toml_string(shim_toml)
    )
}

/// The RuntimeClass that selects the handler (`runtimeClassName: microvm` in a pod spec).
pub fn runtime_class() -> String {
    format!(
        "{HEADER}\n# kubectl apply -f this file; then set `runtimeClassName: {HANDLER}` in a pod spec.\n\
         apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: {HANDLER}\n\
         handler: {HANDLER}\n\
         overhead:\n  podFixed:\n    memory: \"160Mi\"   # guest kernel, agent and VMM, beyond the containers' limits\n    \
         cpu: \"100m\"\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn paths(virtiofsd: Option<&Path>) -> String {
        shim_toml(&ShimPaths {
            kernel: Path::new("/usr/local/share/microvm/vmlinux"),
            agent: Path::new("/usr/local/lib/microvm/microvm-agent"),
            vmm: Path::new("/usr/local/bin/microvm-vmm"),
            virtiofsd,
        })
    }

    #[test]
    fn the_shim_config_names_every_installed_file() {
        let text = paths(Some(Path::new("/usr/local/lib/microvm/virtiofsd")));
        assert!(text.starts_with(HEADER));
        let table: toml::Table = toml::from_str(&text).unwrap();
        let get = |k: &str| table[k].as_str().unwrap().to_string();
        assert_eq!(get("kernel"), "/usr/local/share/microvm/vmlinux");
        assert_eq!(get("agent"), "/usr/local/lib/microvm/microvm-agent");
        assert_eq!(get("vmm"), "/usr/local/bin/microvm-vmm");
        assert_eq!(get("virtiofsd"), "/usr/local/lib/microvm/virtiofsd");
        // Nothing else is set: the shim's defaults apply (and its parser denies unknown keys).
        assert_eq!(table.len(), 4, "{table:?}");
    }

    #[test]
    fn without_virtiofsd_the_key_is_left_out() {
        let table: toml::Table = toml::from_str(&paths(None)).unwrap();
        assert!(!table.contains_key("virtiofsd"));
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn paths_with_quotes_stay_one_toml_string() {
        let odd = PathBuf::from("/opt/a \"b\"\\c/vmlinux");
        let text = shim_toml(&ShimPaths {
            kernel: &odd,
            agent: Path::new("/a"),
            vmm: Path::new("/v"),
            virtiofsd: None,
        });
        let table: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(table["kernel"].as_str(), Some("/opt/a \"b\"\\c/vmlinux"));
    }

    fn handler<'a>(table: &'a toml::Table, plugin: &str) -> &'a toml::Table {
        table["plugins"][plugin]["containerd"]["runtimes"][HANDLER]
            .as_table()
            .unwrap()
    }

    #[test]
    fn the_dropin_declares_the_handler_in_both_syntaxes() {
        let shim = Path::new("/etc/microvm/shim.toml");
        for (syntax, version, plugin) in [
            (ContainerdSyntax::V2, 2, "io.containerd.grpc.v1.cri"),
            (ContainerdSyntax::V3, 3, "io.containerd.cri.v1.runtime"),
        ] {
            let table: toml::Table = toml::from_str(&containerd_dropin(syntax, shim)).unwrap();
            assert_eq!(table["version"].as_integer(), Some(version));
            let rt = handler(&table, plugin);
            assert_eq!(rt["runtime_type"].as_str(), Some(RUNTIME_TYPE));
            assert_eq!(
                rt["options"]["ConfigPath"].as_str(),
                Some("/etc/microvm/shim.toml")
            );
            assert_eq!(
                rt["pod_annotations"].as_array().unwrap()[0].as_str(),
                Some("io.kubernetes.cri.*")
            );
        }
    }

    #[test]
    fn the_runtime_class_names_the_handler() {
        let text = runtime_class();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"kind: RuntimeClass"));
        assert!(lines.contains(&"apiVersion: node.k8s.io/v1"));
        assert!(lines.contains(&"  name: microvm"));
        assert!(lines.contains(&"handler: microvm"));
        assert!(lines.contains(&"  podFixed:"));
    }
}
