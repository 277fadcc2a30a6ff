//! Adversarial and fault tests against a real agent (issue 15; the cases and what each proves
//! are listed in tests/README.md). A hostile peer or pod attacks a captured pod's 15008 and the
//! node's ports; every case checks that the attack is refused or contained, that nothing
//! reaches the app unless it should, and that the agent keeps serving honest peers afterwards.
//! Each limit is paired with a heavy but legitimate use that must keep working.
//!
//! Topology: node `b` runs the agent and the captured pod `server` (an echo app on 8080); node
//! `a` has the uncaptured pods `intruder` (the attacker, with a certificate from the mesh root
//! where the case needs one) and `bystander` (an honest client for controls). Every load loop
//! is bounded in count and time, and only addresses of these namespaces are used.
//!
//! Needs root. Without it these tests fail loudly unless `NODETUNNEL_SKIP_NETNS_TESTS=1`.

#[macro_use]
mod support;

use std::io::{Read, Write};

use anyhow::Context;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use support::agent::{Agent, Ca, Mesh, Protocol, WorkloadSpec};
use support::apps::{EchoServer, Reply};
use support::h2_raw::{self, Session, TlsOptions};
use support::netns::Topology;
use support::tls_probe::{self, frame, ClientCert, Validity};

const APP_PORT: u16 = 8080;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const INTRUDER_ID: &str = "spiffe://cluster.local/ns/default/sa/intruder";
/// Agent settings for these tests: a short TLS handshake timeout so that the stalled
/// handshakes end within the test.
const PROXY_SETTINGS: &str = "  proxy:\n    handshakeTimeout: 2s\n";

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// One agent on node `b` serving the pod `server`; attackers on node `a`. Field order is drop
/// order: the agent and the app stop before the namespaces go.
struct Target {
    agent: Agent,
    app: EchoServer,
    ca: Ca,
    config: String,
    topology: Topology,
}

impl Target {
    /// Starts the agent with `agent_settings` (YAML lines under `agent:`) and the app.
    fn start(agent_settings: &str) -> Target {
        let topology =
            Topology::linked_pair(&[("a", "intruder"), ("a", "bystander"), ("b", "server")]);
        let mesh = Mesh {
            workloads: vec![WorkloadSpec::new(
                "server",
                topology.pod("server").ip,
                "b",
                Protocol::Hbone,
            )],
            services: Vec::new(),
        };
        let ca = Ca::init().expect("nodetunnel ca init");
        let config = mesh.render(&topology, "b", &["server"]).replacen(
            "agent:\n",
            &format!("agent:\n{agent_settings}"),
            1,
        );
        let agent = Agent::start(&topology, "b", &ca, &config).expect("agent ready");
        let app = EchoServer::start(&topology, "server", APP_PORT, Reply::Echo).expect("app");
        Target {
            agent,
            app,
            ca,
            config,
            topology,
        }
    }

    fn server_ip(&self) -> Ipv4Addr {
        self.topology.pod("server").ip
    }

    fn hbone(&self) -> SocketAddr {
        addr(self.server_ip(), 15008)
    }

    fn authority(&self) -> String {
        addr(self.server_ip(), APP_PORT).to_string()
    }

    fn cert(&self, validity: Validity) -> ClientCert {
        tls_probe::leaf_from_root_valid(&self.ca, INTRUDER_ID, validity).expect("client cert")
    }

    /// Runs `work` on a thread inside `pod`'s namespace.
    fn from<T: Send + 'static>(&self, pod: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
        self.topology.run_in(pod, work).expect("thread in pod")
    }

    fn agent_pid(&self) -> u32 {
        self.agent.pid().expect("agent running")
    }

    /// Open file descriptors of the agent.
    fn agent_fds(&self) -> usize {
        let dir = format!("/proc/{}/fd", self.agent_pid());
        std::fs::read_dir(dir).map(Iterator::count).unwrap_or(0)
    }

    /// Resident memory of the agent, KiB.
    fn agent_rss_kib(&self) -> u64 {
        self.agent_status_kib("VmRSS:")
    }

    /// The most resident memory the agent ever had, KiB.
    fn agent_peak_rss_kib(&self) -> u64 {
        self.agent_status_kib("VmHWM:")
    }

    fn agent_status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.agent_pid()))
            .expect("agent status");
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{field} in the agent's status"))
    }

    /// The agent still runs and an honest peer (from `bystander`) still gets a tunnel through
    /// to the app: a CONNECT answered 200 whose bytes reach the app.
    fn assert_serves(&mut self, case: &str) {
        if let Err(error) = self.try_serve(case) {
            panic!("{case}: {error}");
        }
    }

    /// [`Target::assert_serves`] as a result.
    fn try_serve(&mut self, case: &str) -> Result<(), String> {
        if self.agent.exit_status().is_some() {
            return Err("the agent exited".into());
        }
        let marker = format!("CONTROL-{case}").into_bytes();
        let (target, authority) = (self.hbone(), self.authority());
        let cert = self.cert(Validity::Current);
        let sent = marker.clone();
        let answer = self.from("bystander", move || -> anyhow::Result<_> {
            let mut session = Session::connect(target, TlsOptions::mesh(Some(cert)))?;
            session.start(&[])?;
            let mut out = h2_raw::connect(1, &authority, &[]);
            out.extend(frame(h2_raw::DATA, 0, 1, &sent));
            session.send(&out)?;
            Ok(session.answer(1, IO_TIMEOUT))
        });
        let answer = answer.map_err(|error| format!("control: {error:#}"))?;
        h2_raw::expect_status(case, answer, 200).map_err(|error| format!("{error:#}"))?;
        support::wait_for("the control's bytes at the app", IO_TIMEOUT, || {
            self.app.received_contains(&marker).then_some(())
        })
        .map_err(|error| error.to_string())
    }

    /// Waits until the agent's fd count is back within `slack` of `baseline`.
    fn assert_fds_return(&self, case: &str, baseline: usize, slack: usize) {
        support::wait_for("the agent's fds back at baseline", IO_TIMEOUT, || {
            (self.agent_fds() <= baseline + slack).then_some(())
        })
        .unwrap_or_else(|_| {
            panic!(
                "{case}: agent holds {} fds, baseline {baseline}",
                self.agent_fds()
            )
        });
    }
}

// ---------------------------------------------------------------------------------------------
// TLS and identity

/// What the server did with a TLS attempt.
#[derive(Debug, PartialEq, Eq)]
enum Tls {
    /// Refused: handshake error, alert, reset or EOF before any HTTP/2 frame.
    Refused(String),
    /// The server spoke HTTP/2 (the listed frame types came back).
    Served(Vec<u8>),
}

/// Connects with `options`, sends the preface, a CONNECT and `marker`, and says what came back.
fn try_tls(target: SocketAddr, options: TlsOptions, authority: &str, marker: &[u8]) -> Tls {
    let mut session = match Session::connect(target, options) {
        Ok(session) => session,
        Err(error) => return Tls::Refused(format!("{error:#}")),
    };
    let mut out = h2_raw::PREFACE.to_vec();
    out.extend(frame(h2_raw::SETTINGS, 0, 0, &[]));
    out.extend(h2_raw::connect(1, authority, &[]));
    out.extend(frame(h2_raw::DATA, 0, 1, marker));
    if let Err(error) = session.send(&out) {
        return Tls::Refused(error.to_string());
    }
    let received = session.read_until(Duration::from_secs(5), |frame| {
        frame.kind == h2_raw::HEADERS
    });
    if received.frames.is_empty() {
        return Tls::Refused(received.closed.unwrap_or_else(|| "silence".into()));
    }
    Tls::Served(received.frames.iter().map(|frame| frame.kind).collect())
}

