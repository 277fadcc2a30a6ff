//! A fake istiod: a delta ADS server and an Istio CA speaking the agent's own protos over TLS,
//! driven by a test.
//!
//! It serves on `127.0.0.1:15012` inside each node namespace it is started in (nodes have no
//! route to the host, and a listener socket keeps the namespace it was made in), one shared
//! state behind all of them. A test sets resources (every open stream gets the difference, as
//! istiod pushes deltas), reads what the agents sent back (ACKs, NACKs with their messages, the
//! versions a reconnecting agent holds), switches the CA between answering, answering with a
//! certificate for the wrong identity and being down, and stops and restarts the servers.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use prost::Message;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateSigningRequestParams, DnType,
    IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};

use nodetunnel::proto::citadel::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use nodetunnel::proto::citadel::{IstioCertificateRequest, IstioCertificateResponse};
use nodetunnel::proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use nodetunnel::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use nodetunnel::proto::{security, workload as wl, ADDRESS_TYPE, AUTHORIZATION_TYPE};

use super::netns::Topology;

/// The port istiod serves xDS and the CA on.
pub const ISTIOD_PORT: u16 = 15012;
/// The token the tests give agents (`AUTH_TOKEN`).
pub const TOKEN: &str = "test-node-token";

/// How the CA answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaMode {
    /// Signs the CSR for the impersonated identity.
    Normal,
    /// Signs it for another identity (a broken or malicious CA).
    WrongIdentity,
    /// Answers UNAVAILABLE (an outage).
    Down,
}

/// One certificate request the CA received.
#[derive(Debug, Clone)]
pub struct CaCall {
    /// `ImpersonatedIdentity` metadata.
    pub impersonated: String,
    /// The `authorization` header.
    pub authorization: String,
    /// The `clusterid` header.
    pub cluster_id: String,
}

#[derive(Default)]
struct Resources {
    /// type url → name → (version, encoded resource).
    by_type: HashMap<String, BTreeMap<String, (String, prost_types::Any)>>,
    next_version: u64,
}

struct Shared {
    resources: Mutex<Resources>,
    pushes: broadcast::Sender<()>,
    requests: Mutex<Vec<DeltaDiscoveryRequest>>,
    ca_mode: Mutex<CaMode>,
    ca_ttl: Mutex<Duration>,
    ca_calls: Mutex<Vec<CaCall>>,
    root: Certificate,
    root_key: KeyPair,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The fake; stops its servers on drop.
pub struct FakeIstiod {
    shared: Arc<Shared>,
    /// The servers of the current start, on a runtime of their own: shutting it down ends
    /// every connection and stream task too, as an istiod restart does.
    runtime: Option<tokio::runtime::Runtime>,
    nodes: Vec<String>,
    /// PEM of the root that signs istiod's serving certificate and every workload certificate.
    pub root_file: PathBuf,
    tls: Arc<rustls::ServerConfig>,
    _dir: tempfile::TempDir,
}

impl FakeIstiod {
    /// Starts serving in each of `nodes` (roles of `topology`).
    pub fn start(topology: &Topology, nodes: &[&str]) -> Result<FakeIstiod> {
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "fake istiod root");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let root = params.self_signed(&root_key)?;
        let dir = tempfile::tempdir()?;
        let root_file = dir.path().join("root-cert.pem");
        std::fs::write(&root_file, root.pem())?;
        let tls = serving_config(&root, &root_key)?;
        let shared = Arc::new(Shared {
            resources: Mutex::new(Resources::default()),
            pushes: broadcast::channel(64).0,
            requests: Mutex::new(Vec::new()),
            ca_mode: Mutex::new(CaMode::Normal),
            ca_ttl: Mutex::new(Duration::from_secs(3600)),
            ca_calls: Mutex::new(Vec::new()),
            root,
            root_key,
        });
        let mut fake = FakeIstiod {
            shared,
            runtime: None,
            nodes: nodes.iter().map(ToString::to_string).collect(),
            root_file,
            tls,
            _dir: dir,
        };
        fake.restart(topology)?;
        Ok(fake)
    }

