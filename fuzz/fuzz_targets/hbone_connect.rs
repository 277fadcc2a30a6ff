//! Fuzzes the server side of the HBONE CONNECT head: `hbone::parse_connect`, plus
//! `parse_authority` and `TraceParent::parse` on raw strings.
//!
//! Input is a request head in a readable line form, so seeds are plain text:
//!
//! ```text
//! CONNECT 10.0.2.7:8080
//! forwarded: for="10.0.1.5:40000"
//! :protocol: websocket
//! ```
//!
//! Line 1 is `<method> <uri>`; every further non-empty line is `<name>: <value>` (bytes after
//! the first `:`, one leading space dropped; a line without `:` makes the input skipped). The pseudo-header `:protocol` sets h2's extended-CONNECT
//! extension. Heads that `http` itself refuses (bad method, URI or header bytes) are skipped:
//! h2 would have refused them before our parser saw them.
//!
//! Properties: nothing panics; an accepted request, rebuilt with `ConnectRequest::build` from
//! what was parsed, parses back to the same authority, client address, trace id, baggage and
//! service host; parsed authorities and trace ids re-parse from their `Display` form.
#![no_main]

use std::net::SocketAddr;

use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Uri};
use libfuzzer_sys::fuzz_target;
use nodetunnel::hbone::{
    parse_authority, parse_connect, ConnectRequest, ParsedConnect, TraceParent,
};
use nodetunnel::net::ClientAddr;

fuzz_target!(|data: &[u8]| {
    let mut lines = data
        .split(|byte| *byte == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let head = lines.next().unwrap_or_default();
    for line in data.split(|byte| *byte == b'\n') {
        if let Ok(text) = std::str::from_utf8(line) {
            check_raw(text);
        }
    }
    let Some(request) = request(head, lines) else {
        return;
    };
    if let Ok(parsed) = parse_connect(&request) {
        check_round_trip(&parsed);
    }
});

/// Builds the request, or `None` where `http` refuses a part of it.
fn request<'a>(head: &[u8], header_lines: impl Iterator<Item = &'a [u8]>) -> Option<Request<()>> {
    let (method, uri) = split_once(head, b' ').unwrap_or((head, b""));
    let mut request = Request::new(());
    *request.method_mut() = Method::from_bytes(method).ok()?;
    *request.uri_mut() = Uri::try_from(uri).ok()?;
    for line in header_lines.filter(|line| !line.is_empty()) {
        let (name, value) = split_once(line, b':')?;
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if name == b"" {
            // A line starting with ':' is a pseudo-header: `:protocol: <value>`.
            let (pseudo, value) = split_once(value, b':')?;
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if pseudo == b"protocol" {
                let protocol = std::str::from_utf8(value).ok()?;
                request
                    .extensions_mut()
                    .insert(h2::ext::Protocol::from(protocol));
            }
            continue;
        }
        let name = HeaderName::from_bytes(name).ok()?;
        let value = HeaderValue::from_bytes(value).ok()?;
        request.headers_mut().append(name, value);
    }
    Some(request)
}

fn split_once(bytes: &[u8], separator: u8) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|byte| *byte == separator)?;
    Some((&bytes[..at], &bytes[at + 1..]))
}

/// `parse_authority` and `TraceParent::parse` on any string: no panic, and what they accept
/// re-parses from its display form to the same value.
fn check_raw(text: &str) {
    if let Ok(authority) = parse_authority(text) {
        let shown = authority.to_string();
        assert_eq!(
            parse_authority(&shown).as_ref(),
            Ok(&authority),
            "authority {text:?} displays as {shown:?}, which does not parse back"
        );
    }
    if let Some(traceparent) = TraceParent::parse(text) {
        let shown = traceparent.to_string();
        assert_eq!(TraceParent::parse(&shown).as_ref(), Some(&traceparent));
        // Display always writes flags `00`; everything before the flags is kept.
        assert_eq!(
            shown[..53],
            text[..53],
            "traceparent {text:?} changed on display"
        );
    }
}

/// What a client would send for `parsed` must parse back to the same thing on the server.
fn check_round_trip(parsed: &ParsedConnect) {
    let fallback_client: SocketAddr = ([127, 0, 0, 1], 1).into();
    let connect = ConnectRequest {
        authority: parsed.authority.clone(),
        client: ClientAddr(parsed.forwarded_for.unwrap_or(fallback_client)),
        service_host: parsed.forwarded_host.clone(),
        baggage: parsed.baggage.clone().unwrap_or_default(),
        traceparent: parsed
            .traceparent
            .clone()
            .unwrap_or_else(TraceParent::random),
    };
    let rebuilt = match connect.build() {
        Ok(rebuilt) => rebuilt,
        Err(error) => panic!("accepted request {parsed:?} cannot be rebuilt: {error}"),
    };
    let reparsed = match parse_connect(&rebuilt) {
        Ok(reparsed) => reparsed,
        Err(error) => panic!("rebuilt request for {parsed:?} is refused: {error}"),
    };
    assert_eq!(reparsed.authority, parsed.authority, "authority round trip");
    assert_eq!(
        reparsed.forwarded_for,
        Some(connect.client.0),
        "forwarded for= round trip"
    );
    assert_eq!(
        reparsed.forwarded_host, parsed.forwarded_host,
        "forwarded host= round trip"
    );
    assert_eq!(
        reparsed.traceparent,
        Some(connect.traceparent),
        "traceparent"
    );
    let baggage = parsed.baggage.clone().filter(|baggage| !baggage.is_empty());
    assert_eq!(reparsed.baggage, baggage, "baggage round trip");
}
