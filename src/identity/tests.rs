//! The built-in CA's files and leaves, and the manager's caching, sharing and rotation.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use x509_parser::extensions::GeneralName;

use super::ca::{BuiltinCa, ROOT_CERT_FILE, ROOT_KEY_FILE};
use super::*;
use crate::config::agent::CaConfig;
use crate::tls::tests::{handshake, identity, new_ca};

const HOUR: Duration = Duration::from_secs(3600);

fn ca_config(ttl: Duration) -> CaConfig {
    CaConfig {
        workload_cert_ttl: ttl,
        ..CaConfig::default()
    }
}

#[test]
fn issued_leaf_carries_exactly_the_identity() {
    let ca = new_ca();
    let id = identity("spiffe://cluster.local/ns/default/sa/web");
    let before = SystemTime::now();
    let cert = ca.issue(&id).expect("issue");
    assert_eq!(cert.identity(), &id);
    assert_eq!(cert.chain().len(), 1, "leaf only, never the root");
    assert_ne!(&cert.chain()[0], ca.root());

    let (_, leaf) = x509_parser::parse_x509_certificate(cert.chain()[0].as_ref()).expect("parse");
    let san = leaf
        .subject_alternative_name()
        .expect("san")
        .expect("present");
    let uri = id.to_string();
    assert_eq!(san.value.general_names, vec![GeneralName::URI(&uri)]);
    assert!(!leaf.is_ca());
    let eku = leaf
        .extended_key_usage()
        .expect("eku")
        .expect("present")
        .value;
    assert!(eku.server_auth && eku.client_auth);
    let usage = leaf.key_usage().expect("ku").expect("present").value;
    assert!(usage.digital_signature() && !usage.key_cert_sign());
    assert_eq!(leaf.subject().iter().count(), 0, "empty subject");

    // Valid from about a minute ago (clock skew) for the ttl.
    let skew = before
        .duration_since(cert.not_before())
        .expect("starts in the past");
    assert!(
        skew >= Duration::from_secs(59) && skew <= Duration::from_secs(62),
        "{skew:?}"
    );
    let lifetime = cert
        .expires_at()
        .duration_since(before)
        .expect("ends in the future");
    assert!(lifetime > HOUR - Duration::from_secs(2) && lifetime <= HOUR + Duration::from_secs(2));
    let half = cert
        .refresh_at()
        .duration_since(cert.not_before())
        .expect("after start");
    assert_eq!(
        half * 2,
        cert.expires_at()
            .duration_since(cert.not_before())
            .expect("span")
    );

    let again = ca.issue(&id).expect("issue");
    assert_ne!(
        again.chain()[0],
        cert.chain()[0],
        "fresh key and serial per issue"
    );
}

#[test]
fn root_is_created_once_and_reloaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let first = BuiltinCa::load_or_create(&state, &ca_config(HOUR)).expect("create");
    let mode = std::fs::metadata(state.join(ROOT_KEY_FILE))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "root key readable by the agent only");
    let second = BuiltinCa::load_or_create(&state, &ca_config(HOUR)).expect("reload");
    assert_eq!(first.root(), second.root(), "same root after restart");

    // A leaf from the reloaded CA verifies against the first instance's root.
    let id = identity("spiffe://cluster.local/ns/a/sa/x");
    let (chain, key) = second.sign(&id).expect("sign");
    WorkloadCertificate::new(chain, key, vec![first.root().clone()]).expect("chains");
}

