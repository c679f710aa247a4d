//! The uplink against the ThingsBoard emulator, with a real SQLite store in a temp dir.
//! Loopback and ephemeral ports only; every wait is bounded and event-driven.

mod common;

use std::time::Duration;

use common::certs::{write_pem, Ca};
use common::tb_emulator::{Recorded, TbEmulator, TlsServer};
use dlms_bridge::config::{MqttProtocol, Secret, StoreConfig, ThingsboardConfig};
use dlms_bridge::model::{Downlink, Record, RecordKind};
use dlms_bridge::store::{self, StoreHandle};
use dlms_bridge::uplink::tls::TlsSettings;
use dlms_bridge::uplink::{Protocol, TlsReloader, Uplink, UplinkStatus};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "gw-test-token";
const PROFILE: &str = "DLMS Energy Meter";
/// Upper bound for any single wait; the happy path takes milliseconds.
const WAIT: Duration = Duration::from_secs(20);

fn tb_config(emu: &TbEmulator, protocol: MqttProtocol) -> ThingsboardConfig {
    ThingsboardConfig {
        protocol,
        ..emu.thingsboard_config()
    }
}

struct Bridge {
    store: StoreHandle,
    status: watch::Receiver<UplinkStatus>,
    downlink_rx: mpsc::Receiver<Downlink>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
    tls: TlsReloader,
    _dir: tempfile::TempDir,
}

impl Bridge {
    async fn start(cfg: ThingsboardConfig) -> Bridge {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store::open(&StoreConfig {
            path: dir.path().join("queue.db"),
            ..StoreConfig::default()
        })
        .expect("open store");
        let (downlink_tx, downlink_rx) = mpsc::channel(16);
        let uplink = Uplink::new(cfg, store.clone(), downlink_tx)
            .with_shutdown_grace(Duration::from_secs(2));
        let status = uplink.status();
        let tls = uplink.tls_reloader();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let task = tokio::spawn(async move {
            uplink.run(c).await.expect("uplink run");
        });
        Bridge {
            store,
            status,
            downlink_rx,
            cancel,
            task,
            tls,
            _dir: dir,
        }
    }

    async fn wait_status(
        &mut self,
        what: &str,
        pred: impl Fn(&UplinkStatus) -> bool,
    ) -> UplinkStatus {
        let got = match tokio::time::timeout(WAIT, self.status.wait_for(|s| pred(s))).await {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        };
        got.unwrap_or_else(|| {
            panic!(
                "timed out waiting for {what}; status {:?}",
                *self.status.borrow()
            )
        })
    }

    async fn depth(&self) -> u64 {
        self.store.stats().await.expect("store stats").depth
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("uplink stops within the grace period")
            .expect("uplink task");
    }
}

fn reading(device: &str, ts: i64) -> Record {
    let mut values = Map::new();
    values.insert("voltage_l1".into(), json!(230.0 + (ts % 10) as f64 / 10.0));
    values.insert("active_energy".into(), json!(ts));
    Record::telemetry(device, PROFILE, ts, values)
}

fn readings(devices: &[&str], ts: std::ops::Range<i64>) -> Vec<Record> {
    let mut out = Vec::new();
    for t in ts {
        for d in devices {
            out.push(reading(d, t));
        }
    }
    out
}

fn all_arrived(r: &Recorded, devices: &[&str], n: usize) -> bool {
    devices.iter().all(|d| r.telemetry_ts(d).len() >= n)
}

fn assert_in_order(r: &Recorded, devices: &[&str], ts: std::ops::Range<i64>) {
    let expected: Vec<i64> = ts.collect();
    for d in devices {
        assert_eq!(r.telemetry_ts(d), expected, "per-device order for {d}");
    }
}

