//! Connects a VM to a network namespace that CNI (or microvm itself) wired, the way Kata
//! Containers does by default ("tcfilter"): a tap for the VM in that namespace, joined to the
//! CNI interface (a veth, usually `eth0`) by tc ingress redirects both ways, so CNI plugins need
//! no change. The guest then takes over the interface's identity: its MAC, addresses, routes
//! and MTU, which [`plumb`] reads and returns ([`PodInterface`]).
//!
//! Every netlink conversation and tap ioctl runs on a thread of its own that entered the
//! namespace ([`netns`]); the caller's threads never change namespace. See README.md.

pub mod loopback;
pub mod netns;

mod agent;
mod inspect;
mod tap;
mod tc;

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rtnetlink::packet_route::link::LinkFlags;
use rtnetlink::LinkUnspec;

pub use tc::{Filter, FILTER_PRIORITY};

/// The name CNI gives the pod's interface unless told otherwise.
pub const DEFAULT_INTERFACE: &str = "eth0";
/// The name of the VM's tap, beside the CNI interface in the pod's namespace.
pub const DEFAULT_TAP: &str = "tap0_mvm";

/// Why plumbing failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("{0:?} is not a valid interface name (1 to 15 bytes, no '/', '%', ':' or blank)")]
    InvalidName(String),
    #[error("the namespace has no interface {0}")]
    NoInterface(String),
    #[error("interface {0} has no Ethernet address")]
    NotEthernet(String),
    #[error("interface {0} exists already")]
    Exists(String),
    #[error("interface {0} has an ingress qdisc already (plumbed by someone else?)")]
    Busy(String),
    #[error("tap {name}: {what}: {source}")]
    Tap {
        name: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Thread(String),
    #[error("the loopback redirect for port forwarding: {0}")]
    Redirect(String),
}

impl Error {
    fn netlink(what: String, source: rtnetlink::Error) -> Self {
        Self::Netlink { what, source }
    }
}

/// The errno of a netlink error answer, if `e` is one.
fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// A route out of the pod's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `None`: the default route.
    pub destination: Option<IpNet>,
    pub gateway: Option<IpAddr>,
    /// The preferred source address.
    pub source: Option<IpAddr>,
    /// Scope link: the destination is on the link (no gateway).
    pub scope_link: bool,
}

/// A static neighbour entry (IP to MAC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

/// What CNI gave the pod's interface: the identity the guest's interface takes over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    /// Its name in the pod's namespace (`eth0`), which the guest's interface takes too.
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Global addresses (IPv6 link-local ones left out).
    pub addresses: Vec<IpNet>,
    /// Routes of the main table through it, except the kernel's own per-address ones.
    pub routes: Vec<Route>,
    /// Its permanent neighbour entries.
    pub neighbours: Vec<Neighbour>,
}

/// A VM's tap connected to a pod's interface, as [`plumb`] made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plumbing {
    /// The network namespace it lives in.
    pub netns: PathBuf,
    /// The VM's tap, persistent, in that namespace.
    pub tap: String,
    /// The CNI interface it is joined to, and what the guest must configure.
    pub interface: PodInterface,
}

impl Plumbing {
    /// Opens a queue of the tap (see [`open_tap`]) to hand to the VMM.
    pub fn open_tap(&self) -> Result<OwnedFd, Error> {
        open_tap(&self.netns, &self.tap)
    }

    /// Undoes [`plumb`] (see [`unplumb`]).
    pub fn unplumb(&self) -> Result<(), Error> {
        unplumb(&self.netns, &self.interface.name, &self.tap)
    }
}

/// In the network namespace at `netns`: reads the CNI interface `interface` (`eth0`), creates
/// the persistent tap `tap` (`IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`) with the interface's MTU, brings
/// both up and joins them with an ingress qdisc and a match-all mirred redirect on each.
///
/// The interface keeps its addresses, as in Kata's tcfilter model: every frame that reaches it
/// is redirected to the tap before the namespace's IP stack sees it, so the namespace never
/// answers ARP or traffic for them (no conflict with the guest), and tools that read the pod's
/// IP from the namespace still find it there.
///
/// Fails, changing nothing, if `tap` exists or the interface has an ingress qdisc already; a
/// failure half-way removes what this call created.
pub fn plumb(netns: &Path, interface: &str, tap: &str) -> Result<Plumbing, Error> {
    for name in [interface, tap] {
        if !tap::valid_name(name) {
            return Err(Error::InvalidName(name.to_string()));
        }
    }
    let (interface_name, tap_name) = (interface.to_string(), tap.to_string());
    let pod = netns::with_netlink(netns, move |handle| async move {
        let (veth, pod) = inspect::interface(&handle, &interface_name).await?;
        if inspect::link(&handle, &tap_name).await?.is_some() {
            return Err(Error::Exists(tap_name));
        }
        if tc::has_ingress_qdisc(&handle, veth).await? {
            return Err(Error::Busy(interface_name));
        }
        // This thread is in the namespace: the tap is created there.
        tap::create_persistent(&tap_name)?;
        let joined = join(&handle, veth, &pod, &tap_name).await;
        if let Err(e) = joined {
            if let Err(undo) = remove(&handle, &interface_name, &tap_name).await {
                tracing::warn!("cannot undo a failed plumbing of {tap_name}: {undo}");
            }
            return Err(e);
        }
        Ok(pod)
    })?;
    tracing::info!(
        netns = %netns.display(),
        "tap {tap} joined to {interface} ({} addresses, {} routes)",
        pod.addresses.len(),
        pod.routes.len()
    );
    Ok(Plumbing {
        netns: netns.to_path_buf(),
        tap: tap.to_string(),
        interface: pod,
    })
}

