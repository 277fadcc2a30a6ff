//! Tables for the `nodetunnel status|workloads|services|policies|certificates|connections`
//! commands (layer L5): renders the admin API's JSON for people, so no one needs curl and jq.
//! The JSON is read into the same [`super::schema`] types the agent writes it with. Pure
//! functions of the JSON, so the layout is testable without an agent.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use super::schema::{ConfigDump, ConnectionDump, EffectiveConfig, PodState};
use crate::capture::{PodSource, PodStatus};
use crate::state::TunnelProtocol;

/// What the CLI asks a running agent about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Summary counts.
    Status,
    /// The workloads in the model.
    Workloads,
    /// The services in the model.
    Services,
    /// Authorization policies.
    Policies,
    /// Workload certificates and their validity.
    Certificates,
    /// Open connections.
    Connections,
}

impl View {
    /// The admin path whose JSON this view renders.
    pub fn path(self) -> &'static str {
        match self {
            View::Connections => "/connections",
            _ => "/config_dump",
        }
    }

    /// The part of the answer `--json` prints.
    pub fn select(self, answer: &Value) -> Value {
        let key = match self {
            View::Status | View::Connections => return answer.clone(),
            View::Workloads => "workloads",
            View::Services => "services",
            View::Policies => "policies",
            View::Certificates => "certificates",
        };
        answer.get(key).cloned().unwrap_or(Value::Null)
    }

    /// The answer as a table. The answer is decoded into the [`super::schema`] types the agent
    /// wrote it with; an answer of another shape is an error, not a table of blanks.
    pub fn render(self, answer: &Value) -> Result<String, serde_json::Error> {
        if self == View::Connections {
            let connections: Vec<ConnectionDump> = serde_json::from_value(answer.clone())?;
            return Ok(connections_table(&connections));
        }
        let dump: ConfigDump = serde_json::from_value(answer.clone())?;
        Ok(match self {
            View::Status => status(&dump),
            View::Workloads => table(
                &["NAMESPACE", "NAME", "IPS", "NODE", "PROTOCOL", "IDENTITY"],
                dump.workloads.iter().map(|workload| {
                    vec![
                        workload.namespace.clone(),
                        workload.name.clone(),
                        joined(&workload.workload_ips),
                        workload.node.clone(),
                        protocol(workload.protocol).to_string(),
                        workload.identity.clone(),
                    ]
                }),
            ),
            View::Services => table(
                &[
                    "NAMESPACE",
                    "NAME",
                    "HOSTNAME",
                    "VIPS",
                    "PORTS",
                    "ENDPOINTS",
                ],
                dump.services.iter().map(|service| {
                    let ports: Vec<String> = service
                        .ports
                        .iter()
                        .map(|(port, target)| format!("{port}->{target}"))
                        .collect();
                    vec![
                        service.namespace.clone(),
                        service.name.clone(),
                        service.hostname.clone(),
                        joined(&service.vips),
                        ports.join(","),
                        service.endpoints.len().to_string(),
                    ]
                }),
            ),
            View::Policies => table(
                &["NAMESPACE", "NAME", "SCOPE", "ACTION", "RULES"],
                dump.policies.iter().map(|entry| {
                    let policy = &entry.policy;
                    vec![
                        policy.namespace.clone(),
                        policy.name.clone(),
                        format!("{:?}", policy.scope),
                        format!("{:?}", policy.action),
                        policy.rules.len().to_string(),
                    ]
                }),
            ),
            View::Certificates => table(
                &["IDENTITY", "STATE", "VALID FROM", "EXPIRES"],
                dump.certificates.iter().map(|certificate| {
                    let leaf = certificate.cert_chain.first();
                    vec![
                        certificate.identity.clone(),
                        certificate.state.clone(),
                        leaf.map(|leaf| leaf.valid_from.clone()).unwrap_or_default(),
                        leaf.map(|leaf| leaf.expiration_time.clone())
                            .unwrap_or_default(),
                    ]
                }),
            ),
            View::Connections => unreachable!("handled above"),
        })
    }
}

/// `HBONE` / `TCP`, as the dump writes it.
fn protocol(protocol: TunnelProtocol) -> &'static str {
    match protocol {
        TunnelProtocol::Hbone => "HBONE",
        TunnelProtocol::Tcp => "TCP",
    }
}

