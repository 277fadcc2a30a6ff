//! TLS for HBONE (layer L2): the rustls configurations a workload uses on port 15008 and the
//! SPIFFE verifiers that decide whether a peer's certificate names an acceptable identity.
//!
//! Where it sits: the outbound side dials a peer with a [`rustls::ClientConfig`] built here that
//! accepts only the identities the route decision expects; the inbound HBONE listener accepts
//! with a [`rustls::ServerConfig`] that requires a client certificate from our own trust domain;
//! both read the peer's identity afterwards with [`peer_identity`]. The configs are built once
//! per workload certificate by `identity::WorkloadCertificate`, which owns the key material.
//!
//! Settings (shared/reference/istio-compat.md §2.4–2.5): TLS 1.3 only, suites exactly
//! `TLS13_AES_128_GCM_SHA256` and `TLS13_AES_256_GCM_SHA384` (order: [`provider_for`]), ALPN
//! `h2` on both sides, no SNI,
//! no session resumption, client certificate mandatory, key exchange X25519 unless
//! `COMPLIANCE_POLICY=pqc` asks for X25519MLKEM768 only ([`KeyExchange`]). Chains are verified to
//! the roots that came with our own certificate; identities are compared byte for byte.

mod batched;
mod chains;
mod verify;

pub use batched::BatchedReads;
pub use chains::VerifiedChains;

use std::sync::{Arc, LazyLock, OnceLock};

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::VerifierBuilderError;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, CommonState, RootCertStore, ServerConfig};
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;

use crate::spiffe::Identity;

pub use verify::{IdentityList, PeerIdentityError, ServerIdentityVerifier, TrustDomainVerifier};

/// The only application protocol HBONE speaks over TLS.
pub const ALPN_H2: &[u8] = b"h2";

/// How much an HBONE connection's TLS may hold encrypted and not yet taken by the socket
/// (rustls' buffer limit, applied with `set_buffer_limit` once the handshake is done; rustls'
/// default is 64 KiB). rustls takes plaintext only up to this limit per write, and tokio-rustls
/// flushes each write with one `writev`: at 64 KiB an HTTP/2 frame of an app's 256 KiB read
/// took four `writev` calls, each with its own TCP push (`perf stat` of the client's agent
/// during one bulk stream: 161 000 `writev` in 10 s, 67 000 at 256 KiB, and 9 % less CPU per
/// byte in that agent). One record more than 256 KiB, so that a frame of the default size
/// (`proxy.frameSize`) goes out with its head in one `writev`, not a second one for the last
/// few hundred bytes. It fills only while the peer's socket is full, once per connection, not
/// per stream: like the kernel's socket buffer it is outside the memory budget's accounting
/// ([`crate::proxy::budget`]), small beside the 2 × 4 MiB a connection reserves there.
pub const SEND_BUFFER_LIMIT: usize = 272 * 1024;

/// Why a TLS configuration could not be built from a workload's certificate material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The trust roots are empty or not usable as trust anchors for client verification.
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] VerifierBuilderError),
    /// The private key is of an unsupported kind or does not belong to the leaf certificate.
    #[error("workload private key is unusable: {0}")]
    Key(#[source] rustls::Error),
    /// rustls refused the protocol settings (a programming error in the provider setup).
    #[error("TLS settings refused: {0}")]
    Settings(#[source] rustls::Error),
}

/// Which key exchanges TLS offers and accepts, for the process's life (ztunnel's
/// `COMPLIANCE_POLICY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyExchange {
    /// X25519 first, so a ClientHello carries one cheap key share, then P-256 and P-384, and the
    /// hybrid X25519MLKEM768 last: a peer that insists on the hybrid (ztunnel with
    /// `COMPLIANCE_POLICY=pqc`) gets it when it dials us, and after one HelloRetryRequest when
    /// we dial it.
    #[default]
    Classical,
    /// Only X25519MLKEM768 (`COMPLIANCE_POLICY=pqc`): a peer without it cannot handshake.
    PostQuantumOnly,
}

static KEY_EXCHANGE: OnceLock<KeyExchange> = OnceLock::new();

static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
    Arc::new(provider_for(
        *KEY_EXCHANGE.get_or_init(KeyExchange::default),
    ))
});

/// Fixes the key exchange of every TLS config this process builds. Call it before the first
/// config is built; once one is, the choice cannot change, and a different `policy` is refused
/// with the one in force.
pub fn set_key_exchange(policy: KeyExchange) -> Result<(), KeyExchange> {
    let fixed = *KEY_EXCHANGE.get_or_init(|| policy);
    if fixed == policy {
        Ok(())
    } else {
        Err(fixed)
    }
}

