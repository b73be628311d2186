//! The guest kernel command line: the defaults every microvm guest boots with, in one place,
//! plus typed additions.

use serde::{Deserialize, Serialize};

/// The guest command line's defaults: serial console, reset through the i8042 on reboot
/// (`reboot=k`: the VMM ends with status 0), reboot at once on panic, no PCI probing (the PCI
/// core is built in only for `/dev/port`; there is no PCI bus), and no boot chatter (each
/// console byte is a VM exit).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";

/// The longest command line a config may ask for (base and parameters), leaving room in the
/// kernel's 4 KiB for the `virtio_mmio.device=` entries the VMM appends.
pub const MAX_CMDLINE_BYTES: usize = 2048;

/// The guest command line: a base ([`DEFAULT_CMDLINE`] unless replaced) followed by typed
/// parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelCmdline {
    /// Replaces [`DEFAULT_CMDLINE`] entirely (for kernels that need another console or reboot
    /// method); `None`: the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Appended after the base, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<KernelParam>,
}

/// One `key` or `key=value` word of the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelParam {
    /// Letters, digits, `_`, `.` and `-` (`RUST_LOG`, `virtio_mmio.device`).
    pub key: String,
    /// Printable ASCII without spaces or quotes; `None`: a bare flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl KernelParam {
    /// `key=value`.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: Some(value.into()),
        }
    }

    /// A bare `key`.
    pub fn flag(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: None,
        }
    }

    /// Why this parameter cannot go on a command line, if it cannot.
    pub(crate) fn problem(&self) -> Option<&'static str> {
        let key_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
        if self.key.is_empty() || !self.key.chars().all(key_ok) {
            return Some("a key is 1 or more of A-Z a-z 0-9 _ . -");
        }
        let value_ok = |c: char| c.is_ascii_graphic() && c != '"';
        if self
            .value
            .as_deref()
            .is_some_and(|v| !v.chars().all(value_ok))
        {
            return Some("a value is printable ASCII without spaces or quotes");
        }
        None
    }
}

impl std::fmt::Display for KernelParam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={v}", self.key),
            None => f.write_str(&self.key),
        }
    }
}

impl KernelCmdline {
    /// The defaults with `params` after them.
    pub fn with_params(params: Vec<KernelParam>) -> Self {
        Self { base: None, params }
    }

    /// The command line as the guest gets it (before the VMM's device entries).
    pub fn render(&self) -> String {
        let mut line = self.base.as_deref().unwrap_or(DEFAULT_CMDLINE).to_string();
        for p in &self.params {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(&p.to_string());
        }
        line
    }
}
