//! The DNS-learned egress destinations of one pod (layer L1): which IPs the pod resolved
//! through its DNS proxy under a name that a ServiceEntry allows, and until when.
//!
//! The DNS proxy (`dns`) writes here when it relays an upstream answer for an allowed name;
//! the outbound route (`proxy::route`, through [`super::egress::Egress::decide`]) reads it for
//! every connection to a destination outside the registry. One set per captured pod, owned by
//! that pod's proxies, so it is dropped with the pod and no pod's lookups or writes ever
//! contend with another's. Reads take a shared lock and one hash lookup; writes are one per
//! relayed answer of an allowed name.
//!
//! Bounded against a hostile or careless upstream: a TTL is clamped to
//! [`LearnedLimits::ttl_min`]..=[`LearnedLimits::ttl_max`], one answer contributes at most
//! [`MAX_ADDRESSES_PER_ANSWER`] addresses, an address carries at most [`MAX_GRANTS_PER_IP`]
//! grants, and a pod holds at most [`LearnedLimits::max_per_pod`] addresses: when full, the
//! address that expires first makes room (after every expired one went). Expired entries are
//! never used (every read compares with the caller's clock) and are pruned on each write and
//! by [`LearnedDestinations::prune`].

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::Instant;

/// Addresses one DNS answer may add; the rest of a larger answer is ignored.
pub const MAX_ADDRESSES_PER_ANSWER: usize = 32;

/// Distinct (ServiceEntry, name) grants one address may carry.
pub const MAX_GRANTS_PER_IP: usize = 8;

/// The bounds of a pod's learned set (`agent.dns.learnedTtlMin`, `learnedTtlMax`,
/// `maxLearnedPerPod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LearnedLimits {
    /// An answer's TTL below this is raised to it, so an application that caches an address
    /// a little longer than the TTL said is not refused (and TTL 0 still allows a connect).
    pub ttl_min: Duration,
    /// An answer's TTL above this is lowered to it.
    pub ttl_max: Duration,
    /// Addresses one pod may hold.
    pub max_per_pod: usize,
}

impl Default for LearnedLimits {
    fn default() -> Self {
        LearnedLimits {
            ttl_min: Duration::from_secs(30),
            ttl_max: Duration::from_secs(3600),
            max_per_pod: 4096,
        }
    }
}

impl LearnedLimits {
    /// How long an address answered with `ttl` seconds stays allowed.
    pub fn clamp(&self, ttl: u32) -> Duration {
        Duration::from_secs(u64::from(ttl)).clamp(self.ttl_min, self.ttl_max.max(self.ttl_min))
    }
}

/// Which ServiceEntry allowed an address: `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryRef {
    /// `metadata.namespace`.
    pub namespace: Arc<str>,
    /// `metadata.name`.
    pub name: Arc<str>,
}

/// One reason an address is allowed: the pod resolved `host` and the answer carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The ServiceEntry whose host matched the name.
    pub entry: EntryRef,
    /// The name the pod asked (lower case, no trailing dot).
    pub host: Arc<str>,
    /// Until when.
    pub expires: Instant,
}

/// The grants of one address at one moment (a cheap clone of the stored list).
pub type Grants = Arc<[Grant]>;

#[derive(Debug, Default)]
struct Inner {
    by_ip: HashMap<IpAddr, Grants>,
    /// (latest expiry of the address's grants, address): eviction and pruning order.
    by_expiry: BTreeSet<(Instant, IpAddr)>,
}

/// The learned set of one pod.
#[derive(Debug, Default)]
pub struct LearnedDestinations {
    limits: LearnedLimits,
    inner: RwLock<Inner>,
}

/// One address of a DNS answer and the TTL (seconds) the answer gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnsweredAddress {
    /// The address.
    pub ip: IpAddr,
    /// The smallest TTL on the way to it (its record's, and the CNAMEs' before it).
    pub ttl: u32,
}

impl LearnedDestinations {
    /// An empty set bounded by `limits`.
    pub fn new(limits: LearnedLimits) -> Self {
        LearnedDestinations {
            limits,
            inner: RwLock::default(),
        }
    }

    /// The bounds.
    pub fn limits(&self) -> &LearnedLimits {
        &self.limits
    }

