//! nodetunnel: a node-level tunnel agent for zero-trust service meshes.
//!
//! One agent per node captures its pods' TCP traffic inside each pod's network namespace and
//! carries it between nodes as HBONE (HTTP/2 CONNECT over mutual TLS 1.3) with per-workload
//! SPIFFE identities. See `ARCHITECTURE.md` for the flow of a connection through the modules.
//!
//! Layers (a module uses only its own layer or lower):
//! - L5 [`app`], [`admin`]: composition root, signals, node-level servers, admin API.
//! - L4 [`capture`]: local pods and their per-pod listener sets.
//! - L3 [`proxy`]: outbound, inbound, pool, route decision, copy; [`dns`]: the pods' DNS proxy.
//! - L2 [`hbone`], [`tls`], [`identity`], [`authz`]: protocols and certificates.
//! - L1 [`state`], [`config`], [`telemetry`]: the model, configuration, logging.
//! - L0 [`sys`], [`socket`], [`drain`], [`net`], [`spiffe`]: syscalls, sockets, primitives.

pub mod admin;
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
pub mod socket;
pub mod spiffe;
pub mod state;
pub mod sys;
pub mod telemetry;
pub mod tls;
pub mod xds;