#[tokio::test]
async fn agents_sharing_root_files_trust_each_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_pem, key_pem) = BuiltinCa::generate_root("shared").expect("root");
    let cert_file = dir.path().join("root.pem");
    let key_file = dir.path().join("root-key.pem");
    std::fs::write(&cert_file, &cert_pem).expect("write");
    std::fs::write(&key_file, &key_pem).expect("write");
    let config = CaConfig {
        cert_file: Some(cert_file),
        key_file: Some(key_file),
        workload_cert_ttl: HOUR,
        ..CaConfig::default()
    };
    let node_a = BuiltinCa::load_or_create(&dir.path().join("a"), &config).expect("node a");
    let node_b = BuiltinCa::load_or_create(&dir.path().join("b"), &config).expect("node b");
    assert!(
        !dir.path().join("a").join(ROOT_CERT_FILE).exists(),
        "files win over state dir"
    );
    let expected = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .expect("pem")
        .1
        .contents;
    assert_eq!(node_a.root().as_ref(), expected.as_slice());

    let client_id = identity("spiffe://cluster.local/ns/a/sa/client");
    let server_id = identity("spiffe://cluster.local/ns/b/sa/server");
    let client = node_a.issue(&client_id).expect("issue");
    let server = node_b.issue(&server_id).expect("issue");
    let result = handshake(client.client_config(&[server_id]), server.server_config()).await;
    let server = result.server.expect("server accepts");
    assert_eq!(
        crate::tls::peer_identity(server.get_ref().1),
        Some(client_id)
    );
}

#[test]
fn bad_root_material_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, contents: &str| -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("write");
        path
    };
    let (cert_a, key_a) = BuiltinCa::generate_root("a").expect("root");
    let (_, key_b) = BuiltinCa::generate_root("b").expect("root");
    let cert_a = write("a.pem", &cert_a);
    let key_a = write("a-key.pem", &key_a);
    let key_b = write("b-key.pem", &key_b);
    let garbage = write("garbage.pem", "not pem");
    let (expired_cert, expired_key) = expired_root();
    let expired_cert = write("expired.pem", &expired_cert);
    let expired_key = write("expired-key.pem", &expired_key);
    let lone_key_state = dir.path().join("lone");
    std::fs::create_dir(&lone_key_state).expect("mkdir");
    std::fs::write(lone_key_state.join(ROOT_KEY_FILE), "x").expect("write");

    let files = |cert: Option<&PathBuf>, key: Option<&PathBuf>, ttl| CaConfig {
        cert_file: cert.cloned(),
        key_file: key.cloned(),
        workload_cert_ttl: ttl,
        ..CaConfig::default()
    };
    let cases: Vec<(&str, PathBuf, CaConfig, &str)> = vec![
        (
            "cert without key",
            dir.path().into(),
            files(Some(&cert_a), None, HOUR),
            "set together",
        ),
        (
            "key of another root",
            dir.path().into(),
            files(Some(&cert_a), Some(&key_b), HOUR),
            "does not match",
        ),
        (
            "certificate is not PEM",
            dir.path().into(),
            files(Some(&garbage), Some(&key_a), HOUR),
            "root certificate",
        ),
        (
            "key is not PEM",
            dir.path().into(),
            files(Some(&cert_a), Some(&garbage), HOUR),
            "root key",
        ),
        (
            "missing file",
            dir.path().into(),
            files(Some(&dir.path().join("nope")), Some(&key_a), HOUR),
            "reading",
        ),
        (
            "zero ttl",
            dir.path().into(),
            files(Some(&cert_a), Some(&key_a), Duration::ZERO),
            "ttl",
        ),
        (
            "expired root",
            dir.path().into(),
            files(Some(&expired_cert), Some(&expired_key), HOUR),
            "validity",
        ),
        (
            "state dir with a lone key",
            lone_key_state,
            files(None, None, HOUR),
            "does not",
        ),
    ];
    for (name, state, config, text) in cases {
        let error = BuiltinCa::load_or_create(&state, &config).expect_err(name);
        assert!(error.to_string().contains(text), "{name}: {error}");
    }
}

fn expired_root() -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let cert = params.self_signed(&key).expect("cert");
    (cert.pem(), key.serialize_pem())
}

