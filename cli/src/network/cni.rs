//! The runtime's half of the CNI protocol (spec 1.0): each plugin of a network configuration
//! list is executed with `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME` and
//! `CNI_PATH` in its environment and its configuration on stdin; `ADD` runs the plugins in
//! order, each given the previous one's result as `prevResult`, `DEL` in reverse order with the
//! result of the `ADD`. This is what containerd's `go-cni`/`libcni` do, without their result
//! cache (the caller keeps the result) and without a plugin's own network configuration file
//! format other than a `.conflist`.
//!
//! A plugin's output is host input from another program: read with size caps (stdout 1 MiB,
//! stderr 64 KiB), parsed into typed structures (unknown fields ignored, as the spec asks,
//! addresses parsed), and a plugin that runs past [`PLUGIN_TIMEOUT`] is killed.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The most a plugin may print on stdout (its result or error).
const STDOUT_CAP: u64 = 1 << 20;
/// The most of a plugin's stderr kept (for the error message).
const STDERR_CAP: u64 = 64 << 10;
/// How long one plugin may run.
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// The most entries of each kind a result may have.
const MAX_ENTRIES: usize = 64;

/// A network configuration list (`.conflist`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfList {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    /// Each plugin's configuration, as the file has it (`type` names the binary).
    pub plugins: Vec<Map<String, Value>>,
}

impl ConfList {
    /// Parses and checks a conflist: a name, a version, at least one plugin, each with a
    /// `type` that names a file (no `/`).
    pub fn parse(text: &[u8]) -> Result<Self> {
        let list: ConfList = serde_json::from_slice(text).context("not a CNI conflist")?;
        if list.name.is_empty() || list.plugins.is_empty() {
            bail!("a CNI conflist needs a name and at least one plugin");
        }
        for p in &list.plugins {
            plugin_type(p)?;
        }
        Ok(list)
    }
}

fn plugin_type(plugin: &Map<String, Value>) -> Result<&str> {
    let t = plugin
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("a CNI plugin configuration without a \"type\""))?;
    if t.is_empty() || t.contains('/') || t == "." || t == ".." {
        bail!("CNI plugin type {t:?} is not a file name");
    }
    Ok(t)
}

/// Where the plugins are and what the container is: the `CNI_*` variables.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// `CNI_PATH`: the directories searched for plugin binaries.
    pub plugin_dirs: Vec<PathBuf>,
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// `runtimeConfig`, by capability name (`portMappings`): given to the plugins whose
    /// `capabilities` ask for that key.
    pub runtime_config: Map<String, Value>,
}

/// A plugin's failure as it reported it (CNI's error structure), or the runtime's.
#[derive(Debug, Deserialize)]
struct PluginError {
    #[serde(default)]
    code: u32,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

/// The typed parts of a CNI 1.0 result that microvm reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct CniResult {
    #[serde(default)]
    pub interfaces: Vec<ResultInterface>,
    #[serde(default)]
    pub ips: Vec<ResultIp>,
    #[serde(default)]
    pub dns: ResultDns,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ResultInterface {
    pub name: String,
    #[serde(default)]
    pub sandbox: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ResultIp {
    /// `ADDRESS/PREFIX`.
    pub address: String,
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default)]
    pub interface: Option<usize>,
}

