//! The client's pure parts: applying pushes, ACK/NACK, versions for reconnect, the node.

use prost::Message;

use super::*;
use crate::proto::discovery::Resource;
use crate::proto::workload as wl;

fn workload_resource(uid: &str, ip: [u8; 4], version: &str) -> Resource {
    let workload = wl::Workload {
        uid: uid.to_string(),
        name: uid.rsplit('/').next().unwrap_or(uid).to_string(),
        namespace: "default".to_string(),
        addresses: vec![ip.to_vec()],
        ..wl::Workload::default()
    };
    Resource {
        name: uid.to_string(),
        version: version.to_string(),
        resource: Some(prost_types::Any {
            type_url: ADDRESS_TYPE.to_string(),
            value: wl::Address {
                r#type: Some(wl::address::Type::Workload(workload)),
            }
            .encode_to_vec(),
        }),
        ..Resource::default()
    }
}

fn response(resources: Vec<Resource>, removed: &[&str], nonce: &str) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE.to_string(),
        resources,
        removed_resources: removed.iter().map(ToString::to_string).collect(),
        nonce: nonce.to_string(),
        ..DeltaDiscoveryResponse::default()
    }
}

#[test]
fn a_bad_resource_is_refused_by_name_and_the_rest_applies() {
    let mut model = XdsModel::default();
    let mut versions = Versions::default();
    let first = response(
        vec![workload_resource("w/a", [10, 0, 0, 1], "1")],
        &[],
        "n1",
    );
    assert_eq!(
        model
            .apply(&first, &mut versions)
            .expect("type")
            .nack_message(),
        None
    );

    let mut bad = workload_resource("w/b", [10, 0, 0, 2], "1");
    bad.resource.as_mut().expect("any").value = vec![0xff; 3];
    let mut bad_update = workload_resource("w/a", [10, 0, 0, 9], "2");
    bad_update.name = "w/a".to_string();
    if let Some(any) = bad_update.resource.as_mut() {
        // Same resource, now with a 5-byte address: refused, the old value stays.
        let mut address = wl::Address::decode(any.value.as_slice()).expect("decode");
        if let Some(wl::address::Type::Workload(w)) = address.r#type.as_mut() {
            w.addresses = vec![vec![1, 2, 3, 4, 5]];
        }
        any.value = address.encode_to_vec();
    }
    let push = response(
        vec![
            bad,
            workload_resource("w/c", [10, 0, 0, 3], "1"),
            bad_update,
        ],
        &[],
        "n2",
    );
    let applied = model.apply(&push, &mut versions).expect("type");
    assert_eq!(applied.updated, 1);
    let message = applied.nack_message().expect("nack");
    assert!(
        message.starts_with("w/b: resource: not an istio.workload.Address"),
        "{message}"
    );
    assert!(
        message.contains("w/a: workload.addresses[0]: 5 bytes is not an IPv4 or IPv6 address"),
        "{message}"
    );
    assert_eq!(model.workloads.len(), 2);
    assert_eq!(
        model.workloads["w/a"].workload_ips,
        vec!["10.0.0.1".parse::<std::net::IpAddr>().unwrap()],
        "a refused update keeps the last good value"
    );
    // Refused resources are left out of the versions, so istiod sends them again on reconnect.
    let held = versions.of(ADDRESS_TYPE);
    assert_eq!(held.get("w/c").map(String::as_str), Some("1"));
    assert!(!held.contains_key("w/a") && !held.contains_key("w/b"));

    let removal = response(Vec::new(), &["w/c", "never-seen"], "n3");
    let applied = model.apply(&removal, &mut versions).expect("type");
    assert_eq!(applied.removed, 1);
    assert!(!model.workloads.contains_key("w/c"));
    assert!(!versions.of(ADDRESS_TYPE).contains_key("w/c"));
}

#[test]
fn unknown_types_are_refused_whole() {
    let mut model = XdsModel::default();
    let mut push = response(vec![workload_resource("w/a", [10, 0, 0, 1], "1")], &[], "n");
    push.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".to_string();
    assert!(model.apply(&push, &mut Versions::default()).is_err());
    assert!(model.workloads.is_empty());
}

#[test]
fn ack_and_nack_carry_the_nonce() {
    let push = response(Vec::new(), &[], "nonce-7");
    let ack = acknowledgement(&push, None);
    assert_eq!(ack.response_nonce, "nonce-7");
    assert_eq!(ack.type_url, ADDRESS_TYPE);
    assert!(ack.error_detail.is_none());
    let nack = acknowledgement(&push, Some("w/b: bad".to_string()));
    assert_eq!(nack.error_detail.expect("detail").message, "w/b: bad");
}

#[test]
fn reconnect_sends_held_versions() {
    let mut model = XdsModel::default();
    let mut versions = Versions::default();
    let push = response(
        vec![workload_resource("w/a", [10, 0, 0, 1], "v9")],
        &[],
        "n",
    );
    model.apply(&push, &mut versions).expect("type");
    let agent = AgentConfig::default();
    let request = initial_request(&node(&agent), ADDRESS_TYPE, &versions);
    assert!(request.resource_names_subscribe.is_empty(), "wildcard");
    assert_eq!(
        request
            .initial_resource_versions
            .get("w/a")
            .map(String::as_str),
        Some("v9")
    );
}

#[test]
fn node_has_istios_id_and_metadata() {
    let mut agent = AgentConfig {
        node: "worker-1".to_string(),
        ..AgentConfig::default()
    };
    agent.istio.pod_name = "ztunnel-x".to_string();
    agent.istio.pod_namespace = "istio-system".to_string();
    agent.istio.instance_ip = Some("10.1.2.3".parse().unwrap());
    agent
        .istio
        .metadata
        .insert("LABELS".to_string(), serde_json::json!({"app": "ztunnel"}));
    let node = node(&agent);
    assert_eq!(
        node.id,
        "ztunnel~10.1.2.3~ztunnel-x.istio-system~istio-system.svc.cluster.local"
    );
    let fields = node.metadata.expect("metadata").fields;
    let text = |key: &str| match fields.get(key).and_then(|v| v.kind.clone()) {
        Some(prost_types::value::Kind::StringValue(s)) => s,
        other => panic!("{key}: {other:?}"),
    };
    assert_eq!(text("NODE_NAME"), "worker-1");
    assert_eq!(text("INSTANCE_IPS"), "10.1.2.3");
    assert_eq!(text("NAMESPACE"), "istio-system");
    assert_eq!(text("CLUSTER_ID"), "Kubernetes");
    assert!(matches!(
        fields.get("LABELS").and_then(|v| v.kind.clone()),
        Some(prost_types::value::Kind::StructValue(_))
    ));
}
