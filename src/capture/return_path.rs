//! The return path of original-source connections, programmed over rtnetlink (layer L4).
//!
//! When the agent connects to an app from the client's IP, the app's replies are addressed to
//! that foreign IP. The nftables rules (`capture::rules`) mark them; one `ip rule` per family
//! (`fwmark RETURN_MARK/MARK_MASK lookup ROUTE_TABLE`, priority `RULE_PRIORITY`) sends marked
//! packets to a table whose only route is `local default dev lo`, which delivers them to the
//! agent's transparent socket.
//!
//! A netlink socket belongs to the network namespace of the thread that creates it, so these
//! functions must run on a thread inside the pod's namespace; they drive the requests on a
//! small runtime of that thread. Typed errors come back from the kernel (no `ip` binary needed).

use std::net::{Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder, RuleAddRequest};

/// Connmark/fwmark value for replies of original-source connections (as Istio uses).
pub const RETURN_MARK: u32 = 0x111;
/// Bits of the mark we own.
pub const MARK_MASK: u32 = 0xfff;
/// Routing table for the return path.
pub const ROUTE_TABLE: u32 = 100;
/// Priority of our `ip rule`.
pub const RULE_PRIORITY: u32 = 32764;

/// Why the return path could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum ReturnPathError {
    /// The netlink socket (or the runtime driving it) could not be created.
    #[error("open a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The pod has no loopback interface to deliver to.
    #[error("the pod has no `lo` interface")]
    NoLoopback,
    /// The kernel refused a request.
    #[error("{request}: {source}")]
    Netlink {
        /// What was asked, in `ip` terms.
        request: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
}

/// An address family the return path is set up for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    fn version(self) -> IpVersion {
        match self {
            Family::V4 => IpVersion::V4,
            Family::V6 => IpVersion::V6,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }
}

/// Runs `work` with a netlink handle opened in the calling thread's network namespace, on a
/// runtime of that thread (the caller is a plain thread inside the pod, not a runtime worker).
pub(super) fn with_handle<T, F, Fut>(work: F) -> Result<T, ReturnPathError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T, ReturnPathError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(ReturnPathError::Socket)?;
    runtime.block_on(async {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(ReturnPathError::Socket)?;
        let driver = tokio::spawn(connection);
        let result = work(handle).await;
        driver.abort();
        result
    })
}

/// Replaces the `ip rule` and the `local` route of `family`.
pub(super) async fn install(handle: &Handle, family: Family) -> Result<(), ReturnPathError> {
    delete_rules(handle, family).await?;
    let rule = handle
        .rule()
        .add()
        .action(RuleAction::ToTable)
        .table_id(ROUTE_TABLE)
        .fw_mark(RETURN_MARK)
        .priority(RULE_PRIORITY);
    match family {
        Family::V4 => add_rule(rule.v4(), family).await?,
        Family::V6 => add_rule(rule.v6(), family).await?,
    }
    let route = local_default_route(handle, family).await?;
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(|source| ReturnPathError::Netlink {
            request: format!(
                "ip {} route replace local default dev lo table {ROUTE_TABLE}",
                family.name()
            ),
            source,
        })
}

/// `ip rule add fwmark RETURN_MARK/MARK_MASK pref RULE_PRIORITY lookup ROUTE_TABLE`.
async fn add_rule<T>(mut rule: RuleAddRequest<T>, family: Family) -> Result<(), ReturnPathError> {
    rule.message_mut()
        .attributes
        .push(RuleAttribute::FwMask(MARK_MASK));
    rule.execute()
        .await
        .map_err(|source| ReturnPathError::Netlink {
            request: format!(
                "ip {} rule add fwmark {RETURN_MARK:#x}/{MARK_MASK:#x} pref {RULE_PRIORITY} \
                 lookup {ROUTE_TABLE}",
                family.name()
            ),
            source,
        })
}

/// Removes the rules at our priority and every route of our table, for `family`. Missing
/// pieces are not an error.
pub(super) async fn remove(handle: &Handle, family: Family) -> Result<(), ReturnPathError> {
    delete_rules(handle, family).await?;
    let request = format!("ip {} route flush table {ROUTE_TABLE}", family.name());
    let netlink = |source| ReturnPathError::Netlink {
        request: request.clone(),
        source,
    };
    let dump = match family {
        Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
        Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
    };
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(dump)
        .execute()
        .try_collect()
        .await
        .map_err(netlink)?;
    for route in routes
        .into_iter()
        .filter(|route| route_table(route) == ROUTE_TABLE)
    {
        handle.route().del(route).execute().await.map_err(netlink)?;
    }
    Ok(())
}

/// Deletes every rule at our priority (there should be at most one; more are left by an agent
/// that crashed mid-install).
async fn delete_rules(handle: &Handle, family: Family) -> Result<(), ReturnPathError> {
    let netlink = |source| ReturnPathError::Netlink {
        request: format!("ip {} rule del pref {RULE_PRIORITY}", family.name()),
        source,
    };
    let rules: Vec<RuleMessage> = handle
        .rule()
        .get(family.version())
        .execute()
        .try_collect()
        .await
        .map_err(netlink)?;
    let ours = rules.into_iter().filter(|rule| {
        rule.attributes
            .contains(&RuleAttribute::Priority(RULE_PRIORITY))
    });
    for rule in ours {
        handle.rule().del(rule).execute().await.map_err(netlink)?;
    }
    Ok(())
}

/// `local default dev lo table ROUTE_TABLE`, with the scope (host) and protocol (boot) that
/// `ip route replace` gives such a route.
async fn local_default_route(
    handle: &Handle,
    family: Family,
) -> Result<RouteMessage, ReturnPathError> {
    let loopback = loopback_index(handle).await?;
    let route = match family {
        Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .protocol(RouteProtocol::Boot)
            .table_id(ROUTE_TABLE)
            .output_interface(loopback)
            .build(),
        Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .protocol(RouteProtocol::Boot)
            .table_id(ROUTE_TABLE)
            .output_interface(loopback)
            .build(),
    };
    Ok(route)
}

async fn loopback_index(handle: &Handle) -> Result<u32, ReturnPathError> {
    let mut links = handle.link().get().match_name("lo".to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(ReturnPathError::NoLoopback),
        Err(source) => Err(ReturnPathError::Netlink {
            request: "ip link show lo".to_string(),
            source,
        }),
    }
}

/// The routing table a route is in (the header holds tables below 256, the attribute any).
fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}
