//! The key of a traffic series (layer L1): Istio's label set, shared, hashed once.

use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Arc, LazyLock};

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};

use super::TrafficLabels;

/// One traffic series' labels, shared, with their hash computed once.
///
/// A connection looks its labels up about six times in each agent (opened, the series table,
/// both byte counters, closed, the series table again). Hashing some twenty strings each time
/// was ~2 % of the agents' CPU in the connection-rate benchmarks; with the hash computed once the
/// maps hash one word, and a lookup of an interned series compares one pointer. The hash is
/// keyed per process, so workload names chosen to collide cannot pile series into one bucket.
#[derive(Debug, Clone)]
pub(super) struct Series {
    hash: u64,
    /// The labels, shared by every connection of the series.
    pub(super) labels: Arc<TrafficLabels>,
}

static SERIES_HASH_KEY: LazyLock<RandomState> = LazyLock::new(RandomState::new);

impl Series {
    /// Hashes `labels` once and shares them.
    pub(super) fn new(labels: TrafficLabels) -> Self {
        Series {
            hash: SERIES_HASH_KEY.hash_one(&labels),
            labels: Arc::new(labels),
        }
    }
}

impl Hash for Series {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for Series {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && (Arc::ptr_eq(&self.labels, &other.labels) || self.labels == other.labels)
    }
}

impl Eq for Series {}

impl EncodeLabelSet for Series {
    fn encode(&self, encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.labels.encode(encoder)
    }
}
