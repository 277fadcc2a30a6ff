//! The rules a workload or service obeys whichever source describes it (layer L1): Istio's
//! defaults for fields left empty, the form of a service key, and the text form of a waypoint
//! or gateway destination. The file (`config::convert`) and istiod (`xds::convert`) both build
//! the model through these, so the two sources cannot drift apart.

use std::net::IpAddr;

use crate::net::NetworkAddress;

use super::GatewayDestination;

/// Istio's trust domain when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Istio's service account when a workload names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// Istio's cluster id when none is set, used in derived uids and as a workload's `clusterId`.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// `value`, or `default` when it is empty (Istio's protos and our file alike leave a field
/// empty to mean "the default").
pub fn or_default<'a>(value: &'a str, default: &'a str) -> &'a str {
    if value.is_empty() {
        default
    } else {
        value
    }
}

/// The uid Istio gives a pod: `<clusterId>//Pod/<namespace>/<name>`.
pub fn derived_uid(cluster_id: &str, namespace: &str, name: &str) -> String {
    format!("{cluster_id}//Pod/{namespace}/{name}")
}

/// A key of a workload's `services` map that is not `namespace/hostname`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service reference {0:?} is not \"namespace/hostname\"")]
pub struct ServiceKeyError(pub String);

/// Checks that `key` is `namespace/hostname` with both parts present, the form
/// [`super::Service::key`] has, so that a workload's reference can find its service.
pub fn check_service_key(key: &str) -> Result<(), ServiceKeyError> {
    match key.split_once('/') {
        Some((namespace, hostname)) if !namespace.is_empty() && !hostname.is_empty() => Ok(()),
        _ => Err(ServiceKeyError(key.to_string())),
    }
}

/// A waypoint or gateway destination whose text is neither form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid destination {0:?}: expected \"network/IP\" or \"namespace/hostname\"")]
pub struct DestinationError(pub String);

/// A hostname destination must name both its namespace and its hostname.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostnameError {
    /// The namespace is empty.
    #[error("namespace must not be empty")]
    NoNamespace,
    /// The hostname is empty.
    #[error("hostname must not be empty")]
    NoHostname,
}

impl GatewayDestination {
    /// A `namespace/hostname` destination, both parts present.
    pub fn hostname(namespace: String, hostname: String) -> Result<Self, HostnameError> {
        if namespace.is_empty() {
            return Err(HostnameError::NoNamespace);
        }
        if hostname.is_empty() {
            return Err(HostnameError::NoHostname);
        }
        Ok(GatewayDestination::Hostname {
            namespace,
            hostname,
        })
    }
}

impl std::str::FromStr for GatewayDestination {
    type Err = DestinationError;

    /// `network/IP` (an address), else `namespace/hostname` (a name to resolve); a hostname
    /// that is an IP or holds another `/` is neither.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Ok(address) = text.parse::<NetworkAddress>() {
            return Ok(GatewayDestination::Address(address));
        }
        let invalid = || DestinationError(text.to_string());
        let (namespace, hostname) = text.split_once('/').ok_or_else(invalid)?;
        if hostname.contains('/') || hostname.parse::<IpAddr>().is_ok() {
            return Err(invalid());
        }
        GatewayDestination::hostname(namespace.to_string(), hostname.to_string())
            .map_err(|_| invalid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_keys() {
        for (key, ok) in [
            ("default/echo.default.svc.cluster.local", true),
            ("default/", false),
            ("/echo", false),
            ("echo", false),
            ("", false),
        ] {
            assert_eq!(check_service_key(key).is_ok(), ok, "{key:?}");
        }
    }

    #[test]
    fn destinations() {
        let address = |ip: [u8; 4]| {
            Ok(GatewayDestination::Address(NetworkAddress {
                network: String::new(),
                ip: IpAddr::from(ip),
            }))
        };
        let hostname = |namespace: &str, hostname: &str| {
            Ok(GatewayDestination::Hostname {
                namespace: namespace.to_string(),
                hostname: hostname.to_string(),
            })
        };
        let cases = [
            ("/10.0.0.1", address([10, 0, 0, 1])),
            (
                "istio-system/waypoint",
                hostname("istio-system", "waypoint"),
            ),
            (
                "ns/10.0.0.1/x",
                Err(DestinationError("ns/10.0.0.1/x".into())),
            ),
            ("ns/a/b", Err(DestinationError("ns/a/b".into()))),
            ("ns/", Err(DestinationError("ns/".into()))),
            ("/waypoint", Err(DestinationError("/waypoint".into()))),
            ("waypoint", Err(DestinationError("waypoint".into()))),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<GatewayDestination>(), want, "{text:?}");
        }
    }
}
