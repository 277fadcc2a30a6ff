//! Real handshakes over in-memory pipes between configs built from issued certificates.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::ca::BuiltinCa;
use crate::identity::WorkloadCertificate;

pub(crate) fn identity(text: &str) -> Identity {
    text.parse().expect("test identity")
}

/// A CA whose root has a subject of its own (roots with equal subjects fail with BadSignature
/// instead of UnknownIssuer).
pub(crate) fn new_ca() -> BuiltinCa {
    let name = format!("test root {}", rand::random::<u64>());
    let (cert, key) = BuiltinCa::generate_root(&name).expect("root");
    BuiltinCa::from_pem(&cert, &key, Duration::from_secs(3600)).expect("ca")
}

/// Both ends of one handshake; each side's error is kept as text.
pub(crate) struct Handshake {
    pub client: Result<client::TlsStream<tokio::io::DuplexStream>, String>,
    pub server: Result<server::TlsStream<tokio::io::DuplexStream>, String>,
}

pub(crate) async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Handshake {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let connect = TlsConnector::from(client).connect(dummy_server_name(), client_io);
    let accept = TlsAcceptor::from(server).accept(server_io);
    let both = async { tokio::join!(connect, accept) };
    let (client, server) = tokio::time::timeout(Duration::from_secs(10), both)
        .await
        .expect("handshake finished");
    Handshake {
        client: client.map_err(|e| e.to_string()),
        server: server.map_err(|e| e.to_string()),
    }
}

/// How the client side of a case is configured.
enum Client {
    /// A workload certificate, expecting these identities from the server.
    Workload(WorkloadCertificate, Vec<Identity>),
    /// Correct roots and expectations, but no client certificate at all.
    NoCertificate(WorkloadCertificate, Vec<Identity>),
    /// Offers only TLS 1.2 (with a valid client certificate).
    Tls12Only(WorkloadCertificate),
}

