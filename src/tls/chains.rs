//! Peer certificate chains that passed full verification, remembered for the next handshake
//! (layer L2).
//!
//! Verifying a peer's chain (webpki path building and an ECDSA signature per certificate) is a
//! quarter of the CPU of a whole mutual TLS 1.3 handshake (`cargo bench --bench hot_path --
//! mtls`), and a node mostly meets the same few peers again. A chain that passed is remembered
//! by the SHA-256 of its exact DER (leaf and intermediates, length-prefixed) together with the
//! time window in which every one of its certificates is valid. A later handshake presenting
//! the same bytes within that window skips the chain verification; everything else still
//! happens on every handshake: the peer's proof of its key (CertificateVerify, checked by
//! rustls), and the identity decision on the leaf's SPIFFE IDs (the caller's).
//!
//! Why this accepts nothing the full check would refuse: the cache belongs to one verifier,
//! built for one trust bundle (a new bundle means a new certificate and new verifiers, hence an
//! empty cache) and one key usage (the client and server verifiers have separate caches);
//! webpki's answer depends only on those, the DER and the time, and no revocation lists are
//! used. The window is the intersection of the validity of every presented certificate, which
//! is never wider than that of the path webpki built from them; trust anchors have no validity
//! check in webpki either way. Failures are never remembered.

use std::collections::HashMap;
use std::sync::Mutex;

use rustls::pki_types::{CertificateDer, UnixTime};

use crate::spiffe::Identity;

/// How many chains one verifier remembers. Enough for the distinct peers a workload meets;
/// an entry is ~150 bytes, so a full cache is ~40 KiB.
pub const CAPACITY: usize = 256;

/// A bounded set of verified chains; see the module documentation.
#[derive(Debug)]
pub struct VerifiedChains {
    entries: Mutex<HashMap<[u8; 32], Verified>>,
    capacity: usize,
}

/// What is known about a chain that passed verification.
#[derive(Debug, Clone)]
struct Verified {
    /// The leaf's SPIFFE identities, in certificate order.
    identities: Vec<Identity>,
    /// Seconds since the epoch from which every certificate of the chain is valid.
    valid_from: u64,
    /// Seconds since the epoch until which (inclusive) every certificate is valid.
    valid_until: u64,
}

impl Default for VerifiedChains {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl VerifiedChains {
    /// An empty cache holding at most `capacity` chains.
    pub fn with_capacity(capacity: usize) -> Self {
        VerifiedChains {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// The leaf's identities if this exact chain passed `verify` before and all of it is valid
    /// at `now`; otherwise runs `verify` (the full chain verification, returning the leaf's
    /// identities) and remembers the chain if it passed.
    pub fn verify<E>(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        verify: impl FnOnce() -> Result<Vec<Identity>, E>,
    ) -> Result<Vec<Identity>, E> {
        let key = fingerprint(end_entity, intermediates);
        let now = now.as_secs();
        {
            let mut entries = self.lock();
            match entries.get(&key) {
                Some(known) if known.valid_from <= now && now <= known.valid_until => {
                    return Ok(known.identities.clone());
                }
                Some(_) => {
                    entries.remove(&key);
                }
                None => {}
            }
        }
        let identities = verify()?;
        if let Some((valid_from, valid_until)) = window(end_entity, intermediates) {
            let mut entries = self.lock();
            if entries.len() >= self.capacity {
                // Any entry: peers that keep connecting come back at their next handshake.
                if let Some(evicted) = entries.keys().next().copied() {
                    entries.remove(&evicted);
                }
            }
            let verified = Verified {
                identities: identities.clone(),
                valid_from,
                valid_until,
            };
            entries.insert(key, verified);
        }
        Ok(identities)
    }

    /// How many chains are remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no chain is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Verified>> {
        // Plain data: usable after a panic elsewhere.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// SHA-256 over every certificate, each prefixed by its length, so that no two different
/// chains share the input.
fn fingerprint(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for certificate in std::iter::once(end_entity).chain(intermediates) {
        context.update(&(certificate.len() as u64).to_be_bytes());
        context.update(certificate.as_ref());
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(context.finish().as_ref());
    key
}

/// The seconds in which every certificate is valid, or `None` if one cannot be read or the
/// window is empty (then the chain is not remembered).
fn window(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Option<(u64, u64)> {
    let mut from = 0u64;
    let mut until = u64::MAX;
    for certificate in std::iter::once(end_entity).chain(intermediates) {
        let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
        let validity = parsed.validity();
        from = from.max(u64::try_from(validity.not_before.timestamp()).unwrap_or(0));
        until = until.min(u64::try_from(validity.not_after.timestamp()).ok()?);
    }
    (from <= until).then_some((from, until))
}