fn joined<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn connections_table(connections: &[ConnectionDump]) -> String {
    table(
        &[
            "DIRECTION",
            "SOURCE",
            "DESTINATION",
            "PROTOCOL",
            "SOURCE IDENTITY",
            "SENT",
            "RECEIVED",
            "AGE",
        ],
        connections.iter().map(|connection| {
            vec![
                connection.direction.clone(),
                connection.src.clone(),
                connection.actual_dst.clone(),
                protocol(connection.protocol).to_string(),
                connection.src_identity.clone(),
                connection.bytes_sent.to_string(),
                connection.bytes_received.to_string(),
                format!("{:.0}s", connection.age_seconds),
            ]
        }),
    )
}

fn status(dump: &ConfigDump) -> String {
    let pods = &dump.workload_state;
    let up = pods
        .values()
        .filter(|pod| pod.state == PodState::Up)
        .count();
    let config = dump.config.as_ref();
    let rows = [
        ("node", config.map(|c| c.node.clone()).unwrap_or_default()),
        (
            "version",
            dump.version
                .as_ref()
                .map(|v| v.version.clone())
                .unwrap_or_default(),
        ),
        (
            "config",
            config
                .map(|c| c.config_path.display().to_string())
                .unwrap_or_default(),
        ),
        ("pods", format!("{up} up, {} pending", pods.len() - up)),
        ("workloads", dump.workloads.len().to_string()),
        ("services", dump.services.len().to_string()),
        ("policies", dump.policies.len().to_string()),
        ("certificates", dump.certificates.len().to_string()),
        ("dns", config.map_or_else(|| "off".to_string(), dns_status)),
    ];
    let mut out = String::new();
    for (name, value) in rows {
        let _ = writeln!(out, "{:<14}{value}", format!("{name}:"));
    }
    out
}

/// `on (localhost:15053), domain cluster.local, upstreams 10.96.0.10:53`, or `off`.
fn dns_status(config: &EffectiveConfig) -> String {
    if !config.dns_proxy {
        return "off".to_string();
    }
    let upstreams: Vec<String> = config
        .dns_upstreams
        .iter()
        .map(ToString::to_string)
        .collect();
    format!(
        "on ({}), domain {}, upstreams {}",
        config.dns_proxy_addr,
        config.cluster_domain,
        if upstreams.is_empty() {
            "none".to_string()
        } else {
            upstreams.join(",")
        },
    )
}

/// `nodetunnel pod list`: `/pods` (workload uid → [`PodStatus`]) as a table.
pub fn pods(body: &str) -> Result<String, serde_json::Error> {
    let pods: BTreeMap<String, PodStatus> = serde_json::from_str(body)?;
    Ok(table(
        &["WORKLOAD", "STATE", "SOURCE", "NETNS", "REASON"],
        pods.into_iter().map(|(uid, status)| {
            let (state, netns, source, reason) = match status {
                PodStatus::Running { netns, source } => ("running", netns, source, String::new()),
                PodStatus::Failed {
                    netns,
                    source,
                    reason,
                } => ("failed", netns, source, reason),
            };
            let source = match source {
                PodSource::Config => "config",
                PodSource::Api => "api",
                PodSource::Cni => "cni",
            };
            vec![
                uid,
                state.to_string(),
                source.to_string(),
                netns.display().to_string(),
                reason,
            ]
        }),
    ))
}

