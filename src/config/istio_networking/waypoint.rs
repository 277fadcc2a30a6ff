//! The waypoint binding of a ServiceEntry (layer L1, pure): Istio ambient's
//! `istio.io/use-waypoint` labels, which make the entry an egress gateway.

use serde_yaml::Value;

use super::{text, IstioOptions, Problem, ResourceId};
use crate::state::{GatewayAddress, GatewayDestination};

/// Istio ambient's waypoint binding of a ServiceEntry: the label `istio.io/use-waypoint` names
/// the waypoint (a Gateway, whose service is `<name>.<namespace>.svc.<clusterDomain>`), in the
/// entry's namespace unless `istio.io/use-waypoint-namespace` names another; `none` means no
/// waypoint, as in Istio.
pub(super) fn use_waypoint(
    resource: &Value,
    id: &ResourceId,
    options: &IstioOptions,
) -> Result<Option<GatewayAddress>, Problem> {
    let label = |key: &str| text(resource, &["metadata", "labels", key]);
    let Some(name) = label(USE_WAYPOINT).filter(|name| *name != "none") else {
        return Ok(None);
    };
    let namespace = label(USE_WAYPOINT_NAMESPACE).unwrap_or(&id.namespace);
    for (key, value) in [(USE_WAYPOINT, name), (USE_WAYPOINT_NAMESPACE, namespace)] {
        if !crate::config::dns::valid_domain(value) || value.contains('.') {
            return Err((
                format!("metadata.labels[{key}]"),
                format!("{value:?} is not a Kubernetes name"),
            ));
        }
    }
    Ok(Some(GatewayAddress {
        destination: GatewayDestination::Hostname {
            namespace: namespace.to_string(),
            hostname: format!("{name}.{namespace}.svc.{}", options.cluster_domain),
        },
        hbone_mtls_port: crate::net::ports::HBONE,
    }))
}

/// Istio ambient's label binding a resource to a waypoint.
const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// The waypoint's namespace, when not the resource's.
const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
