//! Istio `AuthorizationPolicy` / `PeerAuthentication` resources as a policy source (layer L1,
//! part of `config`): the file's `istioResources:` list and the YAML files of
//! `agent.authorization.policyDirs`, translated by `istio_policy` into the model. The
//! `networking.istio.io` resources of the same sources (ServiceEntry) are translated by
//! `istio_networking`.
//!
//! A resource that cannot be applied is not a config error: it is left out with a
//! [`PolicyFinding`] naming it and the reason, and every other resource applies (the issue's
//! rule; Istio does the same per resource). Findings are logged by the watcher at start-up and
//! on every reload, and printed by `check-config` and `explain`. Reading the directories is the
//! only I/O here ([`read_policy_dirs`]); translation is pure.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_yaml::Value;

use super::istio_networking::{self as networking, NetworkingTranslation};
use super::istio_policy::{self as istio, IstioError, IstioOptions, Translation};
use super::locate::{FieldPath, Locator};
use super::{ConfigError, ConfigErrors};
use crate::state::egress::ServiceEntry;
use crate::state::policy::{PeerAuthentication, Policy, SelectorPolicy};

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// Applied, but not exactly as written (L7 rules at L4, waypoint policies).
    Warning,
    /// Not applied at all.
    Rejected,
}

/// One resource that was left out or changed, with where it was written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PolicyFinding {
    /// `file:line:column: istioResources[i]` for the config file, the file path for a policy
    /// directory's file.
    pub location: String,
    /// Warning or rejected.
    pub kind: FindingKind,
    /// The resource (`Kind namespace/name`) and the reason.
    pub message: String,
}

impl fmt::Display for PolicyFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            FindingKind::Warning => "warning",
            FindingKind::Rejected => "rejected",
        };
        write!(f, "{}: {kind}: {}", self.location, self.message)
    }
}

/// What the Istio resources of every source translated to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IstioResources {
    /// Translated authorization policies, file resources first, then directory files in name
    /// order.
    pub policies: Vec<SelectorPolicy>,
    /// Translated PeerAuthentications, same order.
    pub peer_authentications: Vec<PeerAuthentication>,
    /// Translated ServiceEntries (`networking.istio.io`), same order.
    pub service_entries: Vec<ServiceEntry>,
    /// Translated DestinationRules, same order.
    pub destination_rules: Vec<crate::state::traffic_policy::DestinationRule>,
    /// Everything not applied as written.
    pub findings: Vec<PolicyFinding>,
}

/// A YAML file of a policy directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its content.
    pub text: String,
}

impl IstioResources {
    fn absorb_networking(&mut self, translation: NetworkingTranslation, location: &str) {
        self.service_entries.extend(translation.service_entries);
        self.destination_rules.extend(translation.destination_rules);
        for error in translation.errors {
            self.findings.push(PolicyFinding {
                location: location.to_string(),
                kind: FindingKind::Rejected,
                message: error.to_string(),
            });
        }
    }

    fn absorb(&mut self, translation: Translation, location: &str) {
        self.policies.extend(translation.policies);
        self.peer_authentications
            .extend(translation.peer_authentications);
        for warning in translation.warnings {
            self.findings.push(PolicyFinding {
                location: location.to_string(),
                kind: FindingKind::Warning,
                message: warning.to_string(),
            });
        }
        for error in translation.errors {
            let message = match &error {
                IstioError::Yaml { .. } => format!("{error} (the rest of this file is skipped)"),
                IstioError::Rejected { .. } => error.to_string(),
            };
            self.findings.push(PolicyFinding {
                location: location.to_string(),
                kind: FindingKind::Rejected,
                message,
            });
        }
    }

