//! What an Istio CA response must satisfy before its certificate is used.

use rcgen::{BasicConstraints, Certificate, DnType, IsCa, KeyUsagePurpose};

use super::*;

struct Authority {
    certificate: Certificate,
    key: KeyPair,
}

fn authority(name: &str, parent: Option<&Authority>) -> Authority {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let certificate = match parent {
        Some(parent) => params.signed_by(&key, &parent.certificate, &parent.key),
        None => params.self_signed(&key),
    }
    .expect("sign");
    Authority { certificate, key }
}

/// A leaf for `sans` signed by `issuer`, and its key.
fn leaf(sans: &[&str], issuer: &Authority) -> (String, PrivateKeyDer<'static>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans
        .iter()
        .map(|san| SanType::URI(rcgen::Ia5String::try_from(*san).expect("ia5")))
        .collect();
    let certificate = params
        .signed_by(&key, &issuer.certificate, &issuer.key)
        .expect("sign");
    (
        certificate.pem(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

const ASKED: &str = "spiffe://cluster.local/ns/default/sa/a";

fn asked() -> Identity {
    ASKED.parse().expect("identity")
}

#[test]
fn a_leaf_chaining_to_the_returned_root_is_accepted() {
    let root = authority("root", None);
    let (pem, key) = leaf(&[ASKED], &root);
    let certificate = checked_certificate(
        &asked(),
        &[pem, root.certificate.pem()],
        key,
        UnixTime::now(),
    )
    .expect("accepted");
    assert_eq!(certificate.identity(), &asked());
    assert_eq!(certificate.chain().len(), 1, "the root is never sent");
}

#[test]
fn intermediates_and_root_bundles_work() {
    let old_root = authority("old root", None);
    let new_root = authority("new root", None);
    let intermediate = authority("intermediate", Some(&new_root));
    let (pem, key) = leaf(&[ASKED], &intermediate);
    // One entry holding both roots, as istiod sends during a root rotation.
    let bundle = format!(
        "{}{}",
        old_root.certificate.pem(),
        new_root.certificate.pem()
    );
    let certificate = checked_certificate(
        &asked(),
        &[pem, intermediate.certificate.pem(), bundle],
        key,
        UnixTime::now(),
    )
    .expect("accepted");
    assert_eq!(certificate.chain().len(), 2, "leaf and intermediate");
    assert_eq!(certificate.roots().len(), 2, "both roots trusted for peers");
}

#[test]
fn untrustworthy_responses_are_refused_with_the_reason() {
    let root = authority("root", None);
    let other_root = authority("other", None);
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        ("empty", vec![], "cert_chain is empty"),
        (
            "wrong identity",
            vec![
                leaf(&["spiffe://cluster.local/ns/default/sa/b"], &root).0,
                root.certificate.pem(),
            ],
            "leaf names [spiffe://cluster.local/ns/default/sa/b], asked for exactly",
        ),
        (
            "an extra identity",
            vec![
                leaf(
                    &[ASKED, "spiffe://cluster.local/ns/kube-system/sa/admin"],
                    &root,
                )
                .0,
                root.certificate.pem(),
            ],
            "asked for exactly",
        ),
        (
            "no root",
            vec![leaf(&[ASKED], &root).0],
            "no root certificate in cert_chain",
        ),
        (
            "signed by another root",
            vec![leaf(&[ASKED], &other_root).0, root.certificate.pem()],
            "does not chain to the returned roots",
        ),
        ("not PEM", vec!["garbage".to_string()], "cert_chain[0]"),
    ];
    for (what, chain, expected) in cases {
        let (_, key) = leaf(&[ASKED], &root);
        let error = checked_certificate(&asked(), &chain, key, UnixTime::now())
            .map(|_| ())
            .expect_err(what);
        assert!(
            error.to_string().contains(expected),
            "{what}: {error} does not contain {expected:?}"
        );
    }
}
