use std::net::Ipv4Addr;

use super::*;

fn ip(last: u8) -> SourceKey {
    SourceKey::Ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)))
}

fn identity(account: &str) -> SourceKey {
    SourceKey::Identity(Identity::new("cluster.local", "shop", account).expect("identity"))
}

fn limits(max: Option<u32>, rate: Option<(f64, u32)>) -> PerSourceLimits {
    PerSourceLimits {
        max_connections: max,
        connections_per_second: rate.map(|(per_second, _)| per_second),
        burst: rate.map(|(_, burst)| burst),
    }
}

/// With a rate of ~0, exactly `burst` connections pass and the rest are refused, while another
/// source has a bucket of its own; tokens come back at the configured rate.
#[tokio::test(start_paused = true)]
async fn the_bucket_passes_the_burst_then_refills_at_the_rate() {
    let limiter = Arc::new(InboundLimiter::default());
    let limits = limits(None, Some((2.0, 3)));
    let alice = identity("alice");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            limiter
                .admit(&limits, alice.clone(), Instant::now())
                .expect("burst"),
        );
    }
    let refused = limiter
        .admit(&limits, alice.clone(), Instant::now())
        .expect_err("burst spent");
    assert_eq!(refused.reason(), LimitReason::InboundRate);
    assert_eq!(refused.flag(), ResponseFlag::RateLimited);
    // Closing connections gives no tokens back: this is a rate, not a count.
    held.clear();
    limiter
        .admit(&limits, alice.clone(), Instant::now())
        .expect_err("still no token");
    limiter
        .admit(&limits, identity("bob"), Instant::now())
        .expect("another source is unaffected");
    // 2/s: one token after 500 ms, not before.
    tokio::time::advance(Duration::from_millis(499)).await;
    limiter
        .admit(&limits, alice.clone(), Instant::now())
        .expect_err("not yet");
    tokio::time::advance(Duration::from_millis(1)).await;
    limiter
        .admit(&limits, alice.clone(), Instant::now())
        .expect("refilled one");
    // A long pause refills to the burst, never beyond it.
    tokio::time::advance(Duration::from_secs(60)).await;
    for _ in 0..3 {
        limiter
            .admit(&limits, alice.clone(), Instant::now())
            .expect("full again");
    }
    limiter
        .admit(&limits, alice, Instant::now())
        .expect_err("capped at the burst");
}

/// `maxConnections` counts open connections per source; a refusal takes no token, and a slot
/// comes back when its connection ends.
#[tokio::test(start_paused = true)]
async fn max_connections_counts_open_connections_per_source() {
    let limiter = Arc::new(InboundLimiter::default());
    let limits = limits(Some(2), Some((0.001, 3)));
    let now = Instant::now;
    let first = limiter.admit(&limits, ip(1), now()).expect("1st");
    let _second = limiter.admit(&limits, ip(1), now()).expect("2nd");
    let refused = limiter.admit(&limits, ip(1), now()).expect_err("3rd open");
    assert_eq!(
        refused,
        LimitRefusal::Concurrency {
            client: ip(1),
            max: 2
        }
    );
    assert_eq!(refused.flag(), ResponseFlag::Overflow);
    let _other = limiter.admit(&limits, ip(2), now()).expect("other source");
    drop(first);
    // The refusal above did not spend the third token.
    let _third = limiter
        .admit(&limits, ip(1), now())
        .expect("a slot came back");
}

/// Sources at rest leave the table; at the cap, sources with nothing open make room, and
/// when every tracked source has a connection open, a new source is refused.
#[tokio::test(start_paused = true)]
async fn the_table_of_sources_stays_bounded() {
    let limiter = Arc::new(InboundLimiter::default());
    let count_only = limits(Some(5), None);
    // Without a rate, a source whose last connection ends is at rest at once.
    drop(
        limiter
            .admit(&count_only, ip(1), Instant::now())
            .expect("admitted"),
    );
    assert_eq!(limiter.tracked(), 0);

    let rated = limits(None, Some((1.0, 1)));
    let key = |index: usize| SourceKey::Ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + index as u32)));
    // A peer rotating sources: each spends its token and closes, leaving a partial bucket.
    for index in 0..MAX_TRACKED_SOURCES {
        drop(
            limiter
                .admit(&rated, key(index), Instant::now())
                .expect("new source"),
        );
    }
    assert_eq!(limiter.tracked(), MAX_TRACKED_SOURCES);
    // One more: the full table drops every source with nothing open.
    let held = limiter
        .admit(&rated, key(MAX_TRACKED_SOURCES), Instant::now())
        .expect("room was made");
    assert_eq!(limiter.tracked(), 1);
    drop(held);
    // Refilled buckets are swept on the next admission after the sweep interval.
    tokio::time::advance(SWEEP_INTERVAL).await;
    let _fresh = limiter
        .admit(&rated, ip(1), Instant::now())
        .expect("admitted");
    assert_eq!(limiter.tracked(), 1);

    // Every tracked source holding a connection: a new source is refused.
    let limiter = Arc::new(InboundLimiter::default());
    let held: Vec<InboundSlot> = (0..MAX_TRACKED_SOURCES)
        .map(|index| {
            limiter
                .admit(&count_only, key(index), Instant::now())
                .expect("held")
        })
        .collect();
    let refused = limiter
        .admit(&count_only, identity("newcomer"), Instant::now())
        .expect_err("table full of open sources");
    assert_eq!(refused, LimitRefusal::Sources(MAX_TRACKED_SOURCES));
    assert_eq!(refused.reason(), LimitReason::InboundSources);
    // A known source is still served.
    let _again = limiter
        .admit(&count_only, key(0), Instant::now())
        .expect("tracked source");
    drop(held);
    assert_eq!(limiter.tracked(), 1);
}

/// A reload that lowers the burst applies to the tokens a source already has.
#[tokio::test(start_paused = true)]
async fn a_changed_rule_applies_to_existing_sources() {
    let limiter = Arc::new(InboundLimiter::default());
    let generous = limits(None, Some((0.001, 10)));
    let strict = limits(None, Some((0.001, 1)));
    let _first = limiter
        .admit(&generous, ip(1), Instant::now())
        .expect("1st");
    let _second = limiter
        .admit(&strict, ip(1), Instant::now())
        .expect("one token left");
    limiter
        .admit(&strict, ip(1), Instant::now())
        .expect_err("the lower burst holds");
}