#[tokio::test]
async fn records_arrive_batched_one_device_per_publish_after_connect() {
    let emu = TbEmulator::start(TOKEN).await;
    let devices = ["Meter 1", "Meter 2", "Meter 3"];
    let mut bridge = Bridge::start(tb_config(&emu, MqttProtocol::Auto)).await;
    bridge
        .store
        .enqueue(readings(&devices, 0..50))
        .await
        .expect("enqueue");

    let r = emu
        .wait_for("150 readings", WAIT, |r| all_arrived(r, &devices, 50))
        .await;
    assert_in_order(&r, &devices, 0..50);
    assert!(
        r.connect_precedes_data(),
        "connect before data: {:?}",
        r.events
    );
    for d in devices {
        assert!(
            r.connects
                .contains(&(d.to_string(), Some(PROFILE.to_string()))),
            "connect with type for {d}"
        );
    }
    assert_eq!(r.multi_device_publishes, 0);
    assert!(
        r.telemetry_publishes < 150,
        "rows are batched per device: {} publishes for 150 rows",
        r.telemetry_publishes
    );
    assert_eq!(r.invalid_payloads, 0);
    assert_eq!(r.protocol_levels, vec![5]);
    assert!(r.refused_filters.is_empty(), "{:?}", r.refused_filters);
    for f in [
        "v1/gateway/rpc",
        "v1/gateway/attributes",
        "v1/gateway/attributes/response",
        "v1/devices/me/rpc/request/+",
        "v1/devices/me/attributes",
    ] {
        assert!(r.granted_filters.iter().any(|g| g == f), "subscribed {f}");
    }
    let s = bridge
        .wait_status("all rows acked", |s| s.acked_records == 150)
        .await;
    assert!(s.connected);
    assert_eq!(s.protocol, Some(Protocol::V5));
    assert_eq!(bridge.depth().await, 0);

    // Live traffic after the backlog still flows.
    bridge
        .store
        .enqueue(readings(&devices, 50..60))
        .await
        .expect("enqueue");
    let r = emu
        .wait_for("live readings", WAIT, |r| all_arrived(r, &devices, 60))
        .await;
    assert_in_order(&r, &devices, 0..60);
    bridge.stop().await;
}

#[tokio::test]
async fn large_backlog_is_split_below_the_packet_limit() {
    let emu = TbEmulator::start(TOKEN).await;
    let mut bridge = Bridge::start(tb_config(&emu, MqttProtocol::V5)).await;
    let blob = "x".repeat(1000);
    let recs: Vec<Record> = (0..300)
        .map(|ts| {
            let mut values = Map::new();
            values.insert("blob".into(), Value::String(blob.clone()));
            Record::telemetry("Big", PROFILE, ts, values)
        })
        .collect();
    bridge.store.enqueue(recs).await.expect("enqueue");
    let r = emu
        .wait_for("300 large readings", WAIT, |r| {
            r.telemetry_ts("Big").len() >= 300
        })
        .await;
    assert_eq!(r.oversize_packets, 0);
    assert!(
        r.telemetry_publishes >= 5,
        "~300 KB needs several 64 KiB packets"
    );
    assert_eq!(r.sessions, 1, "no connection was closed for size");
    assert_in_order(&r, &["Big"], 0..300);
    bridge
        .wait_status("acked", |s| s.acked_records == 300)
        .await;
    bridge.stop().await;
}

#[tokio::test]
async fn mqtt_311_when_configured() {
    let emu = TbEmulator::start(TOKEN).await;
    let mut bridge = Bridge::start(tb_config(&emu, MqttProtocol::V311)).await;
    bridge
        .store
        .enqueue(readings(&["A", "B"], 0..20))
        .await
        .expect("enqueue");
    let r = emu
        .wait_for("40 readings", WAIT, |r| all_arrived(r, &["A", "B"], 20))
        .await;
    assert_eq!(r.protocol_levels, vec![4], "{:?}", r.clients);
    assert!(r.connect_precedes_data());
    assert_in_order(&r, &["A", "B"], 0..20);
    let s = bridge.wait_status("acked", |s| s.acked_records == 40).await;
    assert_eq!(s.protocol, Some(Protocol::V311));
    bridge.stop().await;
}

#[tokio::test]
async fn auto_falls_back_to_311_when_v5_is_refused() {
    let emu = TbEmulator::start(TOKEN).await;
    emu.set_refuse_v5(true);
    let mut bridge = Bridge::start(tb_config(&emu, MqttProtocol::Auto)).await;
    bridge
        .store
        .enqueue(readings(&["A"], 0..10))
        .await
        .expect("enqueue");
    let r = emu
        .wait_for("10 readings", WAIT, |r| r.telemetry_ts("A").len() >= 10)
        .await;
    assert!(r.v5_refusals >= 1);
    assert!(r.protocol_levels.iter().all(|l| *l == 4));
    let s = bridge.wait_status("acked", |s| s.acked_records == 10).await;
    assert_eq!(s.protocol, Some(Protocol::V311));
    bridge.stop().await;
}