    /// The address agents use (`XDS_ADDRESS`, `CA_ADDRESS`), the same in every node.
    pub fn address() -> String {
        format!("https://127.0.0.1:{ISTIOD_PORT}")
    }

    /// The Istio environment for an agent on `node` talking to this fake.
    pub fn agent_env(&self, node: &str) -> Vec<(String, String)> {
        let root = self.root_file.display().to_string();
        [
            ("XDS_ADDRESS", Self::address()),
            ("CA_ADDRESS", Self::address()),
            ("XDS_ROOT_CA", root.clone()),
            ("CA_ROOT_CA", root),
            ("AUTH_TOKEN", TOKEN.to_string()),
            ("NODE_NAME", node.to_string()),
            ("POD_NAME", format!("ztunnel-{node}")),
            ("POD_NAMESPACE", "istio-system".to_string()),
            ("SERVICE_ACCOUNT", "ztunnel".to_string()),
            ("CLUSTER_ID", "Kubernetes".to_string()),
            ("TRUST_DOMAIN", "cluster.local".to_string()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect()
    }

    /// Stops every server: listeners close and open streams break.
    pub fn stop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// (Re)starts the servers in every node.
    pub fn restart(&mut self, topology: &Topology) -> Result<()> {
        self.stop();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        for node in self.nodes.clone() {
            let listener = topology
                .run_in(&node, || {
                    std::net::TcpListener::bind(("127.0.0.1", ISTIOD_PORT))
                })?
                .with_context(|| format!("fake istiod listens in {node}"))?;
            listener.set_nonblocking(true)?;
            let shared = self.shared.clone();
            let tls = self.tls.clone();
            runtime.spawn(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(_) => return,
                };
                serve(listener, tls, shared).await;
            });
        }
        self.runtime = Some(runtime);
        Ok(())
    }

    /// Sets (adds or replaces) resources of `type_url`, each with a fresh version, and pushes.
    pub fn set(&self, type_url: &str, resources: Vec<(String, prost_types::Any)>) {
        {
            let mut state = lock(&self.shared.resources);
            for (name, any) in resources {
                state.next_version += 1;
                let version = format!("v{}", state.next_version);
                state
                    .by_type
                    .entry(type_url.to_string())
                    .or_default()
                    .insert(name, (version, any));
            }
        }
        let _ = self.shared.pushes.send(());
    }

    /// Removes resources of `type_url` by name, and pushes.
    pub fn remove(&self, type_url: &str, names: &[&str]) {
        {
            let mut state = lock(&self.shared.resources);
            if let Some(resources) = state.by_type.get_mut(type_url) {
                for name in names {
                    resources.remove(*name);
                }
            }
        }
        let _ = self.shared.pushes.send(());
    }

    /// Every request agents sent, in order.
    pub fn requests(&self) -> Vec<DeltaDiscoveryRequest> {
        lock(&self.shared.requests).clone()
    }

    /// NACK messages received so far.
    pub fn nacks(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter_map(|request| request.error_detail.map(|status| status.message))
            .collect()
    }

    /// How the CA answers from now on.
    pub fn set_ca_mode(&self, mode: CaMode) {
        *lock(&self.shared.ca_mode) = mode;
    }

    /// Lifetime of certificates issued from now on.
    pub fn set_ca_ttl(&self, ttl: Duration) {
        *lock(&self.shared.ca_ttl) = ttl;
    }

    /// Certificate requests received so far.
    pub fn ca_calls(&self) -> Vec<CaCall> {
        lock(&self.shared.ca_calls).clone()
    }
}

impl Drop for FakeIstiod {
    fn drop(&mut self) {
        self.stop();
    }
}