    /// Records that the pod resolved `host`, allowed by `entries`, to `addresses` at `now`.
    /// At most [`MAX_ADDRESSES_PER_ANSWER`] addresses and [`MAX_GRANTS_PER_IP`] entries count.
    pub fn learn(
        &self,
        host: &str,
        entries: &[EntryRef],
        addresses: &[AnsweredAddress],
        now: Instant,
    ) {
        if entries.is_empty() || addresses.is_empty() || self.limits.max_per_pod == 0 {
            return;
        }
        let host: Arc<str> = Arc::from(host);
        let entries = &entries[..entries.len().min(MAX_GRANTS_PER_IP)];
        let mut inner = self.write();
        inner.prune(now);
        for address in addresses.iter().take(MAX_ADDRESSES_PER_ANSWER) {
            let expires = now + self.limits.clamp(address.ttl);
            let fresh = entries.iter().map(|entry| Grant {
                entry: entry.clone(),
                host: host.clone(),
                expires,
            });
            inner.insert(address.ip, fresh, now, self.limits.max_per_pod);
        }
    }

    /// The grants of `ip` still valid at `now`, if any.
    pub fn grants(&self, ip: IpAddr, now: Instant) -> Option<Grants> {
        let inner = self
            .inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let grants = inner.by_ip.get(&ip)?;
        grants
            .iter()
            .any(|grant| grant.expires > now)
            .then(|| grants.clone())
    }

    /// Drops every address whose grants all expired by `now`.
    pub fn prune(&self, now: Instant) {
        self.write().prune(now);
    }

    /// Every address and its grants valid at `now`, by address (admin dump).
    pub fn entries(&self, now: Instant) -> Vec<(IpAddr, Vec<Grant>)> {
        let inner = self
            .inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut out: Vec<(IpAddr, Vec<Grant>)> = inner
            .by_ip
            .iter()
            .map(|(ip, grants)| {
                let valid = grants.iter().filter(|g| g.expires > now).cloned().collect();
                (*ip, valid)
            })
            .filter(|(_, grants): &(IpAddr, Vec<Grant>)| !grants.is_empty())
            .collect();
        out.sort_by_key(|(ip, _)| *ip);
        out
    }

    /// How many addresses are held (expired ones not yet pruned included).
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .by_ip
            .len()
    }

    /// Whether no address is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that
        // matters more than losing the pod's egress: keep serving.
        self.inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn prune(&mut self, now: Instant) {
        while let Some(&(expires, ip)) = self.by_expiry.first() {
            if expires > now {
                break;
            }
            self.by_expiry.pop_first();
            self.by_ip.remove(&ip);
        }
    }

    /// Merges `fresh` into `ip`'s grants: a grant for the same entry and host is replaced
    /// (its expiry renewed), expired ones go, and the newest [`MAX_GRANTS_PER_IP`] stay.
    fn insert(
        &mut self,
        ip: IpAddr,
        fresh: impl Iterator<Item = Grant>,
        now: Instant,
        max_per_pod: usize,
    ) {
        let mut grants: Vec<Grant> = match self.by_ip.get(&ip) {
            Some(old) => {
                let latest = latest(old);
                self.by_expiry.remove(&(latest, ip));
                old.iter().filter(|g| g.expires > now).cloned().collect()
            }
            None => {
                while self.by_ip.len() >= max_per_pod {
                    let Some((_, evicted)) = self.by_expiry.pop_first() else {
                        break;
                    };
                    self.by_ip.remove(&evicted);
                }
                Vec::new()
            }
        };
        for grant in fresh {
            grants.retain(|old| !(old.entry == grant.entry && old.host == grant.host));
            grants.push(grant);
        }
        if grants.len() > MAX_GRANTS_PER_IP {
            grants.sort_by_key(|grant| std::cmp::Reverse(grant.expires));
            grants.truncate(MAX_GRANTS_PER_IP);
        }
        let grants: Grants = grants.into();
        self.by_expiry.insert((latest(&grants), ip));
        self.by_ip.insert(ip, grants);
    }
}

