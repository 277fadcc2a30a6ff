//! The command line as a user meets it: `--version`, `check-config` on good and bad files, and
//! `run` with a bad config, which must exit 64 with `FILE:LINE:COL: FIELD: MESSAGE` lines before
//! binding any port.
//!
//! The `run` tests use network namespaces and need root (see `support::netns_tests_enabled`).

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::agent::{self, run_cli};
use support::netns::Topology;

/// `sysexits.h` EX_DATAERR: the exit code promised for an invalid config.
const EXIT_BAD_CONFIG: i32 = 64;

/// One reported config error.
#[derive(Debug, PartialEq, Eq)]
struct Reported {
    line: usize,
    column: usize,
    field: String,
    message: String,
}

/// Parses the `FILE:LINE:COL: FIELD: MESSAGE` lines for `file` out of `stderr`.
fn reported(stderr: &str, file: &Path) -> Vec<Reported> {
    let prefix = format!("{}:", file.display());
    stderr
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (line_number, rest) = rest.split_once(':')?;
            let (column, rest) = rest.split_once(':')?;
            let (field, message) = rest.strip_prefix(' ')?.split_once(": ")?;
            Some(Reported {
                line: line_number.parse().ok()?,
                column: column.parse().ok()?,
                field: field.to_string(),
                message: message.to_string(),
            })
        })
        .collect()
}

/// 1-based number of the line holding the `occurrence`-th (0-based) match of `needle`.
fn line_of(text: &str, needle: &str, occurrence: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, line)| line.contains(needle))
        .nth(occurrence)
        .map(|(index, _)| index + 1)
        .unwrap_or_else(|| panic!("{needle:?} #{occurrence} not in the test config"))
}

const AGENT: &str = "agent:\n  node: node-a\n";

const CLIENT: &str = concat!(
    "  - uid: cluster1//Pod/default/client\n",
    "    name: client\n",
    "    namespace: default\n",
    "    serviceAccount: client\n",
    "    workloadIps: [10.200.1.2]\n",
    "    protocol: HBONE\n",
    "    node: node-a\n",
);

const SERVER: &str = concat!(
    "  - uid: cluster1//Pod/default/server\n",
    "    name: server\n",
    "    namespace: default\n",
    "    serviceAccount: server\n",
    "    workloadIps: [10.200.2.2]\n",
    "    protocol: HBONE\n",
    "    node: node-b\n",
    "    services:\n",
    "      default/echo.default.svc.cluster.local: {80: 8080}\n",
);

const SERVICES: &str = concat!(
    "services:\n",
    "  - name: echo\n",
    "    namespace: default\n",
    "    hostname: echo.default.svc.cluster.local\n",
    "    vips: [/10.96.0.10]\n",
    "    ports: {80: 8080}\n",
    "policies: []\n",
);

fn good_config() -> String {
    format!("{AGENT}workloads:\n{CLIENT}{SERVER}{SERVICES}")
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn version_flag_prints_name_and_version() {
    let output = run_cli(&["--version"]).expect("run --version");
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let expected = format!("nodetunnel {}", env!("CARGO_PKG_VERSION"));
    assert_eq!(stdout.trim(), expected);
}

/// `check-config` accepts our full file and Istio local-config files used unchanged (ztunnel's
/// example, and one in ztunnel's YAML-tag syntax).
#[test]
fn check_config_accepts_valid_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixture = |name: &str| {
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/config")
                .join(name),
        )
        .expect("config fixture")
    };
    for (name, text) in [
        ("ours.yaml", good_config()),
        ("istio.yaml", fixture("istio-localhost.yaml")),
        ("ztunnel-tags.yaml", fixture("ztunnel-tags.yaml")),
    ] {
        let path = write(dir.path(), name, &text);
        let output = run_cli(&["check-config", &path.to_string_lossy()]).expect("check-config");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{name}: {stderr}");
        assert!(reported(&stderr, &path).is_empty(), "{name}: {stderr}");

        // The same file with one unknown top-level key must fail, so a `check-config` that
        // accepts everything cannot pass this test.
        let broken = write(dir.path(), name, &format!("{text}\nbogusTopLevel: 1\n"));
        let output = run_cli(&["check-config", &broken.to_string_lossy()]).expect("check-config");
        assert_eq!(
            output.status.code(),
            Some(EXIT_BAD_CONFIG),
            "{name} + unknown key"
        );
    }
}

