//! The ZDS wire messages (package `istio.workload.zds`) and the pure decode/encode step of the
//! istio-cni hand-off (layer L4, the boundary where protos become typed requests).
//!
//! istio-cni sends one protobuf `WorkloadRequest` per SEQPACKET datagram, with the pod's network
//! namespace fd attached by SCM_RIGHTS to an `AddWorkload`; the agent answers each with a
//! `WorkloadResponse` carrying an `Ack` (empty error = ACK, anything else = NACK). The structs
//! below are written by hand from the field numbers of istio's `zds.proto`, so the bytes are the
//! same as istio-cni's. [`decode_request`] does no I/O and no syscall: it is what the fuzz
//! target drives.

use std::os::fd::OwnedFd;

/// Largest datagram the agent accepts, as istio's ztunnel (a pod's uid, name, namespace and
/// service account fit in well under this). Larger datagrams are truncated by the kernel and
/// rejected.
pub const MAX_MESSAGE_SIZE: usize = 1024;

/// Protocol version in [`ZdsHello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    /// Never sent; the proto3 default.
    NotUsed = 0,
    /// The only version istio-cni speaks today.
    V1 = 1,
}

/// First message on a connection, agent → istio-cni.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ZdsHello {
    /// A [`Version`].
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

/// Who the pod is, as istio-cni knows it. Field 4 (`trust_domain`) is reserved upstream.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct WorkloadInfo {
    /// Pod name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Kubernetes namespace.
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// Kubernetes service account.
    #[prost(string, tag = "3")]
    pub service_account: String,
}

/// Start (or keep) the proxy of a pod; sent with the pod's netns fd.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AddWorkload {
    /// The pod uid.
    #[prost(string, tag = "1")]
    pub uid: String,
    /// Mandatory upstream; its absence is a protocol error.
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

/// Keep an existing proxy whose netns istio-cni no longer holds; only before `SnapshotSent`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeepWorkload {
    /// The pod uid.
    #[prost(string, tag = "1")]
    pub uid: String,
}

/// Stop the proxy of a pod.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DelWorkload {
    /// The pod uid; field number 2 upstream.
    #[prost(string, tag = "2")]
    pub uid: String,
}

/// Marks the end of the initial snapshot of a connection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotSent {}

/// The answer to every request: empty `error` = ACK, non-empty = NACK with the reason.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    /// Why the request failed; empty on success.
    #[prost(string, tag = "1")]
    pub error: String,
}

/// istio-cni → agent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadRequest {
    /// What is asked; `None` when the sender used a type this agent does not know.
    #[prost(oneof = "workload_request::Payload", tags = "1, 5, 2, 3")]
    pub payload: Option<workload_request::Payload>,
}

/// The `oneof` of [`WorkloadRequest`].
pub mod workload_request {
    /// One request.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        /// Start a pod's proxy.
        #[prost(message, tag = "1")]
        Add(super::AddWorkload),
        /// Keep a pod's proxy through the snapshot.
        #[prost(message, tag = "5")]
        Keep(super::KeepWorkload),
        /// Stop a pod's proxy.
        #[prost(message, tag = "2")]
        Del(super::DelWorkload),
        /// End of the snapshot.
        #[prost(message, tag = "3")]
        SnapshotSent(super::SnapshotSent),
    }
}

/// agent → istio-cni.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadResponse {
    /// Always an [`Ack`] today.
    #[prost(oneof = "workload_response::Payload", tags = "1")]
    pub payload: Option<workload_response::Payload>,
}

/// The `oneof` of [`WorkloadResponse`].
pub mod workload_response {
    /// One response.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        /// ACK or NACK.
        #[prost(message, tag = "1")]
        Ack(super::Ack),
    }
}

/// A decoded, checked request: an `Add` owns exactly one fd, the others none.
#[derive(Debug)]
pub enum Request {
    /// Start the proxy of `uid` in the namespace `netns` (not yet checked to be a netns).
    Add {
        /// The pod uid.
        uid: String,
        /// Who the pod is.
        workload: WorkloadInfo,
        /// The pod's network namespace, as received.
        netns: OwnedFd,
    },
    /// Keep `uid` through the snapshot.
    Keep {
        /// The pod uid.
        uid: String,
    },
    /// Stop `uid`.
    Del {
        /// The pod uid.
        uid: String,
    },
    /// The snapshot is complete.
    SnapshotSent,
}

impl Request {
    /// The message type, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Add { .. } => "add",
            Request::Keep { .. } => "keep",
            Request::Del { .. } => "del",
            Request::SnapshotSent => "snapshotSent",
        }
    }

    /// The pod uid the request is about (empty for `SnapshotSent`).
    pub fn uid(&self) -> &str {
        match self {
            Request::Add { uid, .. } | Request::Keep { uid } | Request::Del { uid } => uid,
            Request::SnapshotSent => "",
        }
    }
}

