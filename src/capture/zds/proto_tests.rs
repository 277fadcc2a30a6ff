use std::os::fd::OwnedFd;

use prost::Message;

use super::*;

fn fds(count: usize) -> Vec<OwnedFd> {
    (0..count)
        .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").expect("open /dev/null")))
        .collect()
}

fn info() -> WorkloadInfo {
    WorkloadInfo {
        name: "client".into(),
        namespace: "default".into(),
        service_account: "client-sa".into(),
    }
}

fn request(payload: workload_request::Payload) -> Vec<u8> {
    WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

fn add(uid: &str, info: Option<WorkloadInfo>) -> Vec<u8> {
    request(workload_request::Payload::Add(AddWorkload {
        uid: uid.into(),
        workload_info: info,
    }))
}

/// What a decode produced, comparable in a table.
#[derive(Debug, PartialEq)]
enum Seen {
    Add(String, WorkloadInfo),
    Keep(String),
    Del(String),
    Snapshot,
    /// Any protobuf decode error (prost's wording is not ours to pin).
    Malformed,
    Error(String),
}

fn seen(result: Result<Request, ZdsError>) -> Seen {
    match result {
        Ok(Request::Add { uid, workload, .. }) => Seen::Add(uid, workload),
        Ok(Request::Keep { uid }) => Seen::Keep(uid),
        Ok(Request::Del { uid }) => Seen::Del(uid),
        Ok(Request::SnapshotSent) => Seen::Snapshot,
        Err(ZdsError::Malformed(_)) => Seen::Malformed,
        Err(error) => Seen::Error(error.to_string()),
    }
}

#[test]
fn decode_table() {
    let good_add = add("uid-1", Some(info()));
    let keep = request(workload_request::Payload::Keep(KeepWorkload {
        uid: "uid-2".into(),
    }));
    let del = request(workload_request::Payload::Del(DelWorkload {
        uid: "uid-3".into(),
    }));
    let snapshot = request(workload_request::Payload::SnapshotSent(SnapshotSent {}));
    let oversized = add(&"u".repeat(MAX_MESSAGE_SIZE), Some(info()));
    let error = |text: &str| Seen::Error(text.to_string());
    let cases: Vec<(&str, Vec<u8>, usize, Seen)> =
        vec![
        ("add with one fd", good_add.clone(), 1, Seen::Add("uid-1".into(), info())),
        ("keep", keep.clone(), 0, Seen::Keep("uid-2".into())),
        ("del", del.clone(), 0, Seen::Del("uid-3".into())),
        ("snapshot sent", snapshot.clone(), 0, Seen::Snapshot),
        (
            "add without fd",
            good_add.clone(),
            0,
            error("add for uid-1 carries 0 file descriptors, expected exactly one (the pod netns)"),
        ),
        (
            "add with two fds",
            good_add.clone(),
            2,
            error("add for uid-1 carries 2 file descriptors, expected exactly one (the pod netns)"),
        ),
        (
            "add without workload_info",
            add("uid-1", None),
            1,
            error("add for uid-1 has no workload_info"),
        ),
        ("add with empty uid", add("", Some(info())), 1, error("add request with an empty uid")),
        (
            "keep with an fd",
            keep,
            1,
            error("keep message must carry no file descriptor, got 1"),
        ),
        (
            "del with an fd",
            del,
            1,
            error("del message must carry no file descriptor, got 1"),
        ),
        (
            "snapshot with an fd",
            snapshot,
            1,
            error("snapshotSent message must carry no file descriptor, got 1"),
        ),
        (
            "truncated add",
            good_add[..good_add.len() - 3].to_vec(),
            1,
            Seen::Malformed,
        ),
        ("empty datagram", Vec::new(), 0, error("unknown or empty WorkloadRequest payload")),
        (
            "unknown payload field 9",
            vec![0x4a, 0x00],
            0,
            error("unknown or empty WorkloadRequest payload"),
        ),
        ("garbage", vec![0xff, 0xff, 0xff, 0xff], 0, Seen::Malformed),
        ("wrong wire type for add", vec![0x08, 0x01], 0, Seen::Malformed),
        (
            "oversized add still decodes here (the size bound is enforced at receive)",
            oversized,
            1,
            Seen::Add("u".repeat(MAX_MESSAGE_SIZE), info()),
        ),
    ];
    for (name, bytes, fd_count, expected) in cases {
        let got = seen(decode_request(&bytes, fds(fd_count)));
        assert_eq!(got, expected, "{name}");
    }
}

/// The bytes are istio-cni's: assembled by hand from the field numbers of `zds.proto`.
#[test]
fn wire_bytes_match_istio_field_numbers() {
    let cases: Vec<(&str, Vec<u8>, Seen)> = vec![
        (
            "add (1) {uid (1), workload_info (2) {name (1)}}",
            vec![0x0a, 0x08, 0x0a, 0x01, b'u', 0x12, 0x03, 0x0a, 0x01, b'n'],
            Seen::Add(
                "u".into(),
                WorkloadInfo {
                    name: "n".into(),
                    ..WorkloadInfo::default()
                },
            ),
        ),
        (
            "keep (5) {uid (1)}",
            vec![0x2a, 0x03, 0x0a, 0x01, b'u'],
            Seen::Keep("u".into()),
        ),
        (
            "del (2) {uid (2)}",
            vec![0x12, 0x03, 0x12, 0x01, b'u'],
            Seen::Del("u".into()),
        ),
        ("snapshot_sent (3) {}", vec![0x1a, 0x00], Seen::Snapshot),
        (
            "workload_info service_account (3), namespace (2)",
            vec![
                0x0a, 0x0b, 0x0a, 0x01, b'u', 0x12, 0x06, 0x12, 0x01, b's', 0x1a, 0x01, b'a',
            ],
            Seen::Add(
                "u".into(),
                WorkloadInfo {
                    name: String::new(),
                    namespace: "s".into(),
                    service_account: "a".into(),
                },
            ),
        ),
    ];
    for (name, bytes, expected) in cases {
        let fd_count = usize::from(matches!(expected, Seen::Add(..)));
        assert_eq!(
            seen(decode_request(&bytes, fds(fd_count))),
            expected,
            "{name}"
        );
    }
    assert_eq!(encode_hello(), vec![0x08, 0x01], "ZdsHello{{version: V1}}");
    assert_eq!(encode_response(None), vec![0x0a, 0x00], "ack (1) {{}}");
    assert_eq!(
        encode_response(Some("x")),
        vec![0x0a, 0x03, 0x0a, 0x01, b'x'],
        "ack (1) {{error (1)}}"
    );
}

#[test]
fn responses_round_trip_and_never_encode_an_empty_nack() {
    let decode = |bytes: Vec<u8>| {
        let response = WorkloadResponse::decode(bytes.as_slice()).expect("decodes");
        match response.payload {
            Some(workload_response::Payload::Ack(ack)) => ack.error,
            None => panic!("no payload"),
        }
    };
    assert_eq!(decode(encode_response(None)), "");
    assert_eq!(decode(encode_response(Some("bad fd"))), "bad fd");
    assert_eq!(decode(encode_response(Some(""))), "request failed");
    assert_eq!(decode_response(&encode_response(None)), Some(Ok(())));
    assert_eq!(
        decode_response(&encode_response(Some("bad fd"))),
        Some(Err(Nack("bad fd".to_string())))
    );
    assert_eq!(decode_response(&[]), None, "no ack");
    assert_eq!(decode_response(&[0xff]), None, "not protobuf");
}

#[test]
fn request_kind_and_uid_name_the_message() {
    let cases = [
        (Request::Keep { uid: "k".into() }, "keep", "k"),
        (Request::Del { uid: "d".into() }, "del", "d"),
        (Request::SnapshotSent, "snapshotSent", ""),
    ];
    for (request, kind, uid) in cases {
        assert_eq!((request.kind(), request.uid()), (kind, uid));
    }
}
