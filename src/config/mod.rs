//! Configuration (layer L1): the local YAML file, parsed, checked and converted into the model.
//!
//! The file is Istio's local ztunnel config (`workloads`, `services`, `policies`, loaded
//! unchanged) plus our own `agent:` section ([`agent::AgentConfig`]). [`load`] reads it at
//! start-up and [`watch::run`] re-reads it on change; both go through the pure [`parse`], which
//! reports *every* problem it can find, each with file, line, column and field, so that
//! `check-config` can show a user all of them at once. A syntax or type error stops
//! deserialisation, so that one comes alone.
//!
//! Flow: text → serde (`local`: shape, types, unknown keys) → `convert::convert` and
//! `AgentConfig::check` (identities, addresses, duplicates, references) → [`locate::Locator`]
//! (field path → line and column) → [`Config`] or [`ConfigErrors`].

pub mod agent;
mod convert;
pub mod dns;
pub mod env;
pub mod istio;
pub mod istio_networking;
pub mod istio_policy;
mod local;
pub mod locate;
mod problem;
pub mod watch;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::state;

use locate::{FieldPath, Locator, Position};
pub use problem::SemanticError;

/// A loaded, checked configuration. Every invariant `parse` checks holds for it, so consumers
/// (the state store, the pod registry, the CA) can trust it without re-validating.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The agent's own section, with command-line overrides applied.
    pub agent: agent::AgentConfig,
    /// Workloads, in file order.
    pub workloads: Vec<state::Workload>,
    /// Services, in file order.
    pub services: Vec<state::Service>,
    /// Policies, in file order.
    pub policies: Vec<state::Policy>,
    /// Istio resources of the file's `istioResources` and of the policy directories, translated,
    /// with what was left out.
    pub istio: istio::IstioResources,
    /// The file it came from.
    pub path: PathBuf,
}

impl Config {
    /// The model part as an indexed snapshot for the state store.
    pub fn snapshot(&self) -> state::Snapshot {
        state::Snapshot::with_authorization(
            self.workloads.clone(),
            self.services.clone(),
            self.authorization(),
        )
        .with_egress(self.egress())
        .with_inbound_limits(self.inbound_limits())
    }

    /// The agent's inbound limits, for the snapshot.
    pub fn inbound_limits(&self) -> state::inbound_limits::InboundLimits {
        state::inbound_limits::InboundLimits(
            self.agent
                .inbound_limits
                .iter()
                .cloned()
                .map(std::sync::Arc::new)
                .collect(),
        )
    }

    /// The outbound traffic policy and the ServiceEntries, for the snapshot.
    pub fn egress(&self) -> state::egress::Egress {
        state::egress::Egress {
            policy: self.agent.outbound_traffic_policy.clone(),
            service_entries: self
                .istio
                .service_entries
                .iter()
                .cloned()
                .map(std::sync::Arc::new)
                .collect(),
            destination_rules: state::traffic_policy::DestinationRules(
                self.istio
                    .destination_rules
                    .iter()
                    .cloned()
                    .map(std::sync::Arc::new)
                    .collect(),
            ),
        }
    }

    /// The model part, unindexed, for merging with istiod's ([`state::merge::merge`]).
    pub fn local_model(&self) -> state::merge::LocalModel {
        state::merge::LocalModel {
            workloads: self.workloads.clone(),
            services: self.services.clone(),
            authorization: self.authorization(),
            egress: self.egress(),
            inbound_limits: self.inbound_limits(),
        }
    }

    /// Every policy source merged in configuration order: local `policies`, then Istio
    /// resources; with the agent's zero-trust switch.
    pub fn authorization(&self) -> state::Authorization {
        let local = self
            .policies
            .iter()
            .cloned()
            .map(state::policy::SelectorPolicy::new);
        state::Authorization {
            policies: local.chain(self.istio.policies.iter().cloned()).collect(),
            peer_authentications: self.istio.peer_authentications.clone(),
            options: self.agent.authorization.options(),
            waypoint: self.agent.authorization.waypoint.clone(),
        }
    }

    /// Adds the resources of policy-directory files (read by [`load`] or the watcher).
    pub fn add_policy_files(&mut self, files: &[istio::PolicyFile]) {
        let options = self.agent.istio_options();
        self.istio.add_files(files, &options);
        self.istio.drop_duplicates(&self.policies);
    }
}