/// The first TLS record a real client sends (its ClientHello), as bytes on the wire.
fn client_hello() -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(tls_probe::AcceptAnyServer(provider)))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let mut connection =
        rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("client");
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).expect("ClientHello");
    hello
}

/// Writes `bytes` on a plain TCP connection (then half-closes if `finish`) and waits, bounded,
/// for the server to close. Returns how it closed, or an error if it stayed open.
fn raw_tcp(
    target: SocketAddr,
    bytes: &[u8],
    finish: bool,
    wait: Duration,
) -> Result<String, String> {
    let mut tcp = TcpStream::connect_timeout(&target, IO_TIMEOUT).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(wait))
        .map_err(|e| e.to_string())?;
    tcp.write_all(bytes).map_err(|e| e.to_string())?;
    if finish {
        let _ = tcp.shutdown(std::net::Shutdown::Write);
    }
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tcp.read(&mut chunk) {
            Ok(0) => return Ok(format!("EOF after {} bytes", answer.len())),
            Ok(read) => answer.extend_from_slice(&chunk[..read]),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("still open after {wait:?}"))
            }
            Err(error) => return Ok(error.to_string()),
        }
    }
}

/// Client certificates outside their validity period, TLS 1.2, a foreign ALPN, no ALPN,
/// garbage, a truncated ClientHello, `close_notify` mid-handshake and a handshake that never
/// completes are all refused on 15008 without a byte reaching the app; the agent's fds return
/// to where they were and an honest peer is served throughout. (No client certificate, a
/// foreign root and a foreign trust domain: `hbone_netns::hbone_port_refuses_untrusted_client_certificates`.)
#[test]
fn tls_attempts_outside_the_mesh_profile_are_refused() {
    require_netns!("tls_attempts_outside_the_mesh_profile_are_refused");
    let mut target = Target::start(PROXY_SETTINGS);
    target.assert_serves("before");
    let baseline = target.agent_fds();
    let accepted = target.app.accepted();
    let (hbone, authority) = (target.hbone(), target.authority());

    let with = |cert: ClientCert, tls12_only: bool, alpn: &[&[u8]]| TlsOptions {
        cert: Some(cert),
        tls12_only,
        alpn: alpn.iter().map(|p| p.to_vec()).collect(),
    };
    let cases = vec![
        (
            "expired client certificate",
            with(target.cert(Validity::Expired), false, &[b"h2"]),
        ),
        (
            "client certificate not yet valid",
            with(target.cert(Validity::NotYetValid), false, &[b"h2"]),
        ),
        (
            "TLS 1.2 only",
            with(target.cert(Validity::Current), true, &[b"h2"]),
        ),
        (
            "ALPN http/1.1 only",
            with(target.cert(Validity::Current), false, &[b"http/1.1"]),
        ),
    ];
    for (index, (case, options)) in cases.into_iter().enumerate() {
        let marker = format!("TLS-MARKER-{index}").into_bytes();
        let (auth, sent) = (authority.clone(), marker.clone());
        let outcome = target.from("intruder", move || try_tls(hbone, options, &auth, &sent));
        assert!(matches!(outcome, Tls::Refused(_)), "{case}: {outcome:?}");
        assert!(
            !target.app.received_contains(&marker),
            "{case}: bytes reached the app"
        );
    }

    // Without ALPN the handshake may complete, but only HTTP/2 is spoken: an HTTP/1 CONNECT
    // is answered by closing the connection.
    let (auth, cert) = (authority.clone(), target.cert(Validity::Current));
    let no_alpn = target.from("intruder", move || -> anyhow::Result<_> {
        let options = TlsOptions {
            cert: Some(cert),
            tls12_only: false,
            alpn: Vec::new(),
        };
        let mut session = match Session::connect(hbone, options) {
            Ok(session) => session,
            Err(error) => return Ok(Some(format!("{error:#}"))),
        };
        let request = format!("CONNECT {auth} HTTP/1.1\r\nHost: {auth}\r\n\r\nNO-ALPN-MARKER");
        let _ = session.send(request.as_bytes());
        Ok(session.read_until(IO_TIMEOUT, |_| false).closed)
    });
    let closed = no_alpn.expect("no-ALPN attempt");
    assert!(
        closed.is_some(),
        "no ALPN + HTTP/1: the connection stayed open"
    );
    assert!(!target.app.received_contains(b"NO-ALPN-MARKER"));

    let hello = client_hello();
    let close_notify = [0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 0x00];
    let mut hello_then_close_notify = hello.clone();
    hello_then_close_notify.extend_from_slice(&close_notify);
    let mut garbage = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    garbage.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let half_hello = hello[..hello.len() / 2].to_vec();
    let raw_cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("plaintext HTTP/1 and garbage", garbage, true),
        (
            "the HTTP/2 preface without TLS",
            h2_raw::PREFACE.to_vec(),
            true,
        ),
        (
            "a truncated ClientHello, then FIN",
            half_hello.clone(),
            true,
        ),
        (
            "close_notify right after the ClientHello",
            hello_then_close_notify,
            false,
        ),
        // Stays open on our side: only the handshake timeout (2 s here) can end it.
        ("a handshake that never completes", half_hello, false),
    ];
    for (case, bytes, finish) in raw_cases {
        let wait = Duration::from_secs(15);
        let closed = target.from("intruder", move || raw_tcp(hbone, &bytes, finish, wait));
        assert!(closed.is_ok(), "{case}: {closed:?}");
    }

    assert_eq!(
        target.app.accepted(),
        accepted,
        "a refused attempt reached the app"
    );
    target.assert_fds_return("TLS attempts", baseline, 2);
    target.assert_serves("after");
}

// ---------------------------------------------------------------------------------------------
// CONNECT

/// A case name, its header fields (name, raw value) and what it must get.
type StreamCase = (String, Vec<(String, Vec<u8>)>, Expect);

/// What a stream must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Status(u16),
    /// Any refusal: a non-200 status or a stream reset.
    Refused,
}