/// An expected error: (needle locating its line, which occurrence, field, message fragment).
type Expected = (&'static str, usize, &'static str, &'static str);

/// Each class of bad config is reported at its line with the offending field, and every error
/// of a file is printed, one per line, with exit code 64.
#[test]
fn check_config_reports_every_error_with_file_line_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let no_ip_client = CLIENT.replace("    workloadIps: [10.200.1.2]\n", "");
    let duplicate = SERVER.replace("Pod/default/server", "Pod/default/client");
    let cases: Vec<(&str, String, Vec<Expected>)> = vec![
        (
            "unknown field",
            good_config().replace(
                "    protocol: HBONE\n",
                "    protocol: HBONE\n    color: blue\n",
            ),
            vec![("color: blue", 0, "workloads[0].color", "unknown field")],
        ),
        (
            "bad IP",
            good_config().replace("10.200.2.2", "10.200.2.300"),
            vec![(
                "10.200.2.300",
                0,
                "workloads[1].workloadIps[0]",
                "10.200.2.300",
            )],
        ),
        (
            "duplicate uid",
            format!("{AGENT}workloads:\n{CLIENT}{duplicate}{SERVICES}"),
            vec![(
                "uid: cluster1//Pod/default/client",
                1,
                "workloads[1].uid",
                "duplicate",
            )],
        ),
        (
            "workload on this node without an IP",
            format!("{AGENT}workloads:\n{no_ip_client}{SERVER}{SERVICES}"),
            vec![(
                "uid: cluster1//Pod/default/client",
                0,
                "workloads[0].workloadIps",
                "no",
            )],
        ),
        (
            "two errors in one file",
            format!("{AGENT}workloads:\n{no_ip_client}{duplicate}{SERVICES}"),
            vec![
                (
                    "uid: cluster1//Pod/default/client",
                    0,
                    "workloads[0].workloadIps",
                    "no",
                ),
                (
                    "uid: cluster1//Pod/default/client",
                    1,
                    "workloads[1].uid",
                    "duplicate",
                ),
            ],
        ),
    ];
    for (case, text, expected) in cases {
        let path = write(dir.path(), "bad.yaml", &text);
        let output = run_cli(&["check-config", &path.to_string_lossy()]).expect("check-config");
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        let all = format!("{stdout}{stderr}");
        assert_eq!(output.status.code(), Some(EXIT_BAD_CONFIG), "{case}: {all}");
        let errors = reported(&all, &path);
        assert_eq!(
            errors.len(),
            expected.len(),
            "{case}: want one line per error:\n{all}"
        );
        for (needle, occurrence, field, fragment) in expected {
            let line = line_of(&text, needle, occurrence);
            let found = errors.iter().find(|error| error.field == field);
            let Some(error) = found else {
                panic!("{case}: no error for field {field}:\n{all}");
            };
            assert!(error.column >= 1, "{case}: {error:?}");
            assert!(error.message.contains(fragment), "{case}: {error:?}");
            // A missing field is reported where its mapping starts; others at their own line.
            let block_end = line + 8;
            if field.ends_with("workloadIps") && fragment == "no" {
                assert!(
                    (line..block_end).contains(&error.line),
                    "{case}: {error:?}, want {line}.."
                );
            } else {
                assert_eq!(error.line, line, "{case}: {error:?}");
            }
        }
    }
}