/// Left-aligned columns sized to their widest cell.
fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.collect();
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(column, header)| {
            rows.iter()
                .map(|row| row.get(column).map_or(0, |cell| cell.chars().count()))
                .chain([header.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_tolerate_missing_fields() {
        let dump = serde_json::json!({
            "workloads": [
                {"namespace": "default", "name": "server", "workloadIps": ["10.0.2.7"],
                 "node": "node-b", "protocol": "HBONE",
                 "identity": "spiffe://cluster.local/ns/default/sa/server"},
                {"name": "partial"}
            ],
            "services": [{"name": "echo", "namespace": "default", "hostname": "echo.default",
                "vips": ["/10.96.0.1", "net2/10.96.0.2"], "ports": {"80": 8080},
                "endpoints": {"u": {"workloadUid": "u", "port": {"80": 8080}}}}],
            "policies": [{"name": "p", "namespace": "default", "scope": "Global",
                "action": "Deny", "rules": [[[]], [[]]]}],
            "certificates": [{"identity": "spiffe://td/ns/a/sa/b", "state": "Available",
                "certChain": [{"validFrom": "2026-01-01T00:00:00Z",
                               "expirationTime": "2026-01-02T00:00:00Z"}]}],
            "workloadState": {"a": {"state": "Up"}, "b": {"state": "Pending"}},
            "config": {"node": "node-a", "configPath": "/etc/nodetunnel.yaml",
                "adminAddr": "127.0.0.1:15000", "metricsAddr": "0.0.0.0:15020",
                "readinessAddr": "0.0.0.0:15021", "drainTimeout": "5s", "reloadInterval": "1s",
                "zdsEnabled": false, "installRules": true, "xdsAddress": null,
                "caAddress": null, "clusterId": "Kubernetes"}
        });
        let workloads = View::Workloads.render(&dump).unwrap();
        let lines: Vec<&str> = workloads.lines().collect();
        assert_eq!(lines.len(), 3, "{workloads}");
        assert!(
            lines[0].starts_with("NAMESPACE  NAME     IPS"),
            "{workloads}"
        );
        assert!(lines[1].contains("10.0.2.7") && lines[1].contains("HBONE"));
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["partial", "TCP"],
            "{workloads}"
        );
        let services = View::Services.render(&dump).unwrap();
        assert!(
            services.contains("/10.96.0.1,net2/10.96.0.2  80->8080  1"),
            "{services}"
        );
        let policies = View::Policies.render(&dump).unwrap();
        assert!(
            policies.contains("default    p     Global  Deny    2"),
            "{policies}"
        );
        let certificates = View::Certificates.render(&dump).unwrap();
        assert!(
            certificates.contains("Available  2026-01-01T00:00:00Z"),
            "{certificates}"
        );
        let status = View::Status.render(&dump).unwrap();
        assert!(status.contains("pods:         1 up, 1 pending"), "{status}");
        assert!(status.contains("node:         node-a"), "{status}");
        assert!(
            status.contains("config:       /etc/nodetunnel.yaml"),
            "{status}"
        );
        assert!(status.contains("dns:          off"), "{status}");
        let mut with_dns = dump.clone();
        with_dns["config"]["dnsProxy"] = Value::Bool(true);
        with_dns["config"]["dnsProxyAddr"] = "localhost:15053".into();
        with_dns["config"]["clusterDomain"] = "cluster.local".into();
        with_dns["config"]["dnsUpstreams"] = serde_json::json!(["10.96.0.10:53"]);
        let status = View::Status.render(&with_dns).unwrap();
        assert!(
            status.contains(
                "dns:          on (localhost:15053), domain cluster.local, upstreams 10.96.0.10:53"
            ),
            "{status}"
        );
        assert_eq!(
            View::Connections
                .render(&serde_json::json!([]))
                .unwrap()
                .lines()
                .count(),
            1
        );
        assert_eq!(View::Services.select(&serde_json::json!({})), Value::Null);
    }

    #[test]
    fn an_answer_of_another_shape_is_an_error_not_blank_columns() {
        // (view, answer): a field of the wrong type, e.g. an agent of an older shape.
        let cases = [
            (
                View::Workloads,
                serde_json::json!({"workloads": [{"protocol": "Hbone"}]}),
            ),
            (
                View::Services,
                serde_json::json!({"services": [{"vips": [{"ip": "10.0.0.1"}]}]}),
            ),
            (View::Connections, serde_json::json!({"not": "a list"})),
        ];
        for (view, answer) in cases {
            assert!(view.render(&answer).is_err(), "{view:?}: {answer}");
        }
    }

    #[test]
    fn pod_list_reads_the_pods_the_agent_writes() {
        let pods = BTreeMap::from([
            (
                "cluster1//Pod/default/client".to_string(),
                PodStatus::Running {
                    netns: "/run/netns/client".into(),
                    source: PodSource::Config,
                },
            ),
            (
                "cluster1//Pod/default/server".to_string(),
                PodStatus::Failed {
                    netns: "/run/netns/server".into(),
                    source: PodSource::Api,
                    reason: "nft failed".to_string(),
                },
            ),
        ]);
        let table = super::pods(&serde_json::to_string(&pods).unwrap()).unwrap();
        let rows: Vec<Vec<&str>> = table
            .lines()
            .map(|line| line.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                vec!["WORKLOAD", "STATE", "SOURCE", "NETNS", "REASON"],
                vec![
                    "cluster1//Pod/default/client",
                    "running",
                    "config",
                    "/run/netns/client"
                ],
                vec![
                    "cluster1//Pod/default/server",
                    "failed",
                    "api",
                    "/run/netns/server",
                    "nft",
                    "failed"
                ],
            ]
        );
        assert!(super::pods(r#"{"u": {"state": "gone"}}"#).is_err());
    }
}