/// What wins over the file: Istio's environment variables, then command-line flags.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Overrides {
    /// The environment (Istio's variables; see [`env`]). Empty in tools that must ignore it.
    pub env: env::Environment,
    /// No config file: start from Istio-mode defaults (istiod for discovery and certificates,
    /// istio-cni for pods) before the environment applies.
    pub istio_defaults: bool,
    /// `--node`: replaces `agent.node`.
    pub node: Option<String>,
    /// `--ca-cert`: replaces `agent.ca.certFile`.
    pub ca_cert: Option<PathBuf>,
    /// `--ca-key`: replaces `agent.ca.keyFile`.
    pub ca_key: Option<PathBuf>,
}

impl Overrides {
    fn apply(&self, agent: &mut agent::AgentConfig) -> Vec<env::EnvProblem> {
        if self.istio_defaults {
            self.env.apply_istio_defaults(agent);
        }
        let problems = self.env.apply(agent);
        if let Some(node) = &self.node {
            agent.node = node.clone();
        }
        if let Some(cert) = &self.ca_cert {
            agent.ca.cert_file = Some(cert.clone());
        }
        if let Some(key) = &self.ca_key {
            agent.ca.key_file = Some(key.clone());
        }
        problems
    }
}

/// One problem in a config file.
///
/// Displayed as `{file}:{line}:{column}: {field}: {message}` (1-based), the form editors and CI
/// logs link to. An error about the file as a whole (it cannot be read) has line 0 and is
/// displayed as `{file}: {message}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line; 0 when the error is about the whole file.
    pub line: usize,
    /// 1-based column; 0 when the error is about the whole file.
    pub column: usize,
    /// The field, e.g. `workloads[1].workloadIps[0]`; `.` for the document itself.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            return write!(f, "{}: {}", self.file.display(), self.message);
        }
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.field,
            self.message
        )
    }
}

/// Every problem found in a config file, in file order. Never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// The configuration of an agent started without a config file (Istio mode): Istio-mode
/// defaults, then the environment and flags in `overrides`. Workloads, services and policies
/// come from istiod, plus ztunnel's local config if `LOCAL_XDS_PATH` (a file, read like a
/// config file) or `LOCAL_XDS` (the text) is set.
pub fn from_environment(overrides: &Overrides) -> Result<Config, ConfigErrors> {
    let overrides = Overrides {
        istio_defaults: true,
        ..overrides.clone()
    };
    let environment = Path::new("environment");
    match overrides.env.local_config() {
        Ok(env::LocalConfig::None) => parse(environment, "", &overrides),
        Ok(env::LocalConfig::Inline(text)) => parse(Path::new("LOCAL_XDS"), &text, &overrides),
        Ok(env::LocalConfig::File(path)) => load(&path, &overrides),
        Err(problem) => Err(ConfigErrors(vec![ConfigError {
            file: environment.to_path_buf(),
            line: 0,
            column: 0,
            field: problem.variable.clone(),
            message: format!("{}: {}", problem.variable, problem.message),
        }])),
    }
}

/// Reads and parses the config file at `path`, then the policy directories it names.
pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigErrors> {
    let mut config = read(path, overrides)?;
    let files = istio::read_policy_dirs(path, &config.agent.authorization.policy_dirs)?;
    config.add_policy_files(&files);
    Ok(config)
}

/// Largest config file the agent reads: a standalone model of thousands of workloads fits
/// many times over, while a runaway file (or `/dev/zero`) cannot exhaust the agent's memory.
pub const MAX_CONFIG_FILE: u64 = 32 * 1024 * 1024;

/// Reads `path` as UTF-8 text, refusing (not truncating) a file longer than `limit` bytes.
/// Blocking: on a runtime, call it from `spawn_blocking`.
pub(crate) fn read_capped(path: &Path, limit: u64) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    String::from_utf8(bytes).map_err(|error| Error::new(ErrorKind::InvalidData, error))
}

/// Reads and parses the config file alone (no policy directories).
pub(crate) fn read(path: &Path, overrides: &Overrides) -> Result<Config, ConfigErrors> {
    match read_capped(path, MAX_CONFIG_FILE) {
        Ok(text) => parse(path, &text, overrides),
        Err(error) => Err(ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            field: ".".to_string(),
            message: format!("cannot read config file: {error}"),
        }])),
    }
}

