//! The Kubernetes packaging in `daemonset/` as a cluster would receive it: every kustomize
//! overlay renders and every rendered object passes a strict schema check (both done by
//! `scripts/validate-daemonset.sh`, which these tests run), and each rendered DaemonSet has what
//! the agent needs on a node and nothing more: exactly the capabilities it uses, a read-only
//! root, readiness on 15021, a rollout that never leaves a node without an agent, a drain that
//! ends inside the grace period, and, per mode, the credentials, config and sockets it reads.
//!
//! Needs kubectl and kubernetes-validate; `bash scripts/validate-daemonset.sh` (or
//! `bash scripts/test.sh`) installs them. Without them these tests fail, unless
//! `NODETUNNEL_SKIP_K8S_VALIDATION=1` is set outside CI.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml::Value;

/// Env var that lets a developer without the tools skip these tests explicitly.
const SKIP_ENV: &str = "NODETUNNEL_SKIP_K8S_VALIDATION";
/// `scripts/validate-daemonset.sh` exit status: a tool is missing.
const EXIT_MISSING_TOOL: i32 = 3;
/// `scripts/validate-daemonset.sh` exit status: a render or a validation failed.
const EXIT_INVALID: i32 = 1;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the validation script (never installing anything) on a daemonset directory.
fn validate(daemonset_dir: &Path, out: &Path) -> Output {
    Command::new("bash")
        .arg(repo().join("scripts/validate-daemonset.sh"))
        .arg("--no-install")
        .arg("--dir")
        .arg(daemonset_dir)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run bash scripts/validate-daemonset.sh")
}

/// What running the script on the repository's `daemonset/` gave.
enum Outcome {
    /// Rendered objects of each overlay, by overlay directory name.
    Rendered(BTreeMap<String, Vec<Value>>),
    /// The tools are not installed; the script's message.
    MissingTools(String),
}

/// The repository's overlays, rendered and validated once per test process.
///
/// Returns `None` only when the tools are missing and the developer opted out (outside CI); a
/// render or validation failure fails every test that needs the renders.
fn rendered(test: &str) -> Option<&'static BTreeMap<String, Vec<Value>>> {
    static OUTCOME: OnceLock<Outcome> = OnceLock::new();
    let outcome = OUTCOME.get_or_init(|| {
        let out = tempfile::tempdir().expect("temp dir");
        let output = validate(&repo().join("daemonset"), out.path());
        if output.status.code() == Some(EXIT_MISSING_TOOL) {
            return Outcome::MissingTools(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        assert!(
            output.status.success(),
            "scripts/validate-daemonset.sh failed on daemonset/ ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Outcome::Rendered(read_renders(out.path()))
    });
    match outcome {
        Outcome::Rendered(overlays) => Some(overlays),
        Outcome::MissingTools(message) => {
            tools_missing(test, message);
            None
        }
    }
}

/// Fails a test whose tools are missing; returns (the test then skips) only when the developer
/// opted out with `NODETUNNEL_SKIP_K8S_VALIDATION=1` outside CI.
fn tools_missing(test: &str, message: &str) {
    let in_ci = std::env::var("CI").is_ok_and(|value| value == "true");
    let opted_out = std::env::var(SKIP_ENV).is_ok_and(|value| value == "1");
    if opted_out && !in_ci {
        eprintln!("SKIPPED {test}: {SKIP_ENV}=1 is set and the manifest tools are missing");
        return;
    }
    panic!(
        "\n\n*** {test} needs kubectl and kubernetes-validate:\n{message}\
         *** Run `bash scripts/validate-daemonset.sh` (as root it installs them) or\n\
         *** `bash scripts/test.sh`, or set {SKIP_ENV}=1 to skip (never honoured under CI=true).\n"
    );
}

/// Every `<overlay>.yaml` the script wrote, split into its objects.
fn read_renders(dir: &Path) -> BTreeMap<String, Vec<Value>> {
    let mut overlays = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("read render dir") {
        let path = entry.expect("render dir entry").path();
        if path
            .extension()
            .is_some_and(|extension| extension == "yaml")
        {
            let name = path.file_stem().expect("file name").to_string_lossy();
            let text = std::fs::read_to_string(&path).expect("read render");
            overlays.insert(name.into_owned(), parse_documents(&text));
        }
    }
    overlays
}

fn parse_documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|document| Value::deserialize(document).expect("rendered YAML parses"))
        .filter(|object| !object.is_null())
        .collect()
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

fn kind_of(object: &Value) -> &str {
    text(&object["kind"])
}

/// The only object of `kind` in an overlay's render.
fn only<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| kind_of(o) == kind).collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind}, got {found:?}");
    found[0]
}

