//! A hand-driven HBONE client for attacks on a pod's 15008: TLS 1.3 with ALPN `h2` and a client
//! certificate of the test's choosing (from the shared root, from a foreign root, or none), then
//! the HTTP/2 preface and a CONNECT written frame by frame. It reports whether the server spoke
//! HTTP/2 back or refused the connection.
//!
//! The probe trusts any server certificate: it plays the attacker, and what is under test is the
//! server's verification of *our* certificate.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::agent::Ca;

/// A client certificate chain and its key.
#[derive(Debug)]
pub struct ClientCert {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 key of the leaf.
    pub key: PrivateKeyDer<'static>,
}

/// A leaf with URI SAN `spiffe` signed by the test's shared root.
pub fn leaf_from_root(ca: &Ca, spiffe: &str) -> Result<ClientCert> {
    let key_pem = std::fs::read_to_string(&ca.key)?;
    let cert_pem = std::fs::read_to_string(&ca.cert)?;
    let issuer_key = rcgen::KeyPair::from_pem(&key_pem).context("parsing the CA key")?;
    let issuer = rcgen::CertificateParams::from_ca_cert_pem(&cert_pem)
        .context("parsing the CA certificate")?
        .self_signed(&issuer_key)?;
    leaf(spiffe, &issuer, &issuer_key, Validity::Current)
}

/// When a test leaf is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From an hour ago to an hour from now.
    Current,
    /// Ended an hour ago.
    Expired,
    /// Starts in an hour.
    NotYetValid,
}

/// [`leaf_from_root`] with the validity period of the test's choosing.
pub fn leaf_from_root_valid(ca: &Ca, spiffe: &str, validity: Validity) -> Result<ClientCert> {
    let key_pem = std::fs::read_to_string(&ca.key)?;
    let cert_pem = std::fs::read_to_string(&ca.cert)?;
    let issuer_key = rcgen::KeyPair::from_pem(&key_pem).context("parsing the CA key")?;
    let issuer = rcgen::CertificateParams::from_ca_cert_pem(&cert_pem)
        .context("parsing the CA certificate")?
        .self_signed(&issuer_key)?;
    leaf(spiffe, &issuer, &issuer_key, validity)
}

/// A leaf with URI SAN `spiffe` signed by a root made on the spot (that no agent trusts).
pub fn leaf_from_foreign_root(spiffe: &str) -> Result<ClientCert> {
    let root_key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "cluster.local");
    let root = params.self_signed(&root_key)?;
    leaf(spiffe, &root, &root_key, Validity::Current)
}

fn leaf(
    spiffe: &str,
    issuer: &rcgen::Certificate,
    issuer_key: &rcgen::KeyPair,
    validity: Validity,
) -> Result<ClientCert> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![rcgen::SanType::URI(spiffe.try_into()?)];
    let now = time::OffsetDateTime::now_utc();
    let start = match validity {
        Validity::Current => now - time::Duration::hours(1),
        Validity::Expired => now - time::Duration::hours(3),
        Validity::NotYetValid => now + time::Duration::hours(1),
    };
    params.not_before = start;
    params.not_after = start + time::Duration::hours(2);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let certificate = params.signed_by(&key, issuer, issuer_key)?;
    Ok(ClientCert {
        chain: vec![certificate.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    })
}

/// What the server did with the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// TLS completed and the server sent HTTP/2 frames; `response` says whether it answered the
    /// CONNECT (a HEADERS frame on stream 1) and `ok` whether that answer was `:status 200`.
    Http2 {
        /// A HEADERS frame came back on stream 1.
        response: bool,
        /// It was the static-table `:status: 200`.
        ok: bool,
    },
    /// The server refused: a TLS alert, a reset, or EOF before any HTTP/2 frame.
    Refused(String),
}

/// Connects to `target` (an HBONE port) from the current namespace, presents `cert`, sends the
/// preface, SETTINGS, a CONNECT for `authority` and a DATA frame carrying `marker`.
pub fn probe(
    target: SocketAddr,
    cert: Option<ClientCert>,
    authority: &str,
    marker: &[u8],
) -> Outcome {
    match probe_inner(target, cert, authority, marker) {
        Ok(outcome) => outcome,
        Err(error) => Outcome::Refused(format!("{error:#}")),
    }
}

