//! Client-side circuit breaking for one source pod (layer L3): DestinationRule
//! `connectionPool.tcp.maxConnections` and `outlierDetection`, per destination service.
//!
//! The outbound handler asks [`Circuit::admit`] for a slot before it connects (refused at once
//! over the limit; the slot is given back when the connection ends), tells
//! [`Circuit::report`] whether the connect to the chosen endpoint worked, and passes
//! [`Circuit::is_ejected`] to the route decision so load balancing skips ejected endpoints.
//! Connect failures are the errors counted (`consecutiveGatewayErrors` /
//! `consecutive5xxErrors`): at L4 a failed connect is what a 502/503/504 is to an HTTP proxy.
//! Time comes from tokio's clock, so tests drive ejection and return with a paused clock.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::{BoxFuture, Either};
use tokio::time::Instant;

use super::route::Route;
use crate::state::traffic_policy::{DestinationRule, OutlierDetection};
use crate::state::{Snapshot, Workload};
use crate::telemetry::metrics::ByteCounters;
use crate::telemetry::Metrics;

/// A connection over a service's `maxConnections`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{open} connections to {service} are open, its DestinationRule allows {max} (connectionPool.tcp.maxConnections)")]
pub struct OverLimit {
    /// `namespace/hostname`.
    pub service: String,
    /// Open now.
    pub open: u32,
    /// The limit.
    pub max: u32,
}

/// An endpoint healthy (not ejected, no failure) for this long is forgotten, so its next
/// ejection starts again from `baseEjectionTime`.
pub const FORGET_HEALTHY_AFTER: Duration = Duration::from_secs(600);
/// How often the health table is pruned of endpoints and services that left the model and of
/// endpoints healthy for [`FORGET_HEALTHY_AFTER`].
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct EndpointHealth {
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    /// The last failure, or the end of the last ejection if later.
    last_trouble: Instant,
}

impl EndpointHealth {
    fn new(now: Instant) -> Self {
        EndpointHealth {
            consecutive_failures: 0,
            ejections: 0,
            ejected_until: None,
            last_trouble: now,
        }
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| until > now)
    }

    /// Nothing worth remembering: the same as no entry, or healthy for long enough.
    fn forgettable(&self, now: Instant) -> bool {
        if self.ejected(now) {
            return false;
        }
        let untroubled = self
            .ejected_until
            .map_or(self.last_trouble, |until| until.max(self.last_trouble));
        (self.consecutive_failures == 0 && self.ejections == 0)
            || now.saturating_duration_since(untroubled) >= FORGET_HEALTHY_AFTER
    }
}

/// Service key → workload uid → health, and when it was last pruned.
#[derive(Debug, Default)]
struct HealthTable {
    by_service: HashMap<String, HashMap<String, EndpointHealth>>,
    pruned: Option<Instant>,
}

/// Per-service counters and per-endpoint health of one source pod.
#[derive(Debug, Default)]
pub struct Circuit {
    open: Mutex<HashMap<String, u32>>,
    endpoints: Mutex<HealthTable>,
}