/// Parses config `text` (that came from `path`, which is only used in errors). Pure: no I/O, no
/// environment; the same text and overrides always give the same result. Policy directories
/// are not read here (see [`load`] and [`Config::add_policy_files`]).
pub fn parse(path: &Path, text: &str, overrides: &Overrides) -> Result<Config, ConfigErrors> {
    let file = match serde_yaml::from_str::<Option<local::LocalFile>>(text) {
        Ok(file) => file.unwrap_or_default(),
        Err(error) => return Err(ConfigErrors(vec![serde_error(path, &error)])),
    };
    let mut file = file;
    let env_problems = overrides.apply(&mut file.agent);
    if !env_problems.is_empty() {
        // About the environment, not the file: no line to point at.
        return Err(ConfigErrors(
            env_problems
                .into_iter()
                .map(|problem| ConfigError {
                    file: PathBuf::from("environment"),
                    line: 0,
                    column: 0,
                    field: problem.variable.clone(),
                    message: format!("{}: {}", problem.variable, problem.message),
                })
                .collect(),
        ));
    }
    let mut problems = problem::Problems::default();
    file.agent
        .check(&FieldPath::default().key("agent"), &mut problems);
    let converted = convert::convert(&file, &mut problems);
    if !problems.0.is_empty() {
        return Err(located(path, text, problems));
    }
    let istio_options = file.agent.istio_options();
    let mut istio =
        istio::IstioResources::from_file(path, text, &file.istio_resources, &istio_options);
    istio.drop_duplicates(&converted.policies);
    Ok(Config {
        agent: file.agent,
        workloads: converted.workloads,
        services: converted.services,
        policies: converted.policies,
        istio,
        path: path.to_path_buf(),
    })
}

/// Positions each problem and sorts them in file order (stable, so problems at one position
/// keep the order they were found in).
fn located(path: &Path, text: &str, problems: problem::Problems) -> ConfigErrors {
    let locator = Locator::new(text);
    let mut errors: Vec<ConfigError> = problems
        .0
        .into_iter()
        .map(|problem| {
            let Position { line, column } = if problem.at_key {
                locator.locate_key(&problem.path)
            } else {
                locator.locate(&problem.path)
            };
            ConfigError {
                file: path.to_path_buf(),
                line,
                column,
                field: problem.path.to_string(),
                message: problem.invalid.to_string(),
            }
        })
        .collect();
    errors.sort_by_key(|error| (error.line, error.column));
    ConfigErrors(errors)
}

/// Splits serde_yaml's `"{path}: {message} at line L column C"` into field and message, keeping
/// the position it carries.
fn serde_error(path: &Path, error: &serde_yaml::Error) -> ConfigError {
    let position = error
        .location()
        .map_or(Position::START, |location| Position {
            line: location.line(),
            column: location.column(),
        });
    let mut text = error.to_string();
    let suffix = format!(" at line {} column {}", position.line, position.column);
    if let Some(start) = text.find(&suffix) {
        text.replace_range(start..start + suffix.len(), "");
    }
    let (mut field, mut message) = match text.split_once(": ") {
        Some((field, message)) if !field.is_empty() && !field.contains(' ') => {
            (field.to_string(), message.to_string())
        }
        _ => (".".to_string(), text),
    };
    if message == "invalid IP address syntax" {
        message = "invalid IP address".to_string();
    }
    if let Some((unknown, rewritten)) = unknown_field(&message) {
        // serde names the mapping; the unknown key itself is the more useful field.
        field = if field == "." {
            // An empty key would print as an empty field; keep `.` (the document) then.
            if unknown.is_empty() {
                field
            } else {
                unknown
            }
        } else {
            format!("{field}.{unknown}")
        };
        message = rewritten;
    }
    ConfigError {
        file: path.to_path_buf(),
        line: position.line,
        column: position.column,
        field,
        message,
    }
}

/// For serde's "unknown field `x`, expected one of `a`, `b`": the key, and a message that
/// suggests the intended field when only its case differs (`workloadIPs` → `workloadIps`), the
/// common slip, instead of listing every field.
fn unknown_field(message: &str) -> Option<(String, String)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, expected) = rest.split_once('`')?;
    let suggestion = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .find(|candidate| candidate.eq_ignore_ascii_case(unknown));
    let rewritten = match suggestion {
        Some(candidate) => format!("unknown field `{unknown}`, did you mean `{candidate}`?"),
        None => message.to_string(),
    };
    Some((unknown.to_string(), rewritten))
}