impl ResultIp {
    /// The address without its prefix length.
    pub fn ip(&self) -> Result<IpAddr> {
        let (ip, prefix) = self
            .address
            .split_once('/')
            .ok_or_else(|| anyhow!("CNI result address {:?} has no prefix", self.address))?;
        let ip: IpAddr = ip
            .parse()
            .with_context(|| format!("CNI result address {:?}", self.address))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match prefix.parse::<u8>() {
            Ok(p) if p <= max => Ok(ip),
            _ => bail!("CNI result address {:?}: bad prefix", self.address),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ResultDns {
    #[serde(default)]
    pub nameservers: Vec<String>,
    #[serde(default)]
    pub search: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

/// Parses and checks a plugin's result: a JSON object with a `cniVersion`, at most
/// [`MAX_ENTRIES`] of each list, every address parsed. Returns the typed view and the value
/// itself (the next plugin's `prevResult`).
pub fn parse_result(out: &[u8]) -> Result<(CniResult, Value)> {
    let value: Value = serde_json::from_slice(out).context("the CNI plugin's result")?;
    if !value.get("cniVersion").is_some_and(Value::is_string) {
        bail!("the CNI plugin's result has no cniVersion");
    }
    let typed: CniResult =
        serde_json::from_value(value.clone()).context("the CNI plugin's result")?;
    let d = &typed.dns;
    for (what, n) in [
        ("interfaces", typed.interfaces.len()),
        ("ips", typed.ips.len()),
        (
            "dns entries",
            d.nameservers.len() + d.search.len() + d.options.len(),
        ),
    ] {
        if n > MAX_ENTRIES {
            bail!("the CNI plugin's result has {n} {what} (at most {MAX_ENTRIES})");
        }
    }
    for ip in &typed.ips {
        ip.ip()?;
        if ip.interface.is_some_and(|i| i >= typed.interfaces.len()) {
            bail!(
                "CNI result address {} names a missing interface",
                ip.address
            );
        }
    }
    for s in &d.nameservers {
        s.parse::<IpAddr>()
            .with_context(|| format!("CNI result nameserver {s:?}"))?;
    }
    Ok((typed, value))
}

/// `ADD`: runs the list's plugins in order. Returns the last result. On a failure, the plugins
/// that ran are not undone here: the caller runs [`del`] (as CNI asks of a runtime).
pub fn add(list: &ConfList, rt: &Runtime) -> Result<(CniResult, Value)> {
    let _lock = host_lock()?;
    let mut prev: Option<(CniResult, Value)> = None;
    for plugin in &list.plugins {
        let config = plugin_config(list, plugin, prev.as_ref().map(|p| &p.1), rt);
        let out = exec(plugin, "ADD", &config, rt)?;
        prev =
            Some(parse_result(&out).with_context(|| {
                format!("CNI plugin {} (ADD)", plugin_type(plugin).unwrap_or("?"))
            })?);
    }
    prev.ok_or_else(|| anyhow!("the CNI conflist has no plugins"))
}

/// `DEL`: runs the list's plugins in reverse order, each with `prev` (the `ADD`'s result, if it
/// got one). Every plugin runs even when one fails (so that what the others made goes); the
/// first failure is returned.
pub fn del(list: &ConfList, rt: &Runtime, prev: Option<&Value>) -> Result<()> {
    let _lock = host_lock()?;
    let mut first_error = None;
    for plugin in list.plugins.iter().rev() {
        let config = plugin_config(list, plugin, prev, rt);
        if let Err(e) = exec(plugin, "DEL", &config, rt) {
            tracing::warn!("{e:#}");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Where concurrent `microvm` processes take turns at the CNI plugins.
const HOST_LOCK: &str = "/run/microvm/cni.lock";

/// One `ADD` or `DEL` at a time on this host: the firewall and portmap plugins create shared
/// iptables chains (`CNI-FORWARD`, ...) and fail when another run creates the same chain at the
/// same moment ("chain already exists"), as two first runs started together do. containerd
/// serialises its CNI calls the same way, within its one process. Released when dropped.
fn host_lock() -> Result<std::fs::File> {
    let path = Path::new(HOST_LOCK);
    if let Some(dir) = path.parent() {
        // Root's alone (it also holds the jail's id slots), whatever the umask.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("open {HOST_LOCK}"))?;
    file.lock().with_context(|| format!("lock {HOST_LOCK}"))?;
    Ok(file)
}

/// A plugin's stdin: its configuration with the list's `name` and `cniVersion`, the previous
/// result and the `runtimeConfig` keys its `capabilities` ask for.
fn plugin_config(
    list: &ConfList,
    plugin: &Map<String, Value>,
    prev: Option<&Value>,
    rt: &Runtime,
) -> Vec<u8> {
    let mut c = plugin.clone();
    c.insert("name".into(), Value::String(list.name.clone()));
    c.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
    if let Some(prev) = prev {
        c.insert("prevResult".into(), prev.clone());
    }
    let caps = plugin.get("capabilities").and_then(Value::as_object);
    let runtime_config: Map<String, Value> = rt
        .runtime_config
        .iter()
        .filter(|(k, _)| caps.is_some_and(|c| c.get(*k) == Some(&Value::Bool(true))))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !runtime_config.is_empty() {
        c.insert("runtimeConfig".into(), Value::Object(runtime_config));
    }
    serde_json::to_vec(&Value::Object(c)).expect("a JSON map serializes")
}

fn find_plugin(name: &str, dirs: &[PathBuf]) -> Result<PathBuf> {
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "CNI plugin {name:?} not found in {} (Debian: apt-get install \
                 containernetworking-plugins)",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            )
        })
}

/// Runs one plugin; its stdout on success, else an error with its message.
fn exec(
    plugin: &Map<String, Value>,
    command: &str,
    config: &[u8],
    rt: &Runtime,
) -> Result<Vec<u8>> {
    let name = plugin_type(plugin)?;
    let path = find_plugin(name, &rt.plugin_dirs)?;
    let cni_path = std::env::join_paths(&rt.plugin_dirs).context("CNI_PATH")?;
    let what = format!("CNI plugin {name} ({command})");
    let mut child = Command::new(&path)
        // A clean environment: only what the protocol defines, and a PATH for the tools the
        // plugins run (iptables).
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &rt.container_id)
        .env("CNI_NETNS", &rt.netns)
        .env("CNI_IFNAME", &rt.ifname)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {what}: {}", path.display()))?;
    let capped = |r: Box<dyn Read + Send>, cap: u64| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let mut r = r.take(cap + 1);
            let _ = r.read_to_end(&mut v);
            // Drain the rest so that the plugin never blocks on a full pipe.
            let _ = std::io::copy(&mut r.into_inner(), &mut std::io::sink());
            v
        })
    };
    let stdout = capped(Box::new(child.stdout.take().expect("piped")), STDOUT_CAP);
    let stderr = capped(Box::new(child.stderr.take().expect("piped")), STDERR_CAP);
    let mut stdin = child.stdin.take().expect("piped");
    // A plugin that exits without reading its config gives EPIPE here: its status says more.
    let _ = stdin.write_all(config);
    drop(stdin);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().context("wait for a CNI plugin")? {
            break s;
        }
        if started.elapsed() > PLUGIN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{what} did not finish within {} s",
                PLUGIN_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = stdout.join().unwrap_or_default();
    let err = stderr.join().unwrap_or_default();
    if out.len() as u64 > STDOUT_CAP {
        bail!("{what} printed more than {} KiB", STDOUT_CAP >> 10);
    }
    if status.success() {
        return Ok(out);
    }
    let err_text = String::from_utf8_lossy(&err[..err.len().min(4096)]);
    match serde_json::from_slice::<PluginError>(&out) {
        Ok(e) if !e.msg.is_empty() => {
            let details = if e.details.is_empty() {
                String::new()
            } else {
                format!(" ({})", e.details)
            };
            bail!("{what} failed: {}{details} [CNI error {}]", e.msg, e.code)
        }
        _ => bail!("{what} failed ({status}): {}", err_text.trim()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use serde_json::json;

    fn runtime(dir: &Path) -> Runtime {
        let mut rc = Map::new();
        rc.insert("portMappings".into(), json!([{"hostPort": 8080}]));
        Runtime {
            plugin_dirs: vec![dir.to_path_buf()],
            container_id: "c1".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            runtime_config: rc,
        }
    }

    /// A plugin that logs its environment and stdin to `log` and prints `out` (exit `code`).
    fn fake_plugin(dir: &Path, name: &str, out: &str, code: i32) {
        let log = dir.join("log");
        let script = format!(
            "#!/bin/sh\n{{ echo \"{name} $CNI_COMMAND $CNI_CONTAINERID $CNI_NETNS $CNI_IFNAME \
             $CNI_PATH\"; cat; echo; }} >> {}\ncat <<'EOF'\n{out}\nEOF\nexit {code}\n",
            log.display()
        );
        let p = dir.join(name);
        std::fs::write(&p, script).unwrap();
        let mut perm = std::fs::metadata(&p).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(&p, perm).unwrap();
    }

    const RESULT: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/x"}],"ips":[{"address":"10.89.0.7/16","gateway":"10.89.0.1","interface":0}],"dns":{}}"#;

    fn list(types: &[(&str, bool)]) -> ConfList {
        ConfList::parse(
            &serde_json::to_vec(&json!({
                "cniVersion": "1.0.0",
                "name": "net1",
                "plugins": types.iter().map(|(t, ports)| if *ports {
                    json!({"type": t, "capabilities": {"portMappings": true}})
                } else {
                    json!({"type": t})
                }).collect::<Vec<_>>(),
            }))
            .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn add_chains_results_and_del_runs_in_reverse_with_the_result() {
        let dir = tempfile::tempdir().unwrap();
        fake_plugin(dir.path(), "first", RESULT, 0);
        fake_plugin(
            dir.path(),
            "second",
            &RESULT.replace("10.89.0.7", "10.89.0.8"),
            0,
        );
        let l = list(&[("first", false), ("second", true)]);
        let rt = runtime(dir.path());
        let (typed, value) = add(&l, &rt).unwrap();
        assert_eq!(typed.ips[0].ip().unwrap().to_string(), "10.89.0.8");
        del(&l, &rt, Some(&value)).unwrap();
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
        let lines: Vec<&str> = log.lines().filter(|l| !l.is_empty()).collect();
        let env = format!("c1 /run/netns/x eth0 {}", dir.path().display());
        assert_eq!(lines[0], format!("first ADD {env}"));
        let first: Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(first["name"], "net1");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert!(first.get("prevResult").is_none());
        assert!(first.get("runtimeConfig").is_none(), "not asked for");
        assert_eq!(lines[2], format!("second ADD {env}"));
        let second: Value = serde_json::from_str(lines[3]).unwrap();
        assert_eq!(second["prevResult"]["ips"][0]["address"], "10.89.0.7/16");
        assert_eq!(second["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        assert_eq!(lines[4], format!("second DEL {env}"));
        assert_eq!(lines[6], format!("first DEL {env}"));
        let del_first: Value = serde_json::from_str(lines[7]).unwrap();
        assert_eq!(del_first["prevResult"]["ips"][0]["address"], "10.89.0.8/16");
    }

    #[test]
    fn a_plugin_error_is_reported_with_its_message_and_del_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        fake_plugin(
            dir.path(),
            "bad",
            r#"{"cniVersion":"1.0.0","code":11,"msg":"no addresses left","details":"range full"}"#,
            1,
        );
        fake_plugin(dir.path(), "good", RESULT, 0);
        let l = list(&[("good", false), ("bad", false)]);
        let rt = runtime(dir.path());
        let e = format!("{:#}", add(&l, &rt).unwrap_err());
        assert!(
            e.contains("CNI plugin bad (ADD) failed: no addresses left (range full)"),
            "{e}"
        );
        // DEL: `bad` fails first, `good` still runs.
        let e = format!("{:#}", del(&l, &rt, None).unwrap_err());
        assert!(e.contains("bad (DEL)"), "{e}");
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
        assert!(log.contains("good DEL"), "{log}");
        let missing = list(&[("absent", false)]);
        let e = format!("{:#}", add(&missing, &rt).unwrap_err());
        assert!(e.contains("\"absent\" not found"), "{e}");
    }

    #[test]
    fn results_are_checked() {
        assert!(parse_result(RESULT.as_bytes()).is_ok());
        for bad in [
            "not json",
            "[]",
            r#"{"ips":[]}"#,
            r#"{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.1"}]}"#,
            r#"{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.1/33"}]}"#,
            r#"{"cniVersion":"1.0.0","ips":[{"address":"banana/8"}]}"#,
            r#"{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.1/8","interface":3}]}"#,
            r#"{"cniVersion":"1.0.0","dns":{"nameservers":["x"]}}"#,
        ] {
            assert!(parse_result(bad.as_bytes()).is_err(), "{bad}");
        }
        let many =
            json!({"cniVersion": "1.0.0", "ips": vec![json!({"address": "10.0.0.1/8"}); 65]});
        assert!(parse_result(&serde_json::to_vec(&many).unwrap()).is_err());
        assert!(ConfList::parse(
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../x"}]}"#
        )
        .is_err());
        assert!(ConfList::parse(br#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#).is_err());
    }

    #[test]
    fn a_plugin_that_prints_too_much_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loud");
        std::fs::write(&p, "#!/bin/sh\ncat >/dev/null\nhead -c 2000000 /dev/zero\n").unwrap();
        let mut perm = std::fs::metadata(&p).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(&p, perm).unwrap();
        let e = format!(
            "{:#}",
            add(&list(&[("loud", false)]), &runtime(dir.path())).unwrap_err()
        );
        assert!(e.contains("more than 1024 KiB"), "{e}");
    }
}