/// The DaemonSet's pod spec and its only container.
fn pod_and_container(objects: &[Value]) -> (&Value, &Value) {
    let pod = &only(objects, "DaemonSet")["spec"]["template"]["spec"];
    let containers = pod["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1, "one container per agent pod");
    (pod, &containers[0])
}

/// A literal env value of the container (not one taken from a field reference).
fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    env_entry(container, name).and_then(|entry| entry["value"].as_str())
}

fn env_entry<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|entry| text(&entry["name"]) == name)
}

fn sequence(value: &Value) -> &[Value] {
    value.as_sequence().map(Vec::as_slice).unwrap_or_default()
}

/// Where a path the agent reads inside its container comes from.
#[derive(Debug, PartialEq)]
enum Origin {
    ConfigMap {
        name: String,
        key: String,
    },
    Secret {
        name: String,
        key: String,
        mode: Option<u64>,
    },
    ServiceAccountToken {
        audience: String,
        expiration_seconds: u64,
    },
    HostPath {
        path: String,
        kind: String,
    },
    EmptyDir,
}

/// A volume mount of the container and the volume behind it.
struct Mounted<'a> {
    mount: &'a Value,
    volume: &'a Value,
    /// The part of the path below the mount point ("" for the mount point itself).
    relative: String,
}

/// The mount that serves `path` (the deepest mount point at or above it).
fn mounted<'a>(pod: &'a Value, container: &'a Value, path: &str) -> Mounted<'a> {
    let mount = sequence(&container["volumeMounts"])
        .iter()
        .filter(|mount| Path::new(path).starts_with(text(&mount["mountPath"])))
        .max_by_key(|mount| text(&mount["mountPath"]).len())
        .unwrap_or_else(|| panic!("no volume mount serves {path}"));
    let volume = volume_of(pod, mount);
    let relative = Path::new(path)
        .strip_prefix(text(&mount["mountPath"]))
        .expect("mount is a prefix")
        .to_string_lossy()
        .into_owned();
    Mounted {
        mount,
        volume,
        relative,
    }
}

/// The pod volume a volume mount names.
fn volume_of<'a>(pod: &'a Value, mount: &Value) -> &'a Value {
    let name = text(&mount["name"]);
    sequence(&pod["volumes"])
        .iter()
        .find(|volume| text(&volume["name"]) == name)
        .unwrap_or_else(|| panic!("mount {name} names no volume"))
}

/// Resolves a path in the container to the Kubernetes object (and key) it is read from.
fn origin(pod: &Value, container: &Value, path: &str) -> Origin {
    let Mounted {
        volume, relative, ..
    } = mounted(pod, container, path);
    if volume["emptyDir"].is_mapping() {
        return Origin::EmptyDir;
    }
    if volume["hostPath"].is_mapping() {
        return Origin::HostPath {
            path: text(&volume["hostPath"]["path"]).to_string(),
            kind: text(&volume["hostPath"]["type"]).to_string(),
        };
    }
    let sources: Vec<&Value> = match volume["projected"]["sources"].as_sequence() {
        Some(sources) => sources.iter().collect(),
        None => vec![volume],
    };
    sources
        .into_iter()
        .find_map(|source| origin_in_source(source, &relative))
        .unwrap_or_else(|| panic!("nothing in volume {volume:?} provides {path}"))
}

/// The origin of `relative` in one configMap/secret/token source, if it provides it.
fn origin_in_source(source: &Value, relative: &str) -> Option<Origin> {
    let token = &source["serviceAccountToken"];
    if token.is_mapping() {
        return (text(&token["path"]) == relative).then(|| Origin::ServiceAccountToken {
            audience: text(&token["audience"]).to_string(),
            expiration_seconds: token["expirationSeconds"].as_u64().unwrap_or_default(),
        });
    }
    for (field, secret) in [("configMap", false), ("secret", true)] {
        let object = &source[field];
        if !object.is_mapping() {
            continue;
        }
        // Without items every key is a file of its own name.
        let (key, mode) = match object["items"].as_sequence() {
            None => (relative.to_string(), None),
            Some(items) => {
                let item = items.iter().find(|item| text(&item["path"]) == relative)?;
                (text(&item["key"]).to_string(), item["mode"].as_u64())
            }
        };
        // A secret volume names its Secret `secretName`, a projected secret source `name`.
        let name = object["secretName"]
            .as_str()
            .unwrap_or_else(|| text(&object["name"]))
            .to_string();
        return Some(if secret {
            Origin::Secret { name, key, mode }
        } else {
            Origin::ConfigMap { name, key }
        });
    }
    None
}