enum Outcome {
    Connected,
    /// The client aborts; its error contains the text.
    ClientRefuses(&'static str),
    /// The server aborts; its error contains the text.
    ServerRefuses(&'static str),
}

fn client_config_for(client: Client) -> Arc<ClientConfig> {
    match client {
        Client::Workload(cert, expected) => cert.client_config(&expected),
        Client::NoCertificate(cert, expected) => {
            let verifier = ServerIdentityVerifier::new(cert.roots().clone(), expected);
            let mut config = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            config.alpn_protocols = vec![ALPN_H2.to_vec()];
            Arc::new(config)
        }
        Client::Tls12Only(cert) => {
            let verifier = ServerIdentityVerifier::new(cert.roots().clone(), Vec::new());
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut config = ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS12])
                .expect("versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            config.alpn_protocols = vec![ALPN_H2.to_vec()];
            Arc::new(config)
        }
    }
}

/// A certificate signed by `signer` but trusting `roots` (to model a peer from another root).
fn cross(signer: &BuiltinCa, id: &Identity, roots: &[&BuiltinCa]) -> WorkloadCertificate {
    let (chain, key) = signer.sign(id).expect("sign");
    let roots: Vec<CertificateDer<'static>> = roots.iter().map(|ca| ca.root().clone()).collect();
    WorkloadCertificate::new(chain, key, roots).expect("certificate")
}

#[tokio::test]
async fn handshake_table() {
    let ca = new_ca();
    let other_ca = new_ca();
    let client_id = identity("spiffe://cluster.local/ns/a/sa/client");
    let server_id = identity("spiffe://cluster.local/ns/b/sa/server");
    let unrelated = identity("spiffe://cluster.local/ns/b/sa/other");
    let foreign = identity("spiffe://other.domain/ns/a/sa/client");
    let issue = |id: &Identity| ca.issue(id).expect("issue");
    let server = issue(&server_id);

    let cases: Vec<(&str, Client, WorkloadCertificate, Outcome)> = vec![
        (
            "same root, expected identity",
            Client::Workload(issue(&client_id), vec![server_id.clone()]),
            issue(&server_id),
            Outcome::Connected,
        ),
        (
            "any of several expected identities",
            Client::Workload(
                issue(&client_id),
                vec![unrelated.clone(), server_id.clone()],
            ),
            issue(&server_id),
            Outcome::Connected,
        ),
        (
            "server during root rotation trusts the client's new root",
            Client::Workload(
                cross(&other_ca, &client_id, &[&ca]),
                vec![server_id.clone()],
            ),
            cross(&ca, &server_id, &[&ca, &other_ca]),
            Outcome::Connected,
        ),
        (
            "server has an unexpected identity",
            Client::Workload(issue(&client_id), vec![unrelated.clone()]),
            issue(&server_id),
            Outcome::ClientRefuses(
                "server identity spiffe://cluster.local/ns/b/sa/server is not one of \
                 [spiffe://cluster.local/ns/b/sa/other]",
            ),
        ),
        (
            "client expects nobody",
            Client::Workload(issue(&client_id), vec![]),
            issue(&server_id),
            Outcome::ClientRefuses("is not one of [-]"),
        ),
        (
            "server certificate from another root",
            Client::Workload(issue(&client_id), vec![server_id.clone()]),
            cross(&other_ca, &server_id, &[&ca]),
            Outcome::ClientRefuses("UnknownIssuer"),
        ),
        (
            "client certificate from another root",
            Client::Workload(
                cross(&other_ca, &client_id, &[&ca]),
                vec![server_id.clone()],
            ),
            issue(&server_id),
            Outcome::ServerRefuses("UnknownIssuer"),
        ),
        (
            "client from another trust domain",
            Client::Workload(issue(&foreign), vec![server_id.clone()]),
            issue(&server_id),
            Outcome::ServerRefuses(
                "client identity spiffe://other.domain/ns/a/sa/client is not in trust domain \
                 cluster.local",
            ),
        ),
        (
            "client without a certificate",
            Client::NoCertificate(issue(&client_id), vec![server_id.clone()]),
            issue(&server_id),
            Outcome::ServerRefuses("certificate"),
        ),
        (
            "client offering only TLS 1.2",
            Client::Tls12Only(issue(&client_id)),
            server,
            Outcome::ServerRefuses("Tls12NotOfferedOrEnabled"),
        ),
    ];

    for (name, client, server, outcome) in cases {
        let result = handshake(client_config_for(client), server.server_config()).await;
        match outcome {
            Outcome::Connected => {
                let client = result
                    .client
                    .unwrap_or_else(|e| panic!("{name}: client: {e}"));
                let server = result
                    .server
                    .unwrap_or_else(|e| panic!("{name}: server: {e}"));
                let (_, client_conn) = client.get_ref();
                let (_, server_conn) = server.get_ref();
                assert_eq!(
                    peer_identity(client_conn),
                    Some(server_id.clone()),
                    "{name}"
                );
                assert_eq!(
                    peer_identity(server_conn),
                    Some(client_id.clone()),
                    "{name}"
                );
            }
            Outcome::ClientRefuses(text) => {
                let error = result
                    .client
                    .err()
                    .unwrap_or_else(|| panic!("{name}: client connected"));
                assert!(error.contains(text), "{name}: client error {error:?}");
                assert!(result.server.is_err(), "{name}: server connected");
            }
            Outcome::ServerRefuses(text) => {
                let error = result
                    .server
                    .err()
                    .unwrap_or_else(|| panic!("{name}: server accepted"));
                assert!(error.contains(text), "{name}: server error {error:?}");
                // In TLS 1.3 the client may finish first; then its first read must fail.
                if let Ok(mut client) = result.client {
                    let mut buffer = [0u8; 1];
                    let read = client.read(&mut buffer).await;
                    assert!(!matches!(read, Ok(1)), "{name}: client got data");
                }
            }
        }
    }
}

#[tokio::test]
async fn negotiates_h2_tls13_aes128_gcm_and_carries_data() {
    let ca = new_ca();
    let client_id = identity("spiffe://cluster.local/ns/a/sa/client");
    let server_id = identity("spiffe://cluster.local/ns/b/sa/server");
    let client_cert = ca.issue(&client_id).expect("issue");
    let server_cert = ca.issue(&server_id).expect("issue");
    let result = handshake(
        client_cert.client_config(&[server_id]),
        server_cert.server_config(),
    )
    .await;
    let mut client = result.client.expect("client");
    let mut server = result.server.expect("server");
    for state in [
        client.get_ref().1 as &rustls::CommonState,
        server.get_ref().1,
    ] {
        assert_eq!(state.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(
            state.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let suite = state.negotiated_cipher_suite().expect("suite").suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
    client.write_all(b"ping").await.expect("write");
    let mut buffer = [0u8; 4];
    server.read_exact(&mut buffer).await.expect("read");
    assert_eq!(&buffer, b"ping");
}

/// A client with the same certificate and checks as ours but `provider`'s key exchanges (Istio's
/// ztunnel with `COMPLIANCE_POLICY=pqc`, or built with ring).
fn client_with(
    provider: CryptoProvider,
    cert: &WorkloadCertificate,
    expected: &[Identity],
) -> Arc<ClientConfig> {
    let verifier = ServerIdentityVerifier::new(cert.roots().clone(), expected.to_vec());
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(
            cert.client_config(expected)
                .client_auth_cert_resolver
                .clone(),
        );
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    Arc::new(config)
}

/// A client certificate, a server certificate and the server's identity, from one new CA.
fn issued_pair() -> (WorkloadCertificate, WorkloadCertificate, Identity) {
    let ca = new_ca();
    let server_id = identity("spiffe://cluster.local/ns/b/sa/server");
    let client_cert = ca
        .issue(&identity("spiffe://cluster.local/ns/a/sa/client"))
        .expect("issue");
    let server_cert = ca.issue(&server_id).expect("issue");
    (client_cert, server_cert, server_id)
}

/// A server configured as Istio's ztunnel is with `COMPLIANCE_POLICY=pqc`: our certificate and
/// client checks, accepting only X25519MLKEM768.
fn post_quantum_server(cert: &WorkloadCertificate) -> Arc<ServerConfig> {
    let verifier = TrustDomainVerifier::new(cert.roots().clone(), cert.identity().trust_domain())
        .expect("verifier");
    let provider = Arc::new(provider_for(KeyExchange::PostQuantumOnly));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(cert.server_config().cert_resolver.clone());
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

#[tokio::test]
async fn key_exchange_is_x25519_and_the_post_quantum_hybrid_works_both_ways() {
    let (client_cert, server_cert, server_id) = issued_pair();
    let expected = [server_id];
    let cases = [
        (
            "ours to ours",
            client_cert.client_config(&expected),
            server_cert.server_config(),
            rustls::NamedGroup::X25519,
            rustls::HandshakeKind::Full,
            AES_128,
        ),
        (
            // Istio's ztunnel offers AES-256 first; our server follows the client's order.
            "a client preferring AES-256 to our server",
            client_with(
                aes_256_first(KeyExchange::Classical),
                &client_cert,
                &expected,
            ),
            server_cert.server_config(),
            rustls::NamedGroup::X25519,
            rustls::HandshakeKind::Full,
            AES_256,
        ),
        (
            "a post-quantum-only client to our server",
            client_with(
                provider_for(KeyExchange::PostQuantumOnly),
                &client_cert,
                &expected,
            ),
            server_cert.server_config(),
            rustls::NamedGroup::X25519MLKEM768,
            rustls::HandshakeKind::Full,
            AES_256,
        ),
        (
            // Our ClientHello carries an X25519 share only, so the server asks again.
            "our client to a post-quantum-only server",
            client_cert.client_config(&expected),
            post_quantum_server(&server_cert),
            rustls::NamedGroup::X25519MLKEM768,
            rustls::HandshakeKind::FullWithHelloRetryRequest,
            AES_128,
        ),
    ];
    for (case, client, server, group, kind, suite) in cases {
        let result = handshake(client, server).await;
        let mut client = result
            .client
            .unwrap_or_else(|e| panic!("{case}: client: {e}"));
        let mut server = result
            .server
            .unwrap_or_else(|e| panic!("{case}: server: {e}"));
        for state in [
            client.get_ref().1 as &rustls::CommonState,
            server.get_ref().1,
        ] {
            let negotiated = state.negotiated_key_exchange_group().expect("group");
            assert_eq!(negotiated.name(), group, "{case}");
            assert_eq!(state.handshake_kind(), Some(kind), "{case}");
            let negotiated = state.negotiated_cipher_suite().expect("suite").suite();
            assert_eq!(negotiated, suite, "{case}");
        }
        client.write_all(b"ping").await.expect("write");
        let mut buffer = [0u8; 4];
        server.read_exact(&mut buffer).await.expect("read");
        assert_eq!(&buffer, b"ping", "{case}");
    }
}

#[tokio::test]
async fn a_post_quantum_only_peer_refuses_a_peer_without_the_hybrid() {
    let (client_cert, server_cert, server_id) = issued_pair();
    // A classical-only client, as a ring-built ztunnel is.
    let mut classical = provider_for(KeyExchange::Classical);
    classical
        .kx_groups
        .retain(|group| group.name() != rustls::NamedGroup::X25519MLKEM768);
    let config = client_with(classical, &client_cert, &[server_id]);
    let result = handshake(config, post_quantum_server(&server_cert)).await;
    let Err(error) = result.server else {
        panic!("the server accepted a client without the hybrid");
    };
    assert!(
        error.contains("NoKxGroupsInCommon") || error.contains("HandshakeFailure"),
        "{error}"
    );
    assert!(result.client.is_err(), "the client cannot carry on");
}

const AES_128: rustls::CipherSuite = rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
const AES_256: rustls::CipherSuite = rustls::CipherSuite::TLS13_AES_256_GCM_SHA384;

/// A provider with the suites in Istio's ztunnel's order.
fn aes_256_first(key_exchange: KeyExchange) -> CryptoProvider {
    let mut provider = provider_for(key_exchange);
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != AES_256);
    provider
}

#[test]
fn suites_are_the_two_aes_gcm_ones_ordered_by_the_key_exchange() {
    let suites = |provider: &CryptoProvider| -> Vec<_> {
        provider.cipher_suites.iter().map(|s| s.suite()).collect()
    };
    assert_eq!(suites(&provider()), vec![AES_128, AES_256]);
    assert_eq!(
        suites(&provider_for(KeyExchange::PostQuantumOnly)),
        vec![AES_256, AES_128]
    );
    assert_eq!(
        suites(&aes_256_first(KeyExchange::Classical)),
        vec![AES_256, AES_128]
    );
}

#[tokio::test]
async fn no_sni_and_no_resumption() {
    let (client_cert, server_cert, server_id) = issued_pair();
    let client = client_cert.client_config(&[server_id]);
    for attempt in 0..2 {
        let result = handshake(client.clone(), server_cert.server_config()).await;
        let server = result.server.expect("server");
        let (_, connection) = server.get_ref();
        assert_eq!(
            connection.server_name(),
            None,
            "attempt {attempt}: SNI sent"
        );
        assert_eq!(
            connection.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "attempt {attempt}"
        );
    }
}

#[test]
fn spiffe_identities_skip_other_sans() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["spiffe://cluster.local/ns/a/sa/x"],
            &["spiffe://cluster.local/ns/a/sa/x"],
        ),
        (
            &[
                "https://example.com/",
                "spiffe://td/ns/a/sa/x",
                "spiffe://td/ns/b/sa/y",
            ],
            &["spiffe://td/ns/a/sa/x", "spiffe://td/ns/b/sa/y"],
        ),
        (&["spiffe://td/ns/a/sa/x/extra", "spiffe://td/sa/x"], &[]),
        (&[], &[]),
    ];
    for (uris, expected) in cases {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["dns.example".to_string()]).expect("params");
        for uri in *uris {
            let uri = rcgen::Ia5String::try_from(uri.to_string()).expect("ia5");
            params.subject_alt_names.push(rcgen::SanType::URI(uri));
        }
        let cert = params.self_signed(&key).expect("cert");
        let got = spiffe_identities(cert.der()).expect("parse");
        let expected: Vec<Identity> = expected.iter().map(|s| identity(s)).collect();
        assert_eq!(got, expected, "{uris:?}");
    }
    assert!(spiffe_identities(&CertificateDer::from(vec![0x30, 0x03, 0x01])).is_err());
}

