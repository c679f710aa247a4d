//! The live view behind the status API and page: per meter its last values with units, state,
//! last error, poll counts and one hour of one chosen key; per local client its messages and
//! bytes; the uplink's connection timeline (since when, session takeovers in the last hour).
//!
//! It is fed by observing what already flows: every `SourceEvent` the router receives (one call
//! in the router) and the uplink's status watch. It must not poll meters, talk to the broker or
//! block: the router calls it on its hot path, so it only updates maps under a short lock.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::{now_ms, RecordKind, TimestampMs};
use crate::sources::SourceEvent;
use crate::uplink::UplinkStatus;

/// How much sparkline history is kept per meter.
pub const HISTORY_SPAN_MS: i64 = 3_600_000;
/// One sparkline point per bucket (the last value in it): 360 points for the hour.
pub const HISTORY_BUCKET_MS: i64 = 10_000;
/// Most local clients remembered; the least recently seen is forgotten beyond this.
pub const MAX_CLIENTS: usize = 1000;
/// Window of the "session takeovers in the last hour" count.
pub const TAKEOVER_WINDOW_MS: i64 = 3_600_000;

/// Telemetry keys the meter actor adds about itself rather than read from the meter.
const HEALTH_KEYS: [&str; 3] = ["poll_ok", "consecutive_failures", "last_error"];

/// What the status page shows of one meter.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MeterLive {
    /// Last value of each register key.
    pub values: BTreeMap<String, Value>,
    /// Unit of each key that has one (from the meter's scaler-unit attribute).
    pub units: BTreeMap<String, String>,
    /// `ts` of the last successful reading.
    pub last_reading_ms: Option<TimestampMs>,
    /// `ts` of the last poll, successful or not.
    pub last_poll_ms: Option<TimestampMs>,
    pub last_error: Option<String>,
    pub last_error_ms: Option<TimestampMs>,
    pub consecutive_failures: u64,
    /// Polls reported (successful and failed) and failed ones, since the bridge started.
    pub polls: u64,
    pub failures: u64,
    /// The meter actor reported it down (Disconnect after repeated failures).
    pub down: bool,
    /// `(bucket start ms, value)` of the sparkline key over the last hour, oldest first.
    #[serde(skip)]
    pub history: VecDeque<(TimestampMs, f64)>,
}

impl MeterLive {
    /// `up`, `failing` (last poll failed), `down` (reported down) or `waiting` (no poll yet).
    pub fn state(&self) -> &'static str {
        if self.down {
            "down"
        } else if self.last_poll_ms.is_none() {
            "waiting"
        } else if self.consecutive_failures > 0 {
            "failing"
        } else {
            "up"
        }
    }
}

/// One local MQTT client as seen through its publishes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientLive {
    pub client_id: String,
    pub username: Option<String>,
    pub messages: u64,
    pub bytes: u64,
    pub first_seen_ms: TimestampMs,
    pub last_seen_ms: TimestampMs,
    pub last_topic: String,
}

/// The uplink's connection timeline, derived from its status watch.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UplinkTimeline {
    /// When the current session came up (None while disconnected).
    pub connected_since_ms: Option<TimestampMs>,
    /// When the last session was lost (None while connected or never connected).
    pub disconnected_since_ms: Option<TimestampMs>,
    /// When each session takeover of the last hour was seen.
    #[serde(skip)]
    pub takeovers: VecDeque<TimestampMs>,
}

impl UplinkTimeline {
    /// Session takeovers seen within the last hour before `now`.
    pub fn takeovers_since(&self, now: TimestampMs) -> usize {
        self.takeovers
            .iter()
            .filter(|t| now - **t <= TAKEOVER_WINDOW_MS)
            .count()
    }
}

#[derive(Default)]
struct Inner {
    meters: HashMap<String, MeterLive>,
    clients: HashMap<String, ClientLive>,
    uplink: UplinkTimeline,
}

/// Totals of what came in, by source.
#[derive(Debug, Default)]
pub struct InTotals {
    pub local_messages: AtomicU64,
    pub local_bytes: AtomicU64,
    /// Records the meter actors emitted (readings, health, connect/disconnect).
    pub meter_records: AtomicU64,
}

/// Shared live state; see the module docs.
pub struct LiveState {
    sparkline_key: String,
    inner: RwLock<Inner>,
    /// Bumped on every change, so server-sent events go out only when something changed.
    version: AtomicU64,
    pub totals: InTotals,
    started_ms: TimestampMs,
}

impl LiveState {
    pub fn new(sparkline_key: &str) -> Self {
        LiveState {
            sparkline_key: sparkline_key.to_string(),
            inner: RwLock::new(Inner::default()),
            version: AtomicU64::new(0),
            totals: InTotals::default(),
            started_ms: now_ms(),
        }
    }

    /// The telemetry key kept for the sparklines.
    pub fn sparkline_key(&self) -> &str {
        &self.sparkline_key
    }

