//! Address newtypes (layer L0).
//!
//! A proxied connection carries several socket addresses that are all `SocketAddr` underneath and
//! easy to swap by mistake: the address the application *meant* to reach, the address of the peer
//! that connected to us, and the address a listener is bound to. Each gets its own type so the
//! compiler catches a swap. Used everywhere from the listeners (L4) down to the route decision (L3).
//! Also the `https://host:port` form of a control-plane address, parsed once for the config
//! check and the gRPC channel alike.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The destination the application dialled before redirection sent it to us
/// (from `SO_ORIGINAL_DST`, or the accepted socket's local address under TPROXY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OriginalDst(pub SocketAddr);

/// The remote address of a downstream connection: the application (outbound) or the peer agent /
/// plaintext client (inbound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// The address a listener is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenAddr(pub SocketAddr);

/// The address the agent actually dials upstream: a peer's HBONE port, or the final target for
/// plaintext passthrough.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UpstreamAddr(pub SocketAddr);

macro_rules! display_inner {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    )*};
}
display_inner!(OriginalDst, ClientAddr, ListenAddr, UpstreamAddr);

/// The well-known ports of the agent. Connections that target one of these through capture are
/// refused so that the agent never proxies to itself.
pub mod ports {
    /// Captured outbound traffic.
    pub const OUTBOUND: u16 = 15001;
    /// Captured plaintext inbound traffic.
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    /// HBONE (mTLS + HTTP/2 CONNECT).
    pub const HBONE: u16 = 15008;
    /// Admin API (loopback only).
    pub const ADMIN: u16 = 15000;
    /// Prometheus metrics.
    pub const METRICS: u16 = 15020;
    /// Readiness.
    pub const READINESS: u16 = 15021;

    /// Ports a captured connection may never target: proxying to them would loop.
    pub fn is_agent_port(port: u16) -> bool {
        matches!(port, OUTBOUND | INBOUND_PLAINTEXT | HBONE)
    }
}

/// `ip:port` with IPv6 bracketed, the form used in HBONE `:authority` and `forwarded`.
pub fn host_port(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// An IP in a named network, written `network/IP` in config (`/10.0.0.1` for the default network).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkAddress {
    /// Network name; empty for the default network.
    pub network: String,
    /// The address within that network.
    pub ip: IpAddr,
}

/// Why a `network/IP` string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkAddressError {
    /// The string had no `/` separating network and IP.
    #[error("expected \"network/IP\" (e.g. \"/10.0.0.1\"), got {0:?}")]
    MissingSlash(String),
    /// The part after the `/` is not an IP address.
    #[error("{0:?} is not a valid IP address")]
    BadIp(String),
}

impl std::str::FromStr for NetworkAddress {
    type Err = NetworkAddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((network, ip)) = s.rsplit_once('/') else {
            return Err(NetworkAddressError::MissingSlash(s.to_string()));
        };
        let ip = ip
            .parse()
            .map_err(|_| NetworkAddressError::BadIp(ip.to_string()))?;
        Ok(NetworkAddress {
            network: network.to_string(),
            ip,
        })
    }
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.ip)
    }
}

impl serde::Serialize for NetworkAddress {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for NetworkAddress {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A control-plane service's address as configured: `https://host[:port]`, or `host:port` with
/// `https://` assumed (istiod is always reached over TLS; the port defaults to 443).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsAddress {
    /// The URI requests go to.
    pub uri: http::Uri,
    /// The host to resolve and dial, without IPv6 brackets.
    pub host: String,
    /// The port to dial.
    pub port: u16,
}

/// Why an address is not an `https://host[:port]` address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpsAddressError {
    /// Not a URI at all (the URI parser's reason).
    #[error("{0}")]
    Uri(String),
    /// A scheme other than `https`.
    #[error("only https:// is supported (istiod is always reached over TLS)")]
    NotHttps,
    /// No host name or address.
    #[error("no host")]
    NoHost,
}

impl std::str::FromStr for HttpsAddress {
    type Err = HttpsAddressError;
    fn from_str(address: &str) -> Result<Self, Self::Err> {
        let with_scheme = if address.contains("://") {
            address.to_string()
        } else {
            format!("https://{address}")
        };
        let uri = with_scheme
            .parse::<http::Uri>()
            .map_err(|error| HttpsAddressError::Uri(error.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(HttpsAddressError::NotHttps);
        }
        let authority = uri.authority().ok_or(HttpsAddressError::NoHost)?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(HttpsAddressError::NoHost);
        }
        let port = authority.port_u16().unwrap_or(443);
        Ok(HttpsAddress {
            host: host.to_string(),
            port,
            uri,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_address_forms() {
        // Expected (network, ip), or None for a parse error.
        type Expected = Option<(&'static str, &'static str)>;
        let cases: &[(&str, Expected)] = &[
            ("/10.0.0.1", Some(("", "10.0.0.1"))),
            ("net1/10.0.0.1", Some(("net1", "10.0.0.1"))),
            ("/fd00::1", Some(("", "fd00::1"))),
            ("10.0.0.1", None),
            ("/10.0.0", None),
            ("", None),
        ];
        for (input, want) in cases {
            let got: Result<NetworkAddress, _> = input.parse();
            match want {
                Some((net, ip)) => {
                    let got = got.expect(input);
                    assert_eq!(got.network, *net, "{input}");
                    assert_eq!(got.ip.to_string(), *ip, "{input}");
                    assert_eq!(got.to_string(), format!("{net}/{ip}"));
                }
                None => assert!(got.is_err(), "{input} should fail"),
            }
        }
    }

    #[test]
    fn authority_brackets_ipv6() {
        assert_eq!(host_port("10.1.2.3".parse().unwrap(), 80), "10.1.2.3:80");
        assert_eq!(host_port("fd00::1".parse().unwrap(), 80), "[fd00::1]:80");
    }

    #[test]
    fn https_addresses() {
        let cases: &[(&str, Option<(&str, u16)>)] = &[
            (
                "https://istiod.istio-system.svc:15012",
                Some(("istiod.istio-system.svc", 15012)),
            ),
            ("istiod:15012", Some(("istiod", 15012))),
            ("https://[fd00::1]:15012", Some(("fd00::1", 15012))),
            ("https://10.0.0.1", Some(("10.0.0.1", 443))),
            ("http://istiod:15010", None),
            ("https://", None),
            ("", None),
        ];
        for (input, want) in cases {
            let got = input
                .parse::<HttpsAddress>()
                .ok()
                .map(|address| (address.host, address.port));
            assert_eq!(
                got,
                want.map(|(h, p)| (h.to_string(), p)),
                "address {input:?}"
            );
        }
    }
}
