//! The gRPC channel to Istio's control plane (layer L2), shared by the xDS client and the Istio
//! CA client: TLS to istiod verified against the istiod root, the node's bearer token and
//! cluster id on every call, and extra headers from the environment.
//!
//! The TCP connection is made by [`SocketFactory::node`] (the one place sockets are made) and
//! TLS by rustls with our provider, instead of tonic's TLS feature, so the agent has one TLS
//! stack and one socket path. The root file and the token file are read again on every new
//! connection and every call, so a rotated istiod root or a refreshed projected token is picked
//! up without a restart.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, Endpoint};

use crate::net::{HttpsAddress, HttpsAddressError};
use crate::socket::{Leg, SocketFactory};

/// Why the channel to the control plane cannot be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// The address is not `https://host:port`.
    #[error("control plane address {address:?}: {reason}")]
    Address {
        /// The address as configured.
        address: String,
        /// What is wrong with it.
        reason: HttpsAddressError,
    },
    /// The name to verify istiod's certificate against is not a DNS name or IP address.
    #[error("control plane address {name:?}: not a valid TLS server name")]
    ServerName {
        /// The address's host, or `altHostname`.
        name: String,
    },
    /// The root certificate (file or inline PEM) is unusable.
    #[error("control plane root {source_name}: {reason}")]
    Root {
        /// The file path, or `inline PEM`.
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// A header name or value is not valid gRPC metadata.
    #[error("header {name:?}: not valid gRPC metadata")]
    Header {
        /// The header name.
        name: String,
    },
    /// The host name could not be resolved.
    #[error("resolving {host}: {source}")]
    Resolve {
        /// host:port.
        host: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// TCP connect failed.
    #[error(transparent)]
    Connect(#[from] crate::socket::SocketError),
    /// The TLS handshake failed.
    #[error("TLS handshake with {host}: {source}")]
    Tls {
        /// The host.
        host: String,
        /// The handshake error.
        source: std::io::Error,
    },
}

/// Where the bearer token comes from: a file re-read per call (a projected service account
/// token is refreshed by the kubelet), or a literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// No token: calls go without `authorization` (a test server, or an istiod that allows it).
    None,
    /// A file with the token.
    File(std::path::PathBuf),
    /// The token itself.
    Literal(String),
}

impl TokenSource {
    /// Istio's `AUTH_TOKEN` rule: an existing path is a file, anything else a literal; unset
    /// means the default projected-token path if it exists.
    pub fn from_setting(setting: Option<&str>, default_path: &Path) -> Self {
        match setting {
            Some("") => TokenSource::None,
            Some(value) if Path::new(value).exists() => TokenSource::File(value.into()),
            Some(value) => TokenSource::Literal(value.to_string()),
            None if default_path.exists() => TokenSource::File(default_path.to_path_buf()),
            None => TokenSource::None,
        }
    }

    fn read(&self) -> Option<String> {
        match self {
            TokenSource::None => None,
            TokenSource::Literal(token) => Some(token.clone()),
            TokenSource::File(path) => match std::fs::read_to_string(path) {
                Ok(token) => Some(token.trim().to_string()),
                Err(error) => {
                    // The call then goes without a token and istiod answers "unauthenticated",
                    // which the caller logs; better than not calling at all.
                    tracing::warn!(path = %path.display(), %error, "cannot read the token file");
                    None
                }
            },
        }
    }
}

/// Where the root that istiod's serving certificate must chain to comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource {
    /// A PEM file, re-read on every connection.
    File(std::path::PathBuf),
    /// PEM text given directly.
    Inline(String),
}

impl RootSource {
    /// Istio's `XDS_ROOT_CA`/`CA_ROOT_CA` rule: a path that exists is a file, otherwise the
    /// value is PEM text (a value that is neither fails when used, naming the path).
    pub fn from_setting(value: &str) -> Self {
        if value.contains("-----BEGIN") {
            RootSource::Inline(value.to_string())
        } else {
            RootSource::File(value.into())
        }
    }