/// On one authenticated connection, requests that are not a CONNECT to this pod get their
/// status (400 malformed or not this pod, 503 agent port or nothing there) or a stream reset,
/// each on its own stream; nothing reaches the app, and a valid CONNECT on the same
/// connection afterwards is served. Oversized header blocks are refused the same way.
#[test]
fn connect_requests_that_do_not_name_the_pod_are_refused_per_stream() {
    require_netns!("connect_requests_that_do_not_name_the_pod_are_refused_per_stream");
    let mut target = Target::start(PROXY_SETTINGS);
    let (ip, intruder) = (target.server_ip(), target.topology.pod("intruder").ip);
    let at = |port: u16| addr(ip, port).to_string();
    let long_host = format!("{}.example:8080", "a".repeat(10 * 1024));
    let mut cases: Vec<StreamCase> = Vec::new();
    let mut add = |case: &str, fields: &[(&str, &[u8])], expect: Expect| {
        let fields = fields
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_vec()))
            .collect();
        cases.push((case.to_string(), fields, expect));
    };
    let auth = at(APP_PORT);
    let get: &[(&str, &[u8])] = &[
        (":method", b"GET"),
        (":scheme", b"https"),
        (":path", b"/"),
        (":authority", auth.as_bytes()),
    ];
    add("GET", get, Expect::Status(400));
    let post: &[(&str, &[u8])] = &[
        (":method", b"POST"),
        (":scheme", b"https"),
        (":path", b"/"),
        (":authority", auth.as_bytes()),
    ];
    add("POST", post, Expect::Status(400));
    let connect = |authority: &str| -> Vec<(&'static str, Vec<u8>)> {
        vec![
            (":method", b"CONNECT".to_vec()),
            (":authority", authority.as_bytes().to_vec()),
        ]
    };
    let table: Vec<(String, String, Expect)> = vec![
        ("no port".into(), ip.to_string(), Expect::Status(400)),
        ("port 0".into(), at(0), Expect::Status(400)),
        ("port 65536".into(), format!("{ip}:65536"), Expect::Refused),
        (
            "IPv6 without brackets".into(),
            "::1:8080".into(),
            Expect::Refused,
        ),
        (
            "userinfo".into(),
            format!("user@{ip}:8080"),
            Expect::Refused,
        ),
        ("10 KiB hostname".into(), long_host, Expect::Refused),
        (
            "unknown hostname".into(),
            "nosuch.example:8080".into(),
            Expect::Status(503),
        ),
        (
            "another pod's IP".into(),
            addr(intruder, APP_PORT).to_string(),
            Expect::Status(400),
        ),
        (
            "loopback".into(),
            "127.0.0.1:8080".into(),
            Expect::Status(400),
        ),
        (
            "IPv6 loopback".into(),
            "[::1]:8080".into(),
            Expect::Status(400),
        ),
        (
            "IPv4-mapped loopback".into(),
            "[::ffff:127.0.0.1]:8080".into(),
            Expect::Status(400),
        ),
        (
            "unspecified".into(),
            "0.0.0.0:8080".into(),
            Expect::Status(400),
        ),
        ("the agent's 15001".into(), at(15001), Expect::Status(503)),
        ("the agent's 15006".into(), at(15006), Expect::Status(503)),
        ("the agent's 15008".into(), at(15008), Expect::Status(503)),
        ("the node's 15000".into(), at(15000), Expect::Status(503)),
        ("the node's 15020".into(), at(15020), Expect::Status(503)),
        ("the node's 15021".into(), at(15021), Expect::Status(503)),
    ];
    for (case, authority, expect) in &table {
        let fields = connect(authority);
        let borrowed: Vec<(&str, &[u8])> = fields.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        add(case, &borrowed, *expect);
    }
    add(
        "CONNECT with :path and :scheme",
        &[
            (":method", b"CONNECT"),
            (":scheme", b"https"),
            (":path", b"/"),
            (":authority", auth.as_bytes()),
        ],
        Expect::Refused,
    );
    add(
        "duplicate :authority",
        &[
            (":method", b"CONNECT"),
            (":authority", auth.as_bytes()),
            (":authority", b"127.0.0.1:8080"),
        ],
        Expect::Refused,
    );
    add(
        "connection-specific header",
        &[
            (":method", b"CONNECT"),
            (":authority", auth.as_bytes()),
            ("connection", b"close"),
        ],
        Expect::Refused,
    );
    add(
        "pseudo-header after a regular one",
        &[
            (":method", b"CONNECT"),
            ("baggage", b"k=v"),
            (":authority", auth.as_bytes()),
        ],
        Expect::Refused,
    );

    let (hbone, cert) = (target.hbone(), target.cert(Validity::Current));
    let before = target.app.accepted();
    let valid = auth.clone();
    let results = target.from("intruder", move || -> anyhow::Result<_> {
        let mut session = Session::connect(hbone, TlsOptions::mesh(Some(cert)))?;
        session.start(&[])?;
        let mut answers = Vec::new();
        let mut stream = 1;
        for (case, fields, expect) in cases {
            let fields: Vec<(&str, &[u8])> = fields
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_slice()))
                .collect();
            let block = header_block_bytes(&fields);
            if let Err(error) =
                session.send(&frame(h2_raw::HEADERS, h2_raw::END_HEADERS, stream, &block))
            {
                answers.push((format!("{case} (send: {error})"), expect, None));
                break;
            }
            let answer = session.answer(stream, IO_TIMEOUT);
            let case = match &session.closed {
                Some(reason) => format!("{case} (connection closed: {reason})"),
                None => case,
            };
            answers.push((case, expect, answer));
            stream += 2;
        }
        let mut last = h2_raw::connect(stream, &valid, &[]);
        last.extend(frame(h2_raw::DATA, 0, stream, b"AFTER-BAD-STREAMS"));
        let answer = match session.send(&last) {
            Ok(()) => session.answer(stream, IO_TIMEOUT),
            Err(_) => None,
        };
        let case = format!("valid CONNECT afterwards (closed: {:?})", session.closed);
        answers.push((case, Expect::Status(200), answer));
        Ok(answers)
    });
    for (case, expect, answer) in results.expect("CONNECT session") {
        match expect {
            Expect::Status(status) => h2_raw::expect_status(&case, answer, status).unwrap(),
            Expect::Refused => assert!(
                matches!(answer, Some(Ok(status)) if status != 200)
                    || matches!(answer, Some(Err(_))),
                "{case}: expected a refusal, got {answer:?}"
            ),
        }
    }
    support::wait_for("the valid tunnel's bytes", IO_TIMEOUT, || {
        target
            .app
            .received_contains(b"AFTER-BAD-STREAMS")
            .then_some(())
    })
    .expect("the connection survives its bad streams");
    assert_eq!(
        target.app.accepted(),
        before + 1,
        "only the valid CONNECT may reach the app"
    );

    // Refused for the whole connection by h2 (it cannot decode the block into a request), each
    // alone on its connection: a header block over the limit (16 KiB by default), split over
    // HEADERS + CONTINUATION, an authority that is not UTF-8 and an uppercase header name.
    let big = "v".repeat(64 * 1024);
    let oversized = h2_raw::header_block(&[
        (":method", "CONNECT"),
        (":authority", &auth),
        ("x-padding", &big),
    ]);
    let not_utf8 = header_block_bytes(&[
        (":method", b"CONNECT"),
        (":authority", b"10.0.0.1:80\xff\xfe"),
    ]);
    let uppercase = header_block_bytes(&[
        (":method", b"CONNECT"),
        (":authority", auth.as_bytes()),
        ("Forwarded", b"for=x"),
    ]);
    let cases = [
        ("oversized header block", oversized),
        ("non-UTF-8 authority", not_utf8),
        ("uppercase header name", uppercase),
    ];
    for (case, block) in cases {
        let (hbone, cert) = (target.hbone(), target.cert(Validity::Current));
        let answer = target.from("intruder", move || -> anyhow::Result<_> {
            let mut session = Session::connect(hbone, TlsOptions::mesh(Some(cert)))?;
            session.start(&[])?;
            let chunks: Vec<&[u8]> = block.chunks(16 * 1024).collect();
            for (index, chunk) in chunks.iter().enumerate() {
                let kind = if index == 0 {
                    h2_raw::HEADERS
                } else {
                    h2_raw::CONTINUATION
                };
                let flags = if index + 1 == chunks.len() {
                    h2_raw::END_HEADERS
                } else {
                    0
                };
                if session.send(&frame(kind, flags, 1, chunk)).is_err() {
                    break;
                }
            }
            let _ = session.send(&frame(h2_raw::DATA, 0, 1, b"CONNECTION-LEVEL-MARKER"));
            let answer = session.answer(1, IO_TIMEOUT);
            Ok((answer, session.closed.clone()))
        });
        let (answer, closed) = answer.expect("session");
        let refused = matches!(answer, Some(Ok(status)) if status != 200)
            || matches!(answer, Some(Err(_)))
            || (answer.is_none() && closed.is_some());
        assert!(refused, "{case}: {answer:?}, closed: {closed:?}");
    }
    assert!(!target.app.received_contains(b"CONNECTION-LEVEL-MARKER"));
    target.assert_serves("after CONNECT abuse");
}