/// The value of `--flag=VALUE` or `--flag VALUE` in the container's args.
fn flag<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    let args: Vec<&str> = sequence(&container["args"]).iter().map(text).collect();
    let prefix = format!("{name}=");
    args.iter().enumerate().find_map(|(index, arg)| {
        if let Some(value) = arg.strip_prefix(&prefix) {
            Some(value)
        } else if *arg == name {
            args.get(index + 1).copied()
        } else {
            None
        }
    })
}

fn parent(path: &str) -> String {
    Path::new(path)
        .parent()
        .expect("path has a parent")
        .display()
        .to_string()
}

#[test]
fn each_overlay_renders_validates_and_ships_its_objects() {
    let Some(overlays) = rendered("each_overlay_renders_validates_and_ships_its_objects") else {
        return;
    };
    // overlay -> (namespace, kinds rendered, ServiceAccount the agent runs as)
    let expected: BTreeMap<&str, (&str, Vec<&str>, &str)> = BTreeMap::from([
        // istio-system belongs to Istio: no Namespace object, or `kubectl delete -k` removes it.
        (
            "istio",
            (
                "istio-system",
                vec!["DaemonSet", "ServiceAccount"],
                "ztunnel",
            ),
        ),
        (
            "standalone",
            (
                "nodetunnel",
                vec!["ConfigMap", "DaemonSet", "Namespace", "ServiceAccount"],
                "nodetunnel",
            ),
        ),
    ]);
    assert_eq!(
        overlays.keys().map(String::as_str).collect::<Vec<_>>(),
        expected.keys().copied().collect::<Vec<_>>(),
        "a new overlay needs its expectations here"
    );
    for (overlay, (namespace, kinds, account)) in &expected {
        let objects = &overlays[*overlay];
        let mut rendered_kinds: Vec<&str> = objects.iter().map(kind_of).collect();
        rendered_kinds.sort_unstable();
        assert_eq!(&rendered_kinds, kinds, "{overlay}: kinds rendered");
        for object in objects {
            let want = if kind_of(object) == "Namespace" {
                ""
            } else {
                namespace
            };
            assert_eq!(
                text(&object["metadata"]["namespace"]),
                want,
                "{overlay}: namespace of {} {}",
                kind_of(object),
                text(&object["metadata"]["name"])
            );
        }
        let (pod, _) = pod_and_container(objects);
        assert_eq!(text(&pod["serviceAccountName"]), *account, "{overlay}");
        assert_eq!(
            text(&only(objects, "ServiceAccount")["metadata"]["name"]),
            *account,
            "{overlay}: the account the DaemonSet names is the one it ships"
        );
    }
}

