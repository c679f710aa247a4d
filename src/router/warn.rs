//! Rate limiting of WARNs about bad local input, per kind of problem: the first occurrence of a
//! kind is logged at once, later ones at most once per interval, each time with the count of
//! what was suppressed since the previous line. A kind that keeps happening is therefore logged
//! at least once per interval, and one broken publisher cannot hide another kind of problem (a
//! single global limit did: after ten bad JSON messages nothing else was ever logged).
//!
//! Pure bookkeeping: the caller passes the time and does the logging.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Default interval between two WARNs of one kind.
pub const DEFAULT_WARN_EVERY: Duration = Duration::from_secs(60);

/// Per-kind state.
#[derive(Debug, Default, Clone, Copy)]
struct Kind {
    /// When this kind was last logged.
    last: Option<Instant>,
    /// Occurrences not logged since `last`.
    suppressed: u64,
    /// Occurrences since start.
    total: u64,
}

/// What the caller should do with one occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it, saying `suppressed` more of this kind were not logged since the last line, and
    /// `total` happened since start.
    Log { suppressed: u64, total: u64 },
    /// Count it only.
    Suppress,
}

/// The per-kind limiter; see the module docs.
#[derive(Debug)]
pub struct WarnLimiter {
    every: Duration,
    kinds: HashMap<&'static str, Kind>,
}

impl Default for WarnLimiter {
    fn default() -> Self {
        WarnLimiter::new(DEFAULT_WARN_EVERY)
    }
}

impl WarnLimiter {
    pub fn new(every: Duration) -> Self {
        WarnLimiter {
            every,
            kinds: HashMap::new(),
        }
    }

    /// Record one occurrence of `kind` at `now`.
    pub fn hit(&mut self, kind: &'static str, now: Instant) -> Verdict {
        let k = self.kinds.entry(kind).or_default();
        k.total += 1;
        let due = k
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.every);
        if due {
            let suppressed = std::mem::take(&mut k.suppressed);
            k.last = Some(now);
            Verdict::Log {
                suppressed,
                total: k.total,
            }
        } else {
            k.suppressed += 1;
            Verdict::Suppress
        }
    }

    /// Kinds with suppressed occurrences whose interval has passed: `(kind, suppressed, total)`.
    /// The caller logs one summary line each, so a burst that stopped is still accounted for.
    pub fn due_summaries(&mut self, now: Instant) -> Vec<(&'static str, u64, u64)> {
        let mut out = Vec::new();
        for (name, k) in &mut self.kinds {
            let due = k
                .last
                .is_none_or(|last| now.saturating_duration_since(last) >= self.every);
            if k.suppressed > 0 && due {
                out.push((*name, std::mem::take(&mut k.suppressed), k.total));
                k.last = Some(now);
            }
        }
        out.sort();
        out
    }

    /// Occurrences of `kind` since start.
    pub fn total(&self, kind: &str) -> u64 {
        self.kinds.get(kind).map_or(0, |k| k.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_logged_first_then_once_per_interval_with_the_suppressed_count() {
        let t0 = Instant::now();
        let mut w = WarnLimiter::new(Duration::from_secs(60));
        assert_eq!(
            w.hit("not_json", t0),
            Verdict::Log {
                suppressed: 0,
                total: 1
            }
        );
        for _ in 0..50 {
            assert_eq!(w.hit("not_json", t0), Verdict::Suppress);
        }
        // Another kind is not hidden by the first one's flood.
        assert_eq!(
            w.hit("bad_device_name", t0),
            Verdict::Log {
                suppressed: 0,
                total: 1
            }
        );
        let t1 = t0 + Duration::from_secs(61);
        assert_eq!(
            w.hit("not_json", t1),
            Verdict::Log {
                suppressed: 50,
                total: 52
            }
        );
        assert_eq!(w.total("not_json"), 52);
    }

    #[test]
    fn suppressed_occurrences_are_summarised_when_the_interval_passes() {
        let t0 = Instant::now();
        let mut w = WarnLimiter::new(Duration::from_secs(60));
        w.hit("bad_shape", t0);
        w.hit("bad_shape", t0);
        w.hit("bad_shape", t0);
        assert!(w.due_summaries(t0 + Duration::from_secs(10)).is_empty());
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(w.due_summaries(t1), vec![("bad_shape", 2, 3)]);
        assert!(w.due_summaries(t1 + Duration::from_secs(120)).is_empty());
    }
}