/// [`h2_raw::header_block`] for byte values (non-UTF-8 cases).
fn header_block_bytes(fields: &[(&str, &[u8])]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x00);
        for part in [name.as_bytes(), value] {
            // Lengths here stay under 127 except the 10 KiB case, which needs the long form.
            if part.len() < 127 {
                block.push(part.len() as u8);
            } else {
                block.push(0x7f);
                let mut rest = part.len() - 127;
                while rest >= 128 {
                    block.push((rest % 128) as u8 | 0x80);
                    rest /= 128;
                }
                block.push(rest as u8);
            }
            block.extend_from_slice(part);
        }
    }
    block
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 abuse

/// Agent memory may grow by at most this much during one attack (KiB).
const RSS_BUDGET_KIB: u64 = 64 * 1024;

/// Runs `attack` from the intruder with a fresh authenticated session, then checks the agent
/// stayed within [`RSS_BUDGET_KIB`] and still serves an honest peer.
fn attack<T: Send + 'static>(
    target: &mut Target,
    case: &str,
    attack: impl FnOnce(&mut Session) -> anyhow::Result<T> + Send + 'static,
) -> T {
    let rss = target.agent_rss_kib();
    let (hbone, cert) = (target.hbone(), target.cert(Validity::Current));
    let outcome = target.from("intruder", move || -> anyhow::Result<T> {
        let mut session = Session::connect(hbone, TlsOptions::mesh(Some(cert)))?;
        attack(&mut session)
    });
    let outcome = outcome.unwrap_or_else(|error| panic!("{case}: {error:#}"));
    let grown = target.agent_rss_kib().saturating_sub(rss);
    assert!(
        grown < RSS_BUDGET_KIB,
        "{case}: agent RSS grew by {grown} KiB"
    );
    target.assert_serves(case);
    outcome
}

/// Frames that a flood repeats, written in batches; stops early if the server closes.
fn flood(session: &mut Session, unit: &[u8], count: usize) -> Received {
    let batch: Vec<u8> = unit
        .iter()
        .copied()
        .cycle()
        .take(unit.len() * 500)
        .collect();
    let mut sent = 0;
    while sent < count && session.send(&batch).is_ok() {
        sent += 500;
    }
    session.read_until(IO_TIMEOUT, |_| false)
}

use support::h2_raw::Received;

/// HTTP/2 floods on an authenticated connection are contained: a CONTINUATION flood and a
/// stream-error reset flood close that connection; SETTINGS and PING floods are absorbed or
/// closed; a peer that never opens its window stalls only its stream. Agent memory stays within
/// budget and honest peers are served after each. The heavy legitimate counterpart: 200
/// concurrent tunnels on one connection (the advertised limit) all work, and only a stream
/// beyond the limit is refused.
#[test]
fn http2_floods_are_contained_and_the_stream_limit_holds() {
    require_netns!("http2_floods_are_contained_and_the_stream_limit_holds");
    let mut target = Target::start(PROXY_SETTINGS);
    let authority = target.authority();

    // CONTINUATION flood: one header block that never ends (bounded at 8 MiB).
    let auth = authority.clone();
    let received = attack(&mut target, "CONTINUATION flood", move |session| {
        session.start(&[])?;
        let block = h2_raw::header_block(&[(":method", "CONNECT"), (":authority", &auth)]);
        session.send(&frame(h2_raw::HEADERS, 0, 1, &block))?;
        let filler = h2_raw::header_block(&[("x-filler", &"f".repeat(16 * 1024 - 32))]);
        let unit = frame(h2_raw::CONTINUATION, 0, 1, &filler);
        Ok(flood(session, &unit, 512))
    });
    assert!(
        received.closed.is_some() || received.goaway().is_some(),
        "CONTINUATION flood: the connection stayed open"
    );

    // Reset flood ("MadeYouReset"): each stream is made to fail by a WINDOW_UPDATE of 0, which
    // the server answers with RST_STREAM; past h2's budget of such resets it closes.
    let received = attack(&mut target, "stream-error reset flood", move |session| {
        session.start(&[])?;
        let mut out = Vec::new();
        for stream in (1..6000u32).step_by(2) {
            // Port 9: nothing listens there, so no app connection is held open.
            out.extend(h2_raw::connect(stream, "nosuch.example:9", &[]));
            out.extend(h2_raw::window_update(stream, 0));
        }
        let _ = session.send(&out);
        Ok(session.read_until(IO_TIMEOUT, |_| false))
    });
    assert!(
        received.closed.is_some() || received.goaway().is_some(),
        "reset flood: the connection stayed open ({} frames)",
        received.frames.len()
    );

    // SETTINGS and PING floods (100k frames each) while not reading: h2 answers one at a time
    // and stops reading while its answers queue, so memory stays bounded.
    for (case, unit) in [
        ("SETTINGS flood", frame(h2_raw::SETTINGS, 0, 0, &[])),
        ("PING flood", frame(h2_raw::PING, 0, 0, b"12345678")),
    ] {
        attack(&mut target, case, move |session| {
            session.start(&[])?;
            let batch: Vec<u8> = unit
                .iter()
                .copied()
                .cycle()
                .take(unit.len() * 1000)
                .collect();
            let deadline = std::time::Instant::now() + IO_TIMEOUT;
            for _ in 0..100 {
                if session.send(&batch).is_err() || std::time::Instant::now() > deadline {
                    break;
                }
            }
            Ok(session.read_until(Duration::from_secs(2), |_| false))
        });
    }

    // A peer that never opens its window: the app's 768 KiB answer (the echo of what we send,
    // within the 1 MiB stream window we were given) stalls in the agent's bounded send buffer
    // and TCP backpressure, not in memory.
    let auth = authority.clone();
    attack(&mut target, "zero-window peer", move |session| {
        session.start_acknowledged(&[(h2_raw::SETTINGS_INITIAL_WINDOW_SIZE, 0)])?;
        session.send(&h2_raw::connect(1, &auth, &[]))?;
        let chunk = frame(h2_raw::DATA, 0, 1, &[b'w'; 16 * 1024]);
        for _ in 0..(768 / 16) {
            session.send(&chunk)?;
        }
        Ok(session.read_until(Duration::from_secs(3), |_| false))
    });

    // 200 concurrent tunnels on one connection all work; the 201st stream is refused.
    let auth = authority.clone();
    let before = target.app.accepted();
    let app = target.app.counters.clone();
    let answers = attack(&mut target, "200 concurrent tunnels", move |session| {
        session.start_acknowledged(&[])?;
        let mut out = Vec::new();
        for index in 0..201u32 {
            out.extend(h2_raw::connect(2 * index + 1, &auth, &[]));
        }
        session.send(&out)?;
        let mut answers = Vec::new();
        for index in 0..201u32 {
            answers.push(session.answer(2 * index + 1, IO_TIMEOUT));
        }
        let mut echo = Vec::new();
        for index in [0u32, 199] {
            echo.extend(frame(
                h2_raw::DATA,
                0,
                2 * index + 1,
                format!("TUNNEL-{index}").as_bytes(),
            ));
        }
        session.send(&echo)?;
        // Hold the connection until both markers went through.
        let through = support::wait_for("both tunnels' bytes at the app", IO_TIMEOUT, || {
            let received = app.received.lock().unwrap_or_else(|e| e.into_inner());
            let seen = |m: &[u8]| support::apps::contains(&received, m);
            (seen(b"TUNNEL-0") && seen(b"TUNNEL-199")).then_some(())
        });
        Ok((answers, through))
    });
    let (answers, through) = answers;
    through.expect("tunnels 1 and 200 carry bytes");
    for (index, answer) in answers.iter().take(200).enumerate() {
        h2_raw::expect_status(&format!("tunnel {index}"), *answer, 200).unwrap();
    }
    assert_eq!(answers[200], Some(Err(0x7)), "stream 201: REFUSED_STREAM");
    assert!(target.app.accepted() >= before + 200);
}

