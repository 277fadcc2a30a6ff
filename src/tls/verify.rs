//! The SPIFFE verifiers (layer L2): chain verification delegated to webpki with our provider's
//! algorithms, then an identity check on the leaf's URI SANs. A refusal here fails the
//! handshake, so a peer with the wrong identity never gets an HBONE stream.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use x509_parser::error::X509Error;

use super::chains::VerifiedChains;
use super::{provider, spiffe_identities};
use crate::spiffe::Identity;

/// Why a peer's (chain-valid) certificate was refused on identity grounds.
///
/// rustls renders a custom certificate error with `Debug`, so `Debug` prints the message:
/// handshake errors then read "server identity … is not one of […]".
#[derive(thiserror::Error)]
pub enum PeerIdentityError {
    /// The server's leaf names none of the identities the client expected.
    #[error("server identity {seen} is not one of [{expected}]")]
    UnexpectedServer {
        /// SPIFFE identities in the server's leaf.
        seen: IdentityList,
        /// Identities the client accepts.
        expected: IdentityList,
    },
    /// The client's identity belongs to another trust domain than ours.
    #[error("client identity {seen} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The client's identity (first SPIFFE URI SAN).
        seen: Identity,
        /// Our trust domain.
        trust_domain: String,
    },
    /// The leaf has no URI SAN that is a SPIFFE identity.
    #[error("peer certificate has no SPIFFE identity")]
    NoIdentity,
    /// The leaf passed chain verification but its extensions cannot be read.
    #[error("peer certificate cannot be parsed: {0}")]
    Parse(#[source] X509Error),
}

impl fmt::Debug for PeerIdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// Identities shown in an error, comma separated (`-` for none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityList(pub Vec<Identity>);

impl fmt::Display for IdentityList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("-");
        }
        for (index, identity) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{identity}")?;
        }
        Ok(())
    }
}

impl From<PeerIdentityError> for rustls::Error {
    fn from(error: PeerIdentityError) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
    }
}

/// Reads the leaf's SPIFFE identities, refusing a leaf that has none.
fn leaf_identities(leaf: &CertificateDer<'_>) -> Result<Vec<Identity>, PeerIdentityError> {
    let identities = spiffe_identities(leaf).map_err(PeerIdentityError::Parse)?;
    if identities.is_empty() {
        return Err(PeerIdentityError::NoIdentity);
    }
    Ok(identities)
}

/// Server-side client verifier: the chain must verify to our roots (webpki, client-auth EKU),
/// then the client's identity — the first SPIFFE URI SAN, the one authorization will see — must
/// be in our trust domain. Checking the first rather than any SAN keeps a foreign identity from
/// reaching policy behind a second, local one.
#[derive(Debug)]
pub struct TrustDomainVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    /// Client chains that passed `chain`, remembered for their next handshake.
    verified: VerifiedChains,
}

impl TrustDomainVerifier {
    /// Fails if `roots` is empty.
    pub fn new(
        roots: Arc<RootCertStore>,
        trust_domain: &str,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let chain = WebPkiClientVerifier::builder_with_provider(roots, provider()).build()?;
        Ok(TrustDomainVerifier {
            chain,
            trust_domain: trust_domain.to_string(),
            verified: VerifiedChains::default(),
        })
    }
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let identities = self.verified.verify(end_entity, intermediates, now, || {
            self.chain
                .verify_client_cert(end_entity, intermediates, now)?;
            Ok::<_, rustls::Error>(leaf_identities(end_entity)?)
        })?;
        let Some(identity) = identities.into_iter().next() else {
            return Err(PeerIdentityError::NoIdentity.into());
        };
        if identity.trust_domain() != self.trust_domain {
            tracing::debug!(client = %identity, trust_domain = %self.trust_domain, "refusing client from another trust domain");
            return Err(PeerIdentityError::ForeignTrustDomain {
                seen: identity,
                trust_domain: self.trust_domain.clone(),
            }
            .into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// Client-side server verifier: the chain must verify to our roots (webpki, server-auth EKU),
/// then any SPIFFE URI SAN of the server's leaf must equal any expected identity, byte for byte.
/// The TLS server name is ignored: identity, not name, is what HBONE authenticates.
#[derive(Debug)]
pub struct ServerIdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
    /// Server chains that passed verification to `roots`; shared by every verifier made for
    /// the same roots with [`Self::sharing`].
    verified: Arc<VerifiedChains>,
}

impl ServerIdentityVerifier {
    /// An empty `expected` refuses every server.
    pub fn new(roots: Arc<RootCertStore>, expected: Vec<Identity>) -> Self {
        Self::sharing(roots, Arc::default(), expected)
    }

    /// [`Self::new`] remembering verified chains in `verified`, which must only ever be used
    /// with these same `roots` (a chain verified to other roots proves nothing here).
    pub fn sharing(
        roots: Arc<RootCertStore>,
        verified: Arc<VerifiedChains>,
        expected: Vec<Identity>,
    ) -> Self {
        ServerIdentityVerifier {
            roots,
            expected,
            algorithms: provider().signature_verification_algorithms,
            verified,
        }
    }
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = self.verified.verify(end_entity, intermediates, now, || {
            let leaf = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &leaf,
                &self.roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
            Ok::<_, rustls::Error>(leaf_identities(end_entity)?)
        })?;
        if seen.iter().any(|identity| self.expected.contains(identity)) {
            return Ok(ServerCertVerified::assertion());
        }
        let error = PeerIdentityError::UnexpectedServer {
            seen: IdentityList(seen),
            expected: IdentityList(self.expected.clone()),
        };
        tracing::debug!(%error, "refusing server");
        Err(error.into())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Serves one certificate to every handshake, on both sides. A rotated certificate gets a new
/// config (and a new resolver), so open sessions keep the key they started with.
#[derive(Debug)]
pub(super) struct AlwaysResolves(pub(super) Arc<CertifiedKey>);

impl ResolvesServerCert for AlwaysResolves {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for AlwaysResolves {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