    pub fn started_ms(&self) -> TimestampMs {
        self.started_ms
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Look at one event on its way to the router's mapping. Cheap; never blocks for long.
    pub fn observe(&self, ev: &SourceEvent) {
        match ev {
            SourceEvent::Local(msg) => {
                let len = msg.payload.len() as u64;
                self.totals.local_messages.fetch_add(1, Ordering::Relaxed);
                self.totals.local_bytes.fetch_add(len, Ordering::Relaxed);
                let Ok(mut g) = self.inner.write() else {
                    return;
                };
                // Looked up before inserting: every local message passes here, and `entry` would
                // allocate the client id each time.
                if !g.clients.contains_key(&msg.client_id) {
                    if g.clients.len() >= MAX_CLIENTS {
                        let oldest = g
                            .clients
                            .values()
                            .min_by_key(|c| c.last_seen_ms)
                            .map(|c| c.client_id.clone());
                        if let Some(o) = oldest {
                            g.clients.remove(&o);
                        }
                    }
                    g.clients.insert(
                        msg.client_id.clone(),
                        ClientLive {
                            client_id: msg.client_id.clone(),
                            first_seen_ms: msg.received_ms,
                            ..ClientLive::default()
                        },
                    );
                }
                let Some(c) = g.clients.get_mut(&msg.client_id) else {
                    return;
                };
                c.username.clone_from(&msg.username);
                c.messages += 1;
                c.bytes += len;
                c.last_seen_ms = msg.received_ms;
                if c.last_topic != msg.topic {
                    c.last_topic.clone_from(&msg.topic);
                }
            }
            SourceEvent::Records(records) => {
                self.totals
                    .meter_records
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                let Ok(mut g) = self.inner.write() else {
                    return;
                };
                for r in records {
                    let m = g.meters.entry(r.device.clone()).or_default();
                    match r.kind {
                        RecordKind::Telemetry => self.observe_telemetry(m, &r.payload),
                        RecordKind::Attributes => {
                            if let Some(obj) = r.payload.as_object() {
                                for (k, v) in obj {
                                    if let (Some(key), Some(u)) =
                                        (k.strip_prefix("unit_"), v.as_str())
                                    {
                                        m.units.insert(key.to_string(), u.to_string());
                                    }
                                }
                            }
                        }
                        RecordKind::Connect => m.down = false,
                        RecordKind::Disconnect => m.down = true,
                        _ => {}
                    }
                }
            }
        }
        self.version.fetch_add(1, Ordering::Relaxed);
    }

    fn observe_telemetry(&self, m: &mut MeterLive, payload: &Value) {
        let ts = payload
            .get("ts")
            .and_then(Value::as_i64)
            .unwrap_or_else(now_ms);
        let Some(values) = payload.get("values").and_then(Value::as_object) else {
            return;
        };
        m.last_poll_ms = Some(ts);
        m.polls += 1;
        if values.get("poll_ok").and_then(Value::as_bool) == Some(false) {
            m.failures += 1;
            m.consecutive_failures = values
                .get("consecutive_failures")
                .and_then(Value::as_u64)
                .unwrap_or(m.consecutive_failures + 1);
            m.last_error = values
                .get("last_error")
                .and_then(Value::as_str)
                .map(str::to_string);
            m.last_error_ms = Some(ts);
            return;
        }
        m.consecutive_failures = 0;
        m.down = false;
        m.last_reading_ms = Some(ts);
        for (k, v) in values {
            if HEALTH_KEYS.contains(&k.as_str()) {
                continue;
            }
            if k == &self.sparkline_key {
                if let Some(x) = v.as_f64() {
                    push_history(&mut m.history, ts, x);
                }
            }
            match m.values.get_mut(k) {
                Some(old) => *old = v.clone(),
                None => {
                    m.values.insert(k.clone(), v.clone());
                }
            }
        }
    }

    /// Follow the uplink's status until `cancel`: connection times and session takeovers.
    pub async fn follow_uplink(
        &self,
        mut status: watch::Receiver<UplinkStatus>,
        cancel: CancellationToken,
    ) {
        let mut last = status.borrow_and_update().clone();
        self.apply_uplink(&UplinkStatus::default(), &last);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = status.changed() => if r.is_err() { return },
            }
            let now = status.borrow_and_update().clone();
            self.apply_uplink(&last, &now);
            last = now;
        }
    }

    fn apply_uplink(&self, before: &UplinkStatus, after: &UplinkStatus) {
        if before.connected == after.connected
            && before.session_takeovers == after.session_takeovers
        {
            return;
        }
        let now = now_ms();
        let Ok(mut g) = self.inner.write() else {
            return;
        };
        let u = &mut g.uplink;
        if after.connected && !before.connected {
            u.connected_since_ms = Some(now);
            u.disconnected_since_ms = None;
        } else if !after.connected && before.connected {
            u.connected_since_ms = None;
            u.disconnected_since_ms = Some(now);
        } else if !after.connected && u.disconnected_since_ms.is_none() {
            u.disconnected_since_ms = Some(now);
        }
        for _ in before.session_takeovers..after.session_takeovers {
            u.takeovers.push_back(now);
        }
        while u
            .takeovers
            .front()
            .is_some_and(|t| now - *t > TAKEOVER_WINDOW_MS)
        {
            u.takeovers.pop_front();
        }
        drop(g);
        self.version.fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of one meter's live state (None before its first record).
    pub fn meter(&self, name: &str) -> Option<MeterLive> {
        self.inner.read().ok()?.meters.get(name).cloned()
    }

    /// Run `f` over every meter's live state under one read lock (metrics, status).
    pub fn with_meters<R>(&self, f: impl FnOnce(&HashMap<String, MeterLive>) -> R) -> R {
        match self.inner.read() {
            Ok(g) => f(&g.meters),
            Err(_) => f(&HashMap::new()),
        }
    }

    /// Local clients, most recently seen first.
    pub fn clients(&self) -> Vec<ClientLive> {
        let mut v: Vec<ClientLive> = self
            .inner
            .read()
            .map(|g| g.clients.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by_key(|c| std::cmp::Reverse(c.last_seen_ms));
        v
    }

    pub fn uplink(&self) -> UplinkTimeline {
        self.inner
            .read()
            .map(|g| g.uplink.clone())
            .unwrap_or_default()
    }
}

/// Append `x` at `ts` to a one-hour history of 10 s buckets (the last value of a bucket wins).
fn push_history(h: &mut VecDeque<(TimestampMs, f64)>, ts: TimestampMs, x: f64) {
    let bucket = ts - ts.rem_euclid(HISTORY_BUCKET_MS);
    match h.back_mut() {
        Some(last) if last.0 == bucket => last.1 = x,
        Some(last) if last.0 > bucket => {}
        _ => h.push_back((bucket, x)),
    }
    while h.front().is_some_and(|f| bucket - f.0 >= HISTORY_SPAN_MS) {
        h.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Record;
    use serde_json::json;

    fn telemetry(device: &str, ts: i64, values: Value) -> Record {
        Record::telemetry(
            device,
            "t",
            ts,
            values.as_object().cloned().unwrap_or_default(),
        )
    }

    #[test]
    fn readings_failures_and_units_are_tracked() {
        let s = LiveState::new("p");
        let unit = Record::attributes(
            "m",
            "t",
            json!({"unit_p": "W"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        );
        s.observe(&SourceEvent::Records(vec![
            unit,
            telemetry(
                "m",
                1_000,
                json!({"p": 5.0, "poll_ok": true, "consecutive_failures": 0}),
            ),
        ]));
        let m = s.meter("m").expect("meter");
        assert_eq!(m.state(), "up");
        assert_eq!(m.values.get("p"), Some(&json!(5.0)));
        assert!(!m.values.contains_key("poll_ok"));
        assert_eq!(m.units.get("p").map(String::as_str), Some("W"));
        s.observe(&SourceEvent::Records(vec![telemetry(
            "m",
            3_000,
            json!({"poll_ok": false, "consecutive_failures": 1, "last_error": "timeout"}),
        )]));
        let m = s.meter("m").expect("meter");
        assert_eq!(m.state(), "failing");
        assert_eq!((m.polls, m.failures), (2, 1));
        assert_eq!(m.last_error.as_deref(), Some("timeout"));
        assert_eq!(m.values.get("p"), Some(&json!(5.0)), "last good value kept");
        s.observe(&SourceEvent::Records(vec![Record {
            device: "m".into(),
            device_type: "t".into(),
            kind: RecordKind::Disconnect,
            payload: Value::Null,
        }]));
        assert_eq!(s.meter("m").expect("meter").state(), "down");
    }

    #[test]
    fn history_keeps_one_hour_of_buckets() {
        let mut h = VecDeque::new();
        for i in 0..(2 * 3600 / 2) {
            push_history(&mut h, i * 2_000, i as f64);
        }
        assert_eq!(h.len(), (HISTORY_SPAN_MS / HISTORY_BUCKET_MS) as usize);
        let last = h.back().expect("points");
        assert_eq!(
            last.1,
            (2 * 3600 / 2 - 1) as f64,
            "last value of the bucket"
        );
    }

    #[test]
    fn takeovers_are_counted_within_the_hour() {
        let s = LiveState::new("p");
        let a = UplinkStatus::default();
        let b = UplinkStatus {
            connected: true,
            session_takeovers: 2,
            ..UplinkStatus::default()
        };
        s.apply_uplink(&a, &b);
        let u = s.uplink();
        assert!(u.connected_since_ms.is_some());
        assert_eq!(u.takeovers_since(now_ms()), 2);
        assert_eq!(u.takeovers_since(now_ms() + TAKEOVER_WINDOW_MS + 1), 0);
    }
}
