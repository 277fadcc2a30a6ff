//! nodetunnel: a node-level tunnel agent for zero-trust service meshes.
//!
//! One agent per node captures its pods' TCP traffic inside each pod's network namespace and
//! carries it between nodes as HBONE (HTTP/2 CONNECT over mutual TLS 1.3) with per-workload
//! SPIFFE identities. See `ARCHITECTURE.md` for the flow of a connection through the modules.
//!
//! Layers (a module uses only its own layer or lower):
//! - L5 [`app`] (composition only), [`admin`]: the admin API, metrics and readiness servers.
//! - L4 [`capture`]: local pods and their per-pod listener sets.
//! - L3 [`proxy`]: outbound, inbound, pool, route decision, copy; [`dns`]: the pods' DNS proxy.
//! - L2 [`hbone`], [`tls`], [`identity`], [`authz`], [`xds`], [`control_plane`], [`proto`]:
//!   protocols, certificates, policy evaluation, istiod.
//! - L1 [`state`] (with the merge of the model's sources and the rules both follow),
//!   [`config`] (with the Istio policy translation), [`telemetry`]: the model, configuration,
//!   logging.
//! - L0 [`sys`], [`socket`], [`drain`], [`shard`], [`net`], [`spiffe`], [`node_http`]: syscalls,
//!   sockets, primitives (drain scopes, the data plane's threads), the node-level servers'
//!   HTTP/1 loop.
//!
//! `scripts/import-cycles` checks that no two files or modules import each other.

pub mod admin;
pub mod allocator;
pub mod app;
pub mod authz;
pub mod capture;
pub mod config;
pub mod control_plane;
pub mod dns;
pub mod drain;
pub mod hbone;
pub mod identity;
pub mod net;
pub mod node_http;
pub mod proto;
pub mod proxy;
pub mod shard;
pub mod socket;
pub mod spiffe;
pub mod state;
pub mod sys;
pub mod telemetry;
pub mod tls;
pub mod xds;