#[tokio::test]
async fn wrong_token_is_refused_and_not_retried_in_a_loop() {
    for protocol in [MqttProtocol::V5, MqttProtocol::V311] {
        let emu = TbEmulator::start(TOKEN).await;
        let mut cfg = tb_config(&emu, protocol);
        cfg.access_token = Secret::new("not-the-token");
        let mut bridge = Bridge::start(cfg).await;
        bridge
            .store
            .enqueue(readings(&["A"], 0..5))
            .await
            .expect("enqueue");
        emu.wait_for("the refused attempt", WAIT, |r| r.auth_failures >= 1)
            .await;
        let s = bridge
            .wait_status("the refusal recorded", |s| s.last_error.is_some())
            .await;
        assert!(!s.connected);
        let err = s.last_error.unwrap_or_default();
        assert!(err.contains("access token refused"), "{err}");
        assert!(
            !err.contains("not-the-token"),
            "the token is never shown: {err}"
        );
        // Observation window: with reconnect_min = 50 ms a tight loop would make ~20 attempts.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = emu.snapshot();
        assert_eq!(
            r.connect_attempts, 1,
            "{protocol:?}: retried only every auth_retry"
        );
        assert_eq!(r.sessions, 0);
        assert_eq!(bridge.depth().await, 5, "nothing lost while refused");
        bridge.stop().await;
    }
}

#[tokio::test]
async fn second_client_with_the_same_token_is_detected_as_takeover() {
    let emu = TbEmulator::start(TOKEN).await;
    let mut bridge = Bridge::start(tb_config(&emu, MqttProtocol::V5)).await;
    bridge.wait_status("connected", |s| s.connected).await;

    // A leftover tb-gateway with the same token.
    let mut opts = rumqttc::v5::MqttOptions::new("tb-gateway", "127.0.0.1", emu.port());
    opts.set_credentials(TOKEN, "");
    let (other, mut other_loop) = rumqttc::v5::AsyncClient::new(opts, 10);
    let other_task = tokio::spawn(async move {
        // Connect once, then stay until evicted back.
        while let Ok(ev) = other_loop.poll().await {
            let _ = ev;
        }
    });
    let s = bridge
        .wait_status("takeover detected", |s| s.session_takeovers >= 1)
        .await;
    assert!(s.last_error.unwrap_or_default().contains("taken over"));
    assert!(emu.snapshot().evictions >= 1);
    other_task.abort();
    drop(other);

    // The bridge comes back and keeps delivering.
    bridge
        .store
        .enqueue(readings(&["A"], 0..5))
        .await
        .expect("enqueue");
    emu.wait_for("delivery after takeover", WAIT, |r| {
        r.telemetry_ts("A").len() >= 5
    })
    .await;
    bridge.stop().await;
}

#[tokio::test]
async fn thingsboard_restart_under_load_loses_nothing() {
    let emu = TbEmulator::start(TOKEN).await;
    let devices = ["M1", "M2", "M3", "M4"];
    let mut bridge = Bridge::start(tb_config(&emu, MqttProtocol::Auto)).await;

    bridge
        .store
        .enqueue(readings(&devices, 0..100))
        .await
        .expect("enqueue");
    emu.wait_for("first readings", WAIT, |r| r.telemetry_ts("M1").len() >= 10)
        .await;
    emu.stop().await;
    bridge.wait_status("disconnected", |s| !s.connected).await;
    let sessions_before = emu.snapshot().sessions;

    // The queue grows while ThingsBoard is down.
    for chunk in 0..5 {
        let from = 100 + chunk * 100;
        bridge
            .store
            .enqueue(readings(&devices, from..from + 100))
            .await
            .expect("enqueue");
    }
    assert!(bridge.depth().await >= 2000, "rows wait in the store");

    emu.restart().await;
    let r = emu
        .wait_for("all 2400 readings", WAIT, |r| all_arrived(r, &devices, 600))
        .await;
    assert!(r.sessions > sessions_before, "reconnected");
    assert_in_order(&r, &devices, 0..600);
    assert!(
        r.connect_precedes_data(),
        "re-announced before data in every session"
    );
    let announced_after: Vec<&String> = r
        .events
        .iter()
        .filter(|e| e.session > sessions_before && e.kind == "connect")
        .map(|e| &e.device)
        .collect();
    for d in devices {
        assert!(announced_after.iter().any(|a| *a == d), "{d} re-announced");
    }
    bridge
        .wait_status("store drained", |s| s.connected && s.acked_records >= 2400)
        .await;
    assert_eq!(bridge.depth().await, 0);
    bridge.stop().await;
}

