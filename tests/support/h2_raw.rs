//! A hand-driven HTTP/2 client over TLS for attacks on an HBONE port: any TLS version, ALPN
//! and client certificate, then frames written byte by byte. A library client (h2) refuses to
//! send what these tests need (floods, resets right after HEADERS, CONTINUATION without end,
//! oversized or malformed header blocks), so frames and HPACK are encoded here.
//!
//! Reading decodes just enough HPACK to tell a response's `:status` (the agent's h2 server
//! sends nothing else in its answers).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustls::pki_types::ServerName;

use super::tls_probe::{frame, AcceptAnyServer, ClientCert};

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame types (RFC 9113 §6).
pub const DATA: u8 = 0x0;
/// HEADERS.
pub const HEADERS: u8 = 0x1;
/// RST_STREAM.
pub const RST_STREAM: u8 = 0x3;
/// SETTINGS.
pub const SETTINGS: u8 = 0x4;
/// PING.
pub const PING: u8 = 0x6;
/// GOAWAY.
pub const GOAWAY: u8 = 0x7;
/// WINDOW_UPDATE.
pub const WINDOW_UPDATE: u8 = 0x8;
/// CONTINUATION.
pub const CONTINUATION: u8 = 0x9;
/// END_STREAM flag (DATA, HEADERS).
pub const END_STREAM: u8 = 0x1;
/// END_HEADERS flag (HEADERS, CONTINUATION).
pub const END_HEADERS: u8 = 0x4;
/// SETTINGS_INITIAL_WINDOW_SIZE.
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

/// How the client does TLS.
#[derive(Debug)]
pub struct TlsOptions {
    /// The client certificate, if any.
    pub cert: Option<ClientCert>,
    /// Offer only TLS 1.2 (the agent must refuse it).
    pub tls12_only: bool,
    /// ALPN protocols offered (empty: no ALPN extension).
    pub alpn: Vec<Vec<u8>>,
}

impl TlsOptions {
    /// TLS 1.3, ALPN `h2`, with `cert`: what a mesh peer sends.
    pub fn mesh(cert: Option<ClientCert>) -> TlsOptions {
        TlsOptions {
            cert,
            tls12_only: false,
            alpn: vec![b"h2".to_vec()],
        }
    }
}

/// One received frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Frame type.
    pub kind: u8,
    /// Flags.
    pub flags: u8,
    /// Stream id.
    pub stream: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of an RST_STREAM or GOAWAY.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let bytes = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    }
}

/// What a read saw: the frames, and whether (and how) the connection ended.
#[derive(Debug, Default)]
pub struct Received {
    /// Frames in arrival order.
    pub frames: Vec<Frame>,
    /// `Some(reason)` once the server closed the connection (EOF, reset, TLS alert).
    pub closed: Option<String>,
}

impl Received {
    /// The GOAWAY error code, if the server sent one.
    pub fn goaway(&self) -> Option<u32> {
        self.frames
            .iter()
            .find(|frame| frame.kind == GOAWAY)
            .and_then(Frame::error_code)
    }
}

/// A TLS connection speaking raw HTTP/2 frames.
pub struct Session {
    stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    buffer: Vec<u8>,
    statuses: StatusDecoder,
    /// Set once the server closed.
    pub closed: Option<String>,
}