fn probe_inner(
    target: SocketAddr,
    cert: Option<ClientCert>,
    authority: &str,
    marker: &[u8],
) -> Result<Outcome> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)));
    let mut config = match cert {
        Some(cert) => builder.with_client_auth_cert(cert.chain, cert.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let server_name = ServerName::IpAddress(target.ip().into());
    let connection = rustls::ClientConnection::new(Arc::new(config), server_name)?;
    let tcp = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .with_context(|| format!("TCP connect to {target}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut stream = rustls::StreamOwned::new(connection, tcp);

    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    let mut block = Vec::new();
    for (name, value) in [(":method", "CONNECT"), (":authority", authority)] {
        // Literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2).
        block.push(0x00);
        block.push(u8::try_from(name.len())?);
        block.extend_from_slice(name.as_bytes());
        block.push(u8::try_from(value.len())?);
        block.extend_from_slice(value.as_bytes());
    }
    out.extend(frame(0x1, 0x4, 1, &block));
    out.extend(frame(0x0, 0, 1, marker));
    stream.write_all(&out).context("TLS handshake / write")?;
    stream.flush()?;

    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut buffer, mut chunk) = (Vec::new(), [0u8; 4096]);
    let mut saw_frame = false;
    while Instant::now() < deadline {
        let read = match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if saw_frame => {
                let _ = error;
                break;
            }
            Err(error) => return Err(error).context("reading the server's answer"),
        };
        buffer.extend_from_slice(&chunk[..read]);
        for (kind, stream_id, payload) in frames(&buffer) {
            saw_frame = true;
            if kind == 0x1 && stream_id == 1 {
                return Ok(Outcome::Http2 {
                    response: true,
                    ok: payload.first() == Some(&0x88),
                });
            }
        }
    }
    if saw_frame {
        return Ok(Outcome::Http2 {
            response: false,
            ok: false,
        });
    }
    Ok(Outcome::Refused("EOF before any HTTP/2 frame".into()))
}

/// Completes a TLS 1.3 handshake with `target`, presenting `cert` and offering only the key
/// exchange `groups`, and returns the group the server chose; a refused handshake is the error.
pub fn key_exchange(
    target: SocketAddr,
    cert: ClientCert,
    groups: &[rustls::NamedGroup],
) -> Result<rustls::NamedGroup> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = rustls::crypto::aws_lc_rs::ALL_KX_GROUPS
        .iter()
        .copied()
        .filter(|group| groups.contains(&group.name()))
        .collect();
    let provider = Arc::new(provider);
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_client_auth_cert(cert.chain, cert.key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let server_name = ServerName::IpAddress(target.ip().into());
    let mut connection = rustls::ClientConnection::new(Arc::new(config), server_name)?;
    let mut tcp = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .with_context(|| format!("TCP connect to {target}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
    while connection.is_handshaking() {
        connection.complete_io(&mut tcp).context("TLS handshake")?;
    }
    connection
        .negotiated_key_exchange_group()
        .map(|group| group.name())
        .context("no key exchange group after the handshake")
}

/// Encodes one HTTP/2 frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Complete frames in `buffer`: (type, stream id, payload).
fn frames(buffer: &[u8]) -> Vec<(u8, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 9 <= buffer.len() {
        let len = (usize::from(buffer[at]) << 16)
            | (usize::from(buffer[at + 1]) << 8)
            | usize::from(buffer[at + 2]);
        if at + 9 + len > buffer.len() {
            break;
        }
        let stream = u32::from_be_bytes([
            buffer[at + 5],
            buffer[at + 6],
            buffer[at + 7],
            buffer[at + 8],
        ]) & 0x7fff_ffff;
        out.push((
            buffer[at + 3],
            stream,
            buffer[at + 9..at + 9 + len].to_vec(),
        ));
        at += 9 + len;
    }
    out
}

/// Accepts every server certificate but still checks handshake signatures properly.
#[derive(Debug)]
pub struct AcceptAnyServer(pub Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
