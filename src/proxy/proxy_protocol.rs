//! The PROXY protocol v2 header the inbound side writes in front of the bytes it delivers to a
//! workload with `applicationTunnel: {protocol: PROXY}` (layer L3, pure encoding; no I/O).
//!
//! Such a workload (a waypoint) terminates tunnels itself and needs to know who the client was
//! and what it asked for: the header carries the HBONE peer's address as source, the CONNECT
//! target as destination and, in TLV `0xD0`, the peer's SPIFFE identity (Istio's layout,
//! shared/reference/istio-compat.md §2.10). Only written, never read.

use std::net::{IpAddr, SocketAddr};

use crate::spiffe::Identity;

/// The 12-byte v2 signature.
const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Version 2, command PROXY.
const VERSION_PROXY: u8 = 0x21;
/// AF_INET + STREAM.
const TCP_OVER_IPV4: u8 = 0x11;
/// AF_INET6 + STREAM.
const TCP_OVER_IPV6: u8 = 0x21;
/// Istio's TLV type for the client's SPIFFE identity.
pub const TLV_PEER_IDENTITY: u8 = 0xD0;

/// Encodes a v2 PROXY header for a TCP connection from `source` to `destination`. When the two
/// addresses are of different families both are written as IPv6 (IPv4-mapped), since one header
/// has one family. `identity`, if any, goes in TLV `0xD0`.
pub fn encode_v2(
    source: SocketAddr,
    destination: SocketAddr,
    identity: Option<&Identity>,
) -> Vec<u8> {
    let identity = identity.map(ToString::to_string);
    let tlv_len = identity.as_ref().map_or(0, |text| 3 + text.len());
    let mut header = Vec::with_capacity(16 + 36 + tlv_len);
    header.extend_from_slice(&SIGNATURE);
    header.push(VERSION_PROXY);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            header.push(TCP_OVER_IPV4);
            push_len(&mut header, 12 + tlv_len);
            header.extend_from_slice(&src.octets());
            header.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            header.push(TCP_OVER_IPV6);
            push_len(&mut header, 36 + tlv_len);
            header.extend_from_slice(&as_v6(src).octets());
            header.extend_from_slice(&as_v6(dst).octets());
        }
    }
    header.extend_from_slice(&source.port().to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    if let Some(text) = identity {
        header.push(TLV_PEER_IDENTITY);
        push_len(&mut header, text.len());
        header.extend_from_slice(text.as_bytes());
    }
    header
}

fn as_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn push_len(header: &mut Vec<u8>, len: usize) {
    // Addresses plus one identity TLV stay far below 64 KiB: identities are short URIs.
    let len = u16::try_from(len).unwrap_or(u16::MAX);
    header.extend_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_byte_exact_headers() {
        let identity: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let id_bytes = identity.to_string().into_bytes();
        let mut v4_with_tlv = SIGNATURE.to_vec();
        v4_with_tlv.extend_from_slice(&[0x21, 0x11, 0x00, (12 + 3 + id_bytes.len()) as u8]);
        v4_with_tlv.extend_from_slice(&[10, 0, 1, 2, 10, 0, 2, 3, 0x30, 0x39, 0x1F, 0x90]);
        v4_with_tlv.extend_from_slice(&[0xD0, 0x00, id_bytes.len() as u8]);
        v4_with_tlv.extend_from_slice(&id_bytes);
        let mut v4_plain = SIGNATURE.to_vec();
        v4_plain.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        v4_plain.extend_from_slice(&[192, 0, 2, 1, 192, 0, 2, 2, 0x00, 0x50, 0x01, 0xBB]);
        let mut v6 = SIGNATURE.to_vec();
        v6.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]);
        v6.extend_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0x00, 0x01, 0x00, 0x02]);
        let mut mixed = SIGNATURE.to_vec();
        mixed.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]);
        mixed.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 10, 0, 1, 2]);
        mixed.extend_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        mixed.extend_from_slice(&[0x00, 0x01, 0x00, 0x02]);
        let cases: &[(&str, &str, Option<&Identity>, Vec<u8>)] = &[
            (
                "10.0.1.2:12345",
                "10.0.2.3:8080",
                Some(&identity),
                v4_with_tlv,
            ),
            ("192.0.2.1:80", "192.0.2.2:443", None, v4_plain),
            ("[fd00::1]:1", "[fd00::2]:2", None, v6),
            ("10.0.1.2:1", "[fd00::2]:2", None, mixed),
        ];
        for (source, destination, identity, want) in cases {
            let got = encode_v2(
                source.parse().unwrap(),
                destination.parse().unwrap(),
                *identity,
            );
            assert_eq!(&got, want, "{source} -> {destination}");
        }
    }
}
