//! Hardening of the HBONE server and client connection (issue 15): deadlines, the idle close,
//! the per-connection handler cap and reset streams, on an in-memory pipe with tokio's paused
//! clock (no TLS: the limits live in the HTTP/2 layer).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use h2::client::SendRequest;
use http::Method;

use super::*;
use crate::hbone::client::{ClientConnection, ClientError};

/// Long enough for any limit under test to pass many times over (the clock is paused, so
/// waiting costs nothing); a serve still running after it never would have stopped.
const FOREVER: Duration = Duration::from_secs(24 * 3600);

fn settings() -> H2Settings {
    let mut settings = H2Settings::from(&crate::config::agent::ProxyConfig::default());
    settings.max_concurrent_streams = 2;
    settings.idle_timeout = Duration::from_secs(60);
    settings
}

fn connect_request() -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri("10.0.0.1:8080")
        .body(())
        .expect("request")
}

/// An h2 client on `io` whose connection is driven in the background.
async fn client(io: tokio::io::DuplexStream) -> SendRequest<Bytes> {
    let (send, connection) = h2::client::handshake(io).await.expect("client handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send
}

/// A serve with `limits` on one end of a pipe, running in its own task.
fn spawn_serve<H, F>(
    limits: ConnectionLimits,
    settings: H2Settings,
    handle: H,
) -> (
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<Result<(), ServerError>>,
)
where
    H: Fn(Request<RecvStream>, SendResponse<Bytes>) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let drain = Drain::new();
    let served =
        tokio::spawn(
            async move { serve_until(server_io, &settings, &drain, limits, handle).await },
        );
    (client_io, served)
}

fn limits(first_stream_in: Duration) -> ConnectionLimits {
    ConnectionLimits {
        first_stream_by: Instant::now() + first_stream_in,
        valid_until: None,
    }
}

/// A client that connects and then sends nothing, or only the HTTP/2 preface, is closed by
/// the deadline counted from accept.
#[tokio::test(start_paused = true)]
async fn a_connection_without_a_stream_is_closed_at_its_deadline() {
    let noop = |_request, _respond| async {};
    // Nothing at all: not even the preface.
    let (silent, served) = spawn_serve(limits(Duration::from_secs(10)), settings(), noop);
    let result = tokio::time::timeout(FOREVER, served).await;
    let result = result.expect("serve ends").expect("join");
    assert!(
        matches!(result, Err(ServerError::FirstStreamTimeout)),
        "{result:?}"
    );
    drop(silent);

    // The preface and SETTINGS, then no stream.
    let (io, served) = spawn_serve(limits(Duration::from_secs(10)), settings(), noop);
    let _send = client(io).await;
    let result = tokio::time::timeout(FOREVER, served).await;
    let result = result.expect("serve ends").expect("join");
    assert!(
        matches!(result, Err(ServerError::FirstStreamTimeout)),
        "{result:?}"
    );
}

/// Once its last stream ends, a connection is closed after the idle timeout; a stream that
/// stays open (an app holding its connection for hours) keeps it, however long.
#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_closed_but_a_long_stream_keeps_it() {
    let (release, released) = tokio::sync::watch::channel(false);
    let handler = move |_request, mut respond: SendResponse<Bytes>| {
        let mut released = released.clone();
        async move {
            let _send = respond.send_response(Response::new(()), false);
            let _ = released.wait_for(|done| *done).await;
        }
    };
    let settings = settings();
    let idle = settings.idle_timeout;
    let (io, served) = spawn_serve(limits(Duration::from_secs(10)), settings, handler);
    let mut send = client(io).await;
    let (response, _stream) = send.send_request(connect_request(), false).expect("send");
    let response = response.await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);

    tokio::time::sleep(idle * 10).await;
    assert!(
        !served.is_finished(),
        "a connection with an open stream stays"
    );

    release.send_replace(true);
    let result = tokio::time::timeout(FOREVER, served).await;
    let result = result.expect("an idle connection is closed").expect("join");
    assert!(result.is_ok(), "{result:?}");
}

/// Reset streams free their h2 slot at once; their handlers still count against the cap, so a
/// rapid-reset loop gets REFUSED_STREAM instead of starting unbounded work.
#[tokio::test(start_paused = true)]
async fn reset_streams_count_until_their_handlers_end() {
    let started = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = started.clone();
    // A handler that ignores resets and never ends (what `until_reset` exists to prevent).
    let handler = move |_request, _respond| {
        counter.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<()>()
    };
    let (io, _served) = spawn_serve(limits(Duration::from_secs(10)), settings(), handler);
    let send = client(io).await;
    let mut refused = 0;
    for _ in 0..20 {
        let mut ready = send.clone().ready().await.expect("ready");
        let (response, mut stream) = ready.send_request(connect_request(), false).expect("send");
        // Let the server take the stream before it is reset.
        tokio::time::sleep(Duration::from_millis(10)).await;
        stream.send_reset(h2::Reason::CANCEL);
        if let Err(error) = response.await {
            if error.reason() == Some(h2::Reason::REFUSED_STREAM) {
                refused += 1;
            }
        }
    }
    assert_eq!(
        started.load(Ordering::SeqCst),
        2,
        "handlers capped per connection"
    );
    assert_eq!(refused, 18, "streams over the cap are refused");
}