async fn join(
    handle: &rtnetlink::Handle,
    veth: u32,
    pod: &PodInterface,
    tap: &str,
) -> Result<(), Error> {
    let tap_index = inspect::link(handle, tap)
        .await?
        .ok_or_else(|| Error::NoInterface(tap.to_string()))?
        .header
        .index;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(tap_index)
                .mtu(pod.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(|e| Error::netlink(format!("set {tap} up with MTU {}", pod.mtu), e))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(veth).up().build())
        .execute()
        .await
        .map_err(|e| Error::netlink(format!("set {} up", pod.name), e))?;
    tc::add_ingress_qdisc(handle, tap_index, tap).await?;
    tc::add_ingress_qdisc(handle, veth, &pod.name).await?;
    tc::add_redirect(handle, veth, tap_index, &pod.name).await?;
    tc::add_redirect(handle, tap_index, veth, tap).await
}

/// Removes what [`plumb`] created in `netns`: the tap (its qdisc and filter go with it) and, on
/// `interface`, the redirect filter (known by its priority, [`FILTER_PRIORITY`]) with the
/// ingress qdisc it sits on; if someone else's filters share that qdisc, only ours goes. The
/// interface itself, its addresses and routes are CNI's and stay. Idempotent: what is missing
/// already, the namespace included, is skipped; an ingress qdisc without our filter is left.
pub fn unplumb(netns: &Path, interface: &str, tap: &str) -> Result<(), Error> {
    if !netns.exists() {
        // The namespace is gone, and everything in it with it.
        return Ok(());
    }
    let (interface, tap) = (interface.to_string(), tap.to_string());
    netns::with_netlink(netns, move |handle| async move {
        remove(&handle, &interface, &tap).await
    })
}

async fn remove(handle: &rtnetlink::Handle, interface: &str, tap: &str) -> Result<(), Error> {
    if let Some(link) = inspect::link(handle, tap).await? {
        match handle.link().del(link.header.index).execute().await {
            Ok(()) => {}
            Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => {}
            Err(e) => return Err(Error::netlink(format!("delete {tap}"), e)),
        }
    }
    if let Some(link) = inspect::link(handle, interface).await? {
        tc::remove_redirect(handle, link.header.index, interface).await?;
    }
    Ok(())
}

/// Opens a queue of the tap `tap` in `netns` (`/dev/net/tun` and `TUNSETIFF` on a thread in that
/// namespace), close-on-exec and blocking, for the caller to hand to the VMM. The tap must
/// exist ([`plumb`] made it): a missing one is an error, never created here.
pub fn open_tap(netns: &Path, tap: &str) -> Result<OwnedFd, Error> {
    let name = tap.to_string();
    let exists = netns::with_netlink(netns, move |handle| async move {
        Ok(inspect::link(&handle, &name).await?.is_some())
    })?;
    if !exists {
        return Err(Error::NoInterface(tap.to_string()));
    }
    let name = tap.to_string();
    netns::run_in(netns, move || tap::open(&name))
}

/// Reads interface `interface` in `netns` as [`plumb`] does, changing nothing.
pub fn read_interface(netns: &Path, interface: &str) -> Result<PodInterface, Error> {
    let name = interface.to_string();
    netns::with_netlink(netns, move |handle| async move {
        Ok(inspect::interface(&handle, &name).await?.1)
    })
}

/// The state of one interface's side of the plumbing, for checks and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub mtu: u32,
    pub up: bool,
    pub ingress_qdisc: bool,
    pub ingress_filters: Vec<Filter>,
}

/// The state of interface `name` in `netns`, or `None` if there is no such interface.
pub fn link_state(netns: &Path, name: &str) -> Result<Option<LinkState>, Error> {
    let name = name.to_string();
    netns::with_netlink(netns, move |handle| async move {
        let Some(link) = inspect::link(&handle, &name).await? else {
            return Ok(None);
        };
        let index = link.header.index;
        let mtu = link.attributes.iter().find_map(|a| match a {
            rtnetlink::packet_route::link::LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        });
        Ok(Some(LinkState {
            index,
            mtu: mtu.unwrap_or(0),
            up: link.header.flags.contains(LinkFlags::Up),
            ingress_qdisc: tc::has_ingress_qdisc(&handle, index).await?,
            ingress_filters: tc::ingress_filters(&handle, index).await?,
        }))
    })
}
