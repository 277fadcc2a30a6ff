//! Workload discovery from istiod (layer L2): a delta ADS client for
//! `istio.workload.Address` and `istio.security.Authorization`.
//!
//! Flow: [`XdsClient::run`] keeps one gRPC stream open to istiod, subscribing to both types
//! (wildcard), with the node id and metadata istiod expects from a ztunnel. Every response is
//! applied to an [`XdsModel`] resource by resource ([`model`], [`convert`]): good resources
//! apply, each bad one is refused by name in the NACK and keeps its last good value. The new
//! model is published whole on a watch channel; the composition root merges it with the local
//! file's model into the state store. When the stream breaks the last model stays in service,
//! the client reconnects with capped, jittered backoff and sends the versions it holds
//! (`initial_resource_versions`) so istiod sends only what changed.

pub mod convert;
pub mod model;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::config::agent::AgentConfig;
use crate::control_plane::{ControlPlane, ControlPlaneError};
use crate::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status};
use crate::proto::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use crate::telemetry::xds::{TerminationReason, XdsMetrics};

pub use model::{Applied, Rejected, Versions, XdsModel};

/// The types subscribed to, in the order their first requests are sent.
pub const TYPES: [&str; 2] = [ADDRESS_TYPE, AUTHORIZATION_TYPE];

/// First reconnect delay; doubled per consecutive failure up to the configured cap.
const RECONNECT_BASE: Duration = Duration::from_millis(10);

/// Which types have had their first response applied since start-up. Readiness waits for all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Synced {
    /// `istio.workload.Address` received.
    pub addresses: bool,
    /// `istio.security.Authorization` received.
    pub authorization: bool,
}

impl Synced {
    /// Both types received.
    pub fn all(&self) -> bool {
        self.addresses && self.authorization
    }

    /// The types still missing, for readiness.
    pub fn pending(&self) -> Vec<String> {
        let mut pending = Vec::new();
        if !self.addresses {
            pending.push(format!("xds {ADDRESS_TYPE}"));
        }
        if !self.authorization {
            pending.push(format!("xds {AUTHORIZATION_TYPE}"));
        }
        pending
    }
}

/// Why one stream ended.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    /// The channel could not be set up.
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    /// istiod refused or broke the stream (including a message over the size limit).
    #[error("xDS stream: {0}")]
    Status(#[from] tonic::Status),
    /// The request queue closed (the stream task ended).
    #[error("xDS request stream closed")]
    RequestsClosed,
}

/// The node istiod sees: Istio's ztunnel id form (istiod recognises the proxy type by the
/// `ztunnel~` prefix) and metadata.
pub fn node(agent: &AgentConfig) -> Node {
    let istio = &agent.istio;
    let ip = istio
        .instance_ip
        .map_or_else(|| "1.1.1.1".to_string(), |ip| ip.to_string());
    let id = format!(
        "ztunnel~{ip}~{}.{}~{}.svc.cluster.local",
        istio.pod_name, istio.pod_namespace, istio.pod_namespace
    );
    let mut metadata: BTreeMap<String, serde_json::Value> = istio.metadata.clone();
    let mut set = |key: &str, value: &str| {
        metadata.insert(
            key.to_string(),
            serde_json::Value::String(value.to_string()),
        );
    };
    set("NAME", &istio.pod_name);
    set("NAMESPACE", &istio.pod_namespace);
    set("INSTANCE_IPS", &ip);
    set("NODE_NAME", &agent.node);
    if !istio.metadata.contains_key("CLUSTER_ID") {
        set("CLUSTER_ID", &istio.cluster_id);
    }
    Node {
        id,
        cluster: String::new(),
        metadata: Some(prost_types::Struct {
            fields: metadata
                .into_iter()
                .map(|(key, value)| (key, json_to_proto(value)))
                .collect(),
        }),
        user_agent_name: "nodetunnel".to_string(),
    }
}