/// Why a request was refused. Every variant is answered with a NACK carrying its text; none
/// closes the connection or touches other pods.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    /// The datagram is not a valid `WorkloadRequest`.
    #[error("malformed WorkloadRequest: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// The datagram did not fit in [`MAX_MESSAGE_SIZE`] and was truncated by the kernel.
    #[error("message larger than {MAX_MESSAGE_SIZE} bytes")]
    TooLarge,
    /// More fds were attached than the receive buffer had room for; they were dropped.
    #[error("too many file descriptors attached (control data truncated)")]
    ControlTruncated,
    /// A valid protobuf with no payload this agent knows (a newer istio-cni?).
    #[error("unknown or empty WorkloadRequest payload")]
    UnknownRequest,
    /// An `Add`, `Keep` or `Del` with an empty uid.
    #[error("{kind} request with an empty uid")]
    EmptyUid {
        /// The message type.
        kind: &'static str,
    },
    /// An `Add` without `workload_info` (a protocol error upstream).
    #[error("add for {uid} has no workload_info")]
    MissingWorkloadInfo {
        /// The pod uid.
        uid: String,
    },
    /// An `Add` without exactly one fd.
    #[error(
        "add for {uid} carries {count} file descriptors, expected exactly one (the pod netns)"
    )]
    FdCount {
        /// The pod uid.
        uid: String,
        /// How many were attached (all were closed).
        count: usize,
    },
    /// A non-`Add` message with fds attached (all were closed).
    #[error("{kind} message must carry no file descriptor, got {count}")]
    UnexpectedFds {
        /// The message type.
        kind: &'static str,
        /// How many.
        count: usize,
    },
    /// The fd of an `Add` is not a network namespace.
    #[error("add for {uid}: fd is not a network namespace ({reason})")]
    NotNetns {
        /// The pod uid.
        uid: String,
        /// What was found instead.
        reason: String,
    },
    /// `Keep` after `SnapshotSent` (a protocol error upstream).
    #[error("keep for {uid} after the snapshot was sent")]
    KeepAfterSnapshot {
        /// The pod uid.
        uid: String,
    },
    /// A second `SnapshotSent` on one connection (a protocol error upstream).
    #[error("snapshot already sent on this connection")]
    SecondSnapshot,
}

/// Decodes one datagram and the fds that came with it into a [`Request`]. Pure: the fds are
/// only counted and moved; any fd not handed out in the result is closed on return.
pub fn decode_request(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<Request, ZdsError> {
    use workload_request::Payload;
    let request = <WorkloadRequest as prost::Message>::decode(bytes)?;
    let Some(payload) = request.payload else {
        return Err(ZdsError::UnknownRequest);
    };
    let (kind, uid) = match &payload {
        Payload::Add(add) => ("add", add.uid.as_str()),
        Payload::Keep(keep) => ("keep", keep.uid.as_str()),
        Payload::Del(del) => ("del", del.uid.as_str()),
        Payload::SnapshotSent(_) => ("snapshotSent", "-"),
    };
    if uid.is_empty() {
        return Err(ZdsError::EmptyUid { kind });
    }
    let Payload::Add(add) = payload else {
        if !fds.is_empty() {
            return Err(ZdsError::UnexpectedFds {
                kind,
                count: fds.len(),
            });
        }
        return Ok(match payload {
            Payload::Keep(keep) => Request::Keep { uid: keep.uid },
            Payload::Del(del) => Request::Del { uid: del.uid },
            _ => Request::SnapshotSent,
        });
    };
    let Some(workload) = add.workload_info else {
        return Err(ZdsError::MissingWorkloadInfo { uid: add.uid });
    };
    let count = fds.len();
    let Ok::<[OwnedFd; 1], _>([netns]) = fds.try_into() else {
        return Err(ZdsError::FdCount {
            uid: add.uid,
            count,
        });
    };
    Ok(Request::Add {
        uid: add.uid,
        workload,
        netns,
    })
}

/// Encodes the answer to one request: ACK when `nack` is `None`, else a NACK with that reason
/// (an empty reason would read as an ACK, so it is replaced by a generic one).
pub fn encode_response(nack: Option<&str>) -> Vec<u8> {
    let error = match nack {
        None => String::new(),
        Some("") => "request failed".to_string(),
        Some(reason) => reason.to_string(),
    };
    let response = WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack { error })),
    };
    prost::Message::encode_to_vec(&response)
}

/// A NACK: the agent refused a request. Displays as the reason, unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Nack(
    /// The reason the agent gave; never empty (an empty one would read as an ACK).
    pub String,
);

/// Decodes a response, as istio-cni does (used by the fake istio-cni of the tests and by the
/// fuzz target): `Some(Ok(()))` for an ACK, `Some(Err(nack))` for a NACK, `None` if the bytes
/// are not a response with an ack.
pub fn decode_response(bytes: &[u8]) -> Option<Result<(), Nack>> {
    let response = <WorkloadResponse as prost::Message>::decode(bytes).ok()?;
    let workload_response::Payload::Ack(ack) = response.payload?;
    Some(if ack.error.is_empty() {
        Ok(())
    } else {
        Err(Nack(ack.error))
    })
}

/// Encodes the hello the agent sends first on every connection.
pub fn encode_hello() -> Vec<u8> {
    prost::Message::encode_to_vec(&ZdsHello {
        version: Version::V1 as i32,
    })
}

#[cfg(test)]
#[path = "proto_tests.rs"]
mod tests;