#[test]
fn every_daemonset_is_a_confined_node_agent() {
    let Some(overlays) = rendered("every_daemonset_is_a_confined_node_agent") else {
        return;
    };
    for (overlay, objects) in overlays {
        let daemonset = only(objects, "DaemonSet");
        let (pod, container) = pod_and_container(objects);
        let security = &container["securityContext"];
        let added: BTreeSet<&str> = sequence(&security["capabilities"]["add"])
            .iter()
            .map(text)
            .collect();
        assert_eq!(
            added,
            BTreeSet::from(["NET_ADMIN", "NET_RAW", "SYS_ADMIN"]),
            "{overlay}: exactly the capabilities the agent uses"
        );
        assert_eq!(
            sequence(&security["capabilities"]["add"]).len(),
            3,
            "{overlay}"
        );
        assert_eq!(
            sequence(&security["capabilities"]["drop"]),
            [Value::from("ALL")],
            "{overlay}: every other capability dropped"
        );
        for (field, want) in [
            ("privileged", false),
            ("allowPrivilegeEscalation", false),
            ("readOnlyRootFilesystem", true),
        ] {
            assert_eq!(security[field].as_bool(), Some(want), "{overlay}: {field}");
        }
        assert_eq!(security["runAsUser"].as_u64(), Some(0), "{overlay}");
        assert_eq!(security["runAsGroup"].as_u64(), Some(1337), "{overlay}");
        for host_namespace in ["hostNetwork", "hostPID", "hostIPC"] {
            assert_ne!(
                pod[host_namespace].as_bool(),
                Some(true),
                "{overlay}: {host_namespace}"
            );
        }
        assert_eq!(
            pod["automountServiceAccountToken"].as_bool(),
            Some(false),
            "{overlay}: no API token the agent does not use"
        );

        let ports: BTreeSet<u64> = sequence(&container["ports"])
            .iter()
            .filter_map(|port| port["containerPort"].as_u64())
            .collect();
        assert_eq!(
            ports,
            BTreeSet::from([15020, 15021]),
            "{overlay}: metrics and readiness only; admin is loopback, 15001/6/8 live in pods"
        );
        let probe = &container["readinessProbe"]["httpGet"];
        assert_eq!(probe["port"].as_u64(), Some(15021), "{overlay}");
        assert_eq!(text(&probe["path"]), "/healthz/ready", "{overlay}");

        let strategy = &daemonset["spec"]["updateStrategy"];
        assert_eq!(text(&strategy["type"]), "RollingUpdate", "{overlay}");
        assert_eq!(
            strategy["rollingUpdate"]["maxSurge"].as_u64(),
            Some(1),
            "{overlay}"
        );
        assert_eq!(
            strategy["rollingUpdate"]["maxUnavailable"].as_u64(),
            Some(0),
            "{overlay}"
        );

        assert_eq!(
            text(&pod["priorityClassName"]),
            "system-node-critical",
            "{overlay}"
        );
        let tolerations: Vec<(&str, &str, &str)> = sequence(&pod["tolerations"])
            .iter()
            .map(|t| (text(&t["key"]), text(&t["operator"]), text(&t["effect"])))
            .collect();
        for wanted in [
            ("", "Exists", "NoSchedule"),
            ("", "Exists", "NoExecute"),
            ("CriticalAddonsOnly", "Exists", ""),
        ] {
            assert!(
                tolerations.contains(&wanted),
                "{overlay}: toleration {wanted:?} missing from {tolerations:?}"
            );
        }

        let grace = pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds");
        assert_eq!(
            env(container, "TERMINATION_GRACE_PERIOD_SECONDS"),
            Some(grace.to_string().as_str()),
            "{overlay}: the agent's drain deadline is derived from the pod's grace period"
        );
        assert!(
            grace > 10,
            "{overlay}: leaves 5 s between drain and SIGKILL"
        );

        let annotations = &daemonset["spec"]["template"]["metadata"]["annotations"];
        for (annotation, want) in [
            ("prometheus.io/scrape", "true"),
            ("prometheus.io/port", "15020"),
            ("prometheus.io/path", "/stats/prometheus"),
        ] {
            assert_eq!(
                text(&annotations[annotation]),
                want,
                "{overlay}: {annotation}"
            );
        }

        // A writable host directory is a way out of the container: only istio-cni's socket
        // directory may be one.
        for mount in sequence(&container["volumeMounts"]) {
            let Some(host) = volume_of(pod, mount)["hostPath"]["path"].as_str() else {
                continue;
            };
            let writable = mount["readOnly"].as_bool() != Some(true);
            assert!(
                !writable || host == "/var/run/ztunnel",
                "{overlay}: host path {host} mounted writable at {}",
                text(&mount["mountPath"])
            );
        }
        assert_eq!(
            origin(pod, container, "/tmp"),
            Origin::EmptyDir,
            "{overlay}: scratch space on a read-only root"
        );
    }
}