#[tokio::test]
async fn withheld_pubacks_keep_rows_and_the_link_is_declared_dead() {
    let emu = TbEmulator::start(TOKEN).await;
    let mut cfg = tb_config(&emu, MqttProtocol::V5);
    cfg.ack_timeout = Duration::from_millis(800);
    let mut bridge = Bridge::start(cfg).await;
    bridge.wait_status("connected", |s| s.connected).await;

    emu.set_withhold_pubacks(true);
    bridge
        .store
        .enqueue(readings(&["A"], 0..10))
        .await
        .expect("enqueue");
    emu.wait_for("data received, not acked", WAIT, |r| {
        r.telemetry_ts("A").len() >= 10 && r.pubacks_withheld >= 1
    })
    .await;
    assert_eq!(bridge.depth().await, 10, "no PUBACK, no delete");
    bridge
        .wait_status("dead link declared", |s| s.dead_links >= 1)
        .await;
    assert_eq!(bridge.depth().await, 10);
    let sessions = emu
        .wait_for("reconnected after the dead link", WAIT, |r| r.sessions >= 2)
        .await
        .sessions;
    assert!(sessions >= 2);

    emu.set_withhold_pubacks(false);
    bridge
        .wait_status("acked after acks resume", |s| s.acked_records >= 10)
        .await;
    assert_eq!(bridge.depth().await, 0);
    let r = emu.snapshot();
    assert!(
        r.telemetry.get("A").map_or(0, Vec::len) > 10,
        "the unacked rows were sent again"
    );
    assert_in_order(&r, &["A"], 0..10);
    bridge.stop().await;
}

#[tokio::test]
async fn rpc_and_attributes_reach_the_downlink_and_replies_reach_thingsboard() {
    let emu = TbEmulator::start(TOKEN).await;
    let mut bridge = Bridge::start(tb_config(&emu, MqttProtocol::V5)).await;
    bridge
        .store
        .enqueue(readings(&["Meter 1"], 0..1))
        .await
        .expect("enqueue");
    emu.wait_for("device announced", WAIT, |r| {
        r.telemetry_ts("Meter 1").len() == 1
    })
    .await;

    assert!(
        emu.push_rpc("Meter 1", 42, "getVoltage", json!({"phase": 1}))
            .await
    );
    let msg = tokio::time::timeout(WAIT, bridge.downlink_rx.recv())
        .await
        .expect("rpc in time")
        .expect("downlink open");
    match msg {
        Downlink::Rpc(rpc) => {
            assert_eq!(rpc.device, "Meter 1");
            assert_eq!(rpc.id, 42);
            assert_eq!(rpc.method, "getVoltage");
            assert_eq!(rpc.params, json!({"phase": 1}));
        }
        other => panic!("expected an RPC, got {other:?}"),
    }
    assert!(
        emu.push_attributes("Meter 1", json!({"tariff": "T2"}))
            .await
    );
    let msg = tokio::time::timeout(WAIT, bridge.downlink_rx.recv())
        .await
        .expect("attributes in time")
        .expect("downlink open");
    assert!(
        matches!(msg, Downlink::Attributes(ref u) if u.device == "Meter 1" && u.data["tariff"] == "T2")
    );

    // Malformed pushes are counted, not fatal.
    assert!(
        emu.push("v1/gateway/rpc", json!({"device": "Meter 1"}))
            .await
    );

    bridge
        .store
        .enqueue(vec![Record {
            device: "Meter 1".into(),
            device_type: PROFILE.into(),
            kind: RecordKind::RpcReply,
            payload: json!({"id": 42, "data": {"voltage": 230.1}}),
        }])
        .await
        .expect("enqueue reply");
    let r = emu
        .wait_for("rpc reply", WAIT, |r| !r.rpc_replies.is_empty())
        .await;
    assert_eq!(
        r.rpc_replies[0],
        json!({"device": "Meter 1", "id": 42, "data": {"voltage": 230.1}})
    );
    let s = bridge
        .wait_status("malformed counted", |s| s.downlink_malformed == 1)
        .await;
    assert_eq!(s.downlink_forwarded, 2);
    assert_eq!(
        emu.snapshot().sessions,
        1,
        "the session survived the malformed push"
    );
    bridge.stop().await;
}

#[tokio::test]
async fn stop_waits_for_outstanding_pubacks() {
    let emu = TbEmulator::start(TOKEN).await;
    let mut bridge = Bridge::start(tb_config(&emu, MqttProtocol::V5)).await;
    bridge
        .store
        .enqueue(readings(&["A"], 0..200))
        .await
        .expect("enqueue");
    bridge
        .wait_status("some acks", |s| s.acked_records > 0)
        .await;
    let store = bridge.store.clone();
    bridge.stop().await;
    // Whatever was not acked is still queued; nothing acked is lost.
    let r = emu.snapshot();
    let depth = store.stats().await.expect("stats").depth as usize;
    assert!(r.telemetry_ts("A").len() + depth >= 200);
}