/// A remembered chain saves only the chain verification: outside the validity of its
/// certificates, to an identity not expected, or to a trust domain not ours, it is refused
/// exactly as the full check refuses it, and a verifier for other roots never shares it.
#[test]
fn remembered_chains_are_refused_wherever_the_full_check_refuses_them() {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::UnixTime;
    use rustls::server::danger::ClientCertVerifier;
    let ca = new_ca();
    let server_id = identity("spiffe://cluster.local/ns/default/sa/server");
    let server = ca.issue(&server_id).expect("server");
    let chain = server.chain();
    let now = UnixTime::now();
    let at = |offset: i64| {
        UnixTime::since_unix_epoch(Duration::from_secs(
            now.as_secs().saturating_add_signed(offset),
        ))
    };
    let verified = Arc::new(VerifiedChains::default());
    let expecting = |expected: &Identity| {
        ServerIdentityVerifier::sharing(
            server.roots().clone(),
            verified.clone(),
            vec![expected.clone()],
        )
    };
    let verify = |verifier: &ServerIdentityVerifier, time: UnixTime| {
        verifier
            .verify_server_cert(&chain[0], &chain[1..], &dummy_server_name(), &[], time)
            .map(|_| ())
            .map_err(|error| format!("{error:?}"))
    };
    let server_verifier = expecting(&server_id);
    verify(&server_verifier, now).expect("first handshake: full check");
    assert_eq!(verified.len(), 1, "the chain is remembered");
    verify(&server_verifier, now).expect("same chain again");
    let other = identity("spiffe://cluster.local/ns/default/sa/other");
    let refused = verify(&expecting(&other), now).expect_err("identity still checked");
    assert!(refused.contains("is not one of"), "{refused}");
    for (time, what) in [
        (at(2 * 86_400), "Expired"),
        (at(-2 * 86_400), "NotValidYet"),
    ] {
        let refused = verify(&server_verifier, time).expect_err("outside the validity");
        assert!(refused.contains(what), "{what}: {refused}");
    }
    verify(&server_verifier, now).expect("valid again now");
    let stranger = new_ca().issue(&server_id).expect("other roots");
    let elsewhere = ServerIdentityVerifier::sharing(
        stranger.roots().clone(),
        Arc::default(),
        vec![server_id.clone()],
    );
    let refused = verify(&elsewhere, now).expect_err("other roots");
    assert!(refused.contains("UnknownIssuer"), "{refused}");

    let clients =
        TrustDomainVerifier::new(server.roots().clone(), "cluster.local").expect("verifier");
    let foreign = ca
        .issue(&identity("spiffe://elsewhere.example/ns/a/sa/b"))
        .expect("foreign");
    let local = ca
        .issue(&identity("spiffe://cluster.local/ns/a/sa/b"))
        .expect("local");
    for _ in 0..2 {
        let refused = clients
            .verify_client_cert(&foreign.chain()[0], &foreign.chain()[1..], now)
            .expect_err("foreign trust domain, every time");
        assert!(
            format!("{refused:?}").contains("not in trust domain"),
            "{refused:?}"
        );
        clients
            .verify_client_cert(&local.chain()[0], &local.chain()[1..], now)
            .expect("local client, every time");
    }
    let refused = clients
        .verify_client_cert(&local.chain()[0], &local.chain()[1..], at(2 * 86_400))
        .expect_err("an expired client");
    assert!(format!("{refused:?}").contains("Expired"), "{refused:?}");
}