/// An admitted connection's place under its service's limit; given back on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    circuit: Arc<Circuit>,
    service: String,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.circuit.open);
        if let Some(count) = open.get_mut(&self.service) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.service);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain counters: still consistent after a panic elsewhere.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Circuit {
    /// Takes a slot for a new connection to `service` (`namespace/hostname`), or refuses it
    /// when `max` are already open.
    pub fn admit(self: &Arc<Self>, service: &str, max: u32) -> Result<ConnectionSlot, OverLimit> {
        let mut open = lock(&self.open);
        let count = open.entry(service.to_string()).or_default();
        if *count >= max {
            return Err(OverLimit {
                service: service.to_string(),
                open: *count,
                max,
            });
        }
        *count += 1;
        Ok(ConnectionSlot {
            circuit: self.clone(),
            service: service.to_string(),
        })
    }

    /// Whether the endpoint `uid` of `service` is ejected now.
    pub fn is_ejected(&self, service: &str, uid: &str, now: Instant) -> bool {
        let endpoints = lock(&self.endpoints);
        endpoints
            .by_service
            .get(service)
            .and_then(|service| service.get(uid))
            .is_some_and(|health| health.ejected(now))
    }

    /// Drops the health of services and endpoints `snapshot` no longer has (or whose endpoint
    /// no longer backs the service), and of endpoints with nothing worth remembering; at most
    /// once per [`PRUNE_INTERVAL`]. Without it the table would keep every endpoint that ever
    /// failed, for the pod's life.
    pub fn prune(&self, snapshot: &Snapshot, now: Instant) {
        let mut table = lock(&self.endpoints);
        let due = table.pruned.map_or(true, |pruned| {
            now.saturating_duration_since(pruned) >= PRUNE_INTERVAL
        });
        if !due {
            return;
        }
        table.pruned = Some(now);
        table.by_service.retain(|service, endpoints| {
            if snapshot.service(service).is_none() {
                return false;
            }
            endpoints.retain(|uid, health| {
                let backs = snapshot
                    .workload(uid)
                    .is_some_and(|workload| workload.services.contains_key(service));
                backs && !health.forgettable(now)
            });
            !endpoints.is_empty()
        });
    }

    /// Endpoints with health state now.
    #[cfg(test)]
    pub fn tracked_endpoints(&self) -> usize {
        lock(&self.endpoints)
            .by_service
            .values()
            .map(HashMap::len)
            .sum()
    }

    /// Records a connect to endpoint `uid` of `service` (which has `endpoint_count`
    /// endpoints); returns `true` when this failure ejected the endpoint.
    pub fn report(
        &self,
        service: &str,
        uid: &str,
        connected: bool,
        policy: &OutlierDetection,
        endpoint_count: usize,
        now: Instant,
    ) -> bool {
        let mut table = lock(&self.endpoints);
        if connected {
            let endpoints = table.by_service.get_mut(service);
            if let Some(endpoints) = endpoints {
                if let Some(health) = endpoints.get_mut(uid) {
                    health.consecutive_failures = 0;
                    if health.forgettable(now) {
                        endpoints.remove(uid);
                    }
                }
            }
            return false;
        }
        let service = table.by_service.entry(service.to_string()).or_default();
        let ejected_now = service
            .values()
            .filter(|health| health.ejected(now))
            .count();
        let health = service
            .entry(uid.to_string())
            .or_insert_with(|| EndpointHealth::new(now));
        if health.ejected(now) {
            return false;
        }
        health.last_trouble = now;
        health.consecutive_failures += 1;
        if health.consecutive_failures < policy.consecutive_errors {
            return false;
        }
        // Envoy's rule: maxEjectionPercent caps the ejected share, but one endpoint may always
        // be ejected.
        let allowed = (endpoint_count * policy.max_ejection_percent as usize / 100).max(1);
        if ejected_now >= allowed {
            return false;
        }
        health.consecutive_failures = 0;
        health.ejections += 1;
        let ejection = policy.base_ejection_time * health.ejections;
        health.ejected_until = Some(now + round_up(ejection, policy.interval));
        true
    }
}

/// The DestinationRule in force for one outbound connection, if any, and its slot under the
/// service's `maxConnections` (given back when the breaker drops with the connection).
#[derive(Debug, Default)]
pub struct Breaker {
    rule: Option<(Arc<DestinationRule>, Arc<Circuit>)>,
    service: String,
    endpoint_count: usize,
    _slot: Option<ConnectionSlot>,
}

impl Breaker {
    /// The breaker of a connection routed by `route` (dialled port `port`) from `source`:
    /// takes a slot when the service's rule has `maxConnections`, or refuses.
    pub fn admit(
        circuit: &Arc<Circuit>,
        snapshot: &Snapshot,
        source: &Workload,
        route: &Route,
        port: u16,
    ) -> Result<Breaker, OverLimit> {
        let service = match route {
            Route::Hbone(route) => route.service.as_ref(),
            Route::Passthrough(route) => route.service.as_ref(),
        };
        let Some(service) = service else {
            return Ok(Breaker::default());
        };
        circuit.prune(snapshot, Instant::now());
        let rules = &snapshot.egress().destination_rules;
        let Some(rule) = rules.for_service(&source.namespace, service) else {
            return Ok(Breaker::default());
        };
        let key = service.key();
        let slot = match rule.tcp.max_connections {
            Some(max) => Some(circuit.admit(&key, max)?),
            None => None,
        };
        Ok(Breaker {
            rule: Some((rule.clone(), circuit.clone())),
            endpoint_count: snapshot.endpoints(service, port).len(),
            service: key,
            _slot: slot,
        })
    }