impl Session {
    /// Connects to `target` from the current namespace and completes the TLS handshake as far
    /// as the client can tell (in TLS 1.3 the server's verdict on our certificate arrives
    /// later, as an alert on the first read).
    pub fn connect(target: SocketAddr, options: TlsOptions) -> Result<Session> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = if options.tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)));
        let mut config = match options.cert {
            Some(cert) => builder.with_client_auth_cert(cert.chain, cert.key)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = options.alpn;
        let server_name = ServerName::IpAddress(target.ip().into());
        let connection = rustls::ClientConnection::new(Arc::new(config), server_name)?;
        let tcp = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .with_context(|| format!("TCP connect to {target}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut stream = rustls::StreamOwned::new(connection, tcp);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .context("TLS handshake")?;
        }
        Ok(Session {
            stream,
            buffer: Vec::new(),
            statuses: StatusDecoder::default(),
            closed: None,
        })
    }

    /// The ALPN protocol the server chose.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.stream.conn.alpn_protocol().map(<[u8]>::to_vec)
    }

    /// Writes `bytes` (and flushes).
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Sends the preface and a SETTINGS frame with `settings` (id, value).
    pub fn start(&mut self, settings: &[(u16, u32)]) -> std::io::Result<()> {
        let mut payload = Vec::new();
        for (id, value) in settings {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&value.to_be_bytes());
        }
        let mut out = PREFACE.to_vec();
        out.extend(frame(SETTINGS, 0, 0, &payload));
        self.send(&out)
    }

    /// [`Session::start`], then waits for the server's SETTINGS and its connection-level
    /// WINDOW_UPDATE and acknowledges the SETTINGS, so the server's flow-control windows (above
    /// the 64 KiB default) apply to what is sent next.
    pub fn start_acknowledged(&mut self, settings: &[(u16, u32)]) -> Result<()> {
        self.start(settings)?;
        let (mut settings_seen, mut window_seen) = (false, false);
        self.read_until(Duration::from_secs(5), |frame| {
            settings_seen |= frame.kind == SETTINGS && frame.flags & 0x1 == 0;
            window_seen |= frame.kind == WINDOW_UPDATE && frame.stream == 0;
            settings_seen && window_seen
        });
        if !settings_seen {
            bail!("no SETTINGS from the server ({:?})", self.closed);
        }
        self.send(&frame(SETTINGS, 0x1, 0, &[]))?;
        Ok(())
    }

    /// Reads frames for up to `timeout`, or until the server closes or `done` says so.
    pub fn read_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&Frame) -> bool,
    ) -> Received {
        let deadline = Instant::now() + timeout;
        let mut received = Received::default();
        let mut chunk = vec![0u8; 64 * 1024];
        while self.closed.is_none() && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = self
                .stream
                .sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))));
            match self.stream.read(&mut chunk) {
                Ok(0) => self.closed = Some("EOF".into()),
                Ok(read) => self.buffer.extend_from_slice(&chunk[..read]),
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(error) => self.closed = Some(error.to_string()),
            }
            let mut stop = false;
            for frame in take_frames(&mut self.buffer) {
                match frame.kind {
                    HEADERS => self.statuses.observe(&frame),
                    RST_STREAM => {
                        let code = frame.error_code().unwrap_or(0);
                        self.statuses
                            .answers
                            .entry(frame.stream)
                            .or_insert(Err(code));
                    }
                    _ => {}
                }
                stop |= done(&frame);
                received.frames.push(frame);
            }
            if stop {
                break;
            }
        }
        received.closed = self.closed.clone();
        received
    }

    /// Waits up to `timeout` for the answer on `stream`: `Ok(status)` for a response,
    /// `Err(code)` for an RST_STREAM; `None` if neither came (the reason is in `closed`).
    pub fn answer(&mut self, stream: u32, timeout: Duration) -> Option<Result<u16, u32>> {
        if let Some(answer) = self.statuses.answers.remove(&stream) {
            return Some(answer);
        }
        self.read_until(timeout, |frame| {
            frame.stream == stream && matches!(frame.kind, HEADERS | RST_STREAM)
        });
        self.statuses.answers.remove(&stream)
    }
}

/// A CONNECT for `authority` on `stream` with extra headers, END_HEADERS set.
pub fn connect(stream: u32, authority: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut fields = vec![(":method", "CONNECT"), (":authority", authority)];
    fields.extend_from_slice(extra);
    frame(HEADERS, END_HEADERS, stream, &header_block(&fields))
}

/// An HPACK block of literal fields without indexing, new names, no Huffman (RFC 7541 §6.2.2).
pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x00);
        hpack_string(&mut block, name.as_bytes());
        hpack_string(&mut block, value.as_bytes());
    }
    block
}

fn hpack_string(out: &mut Vec<u8>, value: &[u8]) {
    hpack_integer(out, 0x00, 7, value.len());
    out.extend_from_slice(value);
}

