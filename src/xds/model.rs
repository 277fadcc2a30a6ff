//! What istiod has told us (layer L2): the accepted resources of each type, their versions, and
//! how one delta response changes them. Pure: the client feeds responses in and publishes the
//! result; tests and the fuzz target drive it without a server.

use std::collections::{BTreeMap, HashMap};

use crate::proto::discovery::{DeltaDiscoveryResponse, Resource};
use crate::proto::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use crate::state::merge::PushedModel;
use crate::state::{Policy, Service, Workload};

use super::convert::{self, AddressResource, FieldError};

/// The accepted resources of every subscribed type. Cloned and replaced as a whole per
/// response, so a reader never sees half of a push.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct XdsModel {
    /// Workloads by uid.
    pub workloads: BTreeMap<String, Workload>,
    /// Services by `namespace/hostname`.
    pub services: BTreeMap<String, Service>,
    /// Authorization policies by `namespace/name`.
    pub policies: BTreeMap<String, Policy>,
}

/// A resource the response carried that was refused, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The resource name.
    pub name: String,
    /// What was wrong.
    pub reason: FieldError,
}

/// The outcome of applying one response.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Resources added or updated.
    pub updated: usize,
    /// Resources removed.
    pub removed: usize,
    /// Resources refused (the response is NACKed naming each).
    pub rejected: Vec<Rejected>,
}

impl Applied {
    /// The NACK message: `"<name>: <field>: <reason>; ..."`, or `None` to ACK.
    pub fn nack_message(&self) -> Option<String> {
        if self.rejected.is_empty() {
            return None;
        }
        Some(
            self.rejected
                .iter()
                .map(|rejected| format!("{}: {}", rejected.name, rejected.reason))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }
}

/// Why a whole response cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// The response is for a type we did not subscribe to.
    #[error("response for unsubscribed type {0:?}")]
    UnknownType(String),
}

/// Accepted versions per type and resource name, sent back as `initial_resource_versions` on
/// reconnect. A refused resource has no entry, so the server sends it again.
#[derive(Debug, Clone, Default)]
pub struct Versions(HashMap<String, HashMap<String, String>>);

impl Versions {
    /// The versions of `type_url`.
    pub fn of(&self, type_url: &str) -> HashMap<String, String> {
        self.0.get(type_url).cloned().unwrap_or_default()
    }
}

impl XdsModel {
    /// A view to merge with the file's model ([`crate::state::merge::merge`]).
    pub fn pushed(&self) -> PushedModel<'_> {
        PushedModel {
            workloads: &self.workloads,
            services: &self.services,
            policies: &self.policies,
        }
    }

    /// Applies one delta response: each resource independently (a refused one keeps its last
    /// accepted value, so a bad push cannot leave partial state), then the removals.
    pub fn apply(
        &mut self,
        response: &DeltaDiscoveryResponse,
        versions: &mut Versions,
    ) -> Result<Applied, ResponseError> {
        let type_url = response.type_url.as_str();
        if type_url != ADDRESS_TYPE && type_url != AUTHORIZATION_TYPE {
            return Err(ResponseError::UnknownType(type_url.to_string()));
        }
        let type_versions = versions.0.entry(type_url.to_string()).or_default();
        let mut applied = Applied::default();
        for resource in &response.resources {
            match self.apply_resource(type_url, resource) {
                Ok(()) => {
                    type_versions.insert(resource.name.clone(), resource.version.clone());
                    applied.updated += 1;
                }
                Err(reason) => {
                    type_versions.remove(&resource.name);
                    applied.rejected.push(Rejected {
                        name: resource.name.clone(),
                        reason,
                    });
                }
            }
        }
        for name in &response.removed_resources {
            type_versions.remove(name);
            let removed = if type_url == ADDRESS_TYPE {
                self.workloads.remove(name).is_some() | self.services.remove(name).is_some()
            } else {
                self.policies.remove(name).is_some()
            };
            applied.removed += usize::from(removed);
        }
        Ok(applied)
    }

    fn apply_resource(&mut self, type_url: &str, resource: &Resource) -> Result<(), FieldError> {
        let name = resource.name.as_str();
        if name.is_empty() {
            return Err(FieldError {
                field: "name".to_string(),
                reason: "must not be empty".to_string(),
            });
        }
        if type_url == AUTHORIZATION_TYPE {
            let policy = convert::authorization_resource(name, resource.resource.as_ref())?;
            self.policies.insert(name.to_string(), policy);
            return Ok(());
        }
        match convert::address_resource(name, resource.resource.as_ref())? {
            AddressResource::Workload(workload) => {
                self.services.remove(name);
                self.workloads.insert(name.to_string(), *workload);
            }
            AddressResource::Service(service) => {
                self.workloads.remove(name);
                self.services.insert(name.to_string(), service);
            }
        }
        Ok(())
    }
}
