//! Fuzzes the HBONE server side with raw HTTP/2 bytes: `hbone::server::serve` (the h2 server
//! with the settings the agent's 15008 uses, from `ProxyConfig::default()`), fed over an
//! in-memory duplex as if it were the plaintext under TLS, with a stream handler shaped like
//! the inbound proxy's: `hbone::parse_connect`, 400 for a malformed request, 503 for a target
//! on an agent port, otherwise a stub upstream "connect" under `hbone::server::until_reset`,
//! then 200 and `proxy::copy::bidirectional` between the tunnel (`hbone::stream::H2Stream`)
//! and a stub upstream that echoes what it reads.
//!
//! Input: the first byte picks options (bit 0: skip the client preface, so the preface
//! handling itself is fuzzed; bits 1-3: how the rest is split into writes, 1 to 8 chunks so
//! frames straddle reads). The rest is written after the preface as the client's bytes; then
//! the client half-closes and reads whatever the server answers.
//!
//! Time is tokio's paused clock, so keepalive PINGs, their timeout and every other timer fire
//! as soon as all tasks wait: a run ends deterministically, however the input stalls.
//!
//! Properties: nothing panics; the server's connection task ends (no input keeps it alive once
//! the client is gone and the keepalive gives up); after a forced drain no stream task is left.
#![no_main]

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use libfuzzer_sys::fuzz_target;
use nodetunnel::config::agent::ProxyConfig;
use nodetunnel::drain::Drain;
use nodetunnel::hbone::stream::H2Stream;
use nodetunnel::hbone::{self, H2Settings};
use nodetunnel::net::ports;
use nodetunnel::proxy::copy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest a run may take on the paused clock: far beyond keepalive interval + timeout.
const RUN_LIMIT: Duration = Duration::from_secs(600);
/// Cap on what the stub upstream echoes per stream, so a window-opening input cannot loop.
const UPSTREAM_LIMIT: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&options, frames)) = data.split_first() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(run(options, frames));
});

async fn run(options: u8, frames: &[u8]) {
    let with_preface = options & 1 == 0;
    let chunks = usize::from((options >> 1) & 7) + 1;
    let (client, server) = tokio::io::duplex(64 * 1024);
    let settings = H2Settings::from(&ProxyConfig::default());
    let drain = Drain::new();
    let serving = {
        let drain = drain.clone();
        tokio::spawn(async move {
            let _ = hbone::server::serve(server, &settings, &drain, handle_stream).await;
        })
    };
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let mut input = Vec::with_capacity(PREFACE.len() + frames.len());
    if with_preface {
        input.extend_from_slice(PREFACE);
    }
    input.extend_from_slice(frames);
    let chunk_len = input.len().div_ceil(chunks).max(1);
    let writer = async move {
        for chunk in input.chunks(chunk_len) {
            if client_write.write_all(chunk).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
        let _ = client_write.shutdown().await;
    };
    let reader = async move {
        let mut sink = vec![0u8; 16 * 1024];
        while let Ok(read) = client_read.read(&mut sink).await {
            if read == 0 {
                break;
            }
        }
    };
    let finished = tokio::time::timeout(RUN_LIMIT, async {
        tokio::join!(writer, reader);
        serving.await
    })
    .await;
    assert!(
        finished.is_ok(),
        "the HBONE server connection outlived its client by {RUN_LIMIT:?}"
    );
    drain.terminate().await;
    assert_eq!(drain.active_tasks(), 0, "stream tasks survived a forced drain");
}

/// The inbound proxy's stream handling, with the pod and its app replaced by an echo: checks,
/// then the upstream "connect" under `until_reset` (a reset stream abandons it), then 200 and
/// the copy.
async fn handle_stream(request: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let target = match hbone::parse_connect(&request) {
        Ok(parsed) => parsed.authority,
        Err(error) => return hbone::server::reject(respond, error.status()),
    };
    if ports::is_agent_port(target.port()) {
        return hbone::server::reject(respond, StatusCode::SERVICE_UNAVAILABLE);
    }
    let connect = async {
        tokio::task::yield_now().await;
        tokio::io::duplex(16 * 1024)
    };
    let Ok((proxy_side, app_side)) = hbone::server::until_reset(&mut respond, connect).await
    else {
        return;
    };
    let Ok(send) = respond.send_response(Response::new(()), false) else {
        return;
    };
    let tunnel = H2Stream::new(send, request.into_body());
    let app = tokio::spawn(echo(app_side));
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let _ = copy::bidirectional(tunnel, proxy_side, &sent, &received).await;
    app.abort();
}

async fn echo(app: tokio::io::DuplexStream) {
    let (mut read, mut write) = tokio::io::split(app);
    let _ = tokio::io::copy(&mut (&mut read).take(UPSTREAM_LIMIT), &mut write).await;
    let _ = write.shutdown().await;
}