    /// The rule's `connectTimeout`.
    pub fn connect_timeout(&self) -> Option<Duration> {
        self.rule
            .as_ref()
            .and_then(|(rule, _)| rule.tcp.connect_timeout)
    }

    /// Records whether connecting to `endpoint` worked, for outlier detection (only when the
    /// endpoint backs the service: a waypoint in front of it is not one of its endpoints).
    pub fn report(&self, metrics: &Metrics, endpoint: &Workload, connected: bool) {
        let Some((rule, circuit)) = &self.rule else {
            return;
        };
        let Some(policy) = &rule.outlier_detection else {
            return;
        };
        if !endpoint.services.contains_key(&self.service) {
            return;
        }
        let now = Instant::now();
        let count = self.endpoint_count;
        if circuit.report(&self.service, &endpoint.uid, connected, policy, count, now) {
            metrics.protection().ejected("consecutive_connect_failures");
            tracing::warn!(
                service = %self.service,
                endpoint = %endpoint.uid,
                rule = %rule.key(),
                "endpoint ejected by outlier detection after consecutive connect failures"
            );
        }
    }

    /// TCP keepalive from the rule's `tcpKeepalive` on a plain upstream socket.
    pub fn keepalive(&self, upstream: &tokio::net::TcpStream) {
        let Some((rule, _)) = &self.rule else {
            return;
        };
        let Some(time) = rule.tcp.tcp_keepalive_time else {
            return;
        };
        let mut keepalive = socket2::TcpKeepalive::new().with_time(time);
        if let Some(interval) = rule.tcp.tcp_keepalive_interval {
            keepalive = keepalive.with_interval(interval);
        }
        if let Err(error) = socket2::SockRef::from(upstream).set_tcp_keepalive(&keepalive) {
            tracing::debug!(%error, "cannot set TCP keepalive from the DestinationRule");
        }
    }

    /// Runs `copy`, ending it (both ends closed) after the rule's `maxConnectionDuration`, or
    /// once no byte has moved either way for its `idleTimeout`. `bytes` are the connection's
    /// live counters, which the copy updates anyway: the idle check samples them, so no timer
    /// is touched per byte. Without either limit (the common case) the future is `copy` itself:
    /// an async fn would hold `copy` twice (as its argument and inside the select) in every
    /// connection's task for its whole life; with a limit it is boxed.
    pub fn bounded<'a, F>(
        &'a self,
        copy: F,
        bytes: &'a ByteCounters,
    ) -> Either<F, BoxFuture<'a, std::io::Result<()>>>
    where
        F: Future<Output = std::io::Result<()>> + Send + 'a,
    {
        let tcp = self.rule.as_ref().map(|(rule, _)| &rule.tcp);
        let max_duration = tcp.and_then(|tcp| tcp.max_connection_duration);
        let idle_timeout = tcp.and_then(|tcp| tcp.idle_timeout);
        if max_duration.is_none() && idle_timeout.is_none() {
            return Either::Left(copy);
        }
        Either::Right(Box::pin(async move {
            let expired = async {
                match max_duration {
                    Some(limit) => tokio::time::sleep(limit).await,
                    None => std::future::pending().await,
                }
            };
            let idle = async {
                match idle_timeout {
                    Some(timeout) => until_idle(bytes, timeout).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                copied = copy => copied,
                () = expired => {
                    tracing::debug!("connection closed at the DestinationRule's maxConnectionDuration");
                    Ok(())
                }
                () = idle => {
                    tracing::debug!("connection closed after the DestinationRule's idleTimeout without traffic");
                    Ok(())
                }
            }
        }))
    }
}