    fn load(&self) -> Result<RootCertStore, ControlPlaneError> {
        let (name, pem) = match self {
            RootSource::Inline(pem) => ("inline PEM".to_string(), pem.clone()),
            RootSource::File(path) => (
                path.display().to_string(),
                std::fs::read_to_string(path).map_err(|error| ControlPlaneError::Root {
                    source_name: path.display().to_string(),
                    reason: error.to_string(),
                })?,
            ),
        };
        let root_error = |reason: String| ControlPlaneError::Root {
            source_name: name.clone(),
            reason,
        };
        let certificates =
            crate::tls::pem_certificates(&pem).map_err(|error| root_error(error.to_string()))?;
        let mut store = RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(certificates);
        if added == 0 {
            return Err(root_error("no usable certificate".to_string()));
        }
        Ok(store)
    }
}

/// How to reach one control-plane service (istiod's xDS or CA endpoint).
#[derive(Debug, Clone)]
pub struct ControlPlane {
    uri: Uri,
    host: String,
    port: u16,
    server_name: String,
    root: RootSource,
    token: TokenSource,
    metadata: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    connect_timeout: Duration,
}

/// Everything a [`ControlPlane`] is built from.
#[derive(Debug, Clone)]
pub struct ControlPlaneSettings {
    /// `https://host:port` (a missing scheme means https).
    pub address: String,
    /// The root istiod's certificate chains to.
    pub root: RootSource,
    /// Name to verify istiod's certificate against instead of the address's host.
    pub alt_hostname: Option<String>,
    /// The bearer token.
    pub token: TokenSource,
    /// Sent as the `clusterid` header.
    pub cluster_id: String,
    /// Extra headers (`XDS_HEADER_<NAME>` / `CA_HEADER_<NAME>`).
    pub headers: BTreeMap<String, String>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
}

impl ControlPlane {
    /// Checks the settings (address, header names) without connecting.
    pub fn new(settings: ControlPlaneSettings) -> Result<Self, ControlPlaneError> {
        let HttpsAddress { uri, host, port } =
            settings
                .address
                .parse()
                .map_err(|reason| ControlPlaneError::Address {
                    address: settings.address.clone(),
                    reason,
                })?;
        let mut metadata = Vec::new();
        let mut headers = settings.headers.clone();
        if !settings.cluster_id.is_empty() {
            headers.insert("clusterid".to_string(), settings.cluster_id.clone());
        }
        for (name, value) in headers {
            let key = AsciiMetadataKey::from_str(&name.to_ascii_lowercase())
                .map_err(|_| ControlPlaneError::Header { name: name.clone() })?;
            let value = AsciiMetadataValue::from_str(&value)
                .map_err(|_| ControlPlaneError::Header { name: name.clone() })?;
            metadata.push((key, value));
        }
        Ok(ControlPlane {
            uri,
            server_name: settings.alt_hostname.unwrap_or_else(|| host.clone()),
            host,
            port,
            root: settings.root,
            token: settings.token,
            metadata,
            connect_timeout: settings.connect_timeout,
        })
    }

    /// The address, for logs.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// A channel that connects on first use and reconnects after failures, each time reading
    /// the root again.
    pub fn channel(&self) -> Channel {
        let target = Arc::new(self.clone());
        let connector = tower::service_fn(move |_: Uri| {
            let target = target.clone();
            async move { target.connect().await.map(TokioIo::new) }
        });
        Endpoint::from(self.uri.clone())
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_with_connector_lazy(connector)
    }

    /// An interceptor that authorizes every call of a generated client.
    pub fn interceptor(&self) -> Authorize {
        Authorize(self.clone())
    }