#[test]
fn the_verified_chain_cache_stays_bounded_and_forgets_failures() {
    let ca = new_ca();
    let chains = VerifiedChains::with_capacity(2);
    let now = rustls::pki_types::UnixTime::now();
    for name in ["a", "b", "c"] {
        let issued = ca
            .issue(&identity(&format!("spiffe://cluster.local/ns/x/sa/{name}")))
            .expect("issued");
        let passed = chains.verify(&issued.chain()[0], &issued.chain()[1..], now, || {
            Ok::<_, ()>(vec![issued.identity().clone()])
        });
        assert_eq!(passed, Ok(vec![issued.identity().clone()]));
        assert!(chains.len() <= 2);
    }
    let issued = ca
        .issue(&identity("spiffe://cluster.local/ns/x/sa/d"))
        .expect("issued");
    let failed = chains.verify(&issued.chain()[0], &[], now, || {
        Err::<Vec<Identity>, _>("refused")
    });
    assert_eq!(failed, Err("refused"));
    let checked = std::cell::Cell::new(false);
    let again = chains.verify(&issued.chain()[0], &[], now, || {
        checked.set(true);
        Err::<Vec<Identity>, _>("refused")
    });
    assert_eq!(again, Err("refused"));
    assert!(
        checked.get(),
        "a failure is checked again, never remembered"
    );
}
