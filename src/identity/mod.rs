//! Workload certificates (layer L2): where a workload's certificate comes from, the value that
//! carries it to TLS, and the cache that keeps one valid certificate per identity.
//!
//! Where it sits: before a connection is proxied, the proxy asks the [`CertificateManager`] for
//! the certificate of the local workload's identity, then takes a TLS config from the returned
//! [`WorkloadCertificate`] (`tls` builds them). Certificates come from a [`CertificateSource`]:
//! the built-in CA ([`ca::BuiltinCa`], standalone mode) or the Istio CA
//! ([`istio_ca::IstioCa`]). The
//! manager deduplicates concurrent issues, rotates at half-life in the background and never
//! hands out an expired certificate.

pub mod ca;
pub mod istio_ca;
mod manager;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::spiffe::Identity;

pub use manager::{CertificateError, CertificateManager, CertificateState, CertificateStatus};

/// Why a certificate source could not produce a certificate (or a CA could not start).
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Only one of `ca.certFile` and `ca.keyFile` is set; a root needs both.
    #[error("ca.certFile and ca.keyFile must be set together")]
    IncompleteFiles,
    /// The state directory holds one of the root files but not the other; refusing to guess
    /// rather than silently replacing a root that peers may trust.
    #[error("{present} exists but {missing} does not; restore it or remove both")]
    PartialState {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file or directory could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The root certificate is not PEM, not X.509, or not a CA.
    #[error("root certificate is not usable: {0}")]
    RootCertificate(#[source] rcgen::Error),
    /// The root key is not a PEM private key of a supported kind.
    #[error("root key is not usable: {0}")]
    RootKey(#[source] rcgen::Error),
    /// The root key does not belong to the root certificate.
    #[error("root key does not match the root certificate's public key")]
    KeyMismatch,
    /// The root certificate is expired or not yet valid: every leaf it signs would be refused.
    #[error("root certificate is outside its validity period")]
    RootExpired,
    /// The configured certificate lifetime is zero or absurdly long.
    #[error("workload certificate ttl {0:?} is not between 1s and 10 years")]
    InvalidTtl(Duration),
    /// Generating a key or signing a certificate failed.
    #[error("signing failed: {0}")]
    Sign(#[source] rcgen::Error),
    /// A call to the Istio CA failed (unreachable, refused, timed out).
    #[error("Istio CA {address}: {message}")]
    Call {
        /// The CA's address.
        address: String,
        /// What happened.
        message: String,
    },
    /// The Istio CA answered with a certificate we must not use.
    #[error("Istio CA response refused: {0}")]
    BadResponse(String),
    /// The issued certificate material is not usable (see [`InvalidCertificate`]).
    #[error(transparent)]
    Certificate(#[from] InvalidCertificate),
}

/// Why certificate material cannot become a [`WorkloadCertificate`].
#[derive(Debug, thiserror::Error)]
pub enum InvalidCertificate {
    /// The chain has no leaf.
    #[error("certificate chain is empty")]
    EmptyChain,
    /// No trust root was given, or none could be used as a trust anchor.
    #[error("no usable trust root")]
    NoRoots,
    /// The leaf cannot be parsed.
    #[error("leaf certificate cannot be parsed: {0}")]
    Parse(#[source] x509_parser::error::X509Error),
    /// The leaf has no URI SAN that is a SPIFFE identity.
    #[error("leaf certificate has no SPIFFE identity")]
    NoIdentity,
    /// The key is unusable or the TLS configs cannot be built from the material.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Where workload certificates come from: the built-in CA or the Istio CA. Object safe so the
/// manager holds either as `Arc<dyn CertificateSource>`; the future owns no borrow beyond
/// `self`, so callers may drop it at any time.
pub trait CertificateSource: Send + Sync + fmt::Debug {
    /// Issues a fresh certificate (new key) for `identity`. The returned certificate's identity
    /// must be `identity`; the manager refuses it otherwise.
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, CaError>> + Send + 'a>>;
}

/// One workload's certificate, key and trust roots, plus the TLS configs made from them.
///
/// Immutable: rotation makes a new value. Connections hold an `Arc` of the config they started
/// with, so a rotation never disturbs an open session.
pub struct WorkloadCertificate {
    identity: Identity,
    chain: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    /// The roots as given (the store keeps only trust anchors), for the admin dump.
    root_certificates: Vec<CertificateDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
    server_config: Arc<ServerConfig>,
    client_template: ClientConfig,
    /// Server chains verified to `roots` by the client configs of this certificate.
    verified_servers: Arc<crate::tls::VerifiedChains>,
}

impl WorkloadCertificate {
    /// Builds a certificate from a chain (leaf first; a copy of a trust root in it is dropped,
    /// roots are never sent), its private key, and the trust roots (several during a root
    /// rotation). The identity and validity are read from the leaf, not taken on trust; the
    /// key must match the leaf. The server config is built here, once.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, InvalidCertificate> {
        let chain: Vec<_> = chain.into_iter().filter(|c| !roots.contains(c)).collect();
        let leaf = chain.first().ok_or(InvalidCertificate::EmptyChain)?;
        let (not_before, not_after) = validity(leaf)?;
        let identity = crate::tls::spiffe_identities(leaf)
            .map_err(InvalidCertificate::Parse)?
            .into_iter()
            .next()
            .ok_or(InvalidCertificate::NoIdentity)?;
        let mut store = RootCertStore::empty();
        let root_certificates = roots.clone();
        let (added, _ignored) = store.add_parsable_certificates(roots);
        if added == 0 {
            return Err(InvalidCertificate::NoRoots);
        }
        let roots = Arc::new(store);
        let certified = crate::tls::certified_key(chain.clone(), key)?;
        let server_config =
            crate::tls::server_config(certified.clone(), roots.clone(), identity.trust_domain())?;
        let client_template = crate::tls::client_config(certified, roots.clone(), &[])?;
        Ok(WorkloadCertificate {
            identity,
            chain,
            roots,
            root_certificates,
            not_before,
            not_after,
            server_config,
            client_template,
            verified_servers: Arc::default(),
        })
    }

    /// The identity the leaf certifies.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Leaf first, then intermediates; never a root.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The roots peers' chains are verified against.
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    /// The trust roots as they were given, DER.
    pub fn root_certificates(&self) -> &[CertificateDer<'static>] {
        &self.root_certificates
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity; after it the certificate must not be used.
    pub fn expires_at(&self) -> SystemTime {
        self.not_after
    }

    /// Half-life, when rotation starts: early enough that a failing CA has half the lifetime
    /// to recover before connections are refused.
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime / 2
    }

    /// The config of the HBONE listener of this workload: presents this certificate, requires
    /// a client from the same trust domain. Built once per certificate.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config.clone()
    }

    /// A config for dialing a peer that must present one of `expected`, presenting this
    /// certificate. Cheap: shares the key and settings of a template built once.
    pub fn client_config(&self, expected: &[Identity]) -> Arc<ClientConfig> {
        crate::tls::expecting(
            &self.client_template,
            self.roots.clone(),
            self.verified_servers.clone(),
            expected,
        )
    }
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("chain_len", &self.chain.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The leaf's validity period as `SystemTime`s.
fn validity(leaf: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), InvalidCertificate> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| match e {
        x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => {
            InvalidCertificate::Parse(e)
        }
        x509_parser::nom::Err::Incomplete(_) => {
            InvalidCertificate::Parse(x509_parser::error::X509Error::InvalidCertificate)
        }
    })?;
    let to_system = |t: x509_parser::time::ASN1Time| {
        let seconds = t.timestamp();
        if seconds >= 0 {
            UNIX_EPOCH + Duration::from_secs(seconds.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
        }
    };
    let validity = parsed.validity();
    Ok((
        to_system(validity.not_before),
        to_system(validity.not_after),
    ))
}

#[cfg(test)]
mod tests;

/// Until when a connection authenticated with `own` and a peer presenting `peer_chain` (leaf
/// first) may carry new streams: the earlier of the two leaves' expiry.
pub fn connection_valid_until(
    own: &WorkloadCertificate,
    peer_chain: Option<&[CertificateDer<'_>]>,
) -> SystemTime {
    let peer = peer_chain
        .and_then(|chain| chain.first())
        .and_then(|leaf| validity(leaf).ok())
        .map(|(_, not_after)| not_after);
    peer.map_or(own.expires_at(), |peer| peer.min(own.expires_at()))
}
