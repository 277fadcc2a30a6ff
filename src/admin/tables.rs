//! Tables for the `nodetunnel status|workloads|services|policies|certificates|connections`
//! commands (layer L5): renders the admin API's JSON for people, so no one needs curl and jq.
//! Pure functions of the JSON, so the layout is testable without an agent.

use std::fmt::Write as _;

use serde_json::Value;

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

    /// The answer as a table.
    pub fn render(self, answer: &Value) -> String {
        match self {
            View::Status => status(answer),
            View::Workloads => table(
                &["NAMESPACE", "NAME", "IPS", "NODE", "PROTOCOL", "IDENTITY"],
                items(answer, "workloads").map(|w| {
                    vec![
                        field(w, "namespace"),
                        field(w, "name"),
                        list(w, "workloadIps"),
                        field(w, "node"),
                        field(w, "protocol"),
                        field(w, "identity"),
                    ]
                }),
            ),
            View::Services => table(
                &["NAMESPACE", "NAME", "HOSTNAME", "VIPS", "PORTS"],
                items(answer, "services").map(|s| {
                    let vips =
                        s.get("vips")
                            .and_then(Value::as_array)
                            .map_or(String::new(), |vips| {
                                vips.iter()
                                    .map(|vip| field(vip, "ip"))
                                    .collect::<Vec<_>>()
                                    .join(",")
                            });
                    let ports =
                        s.get("ports")
                            .and_then(Value::as_object)
                            .map_or(String::new(), |ports| {
                                ports
                                    .iter()
                                    .map(|(port, target)| format!("{port}->{target}"))
                                    .collect::<Vec<_>>()
                                    .join(",")
                            });
                    vec![
                        field(s, "namespace"),
                        field(s, "name"),
                        field(s, "hostname"),
                        vips,
                        ports,
                    ]
                }),
            ),
            View::Policies => table(
                &["NAMESPACE", "NAME", "SCOPE", "ACTION", "RULES"],
                items(answer, "policies").map(|entry| {
                    let policy = entry.get("policy").unwrap_or(entry);
                    let rules = policy
                        .get("rules")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len);
                    vec![
                        field(policy, "namespace"),
                        field(policy, "name"),
                        field(policy, "scope"),
                        field(policy, "action"),
                        rules.to_string(),
                    ]
                }),
            ),
            View::Certificates => table(
                &["IDENTITY", "STATE", "VALID FROM", "EXPIRES"],
                items(answer, "certificates").map(|c| {
                    let chain = c
                        .get("certChain")
                        .and_then(|chain| chain.get(0))
                        .cloned()
                        .unwrap_or(Value::Null);
                    vec![
                        field(c, "identity"),
                        field(c, "state"),
                        field(&chain, "validFrom"),
                        field(&chain, "expirationTime"),
                    ]
                }),
            ),
            View::Connections => table(
                &[
                    "DIRECTION",
                    "SOURCE",
                    "DESTINATION",
                    "SOURCE IDENTITY",
                    "SENT",
                    "RECEIVED",
                    "AGE",
                ],
                answer.as_array().into_iter().flatten().map(|c| {
                    vec![
                        field(c, "direction"),
                        field(c, "srcAddr"),
                        field(c, "dstAddr"),
                        field(c, "srcIdentity"),
                        field(c, "bytesSent"),
                        field(c, "bytesReceived"),
                        format!(
                            "{:.0}s",
                            c.get("ageSeconds").and_then(Value::as_f64).unwrap_or(0.0)
                        ),
                    ]
                }),
            ),
        }
    }
}

fn items<'a>(answer: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    answer
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// A field as text: strings bare, numbers and others as JSON, missing as empty.
fn field(value: &Value, key: &str) -> String {
    match value.get(key) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

fn list(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_array)
        .map_or(String::new(), |items| {
            items
                .iter()
                .map(|item| item.as_str().map_or(item.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(",")
        })
}

fn status(dump: &Value) -> String {
    let count = |key: &str| dump.get(key).and_then(Value::as_array).map_or(0, Vec::len);
    let pods = dump.get("workloadState").and_then(Value::as_object);
    let up = pods.map_or(0, |pods| {
        pods.values()
            .filter(|pod| pod.get("state").and_then(Value::as_str) == Some("Up"))
            .count()
    });
    let config = dump.get("config").cloned().unwrap_or(Value::Null);
    let version = dump.get("version").cloned().unwrap_or(Value::Null);
    let rows = [
        ("node", field(&config, "node")),
        ("version", field(&version, "version")),
        ("config", field(&config, "configPath")),
        (
            "pods",
            format!("{up} up, {} pending", pods.map_or(0, |p| p.len()) - up),
        ),
        ("workloads", count("workloads").to_string()),
        ("services", count("services").to_string()),
        ("policies", count("policies").to_string()),
        ("certificates", count("certificates").to_string()),
        ("dns", dns_status(&config)),
    ];
    let mut out = String::new();
    for (name, value) in rows {
        let _ = writeln!(out, "{:<14}{value}", format!("{name}:"));
    }
    out
}

/// `on (localhost:15053), domain cluster.local, upstreams 10.96.0.10:53`, or `off`.
fn dns_status(config: &Value) -> String {
    if config.get("dnsProxy").and_then(Value::as_bool) != Some(true) {
        return "off".to_string();
    }
    let upstreams = list(config, "dnsUpstreams");
    format!(
        "on ({}), domain {}, upstreams {}",
        field(config, "dnsProxyAddr"),
        field(config, "clusterDomain"),
        if upstreams.is_empty() {
            "none"
        } else {
            &upstreams
        },
    )
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
            "certificates": [{"identity": "spiffe://td/ns/a/sa/b", "state": "Available",
                "certChain": [{"validFrom": "2026-01-01T00:00:00Z",
                               "expirationTime": "2026-01-02T00:00:00Z"}]}],
            "workloadState": {"a": {"state": "Up"}, "b": {"state": "Pending"}},
            "config": {"node": "node-a"}
        });
        let workloads = View::Workloads.render(&dump);
        let lines: Vec<&str> = workloads.lines().collect();
        assert_eq!(lines.len(), 3, "{workloads}");
        assert!(
            lines[0].starts_with("NAMESPACE  NAME     IPS"),
            "{workloads}"
        );
        assert!(lines[1].contains("10.0.2.7") && lines[1].contains("HBONE"));
        assert_eq!(lines[2].trim(), "partial");
        let certificates = View::Certificates.render(&dump);
        assert!(
            certificates.contains("Available  2026-01-01T00:00:00Z"),
            "{certificates}"
        );
        let status = View::Status.render(&dump);
        assert!(status.contains("pods:         1 up, 1 pending"), "{status}");
        assert!(status.contains("node:         node-a"), "{status}");
        assert!(status.contains("dns:          off"), "{status}");
        let with_dns = serde_json::json!({"config": {"dnsProxy": true,
            "dnsProxyAddr": "localhost:15053", "clusterDomain": "cluster.local",
            "dnsUpstreams": ["10.96.0.10:53"]}});
        let status = View::Status.render(&with_dns);
        assert!(
            status.contains(
                "dns:          on (localhost:15053), domain cluster.local, upstreams 10.96.0.10:53"
            ),
            "{status}"
        );
        assert_eq!(
            View::Connections
                .render(&serde_json::json!([]))
                .lines()
                .count(),
            1
        );
        assert_eq!(View::Services.select(&dump), Value::Null);
    }
}