/// Rapid reset (CVE-2023-44487): CONNECT then RST_STREAM at once, 2000 times on one
/// connection, each pair in one write and so in one TLS record: the agent never sees a stream's
/// HEADERS without its reset. h2 handles every frame that has arrived before it hands out a
/// stream, and a handler looks at its stream's reset before doing anything
/// (`hbone::server::until_reset`), so no reset stream may start a check or an upstream
/// connect: none reaches the app, whatever the machine's speed. The agent keeps serving honest
/// peers within its memory budget (`attack`).
#[test]
fn rapid_reset_does_not_fan_out_to_the_app() {
    require_netns!("rapid_reset_does_not_fan_out_to_the_app");
    let mut target = Target::start(PROXY_SETTINGS);
    let authority = target.authority();
    let before = target.app.accepted();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = sent.clone();
    attack(&mut target, "rapid reset", move |session| {
        session.start(&[])?;
        for stream in (1..4000u32).step_by(2) {
            let mut pair = h2_raw::connect(stream, &authority, &[]);
            pair.extend(h2_raw::rst_stream(stream, 0x8));
            // The agent may close the connection first (h2 allows few resets of streams not
            // yet accepted); the pairs it took were still all reset ones.
            if session.send(&pair).is_err() {
                break;
            }
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(session.read_until(Duration::from_secs(3), |_| false))
    });
    // Upstream connects of reset streams, if any, have happened by now (the control ran).
    let fanned_out = target.app.accepted() - before - 1;
    let sent = sent.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("rapid reset: {sent} HEADERS + RST_STREAM pairs sent before the agent closed");
    assert_eq!(
        fanned_out, 0,
        "{fanned_out} of {sent} reset streams still opened a connection to the app"
    );
}

/// Rapid reset where each RST_STREAM arrives after the server accepted its stream (HEADERS in
/// batches of 100, the resets 20 ms later; 2000 streams): h2 frees the slot of a reset stream,
/// so the agent must bound what reset streams cost (handlers in flight counted until they end)
/// and keep its memory within budget and honest peers served (`attack` asserts both).
/// How many reset streams still reach the app depends on how much of its work a stream
/// finishes in those 20 ms, which is the machine's speed, not the agent's correctness (a CI
/// run on a quiet machine saw 600, a loaded one 7), so the count is reported, not asserted;
/// `hbone::server::tests::until_reset_abandons_the_work_of_a_reset_stream` shows without
/// timing that a reset stream's work is dropped.
#[test]
fn rapid_reset_after_accept_does_not_fan_out_to_the_app() {
    require_netns!("rapid_reset_after_accept_does_not_fan_out_to_the_app");
    let mut target = Target::start(PROXY_SETTINGS);
    let authority = target.authority();
    let before = target.app.accepted();
    attack(&mut target, "rapid reset after accept", move |session| {
        session.start_acknowledged(&[])?;
        for batch in 0..20u32 {
            let streams: Vec<u32> = (0..100).map(|i| 2 * (batch * 100 + i) + 1).collect();
            let mut headers = Vec::new();
            let mut resets = Vec::new();
            for stream in &streams {
                headers.extend(h2_raw::connect(*stream, &authority, &[]));
                resets.extend(h2_raw::rst_stream(*stream, 0x8));
            }
            if session.send(&headers).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            if session.send(&resets).is_err() {
                break;
            }
        }
        Ok(session.read_until(Duration::from_secs(3), |_| false))
    });
    let fanned_out = target.app.accepted() - before - 1;
    eprintln!("rapid reset after accept: {fanned_out} of 2000 reset streams reached the app");
}

// ---------------------------------------------------------------------------------------------
// Exhaustion

/// Opens `count` idle TCP connections to `target` from the current namespace (bounded by
/// `IO_TIMEOUT` each); the ones the kernel refused are skipped.
fn idle_connections(target: SocketAddr, count: usize) -> Vec<TcpStream> {
    (0..count)
        .filter_map(|_| TcpStream::connect_timeout(&target, IO_TIMEOUT).ok())
        .collect()
}

/// 2000 idle connections to 15008 (no TLS byte) and 300 to the app port (captured, so each
/// holds an agent connection to the app) cost file descriptors only while they are open: an
/// honest peer is served meanwhile and the agent's fds return to their baseline once they
/// close.
#[test]
fn thousands_of_idle_connections_are_released() {
    require_netns!("thousands_of_idle_connections_are_released");
    // A handshake timeout far beyond how long 2 300 connections take to open, however loaded
    // the machine: the idle HBONE connections (no TLS handshake) must all still be open when the
    // agent's fds are counted, since what is checked is that closing them releases them.
    let mut target = Target::start("  proxy:\n    handshakeTimeout: 300s\n");
    target.assert_serves("before");
    let baseline = target.agent_fds();
    let (hbone, app) = (target.hbone(), addr(target.server_ip(), APP_PORT));
    let held = target.from("intruder", move || {
        let mut held = idle_connections(hbone, 2000);
        held.extend(idle_connections(app, 300));
        held
    });
    assert!(held.len() >= 2000, "only {} connections opened", held.len());
    support::wait_for("the idle connections at the agent", IO_TIMEOUT, || {
        (target.agent_fds() >= baseline + 1000).then_some(())
    })
    .expect("the agent accepts idle connections");
    target.assert_serves("with 2300 idle connections");
    drop(held);
    target.assert_fds_return("idle connections closed", baseline, 5);
    target.assert_serves("after");
}

/// With the agent's open-file limit lowered to 256 while it runs, 400 plaintext connections
/// (two fds each) exhaust it: accept errors are logged clearly and rate-limited (no log flood),
/// the agent stays up, and once the connections close it serves again.
#[test]
fn open_file_limit_reached_then_recovered() {
    require_netns!("open_file_limit_reached_then_recovered");
    let mut target = Target::start(PROXY_SETTINGS);
    target.assert_serves("before");
    let pid = target.agent_pid().to_string();
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=256:256"])
        .status()
        .expect("prlimit");
    assert!(status.success(), "prlimit failed");
    let app = addr(target.server_ip(), APP_PORT);
    let held = target.from("intruder", move || {
        let held = idle_connections(app, 400);
        std::thread::sleep(Duration::from_secs(3));
        held
    });
    assert!(
        target.agent.exit_status().is_none(),
        "the agent exited at its fd limit"
    );
    let log = target.agent.log();
    let exhausted =
        |text: &str| text.contains("Too many open files") || text.contains("os error 24");
    let errors = log
        .events
        .iter()
        .filter(|event| exhausted(&format!("{:?}", event)))
        .count();
    assert!(
        errors > 0,
        "no clear error at the fd limit; log tail:\n{}",
        log.tail(20)
    );
    assert!(
        errors < 500,
        "{errors} error lines in 3 s: the log floods at the fd limit"
    );
    drop(held);
    // Recovery takes as long as the agent needs to close what it held: retried, bounded.
    let mut last = String::new();
    let recovered =
        support::wait_for(
            "the agent to serve again",
            Duration::from_secs(30),
            || match target.try_serve("after the fds are free again") {
                Ok(()) => Some(()),
                Err(error) => {
                    last = error;
                    None
                }
            },
        );
    assert!(recovered.is_ok(), "no recovery after the fd limit: {last}");
}

/// Slowloris on the node's readiness (15021) and metrics (15020) ports: 300 connections each
/// that send half a request head and stall do not stop readiness and metrics from answering
/// fresh requests.
#[test]
fn slowloris_on_node_ports_does_not_block_readiness_or_metrics() {
    require_netns!("slowloris_on_node_ports_does_not_block_readiness_or_metrics");
    let target = Target::start(PROXY_SETTINGS);
    let held = target.from("b", || {
        let mut held = Vec::new();
        for port in [15021, 15020] {
            for mut stream in idle_connections(addr(Ipv4Addr::LOCALHOST, port), 300) {
                let _ = stream.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n");
                held.push(stream);
            }
        }
        held
    });
    assert!(
        held.len() >= 600,
        "only {} slow connections opened",
        held.len()
    );
    for (port, path) in [(15021, "/healthz/ready"), (15020, "/metrics")] {
        let status = target.from("b", move || {
            support::agent::http_status(&format!("127.0.0.1:{port}"), path)
        });
        assert_eq!(
            status.expect("answer during slowloris"),
            200,
            "{port}{path}"
        );
    }
    drop(held);
}

/// Slowloris on 15020/15021 is also cut off: connections that never finish their request head
/// are closed by a header-read timeout, so they cannot pile up until the fds run out.
#[test]
fn slowloris_connections_on_node_ports_are_closed() {
    require_netns!("slowloris_connections_on_node_ports_are_closed");
    let target = Target::start(PROXY_SETTINGS);
    let still_open = target.from("b", || {
        let mut streams = Vec::new();
        for port in [15021, 15020] {
            for mut stream in idle_connections(addr(Ipv4Addr::LOCALHOST, port), 20) {
                let _ = stream.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n");
                streams.push((port, stream));
            }
        }
        // Poll them all, non-blocking, for up to 30 s.
        for (_, stream) in &streams {
            let _ = stream.set_nonblocking(true);
        }
        let mut open: Vec<(u16, TcpStream)> = streams;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !open.is_empty() && std::time::Instant::now() < deadline {
            open.retain_mut(|(_, stream)| {
                let mut chunk = [0u8; 512];
                loop {
                    match stream.read(&mut chunk) {
                        Ok(0) => return false,
                        Ok(_) => continue,
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                            return true
                        }
                        Err(_) => return false,
                    }
                }
            });
            std::thread::sleep(Duration::from_millis(200));
        }
        open.into_iter().map(|(port, _)| port).collect::<Vec<_>>()
    });
    assert!(
        still_open.is_empty(),
        "stalled request heads still open after 30 s on ports {still_open:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Faults

/// Data frames received on `stream` so far, concatenated, and whether it ended (END_STREAM or
/// RST_STREAM).
fn stream_data(received: &Received, stream: u32) -> (Vec<u8>, bool) {
    let mut data = Vec::new();
    let mut ended = false;
    for frame in received
        .frames
        .iter()
        .filter(|frame| frame.stream == stream)
    {
        if frame.kind == h2_raw::DATA {
            data.extend_from_slice(&frame.payload);
        }
        ended |= frame.kind == h2_raw::RST_STREAM
            || (frame.kind == h2_raw::DATA && frame.flags & h2_raw::END_STREAM != 0);
    }
    (data, ended)
}

/// An app killed mid-stream (its socket reset) ends only its own tunnel: the sibling stream on
/// the same HBONE connection keeps echoing.
#[test]
fn killed_app_ends_only_its_own_stream() {
    require_netns!("killed_app_ends_only_its_own_stream");
    let target = Target::start(PROXY_SETTINGS);
    const DOOMED_PORT: u16 = 8081;
    // An app that takes one connection, reads its first bytes, then dies with a reset.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let doomed = target.topology.spawn_in("server", move || {
        let listener = std::net::TcpListener::bind(("0.0.0.0", DOOMED_PORT)).expect("bind 8081");
        let _ = ready_tx.send(());
        let (mut stream, _) = listener.accept().expect("accept");
        let mut first = [0u8; 64];
        let _ = stream.read(&mut first);
        let socket = socket2::SockRef::from(&stream);
        let _ = socket.set_linger(Some(Duration::ZERO));
        drop(stream);
    });
    ready_rx.recv_timeout(IO_TIMEOUT).expect("doomed app ready");
    let (hbone, cert) = (target.hbone(), target.cert(Validity::Current));
    let (live, dying) = (
        target.authority(),
        addr(target.server_ip(), DOOMED_PORT).to_string(),
    );
    let outcome = target.from("intruder", move || -> anyhow::Result<_> {
        let mut session = Session::connect(hbone, TlsOptions::mesh(Some(cert)))?;
        session.start_acknowledged(&[])?;
        let mut out = h2_raw::connect(1, &live, &[]);
        out.extend(h2_raw::connect(3, &dying, &[]));
        session.send(&out)?;
        let answers = (session.answer(1, IO_TIMEOUT), session.answer(3, IO_TIMEOUT));
        session.send(&frame(h2_raw::DATA, 0, 3, b"LAST-WORDS"))?;
        let ended = session.read_until(IO_TIMEOUT, |frame| {
            frame.stream == 3
                && (frame.kind == h2_raw::RST_STREAM || frame.flags & h2_raw::END_STREAM != 0)
        });
        session.send(&frame(h2_raw::DATA, 0, 1, b"STILL-ALIVE"))?;
        let echoed = session.read_until(IO_TIMEOUT, |frame| {
            frame.stream == 1 && support::apps::contains(&frame.payload, b"STILL-ALIVE")
        });
        Ok((answers, ended, echoed))
    });
    let ((live_answer, dying_answer), ended, echoed) = outcome.expect("session");
    h2_raw::expect_status("live tunnel", live_answer, 200).unwrap();
    h2_raw::expect_status("doomed tunnel", dying_answer, 200).unwrap();
    assert!(
        stream_data(&ended, 3).1,
        "the killed app's stream did not end"
    );
    assert!(
        support::apps::contains(&stream_data(&echoed, 1).0, b"STILL-ALIVE"),
        "the sibling stream stopped echoing"
    );
    doomed
        .join()
        .expect("doomed app thread")
        .expect("doomed app namespace");
}