    /// Adds the token and headers to a request's metadata (tonic interceptors are synchronous;
    /// the token file is small and read once per call).
    pub fn authorize(&self, metadata: &mut MetadataMap) {
        if let Some(token) = self.token.read() {
            match AsciiMetadataValue::from_str(&format!("Bearer {token}")) {
                Ok(value) => {
                    metadata.insert("authorization", value);
                }
                Err(_) => tracing::warn!("the token is not valid header text; sent without it"),
            }
        }
        for (key, value) in &self.metadata {
            metadata.insert(key.clone(), value.clone());
        }
    }

    async fn connect(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ControlPlaneError> {
        let roots = self.root.load()?;
        let hostport = self.address();
        let address = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|source| ControlPlaneError::Resolve {
                host: hostport.clone(),
                source,
            })?
            .next()
            .ok_or_else(|| ControlPlaneError::Resolve {
                host: hostport.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
            })?;
        let tcp = SocketFactory::node()
            .connect(address, None, Leg::Network, self.connect_timeout)
            .await?;
        let mut config = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|error| ControlPlaneError::Tls {
                host: hostport.clone(),
                source: std::io::Error::other(error),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![crate::tls::ALPN_H2.to_vec()];
        let server_name = ServerName::try_from(self.server_name.clone()).map_err(|_| {
            ControlPlaneError::ServerName {
                name: self.server_name.clone(),
            }
        })?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map_err(|source| ControlPlaneError::Tls {
                host: hostport,
                source,
            })
    }
}

/// Adds the bearer token and headers to each call (see [`ControlPlane::interceptor`]).
#[derive(Debug, Clone)]
pub struct Authorize(ControlPlane);

impl tonic::service::Interceptor for Authorize {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        self.0.authorize(request.metadata_mut());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_setting_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "abc\n").expect("write");
        let missing = dir.path().join("missing");
        let path = file.to_str().expect("utf8");
        assert_eq!(
            TokenSource::from_setting(Some(path), &missing),
            TokenSource::File(file.clone())
        );
        assert_eq!(
            TokenSource::File(file.clone()).read().as_deref(),
            Some("abc")
        );
        assert_eq!(
            TokenSource::from_setting(Some("literal-token"), &missing),
            TokenSource::Literal("literal-token".to_string())
        );
        assert_eq!(
            TokenSource::from_setting(Some(""), &file),
            TokenSource::None
        );
        assert_eq!(
            TokenSource::from_setting(None, &file),
            TokenSource::File(file.clone())
        );
        assert_eq!(TokenSource::from_setting(None, &missing), TokenSource::None);
    }

    #[test]
    fn cluster_id_and_headers_become_metadata() {
        let plane = ControlPlane::new(ControlPlaneSettings {
            address: "istiod:15012".to_string(),
            root: RootSource::Inline(String::new()),
            alt_hostname: None,
            token: TokenSource::Literal("t0k".to_string()),
            cluster_id: "cluster-1".to_string(),
            headers: BTreeMap::from([("X-Extra".to_string(), "yes".to_string())]),
            connect_timeout: Duration::from_secs(1),
        })
        .expect("valid settings");
        let mut metadata = MetadataMap::new();
        plane.authorize(&mut metadata);
        assert_eq!(
            metadata.get("authorization").and_then(|v| v.to_str().ok()),
            Some("Bearer t0k")
        );
        assert_eq!(
            metadata.get("clusterid").and_then(|v| v.to_str().ok()),
            Some("cluster-1")
        );
        assert_eq!(
            metadata.get("x-extra").and_then(|v| v.to_str().ok()),
            Some("yes")
        );
        let bad = ControlPlane::new(ControlPlaneSettings {
            address: "istiod:15012".to_string(),
            root: RootSource::Inline(String::new()),
            alt_hostname: None,
            token: TokenSource::None,
            cluster_id: String::new(),
            headers: BTreeMap::from([("bad header".to_string(), "x".to_string())]),
            connect_timeout: Duration::from_secs(1),
        });
        assert!(matches!(bad, Err(ControlPlaneError::Header { .. })));
    }
}
