//! Giving freed memory back to the system once the broker has shrunk.
//!
//! glibc's malloc keeps what the process frees in its arenas and returns only the free top of
//! each heap, so after a flood (a thousand stuck subscribers with full queues) or 10,000
//! connections that have gone, RSS stayed at 60–90 MB for good although nothing used it.
//! `malloc_trim(0)` walks every arena and returns the free pages (measured: back to 15–19 MB
//! right after; docs/BROKER.md "Memory"). It costs a walk of the free lists and briefly locks
//! each arena, so it is called only when the broker went quiet after activity, and at most once
//! a minute while it stays busy — never from a hot path.
//!
//! The library has no unsafe code (`#![forbid(unsafe_code)]`): the allocator call itself is
//! installed by the binary (`main.rs`) through [`set_release`]. Without one (tests, targets
//! other than glibc) the housekeeping still runs the policy and calls nothing.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Least time between two releases after the broker went quiet.
pub const MIN_INTERVAL: Duration = Duration::from_secs(5);
/// Longest time between two releases while the broker keeps changing.
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// Returns freed memory to the system; `true` when anything was returned.
pub type Release = fn() -> bool;

static RELEASE: OnceLock<Release> = OnceLock::new();

/// Install the process's release function (once; later calls are ignored and return `false`).
pub fn set_release(release: Release) -> bool {
    RELEASE.set(release).is_ok()
}

/// The installed release function, if any.
pub(crate) fn release_fn() -> Option<Release> {
    RELEASE.get().copied()
}

/// What the broker's size and traffic look like at one housekeeping tick; any change between
/// two ticks is activity (messages routed, clients come and gone, sessions expired).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Activity {
    pub received: u64,
    pub sent: u64,
    pub dropped: u64,
    pub connections_total: u64,
    pub connected: usize,
    pub sessions: usize,
}

/// When to release: after activity, at the first tick with no change (the broker went quiet,
/// e.g. a flood ended or the clients left) once [`MIN_INTERVAL`] has passed since the last
/// release; while the activity goes on, every [`MAX_INTERVAL`]. Nothing while idle. Pure.
#[derive(Debug)]
pub(crate) struct Policy {
    last_seen: Activity,
    /// Activity seen since the last release.
    dirty: bool,
    last_release: Instant,
}

impl Policy {
    pub fn new(now: Instant, seen: Activity) -> Policy {
        Policy {
            last_seen: seen,
            dirty: false,
            last_release: now,
        }
    }

    /// Called every housekeeping tick; `true` when memory should be released now.
    pub fn tick(&mut self, now: Instant, seen: Activity) -> bool {
        let moved = seen != self.last_seen;
        self.last_seen = seen;
        self.dirty |= moved;
        let since = now.saturating_duration_since(self.last_release);
        let due = self.dirty
            && if moved {
                since >= MAX_INTERVAL
            } else {
                since >= MIN_INTERVAL
            };
        if due {
            self.dirty = false;
            self.last_release = now;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn act(received: u64, connected: usize) -> Activity {
        Activity {
            received,
            connected,
            ..Default::default()
        }
    }

    #[test]
    fn idle_broker_never_releases() {
        let t0 = Instant::now();
        let mut p = Policy::new(t0, act(0, 0));
        for s in 1..600 {
            assert!(!p.tick(t0 + Duration::from_secs(s), act(0, 0)));
        }
    }

    #[test]
    fn releases_at_the_first_quiet_tick_after_activity() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut p = Policy::new(t0, act(0, 0));
        // A flood from 10 s to 20 s, then the clients leave at 21 s.
        assert!(!p.tick(at(9), act(0, 1000)));
        for s in 10..=20 {
            assert!(!p.tick(at(s), act(s * 1000, 1000)), "busy at {s} s");
        }
        assert!(
            !p.tick(at(21), act(20_000, 0)),
            "clients leaving is activity"
        );
        assert!(p.tick(at(22), act(20_000, 0)), "quiet: release");
        assert!(!p.tick(at(23), act(20_000, 0)), "once");
        assert!(!p.tick(at(300), act(20_000, 0)));
    }

    #[test]
    fn quiet_soon_after_a_release_waits_for_the_minimum_interval() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut p = Policy::new(t0, act(0, 0));
        assert!(!p.tick(at(10), act(1, 0)));
        assert!(p.tick(at(11), act(1, 0)));
        assert!(!p.tick(at(12), act(2, 0)));
        assert!(
            !p.tick(at(13), act(2, 0)),
            "only 2 s since the last release"
        );
        assert!(!p.tick(at(15), act(2, 0)));
        assert!(p.tick(at(16), act(2, 0)), "5 s since the last release");
    }

    #[test]
    fn steady_activity_releases_once_a_minute() {
        let t0 = Instant::now();
        let mut p = Policy::new(t0, act(0, 5));
        let released: Vec<u64> = (1..=180)
            .filter(|&s| p.tick(t0 + Duration::from_secs(s), act(s, 5)))
            .collect();
        assert_eq!(released, vec![60, 120, 180]);
    }
}
