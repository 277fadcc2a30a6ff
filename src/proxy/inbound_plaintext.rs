//! Inbound plaintext (15006): TCP arriving at the pod that is not HBONE, redirected to us. The
//! original destination is the pod's own address; we connect to it from inside the pod.
//! Authorization decides with no peer identity (so PeerAuthentication STRICT refuses it, and
//! principal or namespace rules never match it); a denied connection is closed before anything
//! reaches the app, and a policy change can close it later ("policy changed").

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::connections::{self, Denied, Revoked};
use super::{accept_loop, copy, WorkloadProxy};
use crate::authz::ConnectionFacts;
use crate::hbone::TraceParent;
use crate::net::{ports, ClientAddr, NetworkAddress, OriginalDst};
use crate::telemetry::{ConnectionRecord, Direction, ResponseFlag};

pub(super) async fn serve(proxy: Arc<WorkloadProxy>, listener: TcpListener) {
    accept_loop(&proxy, listener, "inbound_plaintext", handle).await
}

/// Why a plaintext inbound connection was refused or failed.
#[derive(Debug, thiserror::Error)]
enum PlaintextError {
    #[error("target port {0} is one of the agent's own ports")]
    AgentPort(u16),
    #[error("the local workload {0} is not in the current configuration")]
    UnknownWorkload(String),
    #[error("destination {0} is not an address of this workload")]
    NotLocal(SocketAddr),
    #[error(transparent)]
    Denied(Denied),
    #[error(transparent)]
    Revoked(Revoked),
    #[error(transparent)]
    Socket(#[from] crate::socket::SocketError),
    #[error("copy: {0}")]
    Copy(#[source] std::io::Error),
}

impl PlaintextError {
    /// Istio's response flag for this failure.
    fn flag(&self) -> ResponseFlag {
        match self {
            PlaintextError::Denied(_) | PlaintextError::Revoked(_) => ResponseFlag::Deny,
            _ => ResponseFlag::Connect,
        }
    }
}

async fn handle(proxy: Arc<WorkloadProxy>, stream: TcpStream, peer: SocketAddr) {
    let local = stream.local_addr().unwrap_or(peer);
    let destination = OriginalDst(crate::sys::original_destination(&stream, local));
    let client = ClientAddr(peer);
    let trace = TraceParent::random();
    let span =
        tracing::info_span!("inbound_plaintext", id = %trace, src = %client, dst = %destination);
    let mut record = ConnectionRecord::new(
        &proxy.inputs.metrics,
        Direction::Inbound,
        client,
        destination,
    );
    record.trace = trace.to_string();
    async move {
        if let Err(error) = proxy_connection(&proxy, stream, client, destination, &mut record).await
        {
            record.fail(error.flag(), error);
        }
    }
    .instrument(span)
    .await
}

async fn proxy_connection(
    proxy: &WorkloadProxy,
    stream: TcpStream,
    client: ClientAddr,
    destination: OriginalDst,
    record: &mut ConnectionRecord,
) -> Result<(), PlaintextError> {
    if ports::is_agent_port(destination.0.port()) {
        return Err(PlaintextError::AgentPort(destination.0.port()));
    }
    let local = proxy
        .workload()
        .ok_or_else(|| PlaintextError::UnknownWorkload(proxy.workload_uid.clone()))?;
    if !local.workload_ips.contains(&destination.0.ip()) {
        return Err(PlaintextError::NotLocal(destination.0));
    }
    record.dst_workload = Some(local.clone());
    let snapshot = proxy.inputs.state.snapshot();
    record.src_workload = snapshot
        .workload_by_address(&NetworkAddress {
            network: local.network.clone(),
            ip: client.0.ip(),
        })
        .cloned();
    drop(snapshot);
    let facts = ConnectionFacts {
        source_identity: None,
        source_ip: client.0.ip(),
        destination_ip: destination.0.ip(),
        destination_port: destination.0.port(),
    };
    let registration = connections::admit(&proxy.connections, &proxy.inputs.state, &local, facts)
        .map_err(PlaintextError::Denied)?;
    let source_ip = (proxy.inputs.settings.proxy.original_source
        && client.0.ip() != destination.0.ip())
    .then_some(client.0.ip());
    let timeout = proxy.inputs.settings.proxy.connect_timeout;
    let upstream = proxy
        .sockets
        .connect(destination.0, source_ip, timeout)
        .await?;
    record.connected();
    let copy = copy::bidirectional(stream, upstream, &record.bytes.sent, &record.bytes.received);
    tokio::select! {
        copied = copy => copied.map_err(PlaintextError::Copy),
        revoked = registration.revoked() => Err(PlaintextError::Revoked(revoked)),
    }
}