#[test]
fn unusable_certificate_material_is_refused() {
    let ca = new_ca();
    let other = new_ca();
    let id = identity("spiffe://cluster.local/ns/a/sa/x");
    let sign = || ca.sign(&id).expect("sign");
    let (chain, key) = sign();
    let (_, other_key) = sign();
    let (no_spiffe, no_spiffe_key) = {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["web.example".to_string()]).expect("p");
        let cert = params.self_signed(&key).expect("cert");
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        (vec![cert.der().clone()], key.into())
    };
    let root = vec![ca.root().clone()];
    let cases: Vec<(&str, Result<WorkloadCertificate, InvalidCertificate>, &str)> = vec![
        (
            "empty chain",
            WorkloadCertificate::new(vec![], key.clone_key(), root.clone()),
            "empty",
        ),
        (
            "no roots",
            WorkloadCertificate::new(chain.clone(), key.clone_key(), vec![]),
            "root",
        ),
        (
            "garbage root",
            WorkloadCertificate::new(chain.clone(), key.clone_key(), vec![vec![1, 2, 3].into()]),
            "root",
        ),
        (
            "key of another leaf",
            WorkloadCertificate::new(chain.clone(), other_key, root.clone()),
            "key",
        ),
        (
            "leaf without SPIFFE identity",
            WorkloadCertificate::new(no_spiffe, no_spiffe_key, root.clone()),
            "no SPIFFE identity",
        ),
    ];
    for (name, result, text) in cases {
        let error = result.expect_err(name);
        assert!(error.to_string().contains(text), "{name}: {error}");
    }

    // A root sent along in the chain is dropped; several roots are accepted (rotation).
    let mut with_root = chain.clone();
    with_root.push(ca.root().clone());
    let roots = vec![ca.root().clone(), other.root().clone()];
    let cert = WorkloadCertificate::new(with_root, key, roots).expect("valid");
    assert_eq!(cert.chain(), chain.as_slice());
    assert_eq!(cert.roots().len(), 2);
}

/// A source that counts calls, can be made to fail, can hold callers at a gate, and can lie
/// about the identity.
#[derive(Debug)]
struct TestSource {
    ca: BuiltinCa,
    calls: AtomicUsize,
    failing: AtomicBool,
    gate: Option<Arc<Semaphore>>,
    answer_as: Option<Identity>,
}

impl TestSource {
    fn new(ttl: Duration) -> Self {
        let (cert, key) = BuiltinCa::generate_root("test").expect("root");
        TestSource {
            ca: BuiltinCa::from_pem(&cert, &key, ttl).expect("ca"),
            calls: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            gate: None,
            answer_as: None,
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl CertificateSource for TestSource {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<WorkloadCertificate, CaError>> + Send + 'a>,
    > {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                let _permit = gate.acquire().await.expect("gate open");
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err(CaError::Sign(rcgen::Error::RingUnspecified));
            }
            self.ca.issue(self.answer_as.as_ref().unwrap_or(identity))
        })
    }
}