/// A missing config file is an error that names the file, not a panic.
#[test]
fn check_config_on_a_missing_file_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.yaml");
    let output = run_cli(&["check-config", &path.to_string_lossy()]).expect("check-config");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_ne!(output.status.code(), None, "killed by a signal: {output:?}");
    assert!(stderr.contains("absent.yaml"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `run` with a bad config exits 64 with the located message and never binds: afterwards no
/// TCP listener exists in the node's namespace or in the pod namespace it would have captured.
#[test]
fn run_with_bad_config_exits_64_and_binds_nothing() {
    if !support::netns_tests_enabled("run_with_bad_config_exits_64_and_binds_nothing") {
        return;
    }
    let mut topology = Topology::new();
    topology.add_node("a").expect("node");
    topology.add_pod("a", "client").expect("pod");
    let pod_netns = topology.netns_path("client");
    let dir = tempfile::tempdir().expect("tempdir");
    let pods = format!(
        "  pods:\n    - workload: default/client\n      netns: {}\n",
        pod_netns.display()
    );
    let text = good_config()
        .replace(AGENT, &format!("{AGENT}{pods}"))
        .replace("10.200.2.2", "10.200.2.300");
    let path = write(dir.path(), "bad.yaml", &text);
    let state = dir.path().join("state");

    let node = topology.netns("a");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node, agent::binary(), "run", "--config"])
        .arg(&path)
        .arg("--state-dir")
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let waited = support::wait_for("run to exit", Duration::from_secs(15), || {
        child.try_wait().ok().flatten()
    });
    if waited.is_err() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().expect("output");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(waited.is_ok(), "run with a bad config kept running:\n{all}");
    assert_eq!(output.status.code(), Some(EXIT_BAD_CONFIG), "{all}");
    let errors = reported(&all, &path);
    assert_eq!(errors.len(), 1, "{all}");
    assert_eq!(errors[0].field, "workloads[1].workloadIps[0]");
    assert_eq!(errors[0].line, line_of(&text, "10.200.2.300", 0));

    for role in ["a", "client"] {
        let listeners = topology.exec_role(role, &["ss", "-ltnH"]).expect("ss");
        let listeners = String::from_utf8_lossy(&listeners.stdout)
            .trim()
            .to_string();
        assert!(
            listeners.is_empty(),
            "listeners in {role} after a rejected start:\n{listeners}"
        );
    }
}

/// The control for the test above: the same file, fixed, starts an agent whose HBONE, inbound and
/// outbound listeners are inside the pod's namespace and whose readiness port is in the node's.
#[test]
fn run_with_valid_config_listens_inside_the_pod() {
    if !support::netns_tests_enabled("run_with_valid_config_listens_inside_the_pod") {
        return;
    }
    let mut topology = Topology::new();
    topology.add_node("a").expect("node");
    topology.add_pod("a", "client").expect("pod");
    let pods = format!(
        "  pods:\n    - workload: default/client\n      netns: {}\n",
        topology.netns_path("client").display()
    );
    let text = good_config().replace(AGENT, &format!("{AGENT}{pods}"));
    let ca = agent::Ca::init().expect("ca init");
    let agent = agent::Agent::start(&topology, "a", &ca, &text).expect("agent ready");
    let ports = |role: &str| -> Vec<u16> {
        let output = topology.exec_role(role, &["ss", "-ltnH"]).expect("ss");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                line.split_whitespace()
                    .nth(3)?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    let (pod_ports, node_ports) = (ports("client"), ports("a"));
    for port in [15001, 15006, 15008] {
        assert!(pod_ports.contains(&port), "pod lacks {port}: {pod_ports:?}");
        assert!(
            !node_ports.contains(&port),
            "{port} must not be in the node netns"
        );
    }
    assert!(
        node_ports.contains(&15021),
        "node lacks readiness 15021: {node_ports:?}"
    );
    drop(agent);
}