    /// Translates the file's `istioResources` items one by one, so each finding can name the
    /// line of its item.
    pub(crate) fn from_file(
        path: &Path,
        text: &str,
        resources: &[Value],
        options: &IstioOptions,
    ) -> IstioResources {
        let mut translated = IstioResources::default();
        if resources.is_empty() {
            return translated;
        }
        let locator = Locator::new(text);
        let list = FieldPath::default().key("istioResources");
        for (index, resource) in resources.iter().enumerate() {
            let item = list.index(index);
            let position = locator.locate(&item);
            let location = format!(
                "{}:{}:{}: {item}",
                path.display(),
                position.line,
                position.column
            );
            translated.absorb(istio::translate([resource.clone()], options), &location);
            translated.absorb_networking(
                networking::translate([resource.clone()], options),
                &location,
            );
        }
        translated
    }

    /// Adds the resources of policy-directory files.
    pub(crate) fn add_files(&mut self, files: &[PolicyFile], options: &IstioOptions) {
        for file in files {
            let location = file.path.display().to_string();
            self.absorb(istio::parse(&file.text, options), &location);
            self.absorb_networking(networking::parse(&file.text, options), &location);
        }
    }

    /// Leaves out a policy whose `namespace/name` is already taken (by the local config's
    /// `policies` or an earlier resource): workloads reference policies by that key, so two
    /// would be ambiguous.
    pub(crate) fn drop_duplicates(&mut self, local: &[Policy]) {
        let mut seen: std::collections::HashSet<String> = local.iter().map(Policy::key).collect();
        let mut kept = Vec::with_capacity(self.policies.len());
        for policy in std::mem::take(&mut self.policies) {
            let key = policy.policy.key();
            if seen.insert(key.clone()) {
                kept.push(policy);
            } else {
                self.findings.push(PolicyFinding {
                    location: "policies".to_string(),
                    kind: FindingKind::Rejected,
                    message: format!(
                        "AuthorizationPolicy {key}: a policy with this namespace/name is already \
                         defined; the later one is left out"
                    ),
                });
            }
        }
        self.policies = kept;
    }
}

/// Largest policy file the agent reads.
pub const MAX_POLICY_FILE: u64 = 4 * 1024 * 1024;
/// Largest total of the policy files of every directory.
pub const MAX_POLICY_FILES: u64 = 32 * 1024 * 1024;

/// Reads every `*.yaml` / `*.yml` file of `dirs` (relative paths are relative to the config
/// file's directory), in name order per directory, each at most [`MAX_POLICY_FILE`] bytes and
/// [`MAX_POLICY_FILES`] together. Blocking. A directory that cannot be listed, or a file
/// that cannot be read, is an error: applying a partial policy set could open access.
pub fn read_policy_dirs(config: &Path, dirs: &[PathBuf]) -> Result<Vec<PolicyFile>, ConfigErrors> {
    let base = config.parent().unwrap_or(Path::new("."));
    let mut total: u64 = 0;
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for dir in dirs {
        let dir = base.join(dir);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) => {
                errors.push(file_error(
                    config,
                    &format!("cannot read policy directory {}: {error}", dir.display()),
                ));
                continue;
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| {
                path.extension()
                    .is_some_and(|extension| extension == "yaml" || extension == "yml")
            })
            .filter(|path| path.is_file())
            .collect();
        paths.sort();
        for path in paths {
            let read = super::read_capped(&path, MAX_POLICY_FILE).and_then(|text| {
                total += text.len() as u64;
                if total > MAX_POLICY_FILES {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("policy files together are larger than {MAX_POLICY_FILES} bytes"),
                    ));
                }
                Ok(text)
            });
            match read {
                Ok(text) => files.push(PolicyFile { path, text }),
                Err(error) => errors.push(file_error(
                    config,
                    &format!("cannot read policy file {}: {error}", path.display()),
                )),
            }
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn file_error(config: &Path, message: &str) -> ConfigError {
    ConfigError {
        file: config.to_path_buf(),
        line: 0,
        column: 0,
        field: "agent.authorization.policyDirs".to_string(),
        message: message.to_string(),
    }
}