/// Fetches until the manager hands out a certificate other than `old`, advancing time.
async fn until_replaced(
    manager: &CertificateManager,
    id: &Identity,
    old: &Arc<WorkloadCertificate>,
) -> Arc<WorkloadCertificate> {
    for _ in 0..100 {
        let current = manager.fetch(id).await.expect("fetch");
        if !Arc::ptr_eq(&current, old) {
            return current;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("certificate was never replaced");
}

#[tokio::test]
async fn concurrent_fetches_share_one_issue() {
    let gate = Arc::new(Semaphore::new(0));
    let source = Arc::new(TestSource {
        gate: Some(gate.clone()),
        ..TestSource::new(HOUR)
    });
    let manager = Arc::new(CertificateManager::new(source.clone()));
    let id = identity("spiffe://cluster.local/ns/a/sa/x");
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let manager = manager.clone();
            let id = id.clone();
            tokio::spawn(async move { manager.fetch(&id).await })
        })
        .collect();
    while source.calls() == 0 {
        tokio::task::yield_now().await;
    }
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(100);
    let mut certificates = Vec::new();
    for caller in callers {
        certificates.push(caller.await.expect("join").expect("fetch"));
    }
    assert_eq!(source.calls(), 1, "one issue for eight callers");
    assert!(certificates
        .iter()
        .all(|c| Arc::ptr_eq(c, &certificates[0])));
    let again = manager.fetch(&id).await.expect("cached");
    assert!(Arc::ptr_eq(&again, &certificates[0]));
    assert_eq!(source.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn rotates_at_half_life_without_disturbing_open_sessions() {
    let source = Arc::new(TestSource::new(HOUR));
    let manager = Arc::new(CertificateManager::new(source.clone()));
    let client_id = identity("spiffe://cluster.local/ns/a/sa/client");
    let server_id = identity("spiffe://cluster.local/ns/b/sa/server");
    let old = manager.fetch(&server_id).await.expect("fetch");
    let client = manager.fetch(&client_id).await.expect("fetch");
    let session = handshake(
        client.client_config(std::slice::from_ref(&server_id)),
        old.server_config(),
    )
    .await;
    let (mut client_stream, mut server_stream) =
        (session.client.expect("c"), session.server.expect("s"));

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let rotation = manager.clone().spawn_rotation(async move {
        let _ = stopped.await;
    });
    tokio::time::sleep(HOUR / 2 + Duration::from_secs(60)).await;
    // The background task re-issues on its own (fetch would also trigger it: wait without).
    let calls_before = source.calls();
    for _ in 0..100 {
        if source.calls() > calls_before {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let new = manager.fetch(&server_id).await.expect("fetch");
    assert!(!Arc::ptr_eq(&new, &old), "rotated without a fetch");
    assert_ne!(new.chain()[0], old.chain()[0]);

    // The open session keeps working; a new handshake gets the new certificate.
    client_stream.write_all(b"still").await.expect("write");
    let mut buffer = [0u8; 5];
    server_stream.read_exact(&mut buffer).await.expect("read");
    let client = manager.fetch(&client_id).await.expect("fetch");
    let fresh = handshake(client.client_config(&[server_id]), new.server_config()).await;
    let fresh = fresh.client.expect("client");
    let presented = &fresh.get_ref().1.peer_certificates().expect("certs")[0];
    assert_eq!(presented, &new.chain()[0]);

    stop.send(()).expect("rotation running");
    rotation.await.expect("rotation stops");
}

#[tokio::test(start_paused = true)]
async fn stale_fetch_serves_old_certificate_and_reissues() {
    let source = Arc::new(TestSource::new(HOUR));
    let manager = CertificateManager::new(source.clone());
    let id = identity("spiffe://cluster.local/ns/a/sa/x");
    let old = manager.fetch(&id).await.expect("fetch");
    tokio::time::sleep(HOUR / 2 + Duration::from_secs(60)).await;
    let served = manager.fetch(&id).await.expect("fetch");
    assert!(Arc::ptr_eq(&served, &old), "no wait for the re-issue");
    until_replaced(&manager, &id, &old).await;
    assert_eq!(source.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn failing_source_keeps_old_certificate_until_expiry_then_fails_closed() {
    let source = Arc::new(TestSource::new(HOUR));
    let manager = Arc::new(CertificateManager::new(source.clone()));
    let id = identity("spiffe://cluster.local/ns/a/sa/x");
    let old = manager.fetch(&id).await.expect("fetch");
    source.failing.store(true, Ordering::SeqCst);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let rotation = manager.clone().spawn_rotation(async move {
        let _ = stopped.await;
    });

    tokio::time::sleep(HOUR / 2 + Duration::from_secs(600)).await;
    let attempts = source.calls();
    assert!(attempts > 2, "rotation retried ({attempts} calls)");
    assert!(attempts < 40, "retries back off ({attempts} calls)");
    let served = manager
        .fetch(&id)
        .await
        .expect("old certificate still valid");
    assert!(Arc::ptr_eq(&served, &old));

    tokio::time::sleep(HOUR / 2).await;
    let error = manager
        .fetch(&id)
        .await
        .expect_err("expired certificate served");
    assert!(matches!(error, CertificateError::Issue { .. }), "{error}");
    assert!(
        manager.certificates().is_empty(),
        "expired certificate dropped"
    );

    source.failing.store(false, Ordering::SeqCst);
    // Callers fail fast until the retry time; the retry then finds the source back.
    let mut recovered = None;
    for _ in 0..300 {
        if let Ok(certificate) = manager.fetch(&id).await {
            recovered = Some(certificate);
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let recovered = recovered.expect("source is back");
    assert!(!Arc::ptr_eq(&recovered, &old));
    stop.send(()).expect("rotation running");
    rotation.await.expect("rotation stops");
}

/// Unauthenticated connects must not drive the CA: while an identity has no certificate and
/// its last issue failed, every caller gets that failure at once, and only the retry time
/// starts the next issue.
#[tokio::test(start_paused = true)]
async fn failed_issue_fails_fast_until_its_retry_time() {
    let source = Arc::new(TestSource::new(HOUR));
    source.failing.store(true, Ordering::SeqCst);
    let manager = CertificateManager::new(source.clone());
    let id = identity("spiffe://cluster.local/ns/a/sa/x");
    let first = manager.fetch(&id).await.expect_err("source fails");
    for _ in 0..100 {
        let again = manager.fetch(&id).await.expect_err("still failing");
        assert_eq!(again.to_string(), first.to_string(), "the last error");
        manager.prefetch(&id);
    }
    tokio::task::yield_now().await;
    assert_eq!(source.calls(), 1, "no issue per caller while backing off");
    source.failing.store(false, Ordering::SeqCst);
    // The first retry comes after 1 s ± 20%.
    tokio::time::sleep(Duration::from_secs(2)).await;
    manager
        .fetch(&id)
        .await
        .expect("retried once its time came");
    assert_eq!(source.calls(), 2);
}

#[tokio::test]
async fn certificate_for_another_identity_is_refused() {
    let asked = identity("spiffe://cluster.local/ns/a/sa/x");
    let source = Arc::new(TestSource {
        answer_as: Some(identity("spiffe://cluster.local/ns/a/sa/admin")),
        ..TestSource::new(HOUR)
    });
    let manager = CertificateManager::new(source);
    let error = manager.fetch(&asked).await.expect_err("mismatch accepted");
    assert!(
        matches!(error, CertificateError::IdentityMismatch { .. }),
        "{error}"
    );
    assert!(manager.certificates().is_empty());
}

#[tokio::test]
async fn prefetch_certificates_and_forget() {
    let source = Arc::new(TestSource::new(HOUR));
    let manager = CertificateManager::new(source.clone());
    let a = identity("spiffe://cluster.local/ns/a/sa/a");
    let b = identity("spiffe://cluster.local/ns/b/sa/b");
    manager.prefetch(&b);
    manager.fetch(&a).await.expect("fetch");
    manager.fetch(&b).await.expect("fetch");
    assert_eq!(
        source.calls(),
        2,
        "prefetch issue shared with the later fetch"
    );
    let listed: Vec<Identity> = manager
        .certificates()
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(listed, vec![a.clone(), b.clone()]);

    manager.forget(&a);
    let listed: Vec<Identity> = manager
        .certificates()
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(listed, vec![b]);
    manager.fetch(&a).await.expect("fetch");
    assert_eq!(source.calls(), 3, "forgotten identity is issued again");
}

#[tokio::test(start_paused = true)]
async fn failed_fetches_are_reported_by_reason_whatever_the_source() {
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    let counted = |source: Arc<TestSource>| {
        let metrics = metrics.clone();
        CertificateManager::new(source)
            .on_failure(move |error| metrics.certificate_fetch_failed(error.reason()))
    };
    let failing = Arc::new(TestSource::new(HOUR));
    failing.failing.store(true, Ordering::SeqCst);
    let manager = counted(failing.clone());
    let id = identity("spiffe://cluster.local/ns/a/sa/x");
    manager.fetch(&id).await.expect_err("source fails");
    // Past the first retry time (1 s ± 20%), so the next fetch asks the source again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    manager.fetch(&id).await.expect_err("source fails again");
    let lying = Arc::new(TestSource {
        answer_as: Some(identity("spiffe://cluster.local/ns/a/sa/admin")),
        ..TestSource::new(HOUR)
    });
    counted(lying).fetch(&id).await.expect_err("mismatch");
    failing.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    manager.fetch(&id).await.expect("source recovered");

    let text = metrics.encode(&Default::default(), false);
    let value = |reason: &str| {
        let prefix = format!("nodetunnel_certificate_fetch_failures_total{{reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map(str::to_string)
    };
    assert_eq!(value("source_error").as_deref(), Some("2"), "{text}");
    assert_eq!(value("identity_mismatch").as_deref(), Some("1"), "{text}");
    assert_eq!(value("already_expired"), None, "{text}");
}

#[tokio::test]
async fn held_certificates_carry_their_chain_and_roots() {
    let source = Arc::new(TestSource::new(HOUR));
    let manager = CertificateManager::new(source.clone());
    let b = identity("spiffe://cluster.local/ns/b/sa/b");
    let a = identity("spiffe://cluster.local/ns/a/sa/a");
    manager.fetch(&b).await.expect("fetch");
    manager.fetch(&a).await.expect("fetch");
    let held: Vec<Arc<WorkloadCertificate>> = manager
        .statuses()
        .into_iter()
        .filter_map(|status| status.certificate)
        .collect();
    let identities: Vec<&Identity> = held.iter().map(|c| c.identity()).collect();
    assert_eq!(identities, vec![&a, &b], "sorted by identity");
    assert_eq!(
        held[0].root_certificates(),
        std::slice::from_ref(source.ca.root())
    );
    assert!(
        !held[0].chain().contains(source.ca.root()),
        "roots are not in the chain"
    );
}

#[test]
fn a_connection_is_valid_until_the_earlier_certificate_expires() {
    let (cert, key) = BuiltinCa::generate_root("root").expect("root");
    let short = BuiltinCa::from_pem(&cert, &key, HOUR).expect("ca");
    let long = BuiltinCa::from_pem(&cert, &key, 2 * HOUR).expect("ca");
    let mine = short
        .issue(&identity("spiffe://cluster.local/ns/default/sa/a"))
        .expect("issue");
    let theirs = long
        .issue(&identity("spiffe://cluster.local/ns/default/sa/b"))
        .expect("issue");
    assert_eq!(
        connection_valid_until(&mine, Some(theirs.chain())),
        mine.expires_at()
    );
    assert_eq!(
        connection_valid_until(&theirs, Some(mine.chain())),
        mine.expires_at()
    );
    assert_eq!(connection_valid_until(&theirs, None), theirs.expires_at());
}

#[tokio::test]
async fn statuses_name_initializing_available_and_unavailable_with_the_reason() {
    let gate = Arc::new(Semaphore::new(0));
    let source = Arc::new(TestSource {
        gate: Some(gate.clone()),
        ..TestSource::new(HOUR)
    });
    let manager = CertificateManager::new(source.clone());
    let a = identity("spiffe://cluster.local/ns/a/sa/a");
    let b = identity("spiffe://cluster.local/ns/b/sa/b");
    let states = |manager: &CertificateManager| -> Vec<(Identity, String, bool)> {
        manager
            .statuses()
            .into_iter()
            .map(|status| {
                let held = status.certificate.is_some();
                (status.identity, status.state.to_string(), held)
            })
            .collect()
    };

    manager.prefetch(&a);
    assert_eq!(
        states(&manager),
        vec![(a.clone(), "Initializing".to_string(), false)]
    );

    gate.add_permits(1);
    manager.fetch(&a).await.expect("issued");
    source.failing.store(true, Ordering::SeqCst);
    gate.add_permits(1);
    let error = manager.fetch(&b).await.expect_err("the source fails");
    assert_eq!(
        states(&manager),
        vec![
            (a, "Available".to_string(), true),
            (b, format!("Unavailable: {error}"), false),
        ]
    );
    assert!(
        error
            .to_string()
            .starts_with("no certificate for spiffe://cluster.local/ns/b/sa/b: "),
        "{error}"
    );
}
