//! Fuzzes Istio `AuthorizationPolicy` / `PeerAuthentication` YAML translation
//! (`config::istio_policy::parse`) and then the decisions made with what it produced
//! (`authz::evaluate` and `authz::authorize`), on UTF-8 text.
//!
//! The connection facts come from the input: ports, addresses and identities that the translated
//! policies mention (so that matches are actually reached), picked by a hash of the input, next
//! to a fixed mTLS client and a fixed plaintext client. Each is decided for a fixed destination
//! workload and for one in the first policy's namespace that lists that policy by key, with and
//! without `defaultDeny`.
//!
//! Properties: nothing panics; translation is deterministic; errors, warnings and decisions
//! render (`Display`, and the JSON `nodetunnel explain` prints); a verdict agrees with its
//! reason; `authorize` (which adds PeerAuthentication STRICT) never allows what `evaluate` denies.
#![no_main]

use std::collections::BTreeMap;
use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use nodetunnel::config::istio_policy::{self as istio, IstioOptions, Translation};
use nodetunnel::authz::{
    authorize, evaluate, AuthzOptions, ConnectionFacts, Decision, DecisionReason,
};
use nodetunnel::spiffe::Identity;
use nodetunnel::state::policy::{Match, StringMatch};
use nodetunnel::state::{HealthStatus, TunnelProtocol, Workload};

const DESTINATION_IP: [u8; 4] = [10, 0, 2, 7];
const CLIENT_IP: [u8; 4] = [10, 0, 1, 5];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let options = IstioOptions::default();
    let translation = istio::parse(text, &options);
    assert_eq!(
        translation,
        istio::parse(text, &options),
        "translation is not deterministic"
    );
    for error in &translation.errors {
        let _ = error.to_string();
    }
    for warning in &translation.warnings {
        let _ = warning.to_string();
    }
    if translation.policies.is_empty() && translation.peer_authentications.is_empty() {
        return;
    }
    let facts = [
        client_facts(Some(client_identity()), CLIENT_IP.into(), 8080),
        client_facts(None, CLIENT_IP.into(), 8080),
        derived_facts(&translation, fnv1a(data)),
    ];
    for destination in destinations(&translation) {
        for facts in &facts {
            for default_deny in [false, true] {
                decide(
                    &translation,
                    &destination,
                    facts,
                    AuthzOptions { default_deny },
                );
            }
        }
    }
});

fn decide(
    translation: &Translation,
    destination: &Workload,
    facts: &ConnectionFacts,
    options: AuthzOptions,
) {
    let evaluated = evaluate(&translation.policies, destination, facts, &options);
    check_consistent(&evaluated);
    let authorized = authorize(
        &translation.policies,
        &translation.peer_authentications,
        destination,
        facts,
        &options,
    );
    check_consistent(&authorized);
    // `authorize` only adds a DENY candidate (STRICT) to what `evaluate` sees.
    assert!(
        evaluated.is_allowed() || !authorized.is_allowed(),
        "evaluate denies but authorize allows: {evaluated:?} / {authorized:?}"
    );
}

/// The verdict agrees with its reason, and the decision renders as `explain` prints it.
fn check_consistent(decision: &Decision) {
    let allowing = matches!(
        decision.reason,
        DecisionReason::AllowedBy { .. } | DecisionReason::NoAllowPolicies
    );
    assert_eq!(
        decision.is_allowed(),
        allowing,
        "verdict vs reason: {decision:?}"
    );
    let _ = decision.reason.summary();
    serde_json::to_string(decision).expect("a decision serialises");
}

/// The fixed destination, and one in the first policy's namespace that lists it by key.
fn destinations(translation: &Translation) -> Vec<Workload> {
    let mut destinations = vec![workload("default")];
    let first = translation
        .policies
        .first()
        .map(|selector| &selector.policy);
    if let Some(mut listing) = first.and_then(|policy| workload_in(&policy.namespace)) {
        listing.authorization_policies = translation
            .policies
            .iter()
            .map(|selector| selector.policy.key())
            .take(1)
            .collect();
        destinations.push(listing);
    }
    destinations
}