/// A handler's work stops when its stream is reset, and the handler learns why.
#[tokio::test(start_paused = true)]
async fn until_reset_abandons_the_work_of_a_reset_stream() {
    struct Abandoned(tokio::sync::mpsc::UnboundedSender<&'static str>);
    impl Drop for Abandoned {
        fn drop(&mut self) {
            let _ = self.0.send("work dropped");
        }
    }
    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |_request, mut respond: SendResponse<Bytes>| {
        let events = events.clone();
        async move {
            let guard = Abandoned(events.clone());
            let work = async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            };
            if let Err(reason) = until_reset(&mut respond, work).await {
                let _ = events.send(if reason == h2::Reason::CANCEL {
                    "reset seen"
                } else {
                    "other reason"
                });
            }
        }
    };
    let (io, _served) = spawn_serve(limits(Duration::from_secs(10)), settings(), handler);
    let mut send = client(io).await;
    let (_response, mut stream) = send.send_request(connect_request(), false).expect("send");
    tokio::time::sleep(Duration::from_millis(10)).await;
    stream.send_reset(h2::Reason::CANCEL);
    let first = tokio::time::timeout(FOREVER, seen.recv()).await;
    let second = tokio::time::timeout(FOREVER, seen.recv()).await;
    assert_eq!(
        (first.expect("event"), second.expect("event")),
        (Some("work dropped"), Some("reset seen"))
    );
}

/// A peer that answers PINGs but never a CONNECT does not hold the client forever.
#[tokio::test(start_paused = true)]
async fn a_connect_without_response_times_out() {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        let mut connection = h2::server::handshake(server_io).await.expect("server");
        let mut held = Vec::new();
        while let Some(Ok(stream)) = connection.accept().await {
            held.push(stream);
        }
    });
    let settings = settings();
    let timeout = settings.response_timeout;
    let connection = ClientConnection::handshake(client_io, &settings)
        .await
        .expect("handshake");
    let result = tokio::time::timeout(FOREVER, connection.connect(connect_request())).await;
    match result.expect("connect returns") {
        Err(ClientError::ResponseTimeout(after)) => assert_eq!(after, timeout),
        Err(other) => panic!("expected a response timeout, got {other}"),
        Ok(_) => panic!("expected a response timeout, got a tunnel"),
    }
}

/// A stream reset before its handler first runs (HEADERS and RST_STREAM in one write, as a
/// rapid-reset client sends them) never starts its work: no check, no upstream connect. Eight
/// rounds, because a `select!` that picked its branch at random started the work in half of
/// them.
#[tokio::test(start_paused = true)]
async fn work_of_a_stream_reset_before_its_handler_runs_never_starts() {
    for round in 0..8 {
        assert_eq!(
            started_by_a_stream_reset_before_its_handler_runs().await,
            0,
            "round {round}: the reset stream's work started"
        );
    }
}

/// One connection, one stream reset before its handler's first poll: how often the handler's
/// work started.
async fn started_by_a_stream_reset_before_its_handler_runs() -> usize {
    use std::sync::Arc;
    let (started, outcomes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (started_by, ended_by) = (started.clone(), outcomes.clone());
    let (release, held) = tokio::sync::watch::channel(false);
    let handler = move |_request, mut respond: SendResponse<Bytes>| {
        let (started, ended, mut held) = (started_by.clone(), ended_by.clone(), held.clone());
        async move {
            // Runs only once the test has reset the stream: the handler's first poll then
            // finds the reset already there.
            let _ = held.wait_for(|released| *released).await;
            let work = async {
                started.fetch_add(1, Ordering::SeqCst);
            };
            let _ = until_reset(&mut respond, work).await;
            ended.fetch_add(1, Ordering::SeqCst);
        }
    };
    let (io, _served) = spawn_serve(limits(Duration::from_secs(10)), settings(), handler);
    let mut send = client(io).await;
    let (_response, mut stream) = send.send_request(connect_request(), false).expect("send");
    stream.send_reset(h2::Reason::CANCEL);
    tokio::time::sleep(Duration::from_millis(10)).await;
    release.send_replace(true);
    tokio::time::timeout(FOREVER, async {
        while outcomes.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the handler ended");
    started.load(Ordering::SeqCst)
}