/// A client that stops answering PINGs mid-stream (frozen, or gone without a FIN) is detected
/// by the agent's keepalive, which closes that connection; honest peers are served meanwhile.
#[test]
fn frozen_client_is_detected_by_ping() {
    require_netns!("frozen_client_is_detected_by_ping");
    let mut target =
        Target::start("  proxy:\n    keepaliveInterval: 1s\n    keepaliveTimeout: 1s\n");
    let (hbone, cert, auth) = (
        target.hbone(),
        target.cert(Validity::Current),
        target.authority(),
    );
    let frozen = target
        .topology
        .spawn_in("intruder", move || -> anyhow::Result<Received> {
            let mut session = Session::connect(hbone, TlsOptions::mesh(Some(cert)))?;
            session.start_acknowledged(&[])?;
            session.send(&h2_raw::connect(1, &auth, &[]))?;
            // Read (so TCP stays healthy) but never answer a PING: a hung peer process.
            Ok(session.read_until(Duration::from_secs(20), |frame| {
                frame.kind == h2_raw::GOAWAY
            }))
        });
    target.assert_serves("while a client is frozen");
    let received = frozen
        .join()
        .expect("frozen client thread")
        .expect("entering the pod");
    let received = received.expect("frozen client session");
    assert!(
        received
            .frames
            .iter()
            .any(|frame| frame.kind == h2_raw::PING),
        "the agent never sent a PING"
    );
    assert!(
        received.goaway().is_some() || received.closed.is_some(),
        "the frozen client's connection was still open after 20 s"
    );
}