fn latest(grants: &[Grant]) -> Instant {
    grants
        .iter()
        .map(|grant| grant.expires)
        .max()
        .unwrap_or_else(Instant::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> EntryRef {
        EntryRef {
            namespace: Arc::from("egress"),
            name: Arc::from(name),
        }
    }

    fn answered(ip: &str, ttl: u32) -> AnsweredAddress {
        AnsweredAddress {
            ip: ip.parse().expect("ip"),
            ttl,
        }
    }

    fn limits(max_per_pod: usize) -> LearnedLimits {
        LearnedLimits {
            ttl_min: Duration::from_secs(30),
            ttl_max: Duration::from_secs(3600),
            max_per_pod,
        }
    }

    #[test]
    fn ttls_are_clamped_to_the_floor_and_the_cap() {
        let limits = limits(10);
        let cases = [
            (0, 30),
            (1, 30),
            (30, 30),
            (300, 300),
            (3600, 3600),
            (86_400, 3600),
            (u32::MAX, 3600),
        ];
        for (ttl, expected) in cases {
            assert_eq!(
                limits.clamp(ttl),
                Duration::from_secs(expected),
                "ttl {ttl}"
            );
        }
        // A cap configured below the floor cannot invert the range: the floor wins.
        let inverted = LearnedLimits {
            ttl_max: Duration::from_secs(5),
            ..limits
        };
        assert_eq!(inverted.clamp(600), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_learned_address_expires_after_its_clamped_ttl() {
        let set = LearnedDestinations::new(limits(10));
        let start = Instant::now();
        set.learn(
            "api.example.com",
            &[entry("api")],
            &[answered("203.0.113.1", 1), answered("203.0.113.2", 120)],
            start,
        );
        let ip1: IpAddr = "203.0.113.1".parse().expect("ip");
        let ip2: IpAddr = "203.0.113.2".parse().expect("ip");
        let grants = set.grants(ip1, start).expect("learned");
        assert_eq!(grants[0].entry, entry("api"));
        assert_eq!(&*grants[0].host, "api.example.com");
        // TTL 1 s was raised to the 30 s floor.
        assert!(set.grants(ip1, start + Duration::from_secs(29)).is_some());
        assert!(set.grants(ip1, start + Duration::from_secs(30)).is_none());
        assert!(set.grants(ip2, start + Duration::from_secs(119)).is_some());
        assert!(set.grants(ip2, start + Duration::from_secs(120)).is_none());
        set.prune(start + Duration::from_secs(31));
        assert_eq!(set.len(), 1, "the expired address is pruned");
        assert_eq!(set.entries(start + Duration::from_secs(31)).len(), 1);
        set.prune(start + Duration::from_secs(121));
        assert!(set.is_empty());
    }

    #[test]
    fn a_hostile_answer_is_capped() {
        let set = LearnedDestinations::new(limits(10_000));
        let now = Instant::now();
        let many: Vec<AnsweredAddress> = (0..1000u32)
            .map(|index| AnsweredAddress {
                ip: IpAddr::from((0x0a00_0000u32 + index).to_be_bytes()),
                ttl: u32::MAX,
            })
            .collect();
        set.learn("cdn.example.com", &[entry("cdn")], &many, now);
        assert_eq!(set.len(), MAX_ADDRESSES_PER_ANSWER);
        let grants = set.grants(many[0].ip, now).expect("learned");
        assert_eq!(grants[0].expires, now + Duration::from_secs(3600));

        let entries: Vec<EntryRef> = (0..20).map(|i| entry(&format!("e{i}"))).collect();
        set.learn("multi.example.com", &entries, &many[..1], now);
        let grants = set.grants(many[0].ip, now).expect("learned");
        assert_eq!(grants.len(), MAX_GRANTS_PER_IP);
    }

    #[test]
    fn a_full_set_evicts_the_address_that_expires_first() {
        let set = LearnedDestinations::new(limits(2));
        let now = Instant::now();
        set.learn(
            "a.example",
            &[entry("a")],
            &[answered("192.0.2.1", 600)],
            now,
        );
        set.learn(
            "b.example",
            &[entry("b")],
            &[answered("192.0.2.2", 60)],
            now,
        );
        set.learn(
            "c.example",
            &[entry("c")],
            &[answered("192.0.2.3", 300)],
            now,
        );
        let held: Vec<String> = set
            .entries(now)
            .iter()
            .map(|(ip, _)| ip.to_string())
            .collect();
        assert_eq!(held, ["192.0.2.1", "192.0.2.3"]);
        // Learning an address again renews it instead of taking another slot.
        set.learn(
            "c.example",
            &[entry("c")],
            &[answered("192.0.2.3", 900)],
            now,
        );
        assert_eq!(set.len(), 2);
        let grants = set
            .grants("192.0.2.3".parse().expect("ip"), now)
            .expect("c");
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].expires, now + Duration::from_secs(900));
    }

    #[test]
    fn nothing_is_learned_without_an_entry_or_with_a_zero_cap() {
        let now = Instant::now();
        let set = LearnedDestinations::new(limits(10));
        set.learn("x.example", &[], &[answered("192.0.2.1", 60)], now);
        assert!(set.is_empty());
        let none = LearnedDestinations::new(limits(0));
        none.learn(
            "x.example",
            &[entry("x")],
            &[answered("192.0.2.1", 60)],
            now,
        );
        assert!(none.is_empty());
    }
}
