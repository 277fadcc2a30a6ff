//! Which mesh name a query means and what its addresses are (pure; layer L3).
//!
//! Follows ztunnel's DNS proxy: the requested name is tried as it is, expanded the Kubernetes
//! way relative to the *querying* pod's namespace (`name` → `name.<ns>.svc.<domain>`,
//! `name.ns` → `name.ns.svc.<domain>`, `name.ns.svc` → `name.ns.svc.<domain>`), and with the
//! pod's search domains (`<ns>.svc.<domain>`, `svc.<domain>`, `<domain>`) stripped off (then
//! the answer carries a CNAME from the asked name to the stripped one). Each alias is tried
//! exactly, then as wildcards (`*.example.com`, `*.com`). Services come first (the one in the
//! client's namespace if several share a hostname), then workloads that carry a `hostname`.
//! A name the mesh knows but with no address of the asked family is an empty answer, not
//! NXDOMAIN; a name it does not know is forwarded upstream.

use std::net::IpAddr;
use std::sync::Arc;

use crate::state::{HealthStatus, Service, Snapshot, Workload};

/// The family a query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `A` records.
    V4,
    /// `AAAA` records.
    V6,
}

impl Family {
    fn matches(self, ip: &IpAddr) -> bool {
        match self {
            Family::V4 => ip.is_ipv4(),
            Family::V6 => ip.is_ipv6(),
        }
    }
}

/// What the mesh says about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Not a mesh name: forward it.
    Unknown,
    /// A mesh name. `addresses` (possibly none) answer it; with `canonical` set the name was
    /// found by stripping a search domain, so the answer is a CNAME from the asked name to
    /// `canonical` plus the addresses under `canonical`.
    Known {
        /// Where the addresses are recorded (`None`: under the asked name).
        canonical: Option<String>,
        /// The addresses of the asked family, in model order.
        addresses: Vec<IpAddr>,
        /// What matched, for the query log (`service ns/host`, `workload uid`).
        matched: String,
    },
}

/// The names a pod's query is resolved against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domains {
    /// The cluster domain, lower case, without a trailing dot (`cluster.local`).
    pub cluster: String,
}

impl Domains {
    /// Domains for `cluster_domain` (any case, trailing dot allowed).
    pub fn new(cluster_domain: &str) -> Self {
        Domains {
            cluster: cluster_domain.trim_end_matches('.').to_ascii_lowercase(),
        }
    }

    /// `svc.<domain>`.
    fn svc(&self) -> String {
        format!("svc.{}", self.cluster)
    }

    /// The search list a Kubernetes pod in `namespace` has, most specific first.
    fn search(&self, namespace: &str) -> [String; 3] {
        [
            format!("{namespace}.svc.{}", self.cluster),
            self.svc(),
            self.cluster.clone(),
        ]
    }
}

/// One candidate name and, if it came from stripping a search domain, the stripped name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Alias {
    name: String,
    stripped: Option<String>,
}

/// Resolves `name` (lower case, no trailing dot) for a pod of `client` asking for `family`.
pub fn resolve(
    snapshot: &Snapshot,
    domains: &Domains,
    client: &Workload,
    name: &str,
    family: Family,
) -> Resolution {
    for alias in aliases(domains, &client.namespace, name) {
        for candidate in wildcards(&alias.name) {
            if let Some(service) = pick_service(snapshot, domains, client, &candidate) {
                // A wildcard match answers under the asked name, as ztunnel does.
                let canonical = alias.stripped.clone().filter(|_| candidate == alias.name);
                return Resolution::Known {
                    canonical,
                    addresses: service_addresses(snapshot, client, &service, family),
                    matched: format!("service {}", service.key()),
                };
            }
        }
        if let Some(workload) = pick_workload(snapshot, client, &alias.name) {
            return Resolution::Known {
                canonical: alias.stripped.clone(),
                addresses: workload
                    .workload_ips
                    .iter()
                    .filter(|ip| family.matches(ip))
                    .copied()
                    .collect(),
                matched: format!("workload {}", workload.uid),
            };
        }
    }
    Resolution::Unknown
}