/// `kill -9` of the agent with live tunnels, then a restart with the same config: the new agent
/// binds the pod's ports again, its redirection rules are not duplicated, and it serves.
#[test]
fn kill_9_and_restart_rebinds_without_duplicate_rules() {
    require_netns!("kill_9_and_restart_rebinds_without_duplicate_rules");
    let mut target = Target::start(PROXY_SETTINGS);
    let (hbone, cert, auth) = (
        target.hbone(),
        target.cert(Validity::Current),
        target.authority(),
    );
    let live = target.from("intruder", move || -> anyhow::Result<Session> {
        let mut session = Session::connect(hbone, TlsOptions::mesh(Some(cert)))?;
        session.start(&[])?;
        session.send(&h2_raw::connect(1, &auth, &[]))?;
        session.answer(1, IO_TIMEOUT);
        Ok(session)
    });
    let mut live = live.expect("live tunnel");
    let pid = nix::unistd::Pid::from_raw(target.agent_pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill -9");
    support::wait_for("the agent to die", IO_TIMEOUT, || {
        target.agent.exit_status()
    })
    .expect("agent died");
    let cut = live.read_until(IO_TIMEOUT, |_| false);
    assert!(
        cut.closed.is_some(),
        "the live tunnel survived the agent's death"
    );

    target.agent =
        Agent::start(&target.topology, "b", &target.ca, &target.config).expect("restarted agent");
    let ruleset = target
        .topology
        .exec_role("server", &["nft", "list", "ruleset"])
        .expect("nft list ruleset");
    let ruleset = String::from_utf8_lossy(&ruleset.stdout);
    assert_eq!(
        ruleset.matches("table inet nodetunnel").count(),
        1,
        "rules after kill -9 and restart:\n{ruleset}"
    );
    target.assert_serves("after kill -9 and restart");
}

/// How many connector threads keep opening HBONE connections through a hand-over: several, so
/// that connections sit in the old agent's accept queues when it closes its listeners.
const HANDOVER_CONNECTORS: usize = 4;

/// Opens one HBONE connection and tunnel to the app, as a mesh client would.
fn tunnel_once(hbone: SocketAddr, authority: &str, cert: ClientCert) -> anyhow::Result<()> {
    let mut session = Session::connect(hbone, TlsOptions::mesh(Some(cert)))?;
    session.start(&[])?;
    session.send(&h2_raw::connect(1, authority, &[]))?;
    h2_raw::expect_status("hand-over connect", session.answer(1, IO_TIMEOUT), 200)
}

/// SIGTERM while a new agent takes over the same pod (the DaemonSet rollout): the new agent
/// binds the pod's ports beside the old one (it runs in another node namespace here, as a new
/// agent pod has its own) and replaces the pod's redirection rules, then the old one drains and
/// exits. Connector threads open new HBONE connections through the whole overlap, and none may
/// fail: the old agent's listeners close while the new one's serve, and the connections the
/// kernel had queued on the old listeners go to the new ones instead of being reset. The old
/// agent's live tunnel keeps flowing during its drain. Once the old agent is gone, the pod's
/// nftables table (the new agent's) is still there, once, and plaintext to the app is still
/// captured by the new agent: the old agent's shutdown removed nothing it no longer owned.
#[test]
fn sigterm_while_a_new_agent_takes_over_refuses_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    require_netns!("sigterm_while_a_new_agent_takes_over_refuses_nothing");
    let mut target = Target::start(PROXY_SETTINGS);
    let (hbone, auth) = (target.hbone(), target.authority());
    let cert = target.cert(Validity::Current);
    let live = target.from("intruder", move || -> anyhow::Result<Session> {
        let mut session = Session::connect(hbone, TlsOptions::mesh(Some(cert)))?;
        session.start_acknowledged(&[])?;
        session.send(&h2_raw::connect(1, &auth, &[]))?;
        h2_raw::expect_status("live tunnel", session.answer(1, IO_TIMEOUT), 200)?;
        Ok(session)
    });
    let mut live = live.expect("live tunnel");

    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicUsize::new(0));
    let connectors: Vec<_> = (0..HANDOVER_CONNECTORS)
        .map(|_| {
            let (stop, made) = (stop.clone(), made.clone());
            let (auth, cert) = (target.authority(), target.cert(Validity::Current));
            target.topology.spawn_in("bystander", move || {
                let mut failed = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let cert = ClientCert {
                        chain: cert.chain.clone(),
                        key: cert.key.clone_key(),
                    };
                    if let Err(error) = tunnel_once(hbone, &auth, cert) {
                        failed.push(format!("{error:#}"));
                    }
                    made.fetch_add(1, Ordering::SeqCst);
                }
                failed
            })
        })
        .collect();
    // Progress, not time: wait until the connectors have made `more` connections from now.
    let connects_more = |more: usize, phase: &str| {
        let goal = made.load(Ordering::SeqCst) + more;
        support::wait_for(phase, Duration::from_secs(60), || {
            (made.load(Ordering::SeqCst) >= goal).then_some(())
        })
        .unwrap_or_else(|error| panic!("{phase}: {error}"));
    };
    connects_more(20, "connections to the old agent alone");

    let successor = Agent::start(&target.topology, "a", &target.ca, &target.config)
        .expect("the new agent is ready beside the old one");
    connects_more(40, "connections while both agents serve");
    target.agent.terminate();
    live.send(&frame(h2_raw::DATA, 0, 1, b"DURING-DRAIN"))
        .expect("the live tunnel accepts bytes during the drain");
    let echoed = live.read_until(IO_TIMEOUT, |frame| {
        support::apps::contains(&frame.payload, b"DURING-DRAIN")
    });
    assert!(
        support::apps::contains(&stream_data(&echoed, 1).0, b"DURING-DRAIN"),
        "the live tunnel stopped at SIGTERM"
    );
    connects_more(20, "connections while the old agent drains");
    let status = target.agent.stop(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "old agent exit: {status:?}"
    );
    connects_more(20, "connections to the new agent alone");
    stop.store(true, Ordering::SeqCst);
    let failed: Vec<String> = connectors
        .into_iter()
        .flat_map(|connector| {
            connector
                .join()
                .expect("connector thread")
                .expect("connector namespace")
        })
        .collect();
    let total = made.load(Ordering::SeqCst);
    assert!(
        failed.is_empty(),
        "{} of {total} connects failed in the hand-over: {failed:?}",
        failed.len()
    );

    let ruleset = target
        .topology
        .exec_role("server", &["nft", "list", "ruleset"])
        .expect("nft list ruleset");
    let ruleset = String::from_utf8_lossy(&ruleset.stdout);
    assert_eq!(
        ruleset.matches("table inet nodetunnel").count(),
        1,
        "the pod's rules after the old agent left:\n{ruleset}"
    );
    let rules = target
        .topology
        .exec_role("server", &["ip", "rule", "list"])
        .expect("ip rule list");
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("lookup 100"),
        "the return path the new agent shares was removed:\n{rules}"
    );
    // Plaintext to the app is still redirected, now to the new agent: its access log has the
    // connection (a bypass would reach the app with no agent in between).
    let app = addr(target.server_ip(), APP_PORT);
    let client = target.from("bystander", move || -> anyhow::Result<String> {
        let mut stream = TcpStream::connect_timeout(&app, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let local = stream.local_addr()?.to_string();
        stream.write_all(b"CAPTURED-AFTER-HANDOVER")?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed)?;
        anyhow::ensure!(echoed == b"CAPTURED-AFTER-HANDOVER", "echo: {echoed:?}");
        Ok(local)
    });
    let client = client.expect("plaintext to the app after the hand-over");
    successor
        .wait_for_event(
            "the new agent's record of the plaintext connection",
            IO_TIMEOUT,
            |event| {
                event.is_access() && event.field("src.addr").as_deref() == Some(client.as_str())
            },
        )
        .expect("plaintext to the pod is captured by the new agent");
    target.agent = successor;
}

