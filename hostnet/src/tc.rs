//! Kata's "tcfilter" connection between the CNI interface and the VM's tap, over rtnetlink:
//! an `ingress` qdisc on each, and on each a u32 filter matching every frame (`protocol all`,
//! one all-zero key) whose `mirred egress redirect` action hands the frame to the other one's
//! transmit path. Equivalent to, for each direction,
//!
//! ```text
//! tc qdisc add dev SRC ingress
//! tc filter add dev SRC parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev DST
//! ```

use futures_util::TryStreamExt;
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcMessage};
use rtnetlink::Handle;

use crate::{netlink_errno, Error};

/// `ETH_P_ALL`: the filter sees every frame, whatever its EtherType.
const ETH_P_ALL: u16 = 0x0003;

/// Adds the ingress qdisc to `index` (fails with `EEXIST` if it has one).
pub async fn add_ingress_qdisc(handle: &Handle, index: u32, name: &str) -> Result<(), Error> {
    handle
        .qdisc()
        .add(index as i32)
        .ingress()
        .execute()
        .await
        .map_err(|e| Error::netlink(format!("add ingress qdisc to {name}"), e))
}

/// Adds the match-all filter on `from`'s ingress that redirects every frame to `to`'s egress.
pub async fn add_redirect(handle: &Handle, from: u32, to: u32, name: &str) -> Result<(), Error> {
    handle
        .traffic_filter(from as i32)
        .add()
        .ingress()
        .protocol(ETH_P_ALL.to_be())
        .redirect(to)
        .map_err(|e| Error::netlink(format!("build the redirect filter on {name}"), e))?
        .execute()
        .await
        .map_err(|e| Error::netlink(format!("add the redirect filter on {name}"), e))
}

/// Whether `index` has an ingress qdisc.
pub async fn has_ingress_qdisc(handle: &Handle, index: u32) -> Result<bool, Error> {
    let qdiscs: Vec<TcMessage> = handle
        .qdisc()
        .get()
        .index(index as i32)
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::netlink("list qdiscs".into(), e))?;
    Ok(qdiscs.iter().any(|q| {
        q.header.index == index as i32
            && q.header.parent == TcHandle::INGRESS
            && q.attributes.contains(&TcAttribute::Kind("ingress".into()))
    }))
}

/// The ingress filters of `index`, as `(kind, redirect target ifindex)` pairs (the target is
/// `None` for a filter with no mirred action).
pub async fn ingress_filters(handle: &Handle, index: u32) -> Result<Vec<Filter>, Error> {
    let filters: Vec<TcMessage> = handle
        .traffic_filter(index as i32)
        .get()
        .ingress()
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::netlink("list ingress filters".into(), e))?;
    // A u32 filter is dumped twice: its hash table node (no options) and the rule itself.
    Ok(filters
        .iter()
        .filter_map(|f| {
            let kind = f.attributes.iter().find_map(|a| match a {
                TcAttribute::Kind(k) => Some(k.clone()),
                _ => None,
            })?;
            let options = f.attributes.iter().find_map(|a| match a {
                TcAttribute::Options(o) => Some(o),
                _ => None,
            })?;
            let redirect_to = options.iter().find_map(redirect_target);
            Some(Filter { kind, redirect_to })
        })
        .filter(|f| f.redirect_to.is_some())
        .collect())
}

/// One ingress filter as [`ingress_filters`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub kind: String,
    /// The ifindex a mirred egress-redirect action sends frames to.
    pub redirect_to: Option<u32>,
}

fn redirect_target(option: &rtnetlink::packet_route::tc::TcOption) -> Option<u32> {
    use rtnetlink::packet_route::tc::{
        TcActionAttribute, TcActionMirrorOption, TcActionOption, TcFilterU32Option,
        TcMirrorActionType, TcOption,
    };
    let TcOption::U32(TcFilterU32Option::Action(actions)) = option else {
        return None;
    };
    actions.iter().find_map(|action| {
        action.attributes.iter().find_map(|a| match a {
            TcActionAttribute::Options(opts) => opts.iter().find_map(|o| match o {
                TcActionOption::Mirror(TcActionMirrorOption::Parms(p))
                    if p.eaction == TcMirrorActionType::EgressRedir =>
                {
                    Some(p.ifindex)
                }
                _ => None,
            }),
            _ => None,
        })
    })
}

/// Deletes the ingress qdisc of `index` and with it every filter attached to it; a missing
/// qdisc is not an error.
pub async fn del_ingress_qdisc(handle: &Handle, index: u32, name: &str) -> Result<(), Error> {
    let mut req = handle.qdisc().del(index as i32);
    req.message_mut().header.parent = TcHandle::INGRESS;
    req.message_mut().header.handle = TcHandle::from(0xffff_0000);
    match req.execute().await {
        Ok(()) => Ok(()),
        // ENOENT: no qdisc there; EINVAL: the kernel's answer for "no ingress qdisc" on some
        // versions (the ingress parent does not resolve).
        Err(e) if matches!(netlink_errno(&e), Some(libc::ENOENT | libc::EINVAL)) => Ok(()),
        Err(e) => Err(Error::netlink(
            format!("delete the ingress qdisc of {name}"),
            e,
        )),
    }
}
