//! The built-in certificate authority (layer L2), the certificate source of standalone mode.
//!
//! It signs workload certificates locally with an ECDSA P-256 root. The root is either supplied
//! as files (`ca.certFile` + `ca.keyFile`, so several agents share one root and trust each
//! other) or kept in the agent's state directory, created on first start and reloaded after, so
//! a restart does not change the root that peers already trust.

use std::fs;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{CaError, CertificateSource, WorkloadCertificate};
use crate::config::agent::CaConfig;
use crate::spiffe::Identity;

/// Root certificate file name in the state directory.
pub const ROOT_CERT_FILE: &str = "ca-cert.pem";
/// Root key file name in the state directory (mode 0600).
pub const ROOT_KEY_FILE: &str = "ca-key.pem";

/// Tolerated clock difference between nodes: leaves are valid from this long before issue.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Lifetime of a root created by [`BuiltinCa::generate_root`].
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A CA holding its root key in memory; issues a fresh P-256 key and leaf per request.
pub struct BuiltinCa {
    /// The root re-encoded by rcgen, used only as the issuer handle for signing (same subject
    /// and key identifier as the original, so leaves chain to `root`).
    issuer: rcgen::Certificate,
    issuer_key: KeyPair,
    /// The root exactly as loaded: the trust anchor handed to workloads.
    root: CertificateDer<'static>,
    ttl: Duration,
}

impl std::fmt::Debug for BuiltinCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltinCa")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl BuiltinCa {
    /// Loads the root from `config.cert_file`/`key_file` when set; otherwise from
    /// `state_dir/ca-cert.pem` + `ca-key.pem`, creating both (and the directory) on first use.
    pub fn load_or_create(state_dir: &Path, config: &CaConfig) -> Result<Self, CaError> {
        let ttl = config.workload_cert_ttl;
        match (&config.cert_file, &config.key_file) {
            (Some(cert), Some(key)) => return Self::from_pem(&read(cert)?, &read(key)?, ttl),
            (None, None) => {}
            _ => return Err(CaError::IncompleteFiles),
        }
        let cert_path = state_dir.join(ROOT_CERT_FILE);
        let key_path = state_dir.join(ROOT_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::from_pem(&read(&cert_path)?, &read(&key_path)?, ttl),
            (false, false) => {
                let (cert_pem, key_pem) = Self::generate_root("nodetunnel root CA")?;
                write_root(state_dir, &cert_pem, &key_pem)?;
                tracing::info!(path = %cert_path.display(), "created a new root CA");
                Self::from_pem(&cert_pem, &key_pem, ttl)
            }
            (true, false) => Err(CaError::PartialState {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(CaError::PartialState {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    /// A CA from a PEM root certificate and its PEM private key (PKCS#8 or SEC1).
    pub fn from_pem(cert_pem: &str, key_pem: &str, ttl: Duration) -> Result<Self, CaError> {
        if ttl < Duration::from_secs(1) || ttl > ROOT_LIFETIME {
            return Err(CaError::InvalidTtl(ttl));
        }
        let issuer_key = KeyPair::from_pem(key_pem).map_err(CaError::RootKey)?;
        let params =
            CertificateParams::from_ca_cert_pem(cert_pem).map_err(CaError::RootCertificate)?;
        let root = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|_| CaError::RootCertificate(rcgen::Error::CouldNotParseCertificate))?
            .1
            .contents;
        if !matches!(params.is_ca, IsCa::Ca(_)) {
            return Err(CaError::RootCertificate(
                rcgen::Error::CouldNotParseCertificate,
            ));
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(&root)
            .map_err(|_| CaError::RootCertificate(rcgen::Error::CouldNotParseCertificate))?;
        if parsed.public_key().raw != issuer_key.public_key_der().as_slice() {
            return Err(CaError::KeyMismatch);
        }
        if !parsed.validity().is_valid() {
            return Err(CaError::RootExpired);
        }
        let issuer = params.self_signed(&issuer_key).map_err(CaError::Sign)?;
        Ok(BuiltinCa {
            issuer,
            issuer_key,
            root: CertificateDer::from(root),
            ttl,
        })
    }

    /// Makes a new self-signed P-256 root valid for ten years; returns `(cert_pem, key_pem)`.
    /// Used on first start and by `nodetunnel ca init` to make a root several agents share.
    pub fn generate_root(common_name: &str) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, common_name);
        name.push(DnType::OrganizationName, "nodetunnel");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ROOT_LIFETIME;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(CaError::Sign)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The root certificate exactly as loaded (what peers must trust).
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// Issues a leaf for `identity`: fresh P-256 key, one URI SAN (the identity), empty subject,
    /// serverAuth + clientAuth, not a CA, valid from one minute ago for the configured ttl.
    pub fn issue(&self, identity: &Identity) -> Result<WorkloadCertificate, CaError> {
        let (chain, key) = self.sign(identity)?;
        Ok(WorkloadCertificate::new(
            chain,
            key,
            vec![self.root.clone()],
        )?)
    }

    /// The raw material of [`BuiltinCa::issue`]: `(chain, key)`, for callers that pair it with
    /// other roots.
    pub(crate) fn sign(
        &self,
        identity: &Identity,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = rcgen::Ia5String::try_from(identity.to_string()).map_err(CaError::Sign)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + self.ttl;
        params.serial_number = Some(random_serial());
        let leaf = params
            .signed_by(&key, &self.issuer, &self.issuer_key)
            .map_err(CaError::Sign)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![leaf.der().clone()], key))
    }
}

impl CertificateSource for BuiltinCa {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, CaError>> + Send + 'a>> {
        // Signing is a few hundred microseconds of CPU: not worth a blocking-pool hop.
        Box::pin(std::future::ready(self.issue(identity)))
    }
}

/// 16 random bytes, positive and without leading zero byte (RFC 5280 §4.1.2.2: at most 20).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes the root pair into `dir`: each file through a temporary name and a rename so a crash
/// never leaves a truncated file; the key is created with mode 0600 before any byte is written.
fn write_root(dir: &Path, cert_pem: &str, key_pem: &str) -> Result<(), CaError> {
    let write_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CaError::Write { path, source }
    };
    fs::create_dir_all(dir).map_err(write_error(dir))?;
    write_file(&dir.join(ROOT_KEY_FILE), key_pem, 0o600)?;
    write_file(&dir.join(ROOT_CERT_FILE), cert_pem, 0o644)
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let temporary: PathBuf = path.with_extension("pem.tmp");
    let error = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
    };
    // A leftover from a crash may have other permissions: start from a fresh file.
    match fs::remove_file(&temporary) {
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => return Err(error(source)),
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .map_err(error)?;
    file.write_all(contents.as_bytes()).map_err(error)?;
    file.sync_all().map_err(error)?;
    fs::rename(&temporary, path).map_err(error)
}
