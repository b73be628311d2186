//! Kata's "tcfilter" connection between the CNI interface and the VM's tap, over rtnetlink:
//! an `ingress` qdisc on each, and on each a u32 filter matching every frame (`protocol all`,
//! one all-zero key) whose `mirred egress redirect` action hands the frame to the other one's
//! transmit path. Equivalent to, for each direction,
//!
//! ```text
//! tc qdisc add dev SRC ingress
//! tc filter add dev SRC parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev DST
//! ```

use std::collections::BTreeSet;

use futures_util::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{NetlinkMessage, NLM_F_ACK, NLM_F_REQUEST};
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::Handle;

use crate::{netlink_errno, Error};

/// `ETH_P_ALL`: the filter sees every frame, whatever its EtherType.
const ETH_P_ALL: u16 = 0x0003;
/// The priority ("pref") of the redirect filters made here ("mv"): teardown tells them from
/// filters someone else put on the same interface by it.
pub const FILTER_PRIORITY: u16 = 0x6d76;

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
        .priority(FILTER_PRIORITY)
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

async fn dump_ingress_filters(handle: &Handle, index: u32) -> Result<Vec<TcMessage>, Error> {
    handle
        .traffic_filter(index as i32)
        .get()
        .ingress()
        .execute()
        .try_collect()
        .await
        .map_err(|e| Error::netlink("list ingress filters".into(), e))
}

/// The rules among the ingress filters of `index`: their kind, priority and, for a mirred
/// egress redirect, its target.
pub async fn ingress_filters(handle: &Handle, index: u32) -> Result<Vec<Filter>, Error> {
    let filters = dump_ingress_filters(handle, index).await?;
    // A u32 filter is dumped twice, its hash table node and the rule itself: one entry per kind
    // and priority, the one with an action if any.
    let mut rules: Vec<Filter> = Vec::new();
    let all = filters.iter().filter_map(|f| {
        let kind = f.attributes.iter().find_map(|a| match a {
            TcAttribute::Kind(k) => Some(k.clone()),
            _ => None,
        })?;
        let options = f.attributes.iter().find_map(|a| match a {
            TcAttribute::Options(o) if !o.is_empty() => Some(o),
            _ => None,
        })?;
        let redirect_to = options.iter().find_map(redirect_target);
        Some(Filter {
            kind,
            priority: (f.header.info >> 16) as u16,
            redirect_to,
        })
    });
    for filter in all {
        match rules
            .iter_mut()
            .find(|r| (&r.kind, r.priority) == (&filter.kind, filter.priority))
        {
            Some(r) => r.redirect_to = r.redirect_to.or(filter.redirect_to),
            None => rules.push(filter),
        }
    }
    Ok(rules)
}

/// One ingress filter as [`ingress_filters`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub kind: String,
    pub priority: u16,
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

/// Removes the redirect filter [`add_redirect`] put on `index`: with the ingress qdisc when
/// nothing else is attached to it, alone (by its priority) when someone else's filters share the
/// qdisc. An ingress qdisc without our filter is not ours and stays; a missing one is fine.
pub async fn remove_redirect(handle: &Handle, index: u32, name: &str) -> Result<(), Error> {
    let priorities: BTreeSet<u16> = dump_ingress_filters(handle, index)
        .await?
        .iter()
        .map(|f| (f.header.info >> 16) as u16)
        .collect();
    if !priorities.contains(&FILTER_PRIORITY) {
        return Ok(());
    }
    if priorities.len() == 1 {
        return del_ingress_qdisc(handle, index, name).await;
    }
    // `tc filter del dev NAME parent ffff: pref FILTER_PRIORITY`
    let mut msg = TcMessage::with_index(index as i32);
    msg.header.parent = TcHandle::INGRESS;
    msg.header.info = u32::from(FILTER_PRIORITY) << 16;
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::DelTrafficFilter(msg));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut answers = handle
        .clone()
        .request(req)
        .map_err(|e| Error::netlink(format!("delete the redirect filter of {name}"), e))?;
    while let Some(answer) = answers.next().await {
        if let rtnetlink::packet_core::NetlinkPayload::Error(e) = answer.payload {
            if e.code.is_some() {
                return Err(Error::netlink(
                    format!("delete the redirect filter of {name}"),
                    rtnetlink::Error::NetlinkError(e),
                ));
            }
        }
    }
    Ok(())
}

/// Deletes the ingress qdisc of `index` and with it every filter attached to it; a missing
/// qdisc is not an error.
async fn del_ingress_qdisc(handle: &Handle, index: u32, name: &str) -> Result<(), Error> {
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
