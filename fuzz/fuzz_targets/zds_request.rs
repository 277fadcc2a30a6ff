//! Fuzzes the istio-cni (ZDS) request decoder, `capture::zds::decode_request`: the bytes of one
//! SEQPACKET datagram from the CNI socket, with 0, 1 or 2 fds attached (the first input byte
//! chooses how many; the fds are `/dev/null`, since the decoder only counts and moves them).
//!
//! Properties: nothing panics; an `Add` is accepted only with exactly one fd and the others only
//! with none; an accepted uid is never empty; every outcome encodes to a response that decodes
//! back with the same ACK/NACK text (and a NACK is never empty, which would read as an ACK).
#![no_main]

use std::os::fd::OwnedFd;

use libfuzzer_sys::fuzz_target;
use nodetunnel::capture::zds::proto::{decode_response, Nack};
use nodetunnel::capture::zds::{decode_request, encode_response, Request};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let fd_count = usize::from(selector % 3);
    let fds: Vec<OwnedFd> = (0..fd_count)
        .filter_map(|_| std::fs::File::open("/dev/null").ok().map(OwnedFd::from))
        .collect();
    let fd_count = fds.len();
    let nack = match decode_request(bytes, fds) {
        Ok(request) => {
            assert!(!request.uid().is_empty() || matches!(request, Request::SnapshotSent));
            let expected_fds = usize::from(matches!(request, Request::Add { .. }));
            assert_eq!(
                fd_count,
                expected_fds,
                "{} accepted with {fd_count} fds",
                request.kind()
            );
            None
        }
        Err(error) => Some(error.to_string()),
    };
    let answer = decode_response(&encode_response(nack.as_deref())).expect("our response decodes");
    match (nack, answer) {
        (None, Ok(())) => {}
        (Some(reason), Err(Nack(text))) => {
            assert!(!text.is_empty(), "a NACK must not read as an ACK");
            if !reason.is_empty() {
                assert_eq!(text, reason);
            }
        }
        (nack, answer) => panic!("sent {nack:?}, decoded {answer:?}"),
    }
});