fn workload_in(namespace: &str) -> Option<Workload> {
    Identity::new("cluster.local", namespace, "server").ok()?;
    Some(workload(namespace))
}

fn workload(namespace: &str) -> Workload {
    Workload {
        uid: format!("cluster//Pod/{namespace}/server"),
        name: "server".to_string(),
        namespace: namespace.to_string(),
        service_account: "server".to_string(),
        trust_domain: "cluster.local".to_string(),
        identity: Identity::new("cluster.local", namespace, "server")
            .expect("callers pass a valid namespace"),
        workload_ips: vec![IpAddr::from(DESTINATION_IP)],
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

fn client_identity() -> Identity {
    Identity::new("cluster.local", "client", "client").expect("valid identity")
}

fn client_facts(identity: Option<Identity>, source_ip: IpAddr, port: u16) -> ConnectionFacts {
    ConnectionFacts {
        source_identity: identity,
        source_ip,
        destination_ip: IpAddr::from(DESTINATION_IP),
        destination_port: port,
    }
}

/// Values the policies mention, one of each kind chosen by `hash`.
fn derived_facts(translation: &Translation, hash: u64) -> ConnectionFacts {
    let mut ports = vec![8080];
    let mut source_ips = vec![IpAddr::from(CLIENT_IP)];
    let mut destination_ips = vec![IpAddr::from(DESTINATION_IP)];
    let mut identities = vec![Some(client_identity()), None];
    let matches = translation
        .policies
        .iter()
        .flat_map(|selector| selector.policy.rules.iter().flatten().flatten());
    for found in matches {
        collect(
            found,
            &mut ports,
            &mut source_ips,
            &mut destination_ips,
            &mut identities,
        );
    }
    for peer_authentication in &translation.peer_authentications {
        ports.extend(peer_authentication.port_level.keys());
    }
    let pick = |length: usize, shift: u32| (hash >> shift) as usize % length;
    ConnectionFacts {
        source_identity: identities[pick(identities.len(), 0)].clone(),
        source_ip: source_ips[pick(source_ips.len(), 16)],
        destination_ip: destination_ips[pick(destination_ips.len(), 32)],
        destination_port: ports[pick(ports.len(), 48)],
    }
}

fn collect(
    found: &Match,
    ports: &mut Vec<u16>,
    source_ips: &mut Vec<IpAddr>,
    destination_ips: &mut Vec<IpAddr>,
    identities: &mut Vec<Option<Identity>>,
) {
    ports.extend(&found.destination_ports);
    ports.extend(&found.not_destination_ports);
    let networks = found.source_ips.iter().chain(&found.not_source_ips);
    source_ips.extend(networks.flat_map(|network| [network.addr(), network.broadcast()]));
    let networks = found
        .destination_ips
        .iter()
        .chain(&found.not_destination_ips);
    destination_ips.extend(networks.flat_map(|network| [network.addr(), network.broadcast()]));
    let principals = found.principals.iter().chain(&found.not_principals);
    for principal in principals {
        if let StringMatch::Exact(principal) = principal {
            identities.push(format!("spiffe://{principal}").parse().ok());
        }
    }
    let namespaces = found.namespaces.iter().chain(&found.not_namespaces);
    for namespace in namespaces {
        if let StringMatch::Exact(namespace) = namespace {
            identities.push(Identity::new("cluster.local", namespace, "client").ok());
        }
    }
    let accounts = found
        .service_accounts
        .iter()
        .chain(&found.not_service_accounts);
    for account in accounts {
        let identity = Identity::new(
            "cluster.local",
            &account.namespace,
            &account.service_account,
        );
        identities.push(identity.ok());
    }
}

/// FNV-1a: a stable, dependency-free hash so the same input always picks the same facts.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