/// istiod's serving certificate: names 127.0.0.1 and istiod's service name.
fn serving_config(root: &Certificate, root_key: &KeyPair) -> Result<Arc<rustls::ServerConfig>> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(vec!["istiod.istio-system.svc".to_string()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse()?));
    let cert = params.signed_by(&key, root, root_key)?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A TLS connection tonic can serve.
struct TlsConnection(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl Connected for TlsConnection {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
) {
    let (accepted, incoming) = mpsc::channel::<std::io::Result<TlsConnection>>(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let accept_loop = async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                if let Ok(stream) = acceptor.accept(tcp).await {
                    let _ = accepted.send(Ok(TlsConnection(stream))).await;
                }
            });
        }
    };
    let server = tonic::transport::Server::builder()
        .add_service(AggregatedDiscoveryServiceServer::new(Xds(shared.clone())))
        .add_service(IstioCertificateServiceServer::new(Ca(shared)))
        .serve_with_incoming(ReceiverStream::new(incoming));
    tokio::select! {
        _ = accept_loop => {}
        _ = server => {}
    }
}

struct Xds(Arc<Shared>);

type ResponseStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Xds {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut requests = request.into_inner();
        let (responses, stream) = mpsc::channel(16);
        let shared = self.0.clone();
        let mut pushes = shared.pushes.subscribe();
        tokio::spawn(async move {
            // What this stream's client holds: type → name → version.
            let mut held: HashMap<String, HashMap<String, String>> = HashMap::new();
            let mut nonce = 0u64;
            loop {
                let types: Vec<String> = held.keys().cloned().collect();
                tokio::select! {
                    request = requests.message() => {
                        let Ok(Some(request)) = request else { return };
                        lock(&shared.requests).push(request.clone());
                        if request.response_nonce.is_empty() {
                            // A subscription: the client holds what it says it holds.
                            held.insert(request.type_url.clone(), request.initial_resource_versions.clone());
                            if !send_delta(&shared, &request.type_url, &mut held, &mut nonce, &responses).await {
                                return;
                            }
                        }
                    }
                    pushed = pushes.recv() => {
                        if matches!(pushed, Err(broadcast::error::RecvError::Closed)) {
                            return;
                        }
                        for type_url in types {
                            if !send_delta(&shared, &type_url, &mut held, &mut nonce, &responses).await {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }
}

/// Sends what changed for `type_url` relative to what the client holds (always something on
/// a subscription, so the client can mark the type synced). Returns false once the client is
/// gone.
async fn send_delta(
    shared: &Shared,
    type_url: &str,
    held: &mut HashMap<String, HashMap<String, String>>,
    nonce: &mut u64,
    responses: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) -> bool {
    let client = held.entry(type_url.to_string()).or_default();
    let current = lock(&shared.resources)
        .by_type
        .get(type_url)
        .cloned()
        .unwrap_or_default();
    let resources: Vec<Resource> = current
        .iter()
        .filter(|(name, (version, _))| client.get(*name) != Some(version))
        .map(|(name, (version, any))| Resource {
            name: name.clone(),
            version: version.clone(),
            resource: Some(any.clone()),
            ..Resource::default()
        })
        .collect();
    let removed: Vec<String> = client
        .keys()
        .filter(|name| !current.contains_key(*name))
        .cloned()
        .collect();
    *client = current
        .iter()
        .map(|(name, (version, _))| (name.clone(), version.clone()))
        .collect();
    *nonce += 1;
    let response = DeltaDiscoveryResponse {
        type_url: type_url.to_string(),
        resources,
        removed_resources: removed,
        nonce: format!("n{nonce}"),
        ..DeltaDiscoveryResponse::default()
    };
    responses.send(Ok(response)).await.is_ok()
}

struct Ca(Arc<Shared>);

#[tonic::async_trait]
impl IstioCertificateService for Ca {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let authorization = header("authorization");
        let cluster_id = header("clusterid");
        let body = request.into_inner();
        let impersonated = body
            .metadata
            .as_ref()
            .and_then(|metadata| metadata.fields.get("ImpersonatedIdentity"))
            .and_then(|value| match &value.kind {
                Some(prost_types::value::Kind::StringValue(identity)) => Some(identity.clone()),
                _ => None,
            })
            .unwrap_or_default();
        lock(&self.0.ca_calls).push(CaCall {
            impersonated: impersonated.clone(),
            authorization: authorization.clone(),
            cluster_id,
        });
        if authorization != format!("Bearer {TOKEN}") {
            return Err(Status::unauthenticated("bad token"));
        }
        let mode = *lock(&self.0.ca_mode);
        if mode == CaMode::Down {
            return Err(Status::unavailable("fake CA is down"));
        }
        let mut csr = CertificateSigningRequestParams::from_pem(&body.csr)
            .map_err(|error| Status::invalid_argument(format!("csr: {error}")))?;
        let identity = match mode {
            CaMode::WrongIdentity => {
                "spiffe://cluster.local/ns/kube-system/sa/intruder".to_string()
            }
            _ => impersonated,
        };
        let san = rcgen::Ia5String::try_from(identity)
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        csr.params.subject_alt_names = vec![SanType::URI(san)];
        let now = time::OffsetDateTime::now_utc();
        let ttl = *lock(&self.0.ca_ttl);
        csr.params.not_before = now - Duration::from_secs(1);
        csr.params.not_after = now + ttl;
        csr.params.is_ca = IsCa::ExplicitNoCa;
        let leaf = csr
            .signed_by(&self.0.root, &self.0.root_key)
            .map_err(|error| Status::internal(error.to_string()))?;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![leaf.pem(), self.0.root.pem()],
        }))
    }
}

/// An HBONE workload on `node` as istiod describes a pod.
pub fn workload(
    name: &str,
    service_account: &str,
    ip: std::net::Ipv4Addr,
    node: &str,
) -> wl::Workload {
    wl::Workload {
        uid: uid(name),
        name: name.to_string(),
        namespace: "default".to_string(),
        addresses: vec![ip.octets().to_vec()],
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        trust_domain: "cluster.local".to_string(),
        service_account: service_account.to_string(),
        node: node.to_string(),
        workload_type: wl::WorkloadType::Pod as i32,
        ..wl::Workload::default()
    }
}

/// istiod's uid for a pod of namespace `default`.
pub fn uid(name: &str) -> String {
    format!("Kubernetes//Pod/default/{name}")
}

/// An Address resource for `workload`, named by its uid.
pub fn address(workload: wl::Workload) -> (String, prost_types::Any) {
    (
        workload.uid.clone(),
        prost_types::Any {
            type_url: ADDRESS_TYPE.to_string(),
            value: wl::Address {
                r#type: Some(wl::address::Type::Workload(workload)),
            }
            .encode_to_vec(),
        },
    )
}

/// An Authorization resource, named `namespace/name`.
pub fn authorization(policy: security::Authorization) -> (String, prost_types::Any) {
    (
        format!("{}/{}", policy.namespace, policy.name),
        prost_types::Any {
            type_url: AUTHORIZATION_TYPE.to_string(),
            value: policy.encode_to_vec(),
        },
    )
}

/// A namespace-scoped policy of `action` whose one rule matches source principal `principal`.
pub fn principal_policy(
    name: &str,
    action: security::Action,
    principal: &str,
) -> security::Authorization {
    security::Authorization {
        name: name.to_string(),
        namespace: "default".to_string(),
        scope: security::Scope::Namespace as i32,
        action: action as i32,
        rules: vec![security::Rule {
            clauses: vec![security::Clause {
                matches: vec![security::Match {
                    principals: vec![security::StringMatch {
                        match_type: Some(security::string_match::MatchType::Exact(
                            principal.to_string(),
                        )),
                    }],
                    ..security::Match::default()
                }],
            }],
        }],
        ..security::Authorization::default()
    }
}
