//! `/metrics` in the Prometheus text format. Two parts:
//! - events counted where they happen, through the `metrics` facade (one-line `counter!` /
//!   `histogram!` calls in the poller, the uplink's in-flight table and the router), rendered by
//!   `metrics-exporter-prometheus` (the facade's reference exporter: histograms with fixed
//!   buckets, no HTTP listener of its own), plus process CPU, memory and open files from
//!   `metrics-process`;
//! - state that already exists elsewhere (uplink status, queue stats, router counters, the live
//!   meter view), written at scrape time by [`render_state`] straight from those snapshots, so a
//!   scrape of 1,000 meters costs one pass over a map and no registry look-ups.
//!
//! This module must not keep state of its own beyond the facade's recorder.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::Value;

use crate::app::MeterInfo;
use crate::http::state::LiveState;
use crate::model::TimestampMs;
use crate::router::RouterStats;
use crate::store::StoreStats;
use crate::uplink::UplinkStatus;

/// Buckets of the per-meter poll duration histogram, seconds.
const POLL_BUCKETS_S: [f64; 11] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Buckets of the publish → PUBACK latency histogram, seconds.
const PUBACK_BUCKETS_S: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// The process-wide recorder: `None` when another recorder was installed first (then only the
/// state part is exported).
static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// Install the facade's recorder once per process; later calls return the same handle.
pub fn recorder() -> Option<&'static PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("dlms_bridge_meter_poll_duration_seconds".into()),
                    &POLL_BUCKETS_S,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("dlms_bridge_uplink_puback_latency_seconds".into()),
                        &PUBACK_BUCKETS_S,
                    )
                });
            let handle = builder.ok()?.install_recorder().ok()?;
            describe();
            let process = metrics_process::Collector::default();
            process.describe();
            let _ = PROCESS.set(process);
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_histogram!(
        "dlms_bridge_meter_poll_duration_seconds",
        Unit::Seconds,
        "Duration of one poll of a meter (all its registers), successful or not."
    );
    describe_counter!(
        "dlms_bridge_meter_poll_failures_total",
        "Failed polls of a meter."
    );
    describe_counter!(
        "dlms_bridge_meter_poll_retries_total",
        "Polls retried at once on a fresh association after the reused one failed."
    );
    describe_counter!(
        "dlms_bridge_meter_poll_overruns_total",
        "Polls skipped because the previous one overran the interval."
    );
    describe_histogram!(
        "dlms_bridge_uplink_puback_latency_seconds",
        Unit::Seconds,
        "Time from handing a publish to the MQTT client to its PUBACK from ThingsBoard."
    );
    describe_counter!(
        "dlms_bridge_mapping_errors_total",
        "Local messages on a handled topic that could not be mapped, by kind."
    );
    describe_counter!(
        "dlms_bridge_rpc_total",
        "Server-side RPCs answered, by outcome (ok, error, timeout, no_route)."
    );
}

/// The outcome label of one RPC reply (see `downlink`: failures are `{"success":false,..}`).
pub fn rpc_outcome(data: &Value) -> &'static str {
    if data.get("success").and_then(Value::as_bool) != Some(false) {
        return "ok";
    }
    let why = data.get("error").and_then(Value::as_str).unwrap_or("");
    if why.contains("no RPC route") || why.contains("broker disabled") {
        "no_route"
    } else if why.contains("timed out") || why.contains("no response on") {
        "timeout"
    } else {
        "error"
    }
}

/// The facade part: counters and histograms from event points, and the process figures.
pub fn render_facade() -> String {
    let Some(h) = recorder() else {
        return String::new();
    };
    if let Some(p) = PROCESS.get() {
        p.collect();
    }
    h.render()
}

/// Drain histogram buffers so they do not grow between scrapes (call every few seconds).
pub fn upkeep() {
    if let Some(h) = recorder() {
        h.run_upkeep();
    }
}

/// Snapshots of the state that exists elsewhere, taken by the scrape handler.
pub struct Snapshot<'a> {
    pub uplink: &'a UplinkStatus,
    /// `None` when the store did not answer (then the queue families are left out).
    pub store: Option<StoreStats>,
    pub router: &'a RouterStats,
    pub live: &'a LiveState,
    pub meters: &'a [MeterInfo],
    /// Clients connected to the embedded broker now (`None`: broker disabled).
    pub broker_clients: Option<usize>,
    pub now_ms: TimestampMs,
}