/// aws-lc-rs (the provider Istio's ztunnel is built with) restricted to the two AES-GCM TLS 1.3
/// suites, with the key exchanges of `key_exchange`.
///
/// The suites are ztunnel's, but the order follows the key exchange's strength. With a classical
/// exchange (X25519, P-256: ~128-bit security) AES-128-GCM-SHA256 comes first: AES-256 adds no
/// strength over a 128-bit exchange, while its SHA-384 key schedule and transcript run without
/// vector code on this CPU family (aws-lc, like BoringSSL, uses the plain SHA-512 on AMD) and
/// cost both agents ~50 µs per new connection, where SHA-256 runs on the SHA extensions; AES-128
/// also takes four rounds of fourteen off every record. With the post-quantum hybrid AES-256 comes
/// first, as ztunnel, for margin against Grover. Servers follow the client's order (rustls'
/// default), so a ztunnel dialing us still gets the AES-256 it asks for first.
pub fn provider_for(key_exchange: KeyExchange) -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider, kx_group};
    let mut provider = default_provider();
    provider.cipher_suites = match key_exchange {
        KeyExchange::Classical => vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
        ],
        KeyExchange::PostQuantumOnly => vec![
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_AES_128_GCM_SHA256,
        ],
    };
    provider.kx_groups = match key_exchange {
        KeyExchange::Classical => vec![
            kx_group::X25519,
            kx_group::SECP256R1,
            kx_group::SECP384R1,
            kx_group::X25519MLKEM768,
        ],
        KeyExchange::PostQuantumOnly => vec![kx_group::X25519MLKEM768],
    };
    provider
}

/// The process's provider ([`provider_for`] the key exchange of [`set_key_exchange`]). Every
/// config and verifier in this module uses it, so signature algorithms, suites and key
/// exchanges cannot drift between sides.
pub fn provider() -> Arc<CryptoProvider> {
    PROVIDER.clone()
}

/// Pairs a certificate chain (leaf first, never the root) with its private key, checking that
/// the key is supported and belongs to the leaf, so a bad pair fails here and not mid-handshake.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let signing_key = PROVIDER
        .key_provider
        .load_private_key(key)
        .map_err(TlsError::Key)?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(TlsError::Key)?;
    Ok(Arc::new(certified))
}

/// Server side of port 15008: presents `cert`, requires a client certificate that chains to
/// `roots` and whose identity is in `trust_domain` (see [`TrustDomainVerifier`]).
pub fn server_config(
    cert: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = TrustDomainVerifier::new(roots, trust_domain)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Settings)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(verify::AlwaysResolves(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Our clients never resume, so tickets would only cost bytes.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side of HBONE: presents `cert` and accepts only a server whose leaf chains to `roots`
/// and names one of `expected` (see [`ServerIdentityVerifier`]). An empty `expected` accepts no
/// server. The returned value can be re-targeted cheaply with [`expecting`].
pub fn client_config(
    cert: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    expected: &[Identity],
) -> Result<ClientConfig, TlsError> {
    let verifier = ServerIdentityVerifier::new(roots, expected.to_vec());
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Settings)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(verify::AlwaysResolves(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // The server name is not checked (identity is); SNI would only leak it.
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// A copy of `template` (from [`client_config`]) that accepts only servers naming one of
/// `expected`. Everything else, including the client certificate, is shared, and so are the
/// server chains verified to `roots` (`verified` must belong to these roots alone).
pub fn expecting(
    template: &ClientConfig,
    roots: Arc<RootCertStore>,
    verified: Arc<VerifiedChains>,
    expected: &[Identity],
) -> Arc<ClientConfig> {
    let mut config = template.clone();
    config
        .dangerous()
        .set_certificate_verifier(Arc::new(ServerIdentityVerifier::sharing(
            roots,
            verified,
            expected.to_vec(),
        )));
    Arc::new(config)
}

/// The server name given to rustls on connect: never sent (SNI off) and never checked.
pub fn dummy_server_name() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
}

/// The SPIFFE identities in the URI SANs of a DER certificate, in certificate order. URI SANs
/// that are not identities of the accepted shape are skipped (logged at debug); other SAN kinds
/// are ignored. Fails only if the certificate itself cannot be parsed.
pub fn spiffe_identities(cert: &CertificateDer<'_>) -> Result<Vec<Identity>, X509Error> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| match e {
        x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
        x509_parser::nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
    })?;
    let Some(san) = parsed.subject_alternative_name()? else {
        return Ok(Vec::new());
    };
    let identities = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => match uri.parse::<Identity>() {
                Ok(identity) => Some(identity),
                Err(error) => {
                    tracing::debug!(uri, %error, "ignoring URI SAN that is not a SPIFFE identity");
                    None
                }
            },
            _ => None,
        })
        .collect();
    Ok(identities)
}

/// The identity of the peer of an established connection: the first URI SAN of its leaf
/// certificate that is a SPIFFE identity. `None` before the handshake or if there is none
/// (which our verifiers never let through).
pub fn peer_identity(connection: &CommonState) -> Option<Identity> {
    let leaf = connection.peer_certificates()?.first()?;
    spiffe_identities(leaf).ok()?.into_iter().next()
}

/// Why a PEM string holds no usable certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    /// A block is malformed (the PEM parser's reason).
    #[error("not PEM certificates: {0}")]
    Malformed(String),
    /// No `CERTIFICATE` block at all.
    #[error("no PEM certificate found")]
    Empty,
}

/// Every `CERTIFICATE` block of `pem`, in order, as DER. Used for roots and CA responses, where
/// one string may hold a bundle.
pub fn pem_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    use rustls::pki_types::pem::PemObject;
    let certificates = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| PemError::Malformed(error.to_string()))?;
    if certificates.is_empty() {
        return Err(PemError::Empty);
    }
    Ok(certificates)
}

#[cfg(test)]
pub(crate) mod tests;
