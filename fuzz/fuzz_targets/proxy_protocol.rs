//! Fuzzes the PROXY protocol v2 writer (`proxy::proxy_protocol::encode_v2`, the header the
//! inbound side puts in front of bytes for an `applicationTunnel: PROXY` workload) by parsing
//! what it wrote with an independent parser, the `ppp` crate.
//!
//! Input (structured, `arbitrary`): source and destination addresses of either family, ports,
//! and optionally an identity built from three arbitrary strings (kept only if
//! `Identity::new` accepts them, since the writer only ever sees valid identities).
//!
//! Properties: the header parses as v2 PROXY over TCP, its length is exactly what was written;
//! the addresses and ports read back equal the inputs (both IPv4, or both as IPv6 with an IPv4
//! one mapped); the only TLV is `0xD0` with the identity's text, present exactly when an
//! identity was given.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nodetunnel::proxy::proxy_protocol::{encode_v2, TLV_PEER_IDENTITY};
use nodetunnel::spiffe::Identity;
use ppp::v2;

#[derive(Debug, Arbitrary)]
enum Ip {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl From<&Ip> for IpAddr {
    fn from(ip: &Ip) -> Self {
        match ip {
            Ip::V4(octets) => IpAddr::V4(Ipv4Addr::from(*octets)),
            Ip::V6(octets) => IpAddr::V6(Ipv6Addr::from(*octets)),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    source: (Ip, u16),
    destination: (Ip, u16),
    identity: Option<(String, String, String)>,
}

fuzz_target!(|input: Input| {
    let source = SocketAddr::new(IpAddr::from(&input.source.0), input.source.1);
    let destination = SocketAddr::new(IpAddr::from(&input.destination.0), input.destination.1);
    let identity = input
        .identity
        .as_ref()
        .and_then(|(trust_domain, namespace, account)| {
            Identity::new(trust_domain, namespace, account).ok()
        });
    let written = encode_v2(source, destination, identity.as_ref());

    let header = v2::Header::try_from(written.as_slice())
        .unwrap_or_else(|error| panic!("ppp refuses our header {written:02x?}: {error:?}"));
    assert_eq!(header.len(), written.len(), "header length field");
    assert_eq!(header.version, v2::Version::Two);
    assert_eq!(header.command, v2::Command::Proxy);
    assert_eq!(header.protocol, v2::Protocol::Stream);
    check_addresses(&header.addresses, source, destination);

    let tlvs: Vec<_> = header
        .tlvs()
        .map(|tlv| tlv.unwrap_or_else(|error| panic!("TLV does not parse: {error:?}")))
        .collect();
    match &identity {
        Some(identity) => {
            assert_eq!(tlvs.len(), 1, "exactly one TLV: {tlvs:?}");
            assert_eq!(tlvs[0].kind, TLV_PEER_IDENTITY);
            assert_eq!(tlvs[0].value.as_ref(), identity.to_string().as_bytes());
        }
        None => assert!(tlvs.is_empty(), "no TLV without an identity: {tlvs:?}"),
    }
});

fn check_addresses(addresses: &v2::Addresses, source: SocketAddr, destination: SocketAddr) {
    match (source.ip(), destination.ip(), addresses) {
        (IpAddr::V4(src), IpAddr::V4(dst), v2::Addresses::IPv4(read)) => {
            assert_eq!((read.source_address, read.source_port), (src, source.port()));
            let read_destination = (read.destination_address, read.destination_port);
            assert_eq!(read_destination, (dst, destination.port()));
        }
        (IpAddr::V4(_), IpAddr::V4(_), other) => panic!("IPv4 pair written as {other:?}"),
        (src, dst, v2::Addresses::IPv6(read)) => {
            assert_eq!((read.source_address, read.source_port), (v6(src), source.port()));
            let read_destination = (read.destination_address, read.destination_port);
            assert_eq!(read_destination, (v6(dst), destination.port()));
        }
        (_, _, other) => panic!("a pair with IPv6 written as {other:?}"),
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}