/// Returns once no byte has moved either way on `bytes` for `timeout`. It looks every quarter
/// of the timeout, so the close comes between `timeout` and 1.25 × `timeout` after the last
/// byte.
pub async fn until_idle(bytes: &ByteCounters, timeout: Duration) {
    let total = || bytes.sent.load(Ordering::Relaxed) + bytes.received.load(Ordering::Relaxed);
    let check_every = (timeout / 4).max(Duration::from_millis(10));
    let mut seen = total();
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(check_every).await;
        let now = Instant::now();
        let moved = total();
        if moved != seen {
            seen = moved;
            quiet_since = now;
        } else if now.duration_since(quiet_since) >= timeout {
            return;
        }
    }
}

/// `duration` rounded up to a whole number of `interval`s: ejections are re-examined once per
/// interval, so an endpoint returns at the first check after its ejection time.
fn round_up(duration: Duration, interval: Duration) -> Duration {
    let interval_nanos = interval.as_nanos().max(1);
    let intervals = duration.as_nanos().div_ceil(interval_nanos);
    Duration::from_nanos(u64::try_from(intervals * interval_nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(consecutive_errors: u32, max_ejection_percent: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_errors,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(25),
            max_ejection_percent,
        }
    }

    #[test]
    fn max_connections_refuses_at_the_limit_and_frees_on_drop() {
        let circuit = Arc::new(Circuit::default());
        let first = circuit.admit("shop/echo", 2).unwrap();
        let _second = circuit.admit("shop/echo", 2).unwrap();
        let refused = circuit.admit("shop/echo", 2).unwrap_err();
        assert_eq!((refused.open, refused.max), (2, 2));
        // Another service has a limit of its own.
        let _other = circuit.admit("shop/other", 2).unwrap();
        drop(first);
        let _third = circuit.admit("shop/echo", 2).expect("a slot came free");
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_for_a_growing_time_rounded_to_the_interval() {
        let circuit = Circuit::default();
        let policy = policy(2, 50);
        let service = "shop/echo";
        let now = Instant::now;
        assert!(!circuit.report(service, "a", false, &policy, 2, now()));
        // A success in between resets the count.
        assert!(!circuit.report(service, "a", true, &policy, 2, now()));
        assert!(!circuit.report(service, "a", false, &policy, 2, now()));
        assert!(circuit.report(service, "a", false, &policy, 2, now()));
        assert!(circuit.is_ejected(service, "a", now()));
        assert!(!circuit.is_ejected(service, "b", now()));
        assert!(!circuit.is_ejected("shop/other", "a", now()));
        // 25 s rounds up to 30 s (three 10 s intervals).
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(circuit.is_ejected(service, "a", now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!circuit.is_ejected(service, "a", now()));
        // The second ejection lasts twice as long (50 s → 50 s).
        assert!(!circuit.report(service, "a", false, &policy, 2, now()));
        assert!(circuit.report(service, "a", false, &policy, 2, now()));
        tokio::time::advance(Duration::from_secs(49)).await;
        assert!(circuit.is_ejected(service, "a", now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!circuit.is_ejected(service, "a", now()));
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_percent_caps_ejections_but_allows_one() {
        let circuit = Circuit::default();
        let now = Instant::now();
        // 10 % of 3 endpoints rounds to 0, yet one may be ejected.
        let policy = policy(1, 10);
        assert!(circuit.report("shop/echo", "a", false, &policy, 3, now));
        assert!(!circuit.report("shop/echo", "b", false, &policy, 3, now));
        assert!(!circuit.is_ejected("shop/echo", "b", now));
        // 100 %: every failing endpoint goes.
        let all = policy_all();
        assert!(circuit.report("shop/api", "a", false, &all, 2, now));
        assert!(circuit.report("shop/api", "b", false, &all, 2, now));
    }

    fn policy_all() -> OutlierDetection {
        policy(1, 100)
    }

    /// Traffic more often than the timeout keeps a connection; once quiet, it is idle after
    /// the timeout, at most a quarter of it late (the sampling period).
    #[tokio::test(start_paused = true)]
    async fn until_idle_returns_only_after_a_quiet_timeout() {
        let bytes = ByteCounters::default();
        let timeout = Duration::from_secs(4);
        let idle = until_idle(&bytes, timeout);
        tokio::pin!(idle);
        for round in 0..6 {
            tokio::select! {
                () = &mut idle => panic!("idle while traffic flows (round {round})"),
                () = tokio::time::sleep(Duration::from_secs(3)) => {}
            }
            if round % 2 == 0 {
                bytes.sent.fetch_add(1, Ordering::Relaxed);
            } else {
                bytes.received.fetch_add(1, Ordering::Relaxed);
            }
        }
        let quiet_from = Instant::now();
        idle.await;
        let quiet = quiet_from.elapsed();
        assert!(
            quiet >= timeout && quiet <= timeout + timeout / 4,
            "idle after {quiet:?} of quiet"
        );
    }

    /// A model with `shop/echo` backed by workloads `a` and `b`.
    fn model() -> (Snapshot, String, [String; 2]) {
        let hostname = "echo.shop.svc.cluster.local";
        let key = format!("shop/{hostname}");
        let backing = |name: &str, last: u8| {
            let mut workload = crate::state::tests::workload("shop", name, [10, 0, 0, last]);
            workload
                .services
                .insert(key.clone(), [(80, 8080)].into_iter().collect());
            workload
        };
        let service = crate::state::Service {
            name: "echo".into(),
            namespace: "shop".into(),
            hostname: hostname.into(),
            vips: Vec::new(),
            ports: [(80, 8080)].into_iter().collect(),
            subject_alt_names: Vec::new(),
            waypoint: None,
        };
        let (a, b) = (backing("a", 1), backing("b", 2));
        let uids = [a.uid.clone(), b.uid.clone()];
        (
            Snapshot::new(vec![a, b], vec![service], Vec::new()),
            key,
            uids,
        )
    }

    /// Health is kept only for endpoints of services in the model, and only while there is
    /// something to remember: a success after failures forgets, an ejection is remembered
    /// until the endpoint has been healthy for `FORGET_HEALTHY_AFTER`.
    #[tokio::test(start_paused = true)]
    async fn the_health_table_forgets_what_left_the_model_and_healthy_endpoints() {
        let (snapshot, echo, [a, b]) = model();
        let circuit = Circuit::default();
        let now = Instant::now;
        let all = policy_all();
        let twice = policy(2, 100);
        assert!(
            circuit.report(&echo, &a, false, &all, 2, now()),
            "a ejected"
        );
        assert!(!circuit.report(&echo, &b, false, &twice, 2, now()));
        assert!(!circuit.report(&echo, &b, true, &twice, 2, now()));
        assert_eq!(circuit.tracked_endpoints(), 1, "b's success forgot b");
        circuit.report(&echo, "cluster//Pod/shop/gone", false, &twice, 2, now());
        circuit.report(
            "shop/old.shop.svc.cluster.local",
            &a,
            false,
            &twice,
            2,
            now(),
        );
        assert_eq!(circuit.tracked_endpoints(), 3);
        circuit.prune(&snapshot, now());
        assert_eq!(circuit.tracked_endpoints(), 1, "only the ejected a is left");
        assert!(circuit.is_ejected(&echo, &a, now()));
        // Past the ejection and the memory of it: forgotten at the next prune.
        tokio::time::advance(Duration::from_secs(30) + FORGET_HEALTHY_AFTER).await;
        assert!(!circuit.is_ejected(&echo, &a, now()));
        circuit.report(&echo, &b, false, &twice, 2, now());
        circuit.prune(&snapshot, now());
        assert_eq!(
            circuit.tracked_endpoints(),
            1,
            "a forgotten, b's failure kept"
        );
        // At most one prune per interval.
        circuit.report(&echo, "cluster//Pod/shop/gone", false, &twice, 2, now());
        circuit.prune(&snapshot, now());
        assert_eq!(circuit.tracked_endpoints(), 2);
        tokio::time::advance(PRUNE_INTERVAL).await;
        circuit.prune(&snapshot, now());
        assert_eq!(circuit.tracked_endpoints(), 1);
    }
}
