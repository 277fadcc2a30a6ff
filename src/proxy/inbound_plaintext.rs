//! Inbound plaintext (15006): TCP arriving at the pod that is not HBONE, redirected to us. The
//! original destination is the pod's own address; we connect to it from inside the pod.
//! Authorization decides with no peer identity (so PeerAuthentication STRICT refuses it, and
//! principal or namespace rules never match it); a denied connection is closed before anything
//! reaches the app, and a policy change can close it later ("policy changed"). A connection over
//! the workload's per-source inbound limits (by client IP) is reset at once.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::Instrument;

use super::admission::{self, accept_loop, AdmissionError, Admitted, ListenerKind, Redirected};
use super::{copy, WorkloadProxy};
use crate::authz::ConnectionFacts;
use crate::net::ports;
use crate::telemetry::{ConnectionRecord, Direction, ResponseFlag};

pub(super) async fn serve(proxy: Arc<WorkloadProxy>, listener: std::net::TcpListener) {
    accept_loop(&proxy, listener, ListenerKind::InboundPlaintext, handle).await
}

/// Why a plaintext inbound connection was refused or failed, beyond the shared reasons.
#[derive(Debug, thiserror::Error)]
enum PlaintextError {
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error("destination {0} is not an address of this workload")]
    NotLocal(SocketAddr),
    #[error(transparent)]
    Socket(#[from] crate::socket::SocketError),
}

impl PlaintextError {
    /// Istio's response flag for this failure.
    fn flag(&self) -> ResponseFlag {
        match self {
            PlaintextError::Admission(error) => error.flag(),
            _ => ResponseFlag::Connect,
        }
    }
}

/// One plaintext connection; unauthenticated to the end, it holds its slot (`_admitted`).
async fn handle(
    proxy: Arc<WorkloadProxy>,
    stream: TcpStream,
    peer: SocketAddr,
    _admitted: Admitted,
) {
    let redirected = Redirected::new(&stream, peer);
    let span = tracing::info_span!(
        "inbound_plaintext",
        id = %redirected.trace,
        src = %redirected.client,
        dst = %redirected.destination
    );
    let mut record = redirected.record(&proxy, Direction::Inbound);
    async move {
        if let Err(error) = proxy_connection(&proxy, stream, redirected, &mut record).await {
            record.fail(error.flag(), error);
        }
    }
    .instrument(span)
    .await
}

async fn proxy_connection(
    proxy: &WorkloadProxy,
    stream: TcpStream,
    Redirected {
        client,
        destination,
        ..
    }: Redirected,
    record: &mut ConnectionRecord,
) -> Result<(), PlaintextError> {
    if ports::is_agent_port(destination.0.port()) {
        return Err(AdmissionError::AgentPort(destination.0.port()).into());
    }
    let (snapshot, local) = proxy.local_view()?;
    if !local.workload_ips.contains(&destination.0.ip()) {
        return Err(PlaintextError::NotLocal(destination.0));
    }
    let fields = record.fields_mut();
    fields.dst_workload = Some(local.clone());
    fields.src_workload = admission::source_workload(&snapshot, &local, client.0.ip());
    let facts = ConnectionFacts {
        source_identity: None,
        source_ip: client.0.ip(),
        destination_ip: destination.0.ip(),
        destination_port: destination.0.port(),
    };
    let admission = proxy
        .admit_inbound(&snapshot, &local, facts)
        .inspect_err(|error| {
            if let AdmissionError::Limited(_) = error {
                admission::reset_on_close(&stream);
            }
        })?;
    drop(snapshot);
    let source_ip = proxy.original_source(client.0.ip(), destination.0.ip());
    let timeout = proxy.inputs.settings.proxy.connect_timeout;
    let upstream = proxy
        .sockets
        .connect(destination.0, source_ip, crate::socket::Leg::InPod, timeout)
        .await?;
    record.connected();
    let copy = copy::bidirectional(stream, upstream, &record.bytes.sent, &record.bytes.received);
    Ok(admission::copy_until_revoked(copy, &admission).await?)
}