#[tokio::test]
async fn repeated_evictions_on_311_are_reported_as_takeover() {
    let emu = TbEmulator::start(TOKEN).await;
    let mut bridge = Bridge::start(tb_config(&emu, MqttProtocol::V311)).await;
    bridge.wait_status("connected", |s| s.connected).await;

    // A leftover tb-gateway that reconnects at once whenever it is evicted (3.1.1: no reason
    // code, the server just closes the socket).
    let mut opts = rumqttc::MqttOptions::new("tb-gateway", "127.0.0.1", emu.port());
    opts.set_credentials(TOKEN, "");
    let (other, mut other_loop) = rumqttc::AsyncClient::new(opts, 10);
    let other_task = tokio::spawn(async move {
        loop {
            let _ = other_loop.poll().await;
        }
    });
    let s = bridge
        .wait_status("takeover reported", |s| s.session_takeovers >= 1)
        .await;
    assert!(s.connects >= SHORT_SESSIONS_FOR_TAKEOVER, "{s:?}");
    other_task.abort();
    drop(other);
    bridge
        .store
        .enqueue(readings(&["A"], 0..3))
        .await
        .expect("enqueue");
    emu.wait_for("delivery once alone", WAIT, |r| {
        r.telemetry_ts("A").len() >= 3
    })
    .await;
    bridge.stop().await;
}

/// Must match the uplink's threshold of consecutive short sessions.
const SHORT_SESSIONS_FOR_TAKEOVER: u64 = 3;

#[tokio::test]
async fn payload_invalid_drops_only_that_device_and_keeps_the_session() {
    let emu = TbEmulator::start(TOKEN).await;
    emu.set_reject_device(Some("Bad"));
    let mut bridge = Bridge::start(tb_config(&emu, MqttProtocol::V5)).await;
    bridge
        .store
        .enqueue(readings(&["Good", "Bad"], 0..20))
        .await
        .expect("enqueue");
    let r = emu
        .wait_for("good rows", WAIT, |r| r.telemetry_ts("Good").len() >= 20)
        .await;
    assert!(r.telemetry_ts("Bad").is_empty());
    let s = bridge
        .wait_status("bad rows dropped", |s| {
            s.dropped_records == 20 && s.acked_records == 20
        })
        .await;
    assert!(s.failed_acks >= 1);
    assert_eq!(bridge.depth().await, 0);
    assert_eq!(emu.snapshot().sessions, 1);
    bridge.stop().await;
}

#[tokio::test]
async fn attributes_requests_connect_and_disconnect_rows() {
    let emu = TbEmulator::start(TOKEN).await;
    let mut bridge = Bridge::start(tb_config(&emu, MqttProtocol::V5)).await;
    let row = |kind, payload| Record {
        device: "Meter 9".into(),
        device_type: "Special Profile".into(),
        kind,
        payload,
    };
    bridge
        .store
        .enqueue(vec![
            row(RecordKind::Connect, Value::Null),
            row(RecordKind::Attributes, json!({"fw": "1.0", "serial": "S1"})),
            row(RecordKind::Attributes, json!({"fw": "1.1"})),
            row(
                RecordKind::AttributeRequest,
                json!({"id": 3, "client": false, "keys": ["tariff"]}),
            ),
            row(RecordKind::Disconnect, Value::Null),
        ])
        .await
        .expect("enqueue");
    let r = emu
        .wait_for("disconnect", WAIT, |r| !r.disconnects.is_empty())
        .await;
    assert_eq!(
        r.connects,
        vec![("Meter 9".to_string(), Some("Special Profile".to_string()))],
        "an explicit Connect row is not announced twice"
    );
    assert_eq!(
        r.attributes.get("Meter 9").cloned().map(Value::Object),
        Some(json!({"fw": "1.1", "serial": "S1"}))
    );
    assert_eq!(
        r.attribute_requests,
        vec![json!({"id": 3, "device": "Meter 9", "client": false, "keys": ["tariff"]})]
    );
    assert!(r.connect_precedes_data());
    let kinds: Vec<&str> = r.events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec!["connect", "attributes", "attribute_request", "disconnect"]
    );
    bridge.wait_status("acked", |s| s.acked_records == 5).await;
    bridge.stop().await;
}

#[tokio::test]
async fn a_full_downlink_channel_drops_and_counts_without_stalling_the_session() {
    let emu = TbEmulator::start(TOKEN).await;
    let mut bridge = Bridge::start(tb_config(&emu, MqttProtocol::V5)).await;
    bridge.wait_status("connected", |s| s.connected).await;
    // Nobody reads downlink_rx (capacity 16): the uplink must keep polling and count drops.
    for id in 0..24 {
        assert!(emu.push_rpc("Meter 1", id, "ping", Value::Null).await);
    }
    let s = bridge
        .wait_status("drops counted", |s| {
            s.downlink_forwarded + s.downlink_dropped == 24
        })
        .await;
    assert_eq!(s.downlink_forwarded, 16);
    assert_eq!(s.downlink_dropped, 8);
    bridge
        .store
        .enqueue(readings(&["A"], 0..5))
        .await
        .expect("enqueue");
    emu.wait_for("data still flows", WAIT, |r| r.telemetry_ts("A").len() >= 5)
        .await;
    assert_eq!(emu.snapshot().sessions, 1);
    bridge.stop().await;
}