/// The names `name` may mean for a pod in `namespace`, without duplicates, in the order
/// they are tried.
fn aliases(domains: &Domains, namespace: &str, name: &str) -> Vec<Alias> {
    let mut out: Vec<Alias> = Vec::new();
    let mut add = |alias: Alias| {
        if !alias.name.is_empty() && !out.iter().any(|known| known.name == alias.name) {
            out.push(alias);
        }
    };
    add(Alias {
        name: name.to_string(),
        stripped: None,
    });
    for expanded in kubernetes_names(domains, namespace, name) {
        add(Alias {
            name: expanded,
            stripped: None,
        });
    }
    for search in domains.search(namespace) {
        let Some(stripped) = name
            .strip_suffix(search.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
        else {
            continue;
        };
        add(Alias {
            name: stripped.to_string(),
            stripped: Some(stripped.to_string()),
        });
        for expanded in kubernetes_names(domains, namespace, stripped) {
            add(Alias {
                name: expanded,
                stripped: Some(stripped.to_string()),
            });
        }
    }
    out
}

/// The Kubernetes service FQDNs a short name expands to for a pod in `namespace`.
fn kubernetes_names(domains: &Domains, namespace: &str, name: &str) -> Vec<String> {
    let labels: Vec<&str> = name.split('.').collect();
    let cluster = &domains.cluster;
    match labels.as_slice() {
        [_] => vec![format!("{name}.{namespace}.svc.{cluster}")],
        [_, _] => vec![format!("{name}.svc.{cluster}")],
        [_, _, "svc"] => vec![format!("{name}.{cluster}")],
        _ => Vec::new(),
    }
}

/// `name`, then `*.` + each parent with at least one label (`a.b.c` → `*.b.c`, `*.c`).
fn wildcards(name: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    let mut rest = name;
    while let Some((_, parent)) = rest.split_once('.') {
        out.push(format!("*.{parent}"));
        rest = parent;
    }
    out
}

/// The service named `hostname` that DNS may answer for, preferring the client's namespace.
/// Services with neither VIPs nor endpoints are left to upstream DNS, unless they are
/// Kubernetes services of this cluster (a headless service with no ready pod yet).
fn pick_service(
    snapshot: &Snapshot,
    domains: &Domains,
    client: &Workload,
    hostname: &str,
) -> Option<Arc<Service>> {
    let cluster_suffix = format!(".{}", domains.svc());
    let mut eligible: Vec<&Arc<Service>> = snapshot
        .services_by_hostname(hostname)
        .iter()
        .filter(|service| {
            !service.vips.is_empty()
                || !snapshot.service_workloads(service).is_empty()
                || hostname.ends_with(&cluster_suffix)
        })
        .collect();
    eligible.sort_by(|a, b| a.namespace.cmp(&b.namespace));
    eligible
        .iter()
        .find(|service| service.namespace == client.namespace)
        .or(eligible.first())
        .map(|service| Arc::clone(service))
}

/// The workload with `hostname`, preferring the client's namespace.
fn pick_workload(snapshot: &Snapshot, client: &Workload, hostname: &str) -> Option<Arc<Workload>> {
    let workloads = snapshot.workloads_by_hostname(hostname);
    workloads
        .iter()
        .find(|workload| workload.namespace == client.namespace)
        .or(workloads.first())
        .cloned()
}

/// A service's addresses of `family`: its VIPs in the client's network, or, without VIPs
/// (headless), one address per healthy endpoint.
fn service_addresses(
    snapshot: &Snapshot,
    client: &Workload,
    service: &Service,
    family: Family,
) -> Vec<IpAddr> {
    if !service.vips.is_empty() {
        return service
            .vips
            .iter()
            .filter(|vip| vip.network == client.network && family.matches(&vip.ip))
            .map(|vip| vip.ip)
            .collect();
    }
    snapshot
        .service_workloads(service)
        .iter()
        .filter(|workload| workload.status == HealthStatus::Healthy)
        .filter_map(|workload| {
            workload
                .workload_ips
                .iter()
                .find(|ip| family.matches(ip))
                .copied()
        })
        .collect()
}

#[cfg(test)]
#[path = "answer_tests.rs"]
mod tests;