/// RFC 7541 §5.1 integer with an `prefix_bits` prefix, high bits from `first`.
fn hpack_integer(out: &mut Vec<u8>, first: u8, prefix_bits: u32, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A RST_STREAM with `code`.
pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

/// A WINDOW_UPDATE of `increment` on `stream`.
pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

fn take_frames(buffer: &mut Vec<u8>) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 9 <= buffer.len() {
        let len = (usize::from(buffer[at]) << 16)
            | (usize::from(buffer[at + 1]) << 8)
            | usize::from(buffer[at + 2]);
        if at + 9 + len > buffer.len() {
            break;
        }
        let id = [
            buffer[at + 5],
            buffer[at + 6],
            buffer[at + 7],
            buffer[at + 8],
        ];
        frames.push(Frame {
            kind: buffer[at + 3],
            flags: buffer[at + 4],
            stream: u32::from_be_bytes(id) & 0x7fff_ffff,
            payload: buffer[at + 9..at + 9 + len].to_vec(),
        });
        at += 9 + len;
    }
    buffer.drain(..at);
    frames
}

/// Decodes `:status` from response HEADERS: static-table statuses, and literal statuses
/// (indexed name 8, plain or Huffman-coded digits) with the dynamic-table entries they add.
#[derive(Debug, Default)]
struct StatusDecoder {
    /// Statuses added to the dynamic table, newest first.
    dynamic: std::collections::VecDeque<u16>,
    answers: std::collections::HashMap<u32, Result<u16, u32>>,
}

impl StatusDecoder {
    fn observe(&mut self, frame: &Frame) {
        let mut block: &[u8] = &frame.payload;
        if frame.flags & 0x8 != 0 {
            // PADDED: pad length, then the block, then padding.
            let Some((&pad, rest)) = block.split_first() else {
                return;
            };
            block = &rest[..rest.len().saturating_sub(usize::from(pad))];
        }
        if frame.flags & 0x20 != 0 {
            block = block.get(5..).unwrap_or_default();
        }
        if let Some(status) = self.status(block) {
            self.answers.entry(frame.stream).or_insert(Ok(status));
        }
    }

    fn status(&mut self, block: &[u8]) -> Option<u16> {
        let (&first, rest) = block.split_first()?;
        const STATIC: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
        if first & 0x80 != 0 {
            let index = usize::from(first & 0x7f);
            return match index {
                8..=14 => Some(STATIC[index - 8]),
                62.. => self.dynamic.get(index - 62).copied(),
                _ => None,
            };
        }
        // Literal with incremental indexing (01xxxxxx), without (0000xxxx) or never (0001xxxx),
        // name index 8 (`:status`).
        let (indexed, name_index) = match first {
            0x40..=0x7f => (true, first & 0x3f),
            0x00..=0x1f => (false, first & 0x0f),
            _ => return None,
        };
        if name_index != 8 {
            return None;
        }
        let (&length, value) = rest.split_first()?;
        let value = value.get(..usize::from(length & 0x7f))?;
        let text = if length & 0x80 != 0 {
            huffman_digits(value)?
        } else {
            String::from_utf8(value.to_vec()).ok()?
        };
        let status = text.parse().ok()?;
        if indexed {
            self.dynamic.push_front(status);
        }
        Some(status)
    }
}

/// Decodes a Huffman-coded string of ASCII digits (RFC 7541 Appendix B: '0'-'2' are 5-bit
/// codes 0-2, '3'-'9' 6-bit codes 0x19-0x1f); anything else is refused.
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<bool> = bytes
        .iter()
        .flat_map(|byte| (0..8).rev().map(move |bit| byte >> bit & 1 == 1))
        .collect();
    let mut text = String::new();
    let mut at = 0;
    let read = |at: usize, len: usize| -> Option<u8> {
        let slice = bits.get(at..at + len)?;
        Some(slice.iter().fold(0u8, |acc, bit| acc << 1 | u8::from(*bit)))
    };
    while at < bits.len() {
        // Trailing padding: the most significant bits of EOS (all ones), under 8 bits.
        if bits.len() - at < 8 && bits[at..].iter().all(|bit| *bit) {
            break;
        }
        match read(at, 5)? {
            code @ 0..=2 => {
                text.push(char::from(b'0' + code));
                at += 5;
            }
            _ => match read(at, 6)? {
                code @ 0x19..=0x1f => {
                    text.push(char::from(b'3' + code - 0x19));
                    at += 6;
                }
                _ => return None,
            },
        }
    }
    Some(text)
}

/// Fails unless `answer` is a response with `status`.
pub fn expect_status(case: &str, answer: Option<Result<u16, u32>>, status: u16) -> Result<()> {
    match answer {
        Some(Ok(got)) if got == status => Ok(()),
        other => bail!("{case}: expected status {status}, got {other:?}"),
    }
}
