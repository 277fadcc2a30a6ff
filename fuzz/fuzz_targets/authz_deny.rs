//! Fuzzes L4 authorization with a property: **a DENY that matches never allows.**
//!
//! Input (structured, `arbitrary`): a set of policies (any scope, action, dry-run flag and rule
//! tree, with values from a small vocabulary so that they often match), a destination workload
//! (which may list some of them by key), the connection facts (peer identity or plaintext,
//! source and destination address of either family, IPv4-mapped included, and port), and a
//! recipe for one more enforced DENY policy that matches those facts by construction: its
//! scope applies to the destination, each populated field holds a value derived from the facts
//! (exact, prefix, suffix or presence for principals and namespaces, a CIDR of any prefix
//! length around the address), each negated field holds only values that differ from them, and
//! the matching rule may sit among rules and clause alternatives that do not match.
//!
//! Properties: with that DENY inserted anywhere in the list, `authz::evaluate` and
//! `authz::authorize` both deny, with or without `defaultDeny`, and the deciding reason is an
//! enforced DENY policy. Nothing panics on any policy set.
#![no_main]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nodetunnel::authz::{authorize, evaluate, AuthzOptions, ConnectionFacts, DecisionReason};
use nodetunnel::spiffe::Identity;
use nodetunnel::state::policy::{
    Match, Policy, PolicyAction, PolicyScope, ServiceAccountMatch, StringMatch,
};
use nodetunnel::state::{HealthStatus, TunnelProtocol, Workload};

/// Namespaces, service accounts and names the generated policies and identities draw from.
const WORDS: [&str; 4] = ["default", "client", "server", "kube-system"];
const TRUST_DOMAINS: [&str; 2] = ["cluster.local", "other.td"];

fn word(index: u8) -> &'static str {
    WORDS[usize::from(index) % WORDS.len()]
}

#[derive(Debug, Arbitrary)]
enum Ip {
    V4([u8; 4]),
    /// An IPv4 address as a dual-stack socket reports it (`::ffff:a.b.c.d`).
    Mapped([u8; 4]),
    V6([u8; 16]),
    /// One of two fixed addresses, so that generated CIDRs often contain the facts.
    Known(bool),
}

