//! The Istio CA as a certificate source (layer L2): `CreateCertificate` on istiod with a fresh
//! P-256 key's CSR, the node's token and `ImpersonatedIdentity` (istiod lets the node agent
//! of a node mint certificates for the pods on it).
//!
//! A response is used only after checking it: the leaf names exactly the requested identity
//! and nothing else, and chains (through any intermediates) to one of the returned roots. The
//! roots are every self-signed certificate of the response, so a bundle with an old and a new
//! root during a root rotation verifies peers of both. Caching, rotation at half-life, retry
//! with backoff and fail-closed expiry are the [`super::CertificateManager`]'s.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::RootCertStore;
use tonic::transport::Channel;

use super::{CaError, CertificateSource, WorkloadCertificate};
use crate::control_plane::ControlPlane;
use crate::proto::citadel::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::citadel::IstioCertificateRequest;
use crate::spiffe::Identity;

/// Longest wait for one `CreateCertificate` call; the manager retries after it.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Certificates from istiod.
#[derive(Debug)]
pub struct IstioCa {
    control_plane: ControlPlane,
    channel: Channel,
    ttl: Duration,
}

impl IstioCa {
    /// A client of `control_plane` asking for certificates valid for `ttl`. Connects lazily.
    pub fn new(control_plane: ControlPlane, ttl: Duration) -> Self {
        IstioCa {
            channel: control_plane.channel(),
            control_plane,
            ttl,
        }
    }

    async fn create(&self, identity: &Identity) -> Result<WorkloadCertificate, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = rcgen::Ia5String::try_from(identity.to_string()).map_err(CaError::Sign)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&key)
            .and_then(|request| request.pem())
            .map_err(CaError::Sign)?;
        let request = IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(prost_types::Struct {
                fields: [(
                    "ImpersonatedIdentity".to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
                    },
                )]
                .into(),
            }),
        };
        let mut client = IstioCertificateServiceClient::with_interceptor(
            self.channel.clone(),
            self.control_plane.interceptor(),
        );
        let call = client.create_certificate(request);
        let response = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| CaError::Call {
                address: self.control_plane.address(),
                message: format!("no answer within {CALL_TIMEOUT:?}"),
            })?
            .map_err(|status| CaError::Call {
                address: self.control_plane.address(),
                message: format!("{:?}: {}", status.code(), status.message()),
            })?
            .into_inner();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        checked_certificate(identity, &response.cert_chain, key, UnixTime::now())
    }
}

impl CertificateSource for IstioCa {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, CaError>> + Send + 'a>> {
        Box::pin(self.create(identity))
    }
}

fn refused(reason: impl Into<String>) -> CaError {
    CaError::BadResponse(reason.into())
}

/// Turns a `cert_chain` (leaf first, roots last; an entry may hold several PEM blocks) into a
/// certificate for `identity`, or says why it cannot be trusted.
pub fn checked_certificate(
    identity: &Identity,
    cert_chain: &[String],
    key: PrivateKeyDer<'static>,
    now: UnixTime,
) -> Result<WorkloadCertificate, CaError> {
    let mut certificates = Vec::new();
    for (index, pem) in cert_chain.iter().enumerate() {
        certificates.extend(
            crate::tls::pem_certificates(pem)
                .map_err(|error| refused(format!("cert_chain[{index}]: {error}")))?,
        );
    }
    let mut certificates = certificates.into_iter();
    let leaf = certificates
        .next()
        .ok_or_else(|| refused("cert_chain is empty"))?;
    let (roots, intermediates): (Vec<_>, Vec<_>) =
        certificates.partition(|certificate| is_self_signed(certificate));
    if roots.is_empty() {
        return Err(refused("no root certificate in cert_chain"));
    }
    let named = crate::tls::spiffe_identities(&leaf)
        .map_err(|error| refused(format!("leaf cannot be parsed: {error}")))?;
    if named.as_slice() != std::slice::from_ref(identity) {
        let named: Vec<String> = named.iter().map(ToString::to_string).collect();
        return Err(refused(format!(
            "leaf names [{}], asked for exactly {identity}",
            named.join(", ")
        )));
    }
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(roots.iter().cloned());
    if added == 0 {
        return Err(refused("no usable root certificate in cert_chain"));
    }
    let parsed = ParsedCertificate::try_from(&leaf)
        .map_err(|error| refused(format!("leaf cannot be parsed: {error}")))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &store,
        &intermediates,
        now,
        crate::tls::provider().signature_verification_algorithms.all,
    )
    .map_err(|error| {
        refused(format!(
            "leaf does not chain to the returned roots: {error}"
        ))
    })?;
    let mut chain = vec![leaf];
    chain.extend(intermediates);
    Ok(WorkloadCertificate::new(chain, key, roots)?)
}

fn is_self_signed(certificate: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(certificate.as_ref())
        .map(|(_, parsed)| parsed.subject().as_raw() == parsed.issuer().as_raw())
        .unwrap_or(false)
}

#[cfg(test)]
#[path = "istio_ca_tests.rs"]
mod tests;