/// Prints how fast a backlog drains (debug build, loopback emulator). A measurement, not an
/// assertion: run with `cargo test --test uplink -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn drain_rate_measurement() {
    let emu = TbEmulator::start(TOKEN).await;
    let devices: Vec<String> = (0..100).map(|i| format!("Meter {i}")).collect();
    let names: Vec<&str> = devices.iter().map(String::as_str).collect();
    let mut bridge = Bridge::start(tb_config(&emu, MqttProtocol::V5)).await;
    for chunk in 0..10 {
        let from = chunk * 20;
        bridge
            .store
            .enqueue(readings(&names, from..from + 20))
            .await
            .expect("enqueue");
    }
    let started = std::time::Instant::now();
    bridge
        .wait_status("20000 rows acked", |s| s.acked_records >= 20_000)
        .await;
    let took = started.elapsed();
    let r = emu.snapshot();
    println!(
        "drained 20000 rows of 100 devices in {took:?} ({:.0} rows/s), {} telemetry publishes",
        20_000.0 / took.as_secs_f64(),
        r.telemetry_publishes
    );
    bridge.stop().await;
}

#[tokio::test]
async fn rpc_to_the_gateway_device_itself_is_answered() {
    let emu = TbEmulator::start(TOKEN).await;
    let mut bridge = Bridge::start(tb_config(&emu, MqttProtocol::V5)).await;
    bridge.wait_status("connected", |s| s.connected).await;
    assert!(
        emu.push(
            "v1/devices/me/rpc/request/7",
            json!({"method": "gateway_ping", "params": {}})
        )
        .await
    );
    assert!(
        emu.push(
            "v1/devices/me/rpc/request/8",
            json!({"method": "gateway_device_renamed", "params": {"Old": "New"}})
        )
        .await
    );
    let r = emu
        .wait_for("gateway rpc replies", WAIT, |r| {
            r.gateway_rpc_responses.len() == 2
        })
        .await;
    assert!(r
        .gateway_rpc_responses
        .contains(&("7".into(), json!({"code": 200, "resp": "pong"}))));
    assert!(r
        .gateway_rpc_responses
        .iter()
        .any(|(id, v)| id == "8" && v["success"] == true));
    assert_eq!(bridge.status.borrow().downlink_forwarded, 0);
    bridge.stop().await;
}

#[tokio::test]
async fn thingsboard_down_at_start_then_up_delivers_the_queue() {
    let emu = TbEmulator::start(TOKEN).await;
    emu.stop().await;
    let mut bridge = Bridge::start(tb_config(&emu, MqttProtocol::Auto)).await;
    bridge
        .store
        .enqueue(readings(&["A", "B"], 0..30))
        .await
        .expect("enqueue");
    let s = bridge
        .wait_status("a few failed attempts", |s| s.connect_attempts >= 3)
        .await;
    assert!(!s.connected);
    assert!(s.last_error.unwrap_or_default().starts_with("connecting"));
    emu.restart().await;
    let r = emu
        .wait_for("the queue", WAIT, |r| all_arrived(r, &["A", "B"], 30))
        .await;
    assert_in_order(&r, &["A", "B"], 0..30);
    assert!(r.connect_precedes_data());
    // The backlog drains packed: one publish per device (per session, should one be lost).
    assert!(
        r.telemetry_publishes <= 2 * r.sessions,
        "{} telemetry publishes in {} sessions for a 2-device backlog",
        r.telemetry_publishes,
        r.sessions
    );
    let s = bridge.wait_status("acked", |s| s.acked_records == 60).await;
    assert_eq!(
        s.protocol,
        Some(Protocol::V5),
        "refused TCP is not a reason to leave MQTT 5"
    );
    bridge.stop().await;
}

// ---- TLS to ThingsBoard (the emulator's TLS mode, certificates made here with rcgen) ----

/// The emulator's identity: a server certificate for `names` from `ca`.
fn tls_server(ca: &Ca, names: &[&str], expired: bool, client_ca: Option<&Ca>) -> TlsServer {
    let (cert, key) = ca.issue(names, false, expired);
    TlsServer {
        cert_chain_pem: cert,
        key_pem: key,
        client_ca_pem: client_ca.map(Ca::pem),
    }
}

