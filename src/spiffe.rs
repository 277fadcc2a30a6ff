//! SPIFFE workload identities (layer L0: a pure value type used from config up to TLS).
//!
//! An identity is exactly `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`. It is
//! parsed once into this type and compared byte for byte afterwards: no regex, no case folding,
//! no normalisation, so that what a certificate says is exactly what policy and pool keys see.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A parsed SPIFFE identity of the Kubernetes form `spiffe://td/ns/NS/sa/SA`.
///
/// Held as its one URI, shared: every proxied connection copies the identities of both ends
/// into its access-log record and its `/connections` entry, and a clone is then a reference
/// count instead of three allocations (RSS per idle connection). Compared, hashed and ordered
/// by its parts, as the parts are what policy matches.
#[derive(Clone)]
pub struct Identity {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    uri: Arc<str>,
    /// Where the namespace starts in `uri`.
    namespace_at: u16,
    /// Where the service account starts in `uri`.
    service_account_at: u16,
}

/// Why a string is not a SPIFFE identity of the form we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The string does not start with `spiffe://`.
    #[error("identity {0:?} does not start with \"spiffe://\"")]
    Scheme(String),
    /// The path is not exactly `/ns/<namespace>/sa/<service-account>`.
    #[error("identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Shape(String),
    /// A component is empty or contains a character that is not allowed.
    #[error("identity {0:?} has an empty component or a character outside [A-Za-z0-9._-]")]
    Component(String),
}

const SCHEME: &str = "spiffe://";
/// Each component is at most 253 bytes, so offsets into the URI fit in a `u16`.
const MAX_COMPONENT: usize = 253;

/// SPIFFE path segments and trust domains: letters, digits, `.`, `-`, `_`. Rejecting everything
/// else (including `%`, NUL, `/`) closes the door on encoding tricks in certificate SANs.
fn valid_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_COMPONENT
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl Identity {
    /// Builds an identity from its parts, validating each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let uri = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        if ![trust_domain, namespace, service_account]
            .iter()
            .all(|part| valid_component(part))
        {
            return Err(IdentityError::Component(uri));
        }
        let namespace_at = SCHEME.len() + trust_domain.len() + "/ns/".len();
        let service_account_at = namespace_at + namespace.len() + "/sa/".len();
        Ok(Identity {
            uri: uri.into(),
            // Both fit: three components of at most 253 bytes and the fixed parts.
            namespace_at: namespace_at as u16,
            service_account_at: service_account_at as u16,
        })
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..usize::from(self.namespace_at) - "/ns/".len()]
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.uri
            [usize::from(self.namespace_at)..usize::from(self.service_account_at) - "/sa/".len()]
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.uri[usize::from(self.service_account_at)..]
    }

    /// The whole `spiffe://` URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    fn parts(&self) -> (&str, &str, &str) {
        (
            self.trust_domain(),
            self.namespace(),
            self.service_account(),
        )
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        // The parts are determined by the URI (components cannot contain '/').
        Arc::ptr_eq(&self.uri, &other.uri) || self.uri == other.uri
    }
}

impl Eq for Identity {}

impl std::hash::Hash for Identity {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.uri.hash(state);
    }
}

impl PartialOrd for Identity {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Identity {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parts().cmp(&other.parts())
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("trust_domain", &self.trust_domain())
            .field("namespace", &self.namespace())
            .field("service_account", &self.service_account())
            .finish()
    }
}

impl FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some(rest) = s.strip_prefix("spiffe://") else {
            return Err(IdentityError::Scheme(s.to_string()));
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let [trust_domain, "ns", namespace, "sa", service_account] = parts.as_slice() else {
            return Err(IdentityError::Shape(s.to_string()));
        };
        Identity::new(trust_domain, namespace, service_account)
            .map_err(|_| IdentityError::Component(s.to_string()))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let cases: &[(&str, bool)] = &[
            ("spiffe://cluster.local/ns/default/sa/client", true),
            ("spiffe://td.test/ns/a-b/sa/c_d.e", true),
            ("spiffe://cluster.local/ns/default/sa/", false),
            ("spiffe://cluster.local/ns//sa/x", false),
            ("spiffe:///ns/default/sa/x", false),
            ("SPIFFE://cluster.local/ns/default/sa/x", false),
            ("spiffe://cluster.local/ns/default/sa/x/extra", false),
            ("spiffe://cluster.local/sa/x/ns/default", false),
            ("spiffe://cluster.local/ns/default/sa/x%2F", false),
            ("spiffe://cluster.local/ns/default/sa/x\0", false),
            ("spiffe://cluster.local/ns/default/sa/x y", false),
            ("https://cluster.local/ns/default/sa/x", false),
            ("", false),
        ];
        for (input, ok) in cases {
            let got = input.parse::<Identity>();
            assert_eq!(got.is_ok(), *ok, "{input:?}: {got:?}");
            if let Ok(id) = got {
                assert_eq!(&id.to_string(), input, "round trip");
            }
        }
    }

    #[test]
    fn parts_and_exact_comparison() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/client"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "client");
        let upper: Identity = "spiffe://cluster.local/ns/Default/sa/client"
            .parse()
            .unwrap();
        assert_ne!(id, upper, "comparison is byte for byte, no case folding");
    }

    #[test]
    fn identities_order_by_their_parts_not_their_text() {
        let parse = |text: &str| text.parse::<Identity>().expect(text);
        // As text, '-' sorts before '/', so "a-b" would come first.
        let short = parse("spiffe://a/ns/x/sa/y");
        let longer = parse("spiffe://a-b/ns/x/sa/y");
        assert!(short < longer, "trust domain \"a\" sorts before \"a-b\"");
        let copy = short.clone();
        assert_eq!(copy, parse("spiffe://a/ns/x/sa/y"));
        assert_eq!(copy.as_str(), "spiffe://a/ns/x/sa/y");
        let set: std::collections::HashSet<_> = [short, copy, longer].into_iter().collect();
        assert_eq!(set.len(), 2);
    }
}