/// A tiny Prometheus text writer (families with HELP/TYPE, escaped label values).
struct Prom<'o> {
    out: &'o mut String,
}

impl Prom<'_> {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn one(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], v);
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                for c in val.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {v}");
    }
}

/// The state part of `/metrics`.
pub fn render_state(s: &Snapshot<'_>, out: &mut String) {
    let mut p = Prom { out };
    let u = s.uplink;
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    p.one(
        "dlms_bridge_uplink_connected",
        "gauge",
        "1 while the ThingsBoard session is up.",
        b(u.connected),
    );
    p.one(
        "dlms_bridge_uplink_connect_attempts_total",
        "counter",
        "Connection attempts to ThingsBoard.",
        u.connect_attempts as f64,
    );
    p.one(
        "dlms_bridge_uplink_reconnects_total",
        "counter",
        "Sessions established after the first one.",
        u.connects.saturating_sub(1) as f64,
    );
    p.one(
        "dlms_bridge_uplink_session_takeovers_total",
        "counter",
        "Sessions closed because another client used the same access token.",
        u.session_takeovers as f64,
    );
    p.one(
        "dlms_bridge_uplink_dead_links_total",
        "counter",
        "Sessions dropped because a PUBACK did not arrive within ack_timeout.",
        u.dead_links as f64,
    );
    p.one(
        "dlms_bridge_uplink_publishes_total",
        "counter",
        "Publishes sent to ThingsBoard (one per device batch; announcements included).",
        u.published as f64,
    );
    p.one(
        "dlms_bridge_uplink_acked_publishes_total",
        "counter",
        "Publishes ThingsBoard acknowledged with success.",
        u.acked_publishes as f64,
    );
    p.one(
        "dlms_bridge_uplink_failed_acks_total",
        "counter",
        "PUBACKs with a failure reason code.",
        u.failed_acks as f64,
    );
    p.one(
        "dlms_bridge_records_queued_total",
        "counter",
        "Records made durable in the queue.",
        s.router.records_queued.load(Ordering::Relaxed) as f64,
    );
    p.one(
        "dlms_bridge_records_acked_total",
        "counter",
        "Records deleted from the queue after ThingsBoard acknowledged them.",
        u.acked_records as f64,
    );
    p.family(
        "dlms_bridge_records_dropped_total",
        "counter",
        "Records or messages lost, by reason.",
    );
    let dropped = "dlms_bridge_records_dropped_total";
    if let Some(st) = &s.store {
        p.sample(dropped, &[("reason", "queue_full")], st.dropped_full as f64);
        p.sample(dropped, &[("reason", "max_age")], st.dropped_age as f64);
    }
    p.sample(
        dropped,
        &[("reason", "rejected_by_thingsboard")],
        u.dropped_records as f64,
    );
    p.sample(
        dropped,
        &[("reason", "store_refused")],
        s.router.store_rejected.load(Ordering::Relaxed) as f64,
    );
    p.sample(
        dropped,
        &[("reason", "malformed_local")],
        s.router.malformed_dropped.load(Ordering::Relaxed) as f64,
    );
    if let Some(st) = &s.store {
        p.one(
            "dlms_bridge_queue_depth",
            "gauge",
            "Records waiting for a PUBACK.",
            st.depth as f64,
        );
        let age = st
            .oldest_created_ms
            .map(|t| ((s.now_ms - t).max(0) as f64) / 1000.0)
            .unwrap_or(0.0);
        p.one(
            "dlms_bridge_queue_oldest_age_seconds",
            "gauge",
            "Age of the oldest queued record (0 when the queue is empty).",
            age,
        );
        p.one(
            "dlms_bridge_queue_bytes",
            "gauge",
            "Queue database plus WAL size on disk.",
            st.bytes_on_disk as f64,
        );
    }
    p.one(
        "dlms_bridge_store_up",
        "gauge",
        "1 when the queue answered this scrape.",
        b(s.store.is_some()),
    );
    let t = &s.live.totals;
    p.family(
        "dlms_bridge_messages_in_total",
        "counter",
        "Messages in, by source (local MQTT publishes; meter records).",
    );
    p.sample(
        "dlms_bridge_messages_in_total",
        &[("source", "local")],
        t.local_messages.load(Ordering::Relaxed) as f64,
    );
    p.sample(
        "dlms_bridge_messages_in_total",
        &[("source", "meters")],
        t.meter_records.load(Ordering::Relaxed) as f64,
    );
    p.family(
        "dlms_bridge_message_bytes_in_total",
        "counter",
        "Payload bytes of local MQTT publishes.",
    );
    p.sample(
        "dlms_bridge_message_bytes_in_total",
        &[("source", "local")],
        t.local_bytes.load(Ordering::Relaxed) as f64,
    );
    p.one(
        "dlms_bridge_local_unmatched_total",
        "counter",
        "Local messages on topics no rule handles.",
        s.router.unmatched.load(Ordering::Relaxed) as f64,
    );
    p.one(
        "dlms_bridge_rpc_requests_total",
        "counter",
        "Server-side RPCs received from ThingsBoard.",
        s.router.rpc_requests.load(Ordering::Relaxed) as f64,
    );
    if let Some(n) = s.broker_clients {
        p.one(
            "dlms_bridge_broker_clients",
            "gauge",
            "MQTT clients connected to the embedded broker.",
            n as f64,
        );
    }
    let clients = s.live.clients();
    let recent = clients
        .iter()
        .filter(|c| s.now_ms - c.last_seen_ms <= 300_000)
        .count();
    p.one(
        "dlms_bridge_local_publishers",
        "gauge",
        "Local MQTT clients that published in the last 5 minutes.",
        recent as f64,
    );
    p.family(
        "dlms_bridge_local_client_messages_total",
        "counter",
        "Publishes per local MQTT client.",
    );
    for c in &clients {
        p.sample(
            "dlms_bridge_local_client_messages_total",
            &[("client", &c.client_id)],
            c.messages as f64,
        );
    }
    p.family(
        "dlms_bridge_local_client_bytes_total",
        "counter",
        "Payload bytes per local MQTT client.",
    );
    for c in &clients {
        p.sample(
            "dlms_bridge_local_client_bytes_total",
            &[("client", &c.client_id)],
            c.bytes as f64,
        );
    }
    p.one(
        "dlms_bridge_meters",
        "gauge",
        "Meters being polled.",
        s.meters.len() as f64,
    );
    s.live.with_meters(|live| {
        let up = "dlms_bridge_meter_up";
        p.family(
            up,
            "gauge",
            "1 when the meter's last poll succeeded, 0 when failing or down.",
        );
        for m in s.meters {
            let v = live.get(&m.name).map(|l| l.state() == "up");
            p.sample(up, &[("meter", &m.name)], b(v.unwrap_or(false)));
        }
        let cf = "dlms_bridge_meter_consecutive_failures";
        p.family(cf, "gauge", "Failed polls in a row.");
        for m in s.meters {
            let v = live.get(&m.name).map_or(0, |l| l.consecutive_failures);
            p.sample(cf, &[("meter", &m.name)], v as f64);
        }
        let ls = "dlms_bridge_meter_last_success_timestamp_seconds";
        p.family(
            ls,
            "gauge",
            "Unix time of the meter's last successful reading (0 = none yet).",
        );
        for m in s.meters {
            let v = live
                .get(&m.name)
                .and_then(|l| l.last_reading_ms)
                .unwrap_or(0);
            p.sample(ls, &[("meter", &m.name)], v as f64 / 1000.0);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rpc_outcomes() {
        assert_eq!(rpc_outcome(&json!({"success": true})), "ok");
        assert_eq!(rpc_outcome(&json!({"temp": 3})), "ok");
        assert_eq!(
            rpc_outcome(&json!({"success": false, "error": "no RPC route for device `x`"})),
            "no_route"
        );
        assert_eq!(
            rpc_outcome(&json!({"success": false, "error": "no response on a/b within 5s"})),
            "timeout"
        );
        assert_eq!(
            rpc_outcome(&json!({"success": false, "error": "meter said no"})),
            "error"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        let mut p = Prom { out: &mut out };
        p.sample("x", &[("client", "a\"b\\c\nd")], 1.0);
        assert_eq!(out, "x{client=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}
