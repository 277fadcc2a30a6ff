use std::path::Path;

use super::*;
use crate::config::{self, Overrides};

/// Two workloads named `app` (namespaces `default` and `other`) on node-a, one on node-b.
fn snapshot() -> Snapshot {
    let yaml = r#"
agent:
  node: node-a
workloads:
  - uid: cluster1//Pod/default/app
    name: app
    namespace: default
    serviceAccount: app-sa
    workloadIps: [10.0.0.1]
    node: node-a
  - uid: cluster1//Pod/other/app
    name: app
    namespace: other
    serviceAccount: app-sa
    workloadIps: [10.0.0.2]
    node: node-a
  - uid: cluster1//Pod/default/remote
    name: remote
    namespace: default
    serviceAccount: remote
    workloadIps: [10.0.0.3]
    node: node-b
services: []
policies: []
"#;
    config::parse(Path::new("test.yaml"), yaml, &Overrides::default())
        .expect("test config parses")
        .snapshot()
}

fn info(name: &str, namespace: &str, service_account: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: namespace.into(),
        service_account: service_account.into(),
    }
}

#[test]
fn resolve_workload_uid_table() {
    let snapshot = snapshot();
    let cases = [
        (
            "uid known to the model wins",
            "cluster1//Pod/other/app",
            info("ignored", "ignored", ""),
            Some("cluster1//Pod/other/app"),
        ),
        (
            "kubernetes uid matched by name, namespace, service account",
            "3f1c-uid",
            info("app", "default", "app-sa"),
            Some("cluster1//Pod/default/app"),
        ),
        (
            "namespace tells same-named pods apart",
            "3f1c-uid",
            info("app", "other", "app-sa"),
            Some("cluster1//Pod/other/app"),
        ),
        (
            "empty service account matches any",
            "3f1c-uid",
            info("app", "default", ""),
            Some("cluster1//Pod/default/app"),
        ),
        (
            "different service account does not match",
            "3f1c-uid",
            info("app", "default", "intruder"),
            None,
        ),
        (
            "a workload of another node is not ours",
            "3f1c-uid",
            info("remote", "default", "remote"),
            None,
        ),
        (
            "unknown pod",
            "3f1c-uid",
            info("ghost", "default", ""),
            None,
        ),
    ];
    for (name, uid, info, expected) in cases {
        assert_eq!(
            resolve_workload_uid(&snapshot, "node-a", uid, &info).as_deref(),
            expected,
            "{name}"
        );
    }
}

#[test]
fn only_namespace_files_are_accepted_as_netns() {
    let file = std::fs::File::open("/dev/null").expect("open /dev/null");
    let error = netns_from_fd("pod-1", OwnedFd::from(file)).expect_err("not a netns");
    let text = error.to_string();
    assert!(
        text.starts_with("add for pod-1: fd is not a network namespace (file system type"),
        "{text}"
    );
    let own = std::fs::File::open("/proc/thread-self/ns/net").expect("own netns");
    let (netns, _spare) = netns_from_fd("pod-2", OwnedFd::from(own)).expect("a netns");
    assert_eq!(netns.path(), Path::new("zds:pod-2"));
}

#[test]
fn zds_config_section_defaults_overrides_and_typos() {
    let parse = |agent: &str| {
        let yaml =
            format!("agent:\n  node: node-a\n{agent}workloads: []\nservices: []\npolicies: []\n");
        config::parse(Path::new("test.yaml"), &yaml, &Overrides::default())
    };
    let defaults = parse("").expect("no zds section").agent.zds;
    assert!(!defaults.enabled, "off unless asked for");
    assert_eq!(defaults.socket, Path::new("/var/run/ztunnel/ztunnel.sock"));
    assert_eq!(defaults.reconnect_max, Duration::from_secs(15));

    let set = parse("  zds:\n    enabled: true\n    socket: /tmp/cni.sock\n    reconnectMax: 2s\n")
        .expect("zds section")
        .agent
        .zds;
    assert!(set.enabled);
    assert_eq!(set.socket, Path::new("/tmp/cni.sock"));
    assert_eq!(set.reconnect_max, Duration::from_secs(2));

    let typo = parse("  zds:\n    enable: true\n").expect_err("unknown field");
    assert!(typo.to_string().contains("enable"), "{typo}");
}