#[test]
fn istio_overlay_replaces_ztunnel() {
    let Some(overlays) = rendered("istio_overlay_replaces_ztunnel") else {
        return;
    };
    let objects = &overlays["istio"];
    let daemonset = only(objects, "DaemonSet");
    let (pod, container) = pod_and_container(objects);
    assert_eq!(
        text(&daemonset["spec"]["template"]["metadata"]["labels"]["app"]),
        "ztunnel",
        "what istioctl and dashboards select"
    );
    assert_eq!(
        text(&daemonset["metadata"]["name"]),
        "ztunnel",
        "Istio's chart name: `istioctl ztunnel-config` without a pod reads daemonset/ztunnel, \
         and the pods it makes are ztunnel-<hash>, which Istio's dashboards select"
    );
    assert_eq!(
        text(&container["name"]),
        "istio-proxy",
        "Istio's chart names the container istio-proxy (kubectl logs -c, log pipelines)"
    );
    assert!(
        daemonset["spec"]["selector"]["matchLabels"]["app"].is_null(),
        "the selector must not claim pods of Istio's own ztunnel DaemonSet"
    );
    let args: Vec<&str> = sequence(&container["args"]).iter().map(text).collect();
    assert_eq!(args, ["run"], "Istio mode: no --config, all from the env");
    for variable in ["XDS_ADDRESS", "CA_ADDRESS"] {
        assert_eq!(
            env(container, variable),
            Some("https://istiod.istio-system.svc:15012"),
            "{variable}"
        );
    }
    for (variable, field) in [
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("INSTANCE_IP", "status.podIP"),
        ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ] {
        let entry = env_entry(container, variable).unwrap_or_else(|| panic!("{variable}"));
        assert_eq!(
            text(&entry["valueFrom"]["fieldRef"]["fieldPath"]),
            field,
            "{variable}"
        );
    }

    let token = env(container, "AUTH_TOKEN").expect("AUTH_TOKEN");
    assert_eq!(
        origin(pod, container, token),
        Origin::ServiceAccountToken {
            audience: "istio-ca".to_string(),
            expiration_seconds: 43200,
        },
        "the node token istiod's CA accepts"
    );
    for variable in ["XDS_ROOT_CA", "CA_ROOT_CA"] {
        let root = env(container, variable).unwrap_or_else(|| panic!("{variable}"));
        assert_eq!(
            origin(pod, container, root),
            Origin::ConfigMap {
                name: "istio-ca-root-cert".to_string(),
                key: "root-cert.pem".to_string(),
            },
            "{variable}: istiod's root, as istiod publishes it"
        );
    }
    let socket = env(container, "INPOD_UDS").expect("INPOD_UDS");
    assert_eq!(
        origin(pod, container, &parent(socket)),
        Origin::HostPath {
            path: "/var/run/ztunnel".to_string(),
            kind: "DirectoryOrCreate".to_string(),
        },
        "istio-cni connects to the ZDS socket in this host directory"
    );
}

#[test]
fn standalone_overlay_runs_from_its_configmap_with_a_shared_root() {
    let Some(overlays) = rendered("standalone_overlay_runs_from_its_configmap_with_a_shared_root")
    else {
        return;
    };
    let objects = &overlays["standalone"];
    let (pod, container) = pod_and_container(objects);
    let config_map = only(objects, "ConfigMap");

    let config_path = flag(container, "--config").expect("--config");
    let Origin::ConfigMap { name, key } = origin(pod, container, config_path) else {
        panic!("{config_path} is not read from a ConfigMap");
    };
    assert_eq!(name, text(&config_map["metadata"]["name"]));
    let config = text(&config_map["data"][key.as_str()]);
    assert!(!config.is_empty(), "ConfigMap key {key} is empty");

    for (flag_name, secret_key, mode) in [
        ("--ca-cert", "ca-cert.pem", None),
        ("--ca-key", "ca-key.pem", Some(0o400)),
    ] {
        let path = flag(container, flag_name).unwrap_or_else(|| panic!("{flag_name}"));
        assert_eq!(
            origin(pod, container, path),
            Origin::Secret {
                name: "nodetunnel-ca".to_string(),
                key: secret_key.to_string(),
                mode,
            },
            "{flag_name}: one root for every node, from the Secret the README has you create"
        );
    }
    assert!(
        !objects.iter().any(|object| kind_of(object) == "Secret"),
        "the CA key is never part of the manifests"
    );

    let state_dir = flag(container, "--state-dir").expect("--state-dir");
    let state = mounted(pod, container, state_dir);
    assert_eq!(origin(pod, container, state_dir), Origin::EmptyDir);
    assert_ne!(state.mount["readOnly"].as_bool(), Some(true), "writable");
    assert!(
        state.relative.is_empty(),
        "the state dir is a volume of its own"
    );

    assert_eq!(flag(container, "--node"), Some("$(NODE_NAME)"));
    let node = env_entry(container, "NODE_NAME").expect("NODE_NAME");
    assert_eq!(
        text(&node["valueFrom"]["fieldRef"]["fieldPath"]),
        "spec.nodeName"
    );

    let netns = mounted(pod, container, "/var/run/netns/pod");
    assert_eq!(text(&netns.volume["hostPath"]["path"]), "/var/run/netns");
    assert_eq!(
        text(&netns.mount["mountPropagation"]),
        "HostToContainer",
        "namespaces created after the agent started must show up in it"
    );

    check_config(config, grace_period(pod));
}

fn grace_period(pod: &Value) -> Duration {
    Duration::from_secs(
        pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds"),
    )
}

