//! What can be wrong in a config file beyond its syntax (layer L1, part of `config`): every
//! semantic problem [`SemanticError`] names, and [`Problems`], where the checks of the agent
//! section and of the model collect them against the field they are about.

use super::locate::FieldPath;
use crate::net::{NetworkAddress, NetworkAddressError};
use crate::spiffe::IdentityError;
use crate::state::rules::{DestinationError, ServiceKeyError};

/// A semantic problem in the file; its `Display` is the message users read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SemanticError {
    /// A DNS domain that is not dot-separated labels of letters, digits and hyphens.
    #[error("invalid DNS domain {0:?}: expected labels of a-z, 0-9 and '-' separated by dots")]
    DnsName(String),
    /// A congestion control name that no kernel could have.
    #[error("invalid TCP congestion control {0:?}: expected a kernel algorithm name such as cubic or bbr (a-z, 0-9, '_', at most 15)")]
    CongestionControl(String),
    /// A string that should be an IP address is not one.
    #[error("invalid IP address {0:?}")]
    Ip(String),
    /// A `network/IP` string that is malformed.
    #[error("invalid network address: {0}")]
    NetworkAddress(#[from] NetworkAddressError),
    /// A waypoint or gateway destination that is neither `network/IP` nor `namespace/hostname`.
    #[error(transparent)]
    Destination(#[from] DestinationError),
    /// A SPIFFE identity string that does not parse.
    #[error("invalid identity: {0}")]
    Identity(#[from] IdentityError),
    /// One part of a workload's identity (trust domain, namespace, service account) is invalid.
    #[error("{0:?} cannot be part of a SPIFFE identity (allowed: A-Z a-z 0-9 . - _, at most 253)")]
    IdentityPart(String),
    /// Two workloads share a uid, the key of the model.
    #[error("duplicate uid {uid:?} (also used by {first})")]
    DuplicateUid {
        /// The uid.
        uid: String,
        /// Where it was first used.
        first: FieldPath,
    },
    /// Two workloads in one network claim one IP, so traffic to it would be ambiguous.
    #[error("address {address} is already claimed by {first}")]
    AddressClaimed {
        /// The `network/IP`.
        address: NetworkAddress,
        /// The workload that claimed it first.
        first: FieldPath,
    },
    /// A workload of this node without an address cannot be captured or reached.
    #[error("workload runs on this node ({0:?}) but has no workloadIps")]
    LocalWithoutIps(String),
    /// A key of a workload's `services` map that is not `namespace/hostname`.
    #[error(transparent)]
    ServiceReference(#[from] ServiceKeyError),
    /// Port 0 where a real port is needed.
    #[error("port 0 is not a usable port here")]
    PortZero,
    /// A number outside the range the setting allows.
    #[error("{value} is out of range ({min}..={max})")]
    OutOfRange {
        /// The value given.
        value: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// A required string is empty.
    #[error("must not be empty")]
    Empty,
    /// A workload with neither `uid` nor `name`: nothing could refer to it.
    #[error("a workload needs a uid or a name")]
    Unnamed,
    /// Two services share `namespace/hostname`.
    #[error("duplicate service {key:?} (also defined by {first})")]
    DuplicateService {
        /// `namespace/hostname`.
        key: String,
        /// Where it was first defined.
        first: FieldPath,
    },
    /// Two services (or one twice) claim one VIP.
    #[error("VIP {vip} is already claimed by {first}")]
    DuplicateVip {
        /// The VIP.
        vip: NetworkAddress,
        /// Where it was first claimed.
        first: FieldPath,
    },
    /// Two policies share `namespace/name`.
    #[error("duplicate policy {key:?} (also defined by {first})")]
    DuplicatePolicy {
        /// `namespace/name`.
        key: String,
        /// Where it was first defined.
        first: FieldPath,
    },
    /// A pod entry names a workload that is not in the file.
    #[error("no workload has uid or namespace/name {0:?}")]
    UnknownPodWorkload(String),
    /// A pod entry names a workload that runs on another node.
    #[error("workload {workload:?} runs on node {node:?}, not on this node {agent_node:?}")]
    PodNotLocal {
        /// The pod's workload reference.
        workload: String,
        /// The workload's node.
        node: String,
        /// This agent's node.
        agent_node: String,
    },
    /// Two pod entries for one workload or one network namespace.
    #[error("duplicate pod entry {value:?} (also listed by {first})")]
    DuplicatePod {
        /// The repeated workload or netns.
        value: String,
        /// The first entry.
        first: FieldPath,
    },
    /// Pods are listed, but without a node name no workload can be matched to this node.
    #[error("pods are listed but the node name is empty (set agent.node or --node)")]
    NodeMissing,
    /// Half of a CA key pair.
    #[error("{present} is set but {missing} is not; both are needed")]
    CaPairIncomplete {
        /// The field that is set.
        present: &'static str,
        /// The field that is missing.
        missing: &'static str,
    },
    /// The admin API is unauthenticated, so it must not be reachable from the network.
    #[error("admin address {0} is not a loopback address")]
    AdminNotLoopback(std::net::SocketAddr),
    /// An istiod (xDS or CA) address that cannot be used.
    #[error("control plane address {address:?}: {reason}")]
    ControlPlaneAddress {
        /// The address as written.
        address: String,
        /// What is wrong with it.
        reason: crate::net::HttpsAddressError,
    },
    /// A size limit of zero would refuse everything.
    #[error("must be greater than 0")]
    ZeroSize,
    /// A duration of zero that breaks what it times (a zero keepalive timeout closes every
    /// HBONE connection; a zero interval spins).
    #[error("must be longer than 0s")]
    ZeroDuration,
    /// An inbound limit that limits nothing (probably a misspelt or misplaced field).
    #[error("sets no limit: give maxConnections, connectionsPerSecond or both")]
    NoInboundLimit,
    /// A bucket size without a refill rate.
    #[error("burst needs connectionsPerSecond")]
    BurstWithoutRate,
    /// A connection rate that is not a number above 0 (0 would refuse for ever once the burst
    /// is spent; a fraction like 0.1 is one every 10 s).
    #[error("{0} is not a rate above 0 and at most 1000000 per second")]
    Rate(String),
}

/// A problem and the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field.
    pub path: FieldPath,
    /// The problem is the mapping key at the end of `path`, not its value.
    pub at_key: bool,
    /// What is wrong.
    pub invalid: SemanticError,
}

/// Problems collected during conversion, in the order found.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Records `invalid` at `path`.
    pub fn push(&mut self, path: FieldPath, invalid: SemanticError) {
        self.0.push(Problem {
            path,
            at_key: false,
            invalid,
        });
    }

    /// Records `invalid` about the mapping key at the end of `path`.
    pub fn push_key(&mut self, path: FieldPath, invalid: SemanticError) {
        self.0.push(Problem {
            path,
            at_key: true,
            invalid,
        });
    }
}