// ---------------------------------------------------------------------------------------------
// Memory budget

/// The node-wide budget of the next test (`proxy.memoryBudget`), bytes.
const MEMORY_BUDGET: u64 = 4 * 1024 * 1024;
/// What each stream's app writes at once in that test.
const FLOOD_PER_STREAM: usize = 384 * 1024;
/// Streams per connection in that test.
const FLOOD_STREAMS: u32 = 64;
/// The app port that floods.
const FLOOD_PORT: u16 = 8081;

/// A peer that never reads while its streams' apps write (issue 15): 2 connections x 64 streams
/// whose app each writes 384 KiB at once (48 MiB in all), with the peer's windows wide open.
/// Before the budget the agent read every app's answer into memory (up to 256 KiB read plus
/// 400 KiB of h2 send buffer per stream); now a connection's tunnels hold at most its share of
/// `memoryBudget` (the first connection gets a 2 MiB window and allowance, the second only
/// HTTP/2's 64 KiB floor), the rest waits in the apps' sockets. The agent's peak RSS grows by
/// less than the budget plus the per-stream state, and once the peer reads, every stream
/// delivers all of its app's bytes: throttled, nothing lost.
#[test]
fn a_peer_that_never_reads_is_held_to_the_memory_budget() {
    require_netns!("a_peer_that_never_reads_is_held_to_the_memory_budget");
    let settings = format!("{PROXY_SETTINGS}    memoryBudget: {MEMORY_BUDGET}\n");
    let mut target = Target::start(&settings);
    let flood = EchoServer::start(
        &target.topology,
        "server",
        FLOOD_PORT,
        Reply::Flood(FLOOD_PER_STREAM),
    )
    .expect("flooding app");
    target.assert_serves("before");
    let peak_before = target.agent_peak_rss_kib();
    let hbone = target.hbone();
    let certs = [
        target.cert(Validity::Current),
        target.cert(Validity::Current),
    ];
    let authority = addr(target.server_ip(), FLOOD_PORT).to_string();
    let app = flood.counters.clone();
    let delivered = target.from("intruder", move || -> anyhow::Result<Vec<Vec<usize>>> {
        const WIDE_OPEN: u32 = 0x7fff_ffff;
        let mut sessions = Vec::new();
        for cert in certs {
            let mut session = Session::connect(hbone, TlsOptions::mesh(Some(cert)))?;
            // Not `start_acknowledged`: a connection held to HTTP/2's default window gets no
            // connection WINDOW_UPDATE to wait for.
            session
                .start(&[(h2_raw::SETTINGS_INITIAL_WINDOW_SIZE, WIDE_OPEN)])
                .context("HTTP/2 start")?;
            let mut out = h2_raw::window_update(0, WIDE_OPEN - 65_535);
            for index in 0..FLOOD_STREAMS {
                out.extend(h2_raw::connect(2 * index + 1, &authority, &[]));
            }
            session.send(&out).context("sending the CONNECTs")?;
            sessions.push(session);
        }
        let streams = 2 * FLOOD_STREAMS as usize;
        support::wait_for("every stream's app connection", IO_TIMEOUT, || {
            (app.accepted.load(std::sync::atomic::Ordering::SeqCst) >= streams).then_some(())
        })?;
        // The attack itself: nobody reads while the apps write. Time is the subject here (how
        // long the peer stalls), not something asserted.
        std::thread::sleep(Duration::from_secs(3));
        let mut delivered = Vec::new();
        for session in &mut sessions {
            delivered.push(read_all_streams(session)?);
        }
        Ok(delivered)
    });
    let delivered = delivered.unwrap_or_else(|error| panic!("stalled peer: {error:#}"));
    let grown = target.agent_peak_rss_kib().saturating_sub(peak_before);
    // The budget, plus per-stream state (tasks, h2 streams, TLS and socket buffers) of 128
    // streams and the allocator's slack.
    let bound = MEMORY_BUDGET / 1024 + 12 * 1024;
    eprintln!("agent peak RSS grew by {grown} KiB (bound {bound} KiB)");
    assert!(
        grown < bound,
        "agent peak RSS grew by {grown} KiB with a stalled peer (bound {bound} KiB)"
    );
    for (connection, streams) in delivered.iter().enumerate() {
        for (index, bytes) in streams.iter().enumerate() {
            assert_eq!(
                *bytes, FLOOD_PER_STREAM,
                "connection {connection}, stream {index}: every byte of the app's answer"
            );
        }
    }
    target.assert_serves("after the stalled peer");
}

/// Reads until every stream of the test above delivered its app's whole answer (or a minute
/// passed); returns the bytes per stream.
fn read_all_streams(session: &mut Session) -> anyhow::Result<Vec<usize>> {
    let mut bytes = vec![0usize; FLOOD_STREAMS as usize];
    let mut complete = 0;
    session.read_until(Duration::from_secs(60), |frame| {
        if frame.kind == h2_raw::DATA && frame.stream % 2 == 1 {
            let index = (frame.stream / 2) as usize;
            if let Some(count) = bytes.get_mut(index) {
                let before = *count;
                *count += frame.payload.len();
                if before < FLOOD_PER_STREAM && *count >= FLOOD_PER_STREAM {
                    complete += 1;
                }
            }
        }
        complete == FLOOD_STREAMS
    });
    Ok(bytes)
}