fn json_to_proto(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(json_to_proto).collect(),
        }),
        serde_json::Value::Object(fields) => Kind::StructValue(prost_types::Struct {
            fields: fields
                .into_iter()
                .map(|(key, value)| (key, json_to_proto(value)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// The first request of a stream for one type: wildcard subscription, with what we hold.
pub fn initial_request(node: &Node, type_url: &str, versions: &Versions) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(node.clone()),
        type_url: type_url.to_string(),
        initial_resource_versions: versions.of(type_url),
        ..DeltaDiscoveryRequest::default()
    }
}

/// The ACK (no error) or NACK (error naming each refused resource) of one response.
pub fn acknowledgement(
    response: &DeltaDiscoveryResponse,
    nack: Option<String>,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: response.type_url.clone(),
        response_nonce: response.nonce.clone(),
        error_detail: nack.map(|message| Status {
            // INVALID_ARGUMENT, as Envoy and ztunnel report rejected config.
            code: 3,
            message,
            details: Vec::new(),
        }),
        ..DeltaDiscoveryRequest::default()
    }
}

/// Settings of the client.
#[derive(Debug, Clone)]
pub struct XdsSettings {
    /// istiod.
    pub control_plane: ControlPlane,
    /// The node sent in the first requests.
    pub node: Node,
    /// Largest response accepted.
    pub max_message_size: usize,
    /// Cap of the reconnect backoff.
    pub reconnect_max: Duration,
}

/// The delta ADS client. Create with [`XdsClient::new`], then spawn [`XdsClient::run`].
#[derive(Debug)]
pub struct XdsClient {
    settings: XdsSettings,
    metrics: XdsMetrics,
    model: watch::Sender<Arc<XdsModel>>,
    synced: watch::Sender<Synced>,
}

impl XdsClient {
    /// A client that has not connected yet, with an empty model.
    pub fn new(settings: XdsSettings, metrics: XdsMetrics) -> Self {
        XdsClient {
            settings,
            metrics,
            model: watch::channel(Arc::new(XdsModel::default())).0,
            synced: watch::channel(Synced::default()).0,
        }
    }

    /// The model as istiod last pushed it; changes once per applied response.
    pub fn subscribe_model(&self) -> watch::Receiver<Arc<XdsModel>> {
        self.model.subscribe()
    }

    /// Which types have been received at least once.
    pub fn subscribe_synced(&self) -> watch::Receiver<Synced> {
        self.synced.subscribe()
    }

    /// Keeps a stream to istiod until `shutdown` completes. The last model stays published
    /// while disconnected.
    pub async fn run<F: std::future::Future<Output = ()>>(self: Arc<Self>, shutdown: F) {
        tokio::pin!(shutdown);
        let mut versions = Versions::default();
        let mut delay = RECONNECT_BASE;
        loop {
            let mut progressed = false;
            let ended = tokio::select! {
                ended = self.stream(&mut versions, &mut progressed) => ended,
                _ = &mut shutdown => return,
            };
            let reason = match &ended {
                Ok(()) => TerminationReason::Complete,
                Err(XdsError::ControlPlane(_)) => TerminationReason::ConnectionError,
                Err(XdsError::Status(status)) if !progressed => {
                    if status.code() == tonic::Code::Unavailable {
                        TerminationReason::ConnectionError
                    } else {
                        TerminationReason::Error
                    }
                }
                Err(_) => TerminationReason::Error,
            };
            self.metrics.terminated(reason);
            if progressed {
                delay = RECONNECT_BASE;
            }
            match ended {
                // A clean end after a working stream (istiod restarting, rebalancing)
                // reconnects at once; one that ended before any response backs off, so a
                // server that keeps closing cannot make us spin.
                Ok(()) if progressed => {
                    tracing::info!(address = %self.settings.control_plane.address(),
                        "xDS stream ended by the server; reconnecting");
                    continue;
                }
                Ok(()) => tracing::warn!(address = %self.settings.control_plane.address(),
                    retry_in = ?delay, "xDS stream ended before any response; serving the last known state"),
                Err(error) => tracing::warn!(address = %self.settings.control_plane.address(),
                    %error, retry_in = ?delay, "xDS stream failed; serving the last known state"),
            }
            tokio::select! {
                _ = tokio::time::sleep(jittered(delay)) => {}
                _ = &mut shutdown => return,
            }
            delay = (delay * 2).min(self.settings.reconnect_max);
        }
    }

    /// One stream: subscribe, then apply and acknowledge responses until it ends.
    async fn stream(&self, versions: &mut Versions, progressed: &mut bool) -> Result<(), XdsError> {
        let channel = self.settings.control_plane.channel();
        let mut client = AggregatedDiscoveryServiceClient::with_interceptor(
            channel,
            self.settings.control_plane.interceptor(),
        )
        .max_decoding_message_size(self.settings.max_message_size);
        let (requests, queue) = mpsc::channel(TYPES.len() * 2);
        for type_url in TYPES {
            requests
                .send(initial_request(&self.settings.node, type_url, versions))
                .await
                .map_err(|_| XdsError::RequestsClosed)?;
        }
        let mut responses = client
            .delta_aggregated_resources(ReceiverStream::new(queue))
            .await?
            .into_inner();
        tracing::info!(address = %self.settings.control_plane.address(), "xDS stream open");
        while let Some(response) = responses.message().await? {
            *progressed = true;
            self.metrics
                .received(&response.type_url, response.encoded_len());
            let nack = self.apply(&response, versions);
            requests
                .send(acknowledgement(&response, nack))
                .await
                .map_err(|_| XdsError::RequestsClosed)?;
        }
        Ok(())
    }

    /// Applies one response to a copy of the model and publishes it; returns the NACK message.
    fn apply(&self, response: &DeltaDiscoveryResponse, versions: &mut Versions) -> Option<String> {
        let mut next = XdsModel::clone(&self.model.borrow());
        let applied = match next.apply(response, versions) {
            Ok(applied) => applied,
            Err(error) => {
                tracing::warn!(%error, "xDS response refused");
                return Some(error.to_string());
            }
        };
        let nack = applied.nack_message();
        if let Some(message) = &nack {
            tracing::warn!(type_url = %response.type_url, rejected = applied.rejected.len(),
                reasons = %message, "xDS resources refused; the rest applied");
        }
        tracing::debug!(type_url = %response.type_url, updated = applied.updated,
            removed = applied.removed, "xDS response applied");
        if applied.updated > 0 || applied.removed > 0 {
            self.model.send_replace(Arc::new(next));
        }
        self.synced.send_modify(|synced| {
            if response.type_url == ADDRESS_TYPE {
                synced.addresses = true;
            } else if response.type_url == AUTHORIZATION_TYPE {
                synced.authorization = true;
            }
        });
        nack
    }
}

/// ±20 % so that a fleet of agents does not reconnect to a restarted istiod in lockstep.
fn jittered(delay: Duration) -> Duration {
    use rand::Rng;
    delay.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
}

#[cfg(test)]
mod tests;