/// Uplink config for the TLS emulator: TLS on, trusting `ca_file`; a slow auth retry so a
/// tight loop would show.
fn tls_config(emu: &TbEmulator, ca_file: &std::path::Path) -> ThingsboardConfig {
    ThingsboardConfig {
        tls: Some(true),
        ca_file: Some(ca_file.to_path_buf()),
        auth_retry: Duration::from_secs(60),
        ..emu.thingsboard_config()
    }
}

/// Starts a bridge that should fail on a certificate: returns the error text once it is in
/// the status, after checking nothing got through and nothing is retried in a loop.
async fn tls_failure(emu: &TbEmulator, cfg: ThingsboardConfig) -> String {
    let mut bridge = Bridge::start(cfg).await;
    bridge
        .store
        .enqueue(readings(&["A"], 0..3))
        .await
        .expect("enqueue");
    let s = bridge
        .wait_status("the TLS failure", |s| s.last_error.is_some())
        .await;
    assert!(!s.connected);
    // Observation window: with reconnect_min = 50 ms a tight loop would make ~20 attempts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = bridge.status.borrow().clone();
    assert_eq!(s.connect_attempts, 1, "retried only every auth_retry");
    assert_eq!(emu.snapshot().sessions, 0);
    assert_eq!(bridge.depth().await, 3, "nothing lost while refused");
    bridge.stop().await;
    s.last_error.unwrap_or_default()
}

#[tokio::test]
async fn tls_with_a_valid_chain_carries_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Test CA");
    let emu = TbEmulator::start_tls(TOKEN, &tls_server(&ca, &["127.0.0.1"], false, None)).await;
    let ca_file = write_pem(dir.path(), "ca.pem", &ca.pem());
    for protocol in [MqttProtocol::V5, MqttProtocol::V311] {
        let cfg = ThingsboardConfig {
            protocol,
            ..tls_config(&emu, &ca_file)
        };
        let mut bridge = Bridge::start(cfg).await;
        let before = emu.snapshot();
        let n = before.telemetry_ts("A").len() as i64;
        bridge
            .store
            .enqueue(readings(&["A"], n..n + 10))
            .await
            .expect("enqueue");
        let r = emu
            .wait_for("readings over TLS", WAIT, |r| {
                all_arrived(r, &["A"], (n + 10) as usize)
            })
            .await;
        assert_in_order(&r, &["A"], 0..n + 10);
        assert_eq!(r.auth_failures, 0, "the token was accepted over TLS");
        assert_eq!(r.x509_sessions, 0);
        bridge.wait_status("acked", |s| s.acked_records == 10).await;
        bridge.stop().await;
    }
}

#[tokio::test]
async fn tls_refuses_a_certificate_for_another_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Test CA");
    let emu = TbEmulator::start_tls(
        TOKEN,
        &tls_server(&ca, &["thingsboard.example"], false, None),
    )
    .await;
    let ca_file = write_pem(dir.path(), "ca.pem", &ca.pem());
    let err = tls_failure(&emu, tls_config(&emu, &ca_file)).await;
    assert!(err.contains("wrong host"), "{err}");
}

#[tokio::test]
async fn tls_refuses_an_expired_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Test CA");
    let emu = TbEmulator::start_tls(TOKEN, &tls_server(&ca, &["127.0.0.1"], true, None)).await;
    let ca_file = write_pem(dir.path(), "ca.pem", &ca.pem());
    let err = tls_failure(&emu, tls_config(&emu, &ca_file)).await;
    assert!(err.contains("expired"), "{err}");
}

#[tokio::test]
async fn tls_refuses_a_certificate_from_an_untrusted_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trusted = Ca::new("Trusted CA");
    let other = Ca::new("Other CA");
    let emu = TbEmulator::start_tls(TOKEN, &tls_server(&other, &["127.0.0.1"], false, None)).await;
    let ca_file = write_pem(dir.path(), "ca.pem", &trusted.pem());
    let err = tls_failure(&emu, tls_config(&emu, &ca_file)).await;
    assert!(err.contains("untrusted"), "{err}");
}

