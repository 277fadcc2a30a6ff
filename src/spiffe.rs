//! SPIFFE workload identities (layer L0: a pure value type used from config up to TLS).
//!
//! An identity is exactly `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`. It is
//! parsed once into this type and compared byte for byte afterwards: no regex, no case folding,
//! no normalisation, so that what a certificate says is exactly what policy and pool keys see.

use std::fmt;
use std::str::FromStr;

/// A parsed SPIFFE identity of the Kubernetes form `spiffe://td/ns/NS/sa/SA`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
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

/// SPIFFE path segments and trust domains: letters, digits, `.`, `-`, `_`. Rejecting everything
/// else (including `%`, NUL, `/`) closes the door on encoding tricks in certificate SANs.
fn valid_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
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
        if ![trust_domain, namespace, service_account]
            .iter()
            .all(|part| valid_component(part))
        {
            return Err(IdentityError::Component(format!(
                "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
            )));
        }
        Ok(Identity {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
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
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
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
}
