//! Bookkeeping between our publish requests, the packet ids rumqttc assigns, and ThingsBoard's
//! PUBACKs.
//!
//! rumqttc's `publish()` returns no packet id (rumqtt #349, #1007), so the session task records
//! each request here in order, binds it to the pkid of the next `Outgoing::Publish(pkid)` event
//! (FIFO; the session task is the only publisher) and resolves it on `Incoming::PubAck(pkid)`.
//! Pure: no I/O, and time comes in as arguments.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A bookkeeping inconsistency. The session task treats it as a broken session and resends from
/// the store.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// rumqttc reported an outgoing publish we did not request.
    #[error("outgoing publish {pkid} without a matching request")]
    UnexpectedOutgoing { pkid: u16 },
    /// rumqttc reused a packet id that is still awaiting its PUBACK.
    #[error("packet id {pkid} reused while still in flight")]
    PkidInUse { pkid: u16 },
}

#[derive(Debug)]
struct Entry<T> {
    tag: T,
    /// When the request was handed to rumqttc; the PUBACK deadline counts from here.
    since: Instant,
    /// Whether a late PUBACK for this entry means a dead link (rows) or is tolerated (announces).
    deadline_applies: bool,
}

/// Publishes requested but not yet acknowledged, in request order.
#[derive(Debug)]
pub struct Inflight<T> {
    /// Requested, waiting for rumqttc to assign a pkid (FIFO).
    requested: VecDeque<Entry<T>>,
    /// On the wire, waiting for a PUBACK.
    sent: HashMap<u16, Entry<T>>,
}

impl<T> Default for Inflight<T> {
    fn default() -> Self {
        Inflight {
            requested: VecDeque::new(),
            sent: HashMap::new(),
        }
    }
}

impl<T> Inflight<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Publishes not yet acknowledged (the window the caller keeps ≤ `max_inflight`).
    pub fn len(&self) -> usize {
        self.requested.len() + self.sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Record a publish request just handed to rumqttc.
    pub fn push_request(&mut self, tag: T, now: Instant, deadline_applies: bool) {
        self.requested.push_back(Entry {
            tag,
            since: now,
            deadline_applies,
        });
    }

    /// rumqttc wrote the next publish with this pkid: bind it to the oldest request.
    pub fn on_outgoing(&mut self, pkid: u16) -> Result<(), Error> {
        if self.sent.contains_key(&pkid) {
            return Err(Error::PkidInUse { pkid });
        }
        let entry = self
            .requested
            .pop_front()
            .ok_or(Error::UnexpectedOutgoing { pkid })?;
        self.sent.insert(pkid, entry);
        Ok(())
    }

    /// A PUBACK arrived; `None` for a stray one (duplicate PUBACKs from ThingsBoard < 4.2.1, or an
    /// entry already given up on).
    pub fn on_puback(&mut self, pkid: u16) -> Option<T> {
        self.sent.remove(&pkid).map(|e| {
            metrics::histogram!("dlms_bridge_uplink_puback_latency_seconds")
                .record(e.since.elapsed().as_secs_f64());
            e.tag
        })
    }

    /// Whether some entry whose deadline applies has waited longer than `timeout`.
    pub fn overdue(&self, now: Instant, timeout: Duration) -> bool {
        self.requested
            .iter()
            .chain(self.sent.values())
            .any(|e| e.deadline_applies && now.saturating_duration_since(e.since) > timeout)
    }

    /// Whether any entry whose deadline applies is still waiting (what a graceful stop waits for).
    pub fn has_tracked(&self) -> bool {
        self.requested
            .iter()
            .chain(self.sent.values())
            .any(|e| e.deadline_applies)
    }

    /// Give up on sent entries without a deadline that waited longer than `timeout` (ThingsBoard
    /// sends no PUBACK for a failed `connect`), so they stop occupying the window.
    pub fn expire_untracked(&mut self, now: Instant, timeout: Duration) -> Vec<T> {
        let stale: Vec<u16> = self
            .sent
            .iter()
            .filter(|(_, e)| {
                !e.deadline_applies && now.saturating_duration_since(e.since) > timeout
            })
            .map(|(pkid, _)| *pkid)
            .collect();
        stale
            .into_iter()
            .filter_map(|pkid| self.sent.remove(&pkid).map(|e| e.tag))
            .collect()
    }

    /// Forget everything (connection lost): the rows are still in the store and get resent.
    pub fn reset(&mut self) {
        self.requested.clear();
        self.sent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(20);

    #[test]
    fn fifo_binding_and_out_of_order_acks() {
        let t0 = Instant::now();
        let mut f = Inflight::new();
        f.push_request("a", t0, true);
        f.push_request("b", t0, true);
        f.push_request("c", t0, true);
        assert_eq!(f.len(), 3);
        f.on_outgoing(5).unwrap();
        f.on_outgoing(6).unwrap();
        f.on_outgoing(1).unwrap();
        assert_eq!(f.on_puback(6), Some("b"));
        assert_eq!(f.on_puback(5), Some("a"));
        assert_eq!(f.on_puback(1), Some("c"));
        assert!(f.is_empty());
    }

    #[test]
    fn stray_and_duplicate_pubacks_are_ignored() {
        let mut f = Inflight::new();
        f.push_request(1, Instant::now(), true);
        f.on_outgoing(3).unwrap();
        assert_eq!(f.on_puback(9), None);
        assert_eq!(f.on_puback(3), Some(1));
        assert_eq!(f.on_puback(3), None);
    }

    #[test]
    fn unexpected_outgoing_and_pkid_reuse_are_errors() {
        let mut f: Inflight<u8> = Inflight::new();
        assert_eq!(f.on_outgoing(1), Err(Error::UnexpectedOutgoing { pkid: 1 }));
        f.push_request(1, Instant::now(), true);
        f.push_request(2, Instant::now(), true);
        f.on_outgoing(1).unwrap();
        assert_eq!(f.on_outgoing(1), Err(Error::PkidInUse { pkid: 1 }));
    }

    #[test]
    fn overdue_counts_only_tracked_entries() {
        let t0 = Instant::now();
        let mut f = Inflight::new();
        f.push_request("announce", t0, false);
        f.on_outgoing(1).unwrap();
        assert!(!f.overdue(t0 + 2 * T, T));
        assert!(!f.has_tracked());
        assert_eq!(f.expire_untracked(t0 + T / 2, T), Vec::<&str>::new());
        assert_eq!(f.expire_untracked(t0 + 2 * T, T), vec!["announce"]);
        assert!(f.is_empty());

        f.push_request("rows", t0, true);
        assert!(f.has_tracked());
        assert!(!f.overdue(t0 + T, T));
        assert!(f.overdue(t0 + T + Duration::from_millis(1), T));
        f.on_outgoing(2).unwrap();
        assert!(f.overdue(t0 + 2 * T, T));
        f.reset();
        assert!(f.is_empty());
        assert!(!f.overdue(t0 + 2 * T, T));
    }
}