/// The shipped config passes `nodetunnel check-config` on a node of the example, and drains
/// before the kubelet's SIGKILL.
fn check_config(config: &str, grace: Duration) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, config).expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_nodetunnel"))
        .args(["check-config", "--node", "worker-1"])
        .arg(&file)
        .output()
        .expect("run nodetunnel check-config");
    assert!(
        output.status.success(),
        "the ConfigMap's config.yaml does not pass check-config:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: Value = serde_yaml::from_str(config).expect("config is YAML");
    let drain = humantime::parse_duration(text(&parsed["agent"]["drainTimeout"]))
        .expect("agent.drainTimeout is set");
    assert!(
        drain < grace,
        "drainTimeout {drain:?} must end before the grace period {grace:?}"
    );
}

/// Copies the repository's `daemonset/` into `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

#[test]
fn validation_rejects_a_misspelt_field_and_a_broken_overlay() {
    // (case, file to edit, text replaced, replacement, what the failure must name)
    let cases: [(&str, &str, &str, &str, &str); 3] = [
        (
            "unknown field, caught only by --strict",
            "base/daemonset.yaml",
            "readOnlyRootFilesystem: true",
            "readOnlyRootFileSystem: true",
            "'readOnlyRootFileSystem' was unexpected",
        ),
        (
            "overlay naming a patch that does not exist",
            "overlays/istio/kustomization.yaml",
            "path: daemonset-istio.yaml",
            "path: daemonset-missing.yaml",
            "FAIL istio",
        ),
        (
            "deprecated kustomize syntax, which kustomize v5 warns about",
            "overlays/standalone/kustomization.yaml",
            "patches:\n  - path: daemonset-standalone.yaml",
            "patchesStrategicMerge:\n  - daemonset-standalone.yaml",
            "FAIL standalone: kustomize warned",
        ),
    ];
    for (case, file, from, to, named) in cases {
        let work = tempfile::tempdir().expect("temp dir");
        let copy: PathBuf = work.path().join("daemonset");
        copy_tree(&repo().join("daemonset"), &copy);
        let edited = copy.join(file);
        let original = std::fs::read_to_string(&edited).expect("read");
        assert!(original.contains(from), "{case}: {file} has no {from:?}");
        std::fs::write(&edited, original.replace(from, to)).expect("write");

        let output = validate(&copy, &work.path().join("out"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.code() == Some(EXIT_MISSING_TOOL) {
            tools_missing(
                "validation_rejects_a_misspelt_field_and_a_broken_overlay",
                &stderr,
            );
            return;
        }
        assert_eq!(
            output.status.code(),
            Some(EXIT_INVALID),
            "{case}: must fail validation\n{stderr}"
        );
        assert!(
            stderr.contains(named),
            "{case}: expected {named:?} in\n{stderr}"
        );
    }
}

/// Kustomization fields kustomize v5 deprecates (it warns, and a later release drops them).
const DEPRECATED_KUSTOMIZE_FIELDS: [&str; 6] = [
    "bases",
    "patchesStrategicMerge",
    "patchesJson6902",
    "commonLabels",
    "vars",
    "imageTags",
];

#[test]
fn kustomizations_use_current_syntax_and_standalone_keeps_its_names() {
    let mut files = Vec::new();
    let mut directories = vec![repo().join("daemonset")];
    while let Some(directory) = directories.pop() {
        for entry in std::fs::read_dir(&directory).expect("read dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                directories.push(path);
            } else if path
                .file_name()
                .is_some_and(|name| name == "kustomization.yaml")
            {
                files.push(path);
            }
        }
    }
    assert_eq!(files.len(), 3, "base and two overlays: {files:?}");
    for file in &files {
        let kustomization: Value =
            serde_yaml::from_str(&std::fs::read_to_string(file).expect("read")).expect("YAML");
        for field in DEPRECATED_KUSTOMIZE_FIELDS {
            assert!(
                kustomization[field].is_null(),
                "{}: `{field}` is deprecated kustomize syntax",
                file.display()
            );
        }
    }

    let Some(overlays) =
        rendered("kustomizations_use_current_syntax_and_standalone_keeps_its_names")
    else {
        return;
    };
    let objects = &overlays["standalone"];
    let (_, container) = pod_and_container(objects);
    assert_eq!(
        text(&only(objects, "DaemonSet")["metadata"]["name"]),
        "nodetunnel"
    );
    assert_eq!(text(&container["name"]), "nodetunnel");
}