impl Ip {
    fn addr(&self) -> IpAddr {
        match self {
            Ip::V4(octets) => IpAddr::V4(Ipv4Addr::from(*octets)),
            Ip::Mapped(octets) => IpAddr::V6(Ipv4Addr::from(*octets).to_ipv6_mapped()),
            Ip::V6(octets) => IpAddr::V6(Ipv6Addr::from(*octets)),
            Ip::Known(first) => IpAddr::V4(if *first {
                Ipv4Addr::new(10, 0, 1, 5)
            } else {
                Ipv4Addr::new(10, 0, 2, 7)
            }),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum GenString {
    Exact(u8),
    Prefix(u8),
    Suffix(u8),
    Presence,
}

impl GenString {
    fn build(&self) -> StringMatch {
        match self {
            GenString::Exact(index) => StringMatch::Exact(word(*index).to_string()),
            GenString::Prefix(index) => StringMatch::Prefix(word(*index)[..2].to_string()),
            GenString::Suffix(index) => StringMatch::Suffix(word(*index)[2..].to_string()),
            GenString::Presence => StringMatch::Presence,
        }
    }
}

#[derive(Debug, Arbitrary)]
struct GenMatch {
    namespaces: Vec<GenString>,
    not_namespaces: Vec<GenString>,
    principals: Vec<(u8, u8, u8)>,
    not_principals: Vec<(u8, u8, u8)>,
    service_accounts: Vec<(u8, u8)>,
    source_ips: Vec<(Ip, u8)>,
    not_source_ips: Vec<(Ip, u8)>,
    destination_ips: Vec<(Ip, u8)>,
    destination_ports: Vec<u16>,
    not_destination_ports: Vec<u16>,
}

fn net((ip, prefix): &(Ip, u8)) -> IpNet {
    let addr = ip.addr();
    let max = if addr.is_ipv4() { 32 } else { 128 };
    IpNet::new(addr, prefix % (max + 1)).expect("prefix within range")
}

fn principal((td, ns, sa): &(u8, u8, u8)) -> StringMatch {
    let td = TRUST_DOMAINS[usize::from(*td) % TRUST_DOMAINS.len()];
    StringMatch::Exact(format!("{td}/ns/{}/sa/{}", word(*ns), word(*sa)))
}

impl GenMatch {
    fn build(&self) -> Match {
        let strings = |list: &[GenString]| list.iter().map(GenString::build).collect();
        Match {
            namespaces: strings(&self.namespaces),
            not_namespaces: strings(&self.not_namespaces),
            principals: self.principals.iter().map(principal).collect(),
            not_principals: self.not_principals.iter().map(principal).collect(),
            service_accounts: self
                .service_accounts
                .iter()
                .map(|(ns, sa)| ServiceAccountMatch {
                    namespace: word(*ns).to_string(),
                    service_account: word(*sa).to_string(),
                })
                .collect(),
            not_service_accounts: Vec::new(),
            source_ips: self.source_ips.iter().map(net).collect(),
            not_source_ips: self.not_source_ips.iter().map(net).collect(),
            destination_ips: self.destination_ips.iter().map(net).collect(),
            not_destination_ips: Vec::new(),
            destination_ports: self.destination_ports.clone(),
            not_destination_ports: self.not_destination_ports.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum GenScope {
    Global,
    Namespace(u8),
    WorkloadSelector(u8),
}

#[derive(Debug, Arbitrary)]
struct GenPolicy {
    name: u8,
    scope: GenScope,
    deny: bool,
    dry_run: bool,
    rules: Vec<Vec<Vec<GenMatch>>>,
}

impl GenPolicy {
    fn build(&self, index: usize) -> Policy {
        let (scope, namespace) = match self.scope {
            GenScope::Global => (PolicyScope::Global, "istio-system"),
            GenScope::Namespace(ns) => (PolicyScope::Namespace, word(ns)),
            GenScope::WorkloadSelector(ns) => (PolicyScope::WorkloadSelector, word(ns)),
        };
        Policy {
            name: format!("p{index}-{}", self.name % 4),
            namespace: namespace.to_string(),
            scope,
            action: if self.deny {
                PolicyAction::Deny
            } else {
                PolicyAction::Allow
            },
            dry_run: self.dry_run,
            rules: self
                .rules
                .iter()
                .map(|rule| {
                    rule.iter()
                        .map(|clause| clause.iter().map(GenMatch::build).collect())
                        .collect()
                })
                .collect(),
        }
    }
}

/// How the extra DENY is made to match. Each flag populates one field from the facts.
#[derive(Debug, Arbitrary)]
struct DenyRecipe {
    scope: u8,
    position: u8,
    principal: Option<GenString>,
    namespace: Option<GenString>,
    service_account: bool,
    source_prefix: Option<u8>,
    destination_prefix: Option<u8>,
    port: bool,
    not_port: bool,
    not_principal: bool,
    not_source: bool,
    /// Non-matching rules placed before the matching one, and alternatives in its clause.
    decoy_rules: u8,
    decoy_alternatives: u8,
}

#[derive(Debug, Arbitrary)]
struct Input {
    policies: Vec<GenPolicy>,
    destination_namespace: u8,
    listed: Vec<u8>,
    identity: Option<(u8, u8, u8)>,
    source: Ip,
    destination: Ip,
    port: u16,
    deny: DenyRecipe,
}

fuzz_target!(|input: Input| {
    let mut policies: Vec<Policy> = input
        .policies
        .iter()
        .take(16)
        .enumerate()
        .map(|(index, policy)| policy.build(index))
        .collect();
    let mut destination = workload(word(input.destination_namespace));
    destination.authorization_policies = input
        .listed
        .iter()
        .filter_map(|index| policies.get(usize::from(*index)).map(Policy::key))
        .collect();
    let facts = ConnectionFacts {
        source_identity: input.identity.and_then(|(td, ns, sa)| {
            let td = TRUST_DOMAINS[usize::from(td) % TRUST_DOMAINS.len()];
            Identity::new(td, word(ns), word(sa)).ok()
        }),
        source_ip: input.source.addr(),
        destination_ip: input.destination.addr(),
        destination_port: input.port,
    };
    let deny = matching_deny(&input.deny, &facts, &mut destination);
    let key = deny.key();
    let position = usize::from(input.deny.position) % (policies.len() + 1);
    policies.insert(position, deny);

    for default_deny in [false, true] {
        let options = AuthzOptions { default_deny };
        let evaluated = evaluate(&policies, &destination, &facts, &options);
        let authorized = authorize(&policies, &[], &destination, &facts, &options);
        for decision in [&evaluated, &authorized] {
            assert!(
                !decision.is_allowed(),
                "a matching DENY ({key}) was overridden: {decision:?}\nfacts: {facts:?}\npolicies: {policies:#?}"
            );
            let DecisionReason::DeniedBy { policy, .. } = &decision.reason else {
                panic!("denied, but not by a DENY policy: {decision:?}");
            };
            let decider = policies.iter().find(|candidate| &candidate.key() == policy);
            assert!(
                decider.is_some_and(|p| p.action == PolicyAction::Deny && !p.dry_run),
                "deciding policy {policy} is not an enforced DENY"
            );
        }
    }
});

/// An enforced DENY that matches `facts` at `destination` by construction.
fn matching_deny(recipe: &DenyRecipe, facts: &ConnectionFacts, destination: &mut Workload) -> Policy {
    let (scope, namespace) = match recipe.scope % 3 {
        0 => (PolicyScope::Global, "istio-system".to_string()),
        1 => (PolicyScope::Namespace, destination.namespace.clone()),
        _ => (PolicyScope::WorkloadSelector, "default".to_string()),
    };
    let name = "the-matching-deny".to_string();
    if scope == PolicyScope::WorkloadSelector {
        destination
            .authorization_policies
            .push(format!("{namespace}/{name}"));
    }
    let matching = matching_match(recipe, facts);
    let mut decoy = matching.clone();
    decoy.destination_ports = vec![facts.destination_port.wrapping_add(1)];
    decoy.not_destination_ports.clear();
    let decoys = usize::from(recipe.decoy_alternatives % 3);
    let mut clause = vec![decoy.clone(); decoys];
    clause.insert(decoys / 2, matching);
    let mut rules = vec![vec![vec![decoy]]; usize::from(recipe.decoy_rules % 3)];
    rules.push(vec![clause]);
    Policy {
        name,
        namespace,
        scope,
        action: PolicyAction::Deny,
        dry_run: false,
        rules,
    }
}

fn matching_match(recipe: &DenyRecipe, facts: &ConnectionFacts) -> Match {
    let mut found = Match::default();
    if let Some(identity) = &facts.source_identity {
        let principal = format!(
            "{}/ns/{}/sa/{}",
            identity.trust_domain(),
            identity.namespace(),
            identity.service_account()
        );
        if let Some(how) = &recipe.principal {
            found.principals.push(derived(how, &principal));
        }
        if let Some(how) = &recipe.namespace {
            found.namespaces.push(derived(how, identity.namespace()));
        }
        if recipe.service_account {
            found.service_accounts.push(ServiceAccountMatch {
                namespace: identity.namespace().to_string(),
                service_account: identity.service_account().to_string(),
            });
        }
        if recipe.not_principal {
            found
                .not_principals
                .push(StringMatch::Exact(format!("{principal}-not")));
        }
    }
    if let Some(prefix) = recipe.source_prefix {
        found.source_ips.push(cidr_around(facts.source_ip, prefix));
    }
    if let Some(prefix) = recipe.destination_prefix {
        found
            .destination_ips
            .push(cidr_around(facts.destination_ip, prefix));
    }
    if recipe.not_port {
        found
            .not_destination_ports
            .push(facts.destination_port.wrapping_add(1));
    }
    if recipe.not_source {
        found.not_source_ips.push(other_host(facts.source_ip));
    }
    // A match with no field never matches; the port always pins it down when nothing else does.
    if recipe.port || found == Match::default() {
        found.destination_ports.push(facts.destination_port);
    }
    found
}

/// A string match that `value` satisfies.
fn derived(how: &GenString, value: &str) -> StringMatch {
    let cut = |at: u8| usize::from(at) % (value.len() + 1);
    match how {
        GenString::Exact(_) => StringMatch::Exact(value.to_string()),
        GenString::Prefix(at) => StringMatch::Prefix(value[..cut(*at)].to_string()),
        GenString::Suffix(at) => StringMatch::Suffix(value[cut(*at)..].to_string()),
        GenString::Presence if value.is_empty() => StringMatch::Exact(String::new()),
        GenString::Presence => StringMatch::Presence,
    }
}

/// A CIDR of some prefix length that contains `ip`, written in `ip`'s own family. For an
/// IPv4-mapped address that is a CIDR inside `::ffff:0:0/96` (a wider IPv6 range is not about
/// IPv4 peers).
fn cidr_around(ip: IpAddr, prefix: u8) -> IpNet {
    let prefix = match ip {
        IpAddr::V4(_) => prefix % 33,
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => 96 + prefix % 33,
        IpAddr::V6(_) => prefix % 129,
    };
    IpNet::new(ip, prefix).expect("prefix within range").trunc()
}

/// A single-host CIDR of the same family that is not `ip`.
fn other_host(ip: IpAddr) -> IpNet {
    match ip {
        IpAddr::V4(v4) => IpNet::from(IpAddr::V4(Ipv4Addr::from(u32::from(v4) ^ 1))),
        IpAddr::V6(v6) => IpNet::from(IpAddr::V6(Ipv6Addr::from(u128::from(v6) ^ 1))),
    }
}

fn workload(namespace: &str) -> Workload {
    Workload {
        uid: format!("cluster//Pod/{namespace}/server"),
        name: "server".to_string(),
        namespace: namespace.to_string(),
        service_account: "server".to_string(),
        trust_domain: "cluster.local".to_string(),
        identity: Identity::new("cluster.local", namespace, "server")
            .expect("the vocabulary holds valid namespaces"),
        workload_ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 2, 7))],
        protocol: TunnelProtocol::Hbone,
        node: "node-a".to_string(),
        network: String::new(),
        hostname: String::new(),
        waypoint: None,
        application_tunnel: None,
        services: BTreeMap::new(),
        labels: BTreeMap::from([("app".to_string(), "server".to_string())]),
        canonical_name: "server".to_string(),
        canonical_revision: "latest".to_string(),
        workload_name: "server".to_string(),
        workload_type: "deployment".to_string(),
        cluster_id: "Kubernetes".to_string(),
        authorization_policies: Vec::new(),
        status: HealthStatus::Healthy,
    }
}