#[tokio::test]
async fn x509_client_certificate_is_accepted_without_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server_ca = Ca::new("Server CA");
    let device_ca = Ca::new("Device CA");
    let emu = TbEmulator::start_tls(
        TOKEN,
        &tls_server(&server_ca, &["127.0.0.1"], false, Some(&device_ca)),
    )
    .await;
    let (cert, key) = device_ca.issue(&["gateway"], true, false);
    let cfg = ThingsboardConfig {
        access_token: Secret::new(""),
        cert_file: Some(write_pem(dir.path(), "gw.pem", &cert)),
        key_file: Some(write_pem(dir.path(), "gw.key", &key)),
        ..tls_config(&emu, &write_pem(dir.path(), "ca.pem", &server_ca.pem()))
    };
    let mut bridge = Bridge::start(cfg).await;
    bridge
        .store
        .enqueue(readings(&["A"], 0..10))
        .await
        .expect("enqueue");
    let r = emu
        .wait_for("readings over X.509", WAIT, |r| all_arrived(r, &["A"], 10))
        .await;
    assert_in_order(&r, &["A"], 0..10);
    assert_eq!(r.x509_sessions, 1, "authenticated by the certificate");
    bridge.wait_status("acked", |s| s.acked_records == 10).await;
    bridge.stop().await;
}

#[tokio::test]
async fn x509_client_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server_ca = Ca::new("Server CA");
    let device_ca = Ca::new("Device CA");
    let rogue_ca = Ca::new("Rogue CA");
    let emu = TbEmulator::start_tls(
        TOKEN,
        &tls_server(&server_ca, &["127.0.0.1"], false, Some(&device_ca)),
    )
    .await;
    let (cert, key) = rogue_ca.issue(&["gateway"], true, false);
    let cfg = ThingsboardConfig {
        access_token: Secret::new(""),
        cert_file: Some(write_pem(dir.path(), "gw.pem", &cert)),
        key_file: Some(write_pem(dir.path(), "gw.key", &key)),
        ..tls_config(&emu, &write_pem(dir.path(), "ca.pem", &server_ca.pem()))
    };
    let err = tls_failure(&emu, cfg).await;
    assert!(err.contains("refused our client certificate"), "{err}");
    assert!(emu.snapshot().tls_handshake_failures >= 1);
}

#[tokio::test]
async fn reload_reads_new_certificates_and_retries_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old_ca = Ca::new("Old CA");
    let new_ca = Ca::new("New CA");
    // ThingsBoard moved to a certificate from a new CA; the bridge still trusts the old one.
    let emu = TbEmulator::start_tls(TOKEN, &tls_server(&new_ca, &["127.0.0.1"], false, None)).await;
    let ca_file = write_pem(dir.path(), "ca.pem", &old_ca.pem());
    let cfg = tls_config(&emu, &ca_file);
    let settings = TlsSettings::from_config(&cfg);
    let mut bridge = Bridge::start(cfg).await;
    bridge
        .store
        .enqueue(readings(&["A"], 0..5))
        .await
        .expect("enqueue");
    let s = bridge
        .wait_status("the untrusted certificate", |s| s.last_error.is_some())
        .await;
    assert!(s.last_error.unwrap_or_default().contains("untrusted"));
    // The operator installs the new CA and sends SIGHUP; auth_retry (60 s) is not waited out.
    write_pem(dir.path(), "ca.pem", &new_ca.pem());
    bridge.tls.reload(settings);
    let r = emu
        .wait_for("readings after the reload", WAIT, |r| {
            all_arrived(r, &["A"], 5)
        })
        .await;
    assert_in_order(&r, &["A"], 0..5);
    bridge.wait_status("acked", |s| s.acked_records == 5).await;
    bridge.stop().await;
}

#[tokio::test]
async fn unreadable_certificates_block_connecting_until_a_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Test CA");
    let emu = TbEmulator::start_tls(TOKEN, &tls_server(&ca, &["127.0.0.1"], false, None)).await;
    // The CA file vanished after check-config (or was never installed).
    let ca_file = dir.path().join("ca.pem");
    let cfg = tls_config(&emu, &ca_file);
    let settings = TlsSettings::from_config(&cfg);
    let mut bridge = Bridge::start(cfg).await;
    let s = bridge
        .wait_status("the TLS configuration error", |s| s.last_error.is_some())
        .await;
    assert!(
        s.last_error
            .unwrap_or_default()
            .contains("TLS configuration"),
        "reported as such"
    );
    // Observation window: never a plain-TCP fallback while the TLS material is missing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        bridge.status.borrow().connect_attempts,
        0,
        "no connection without TLS"
    );
    assert_eq!(emu.snapshot().connect_attempts, 0);

    write_pem(dir.path(), "ca.pem", &ca.pem());
    bridge.tls.reload(settings);
    bridge
        .store
        .enqueue(readings(&["A"], 0..3))
        .await
        .expect("enqueue");
    emu.wait_for("readings after the reload", WAIT, |r| {
        all_arrived(r, &["A"], 3)
    })
    .await;
    bridge.wait_status("acked", |s| s.acked_records == 3).await;
    bridge.stop().await;
}
