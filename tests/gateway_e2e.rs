//! Issue #10 end to end (`app::start`): the gateway as ThingsBoard operators use it, against the
//! ThingsBoard emulator with a real broker, real SQLite files and simulated TCP meters.
//! Loopback and ephemeral ports only; every wait is event-driven and bounded.

mod common;

use std::path::Path;
use std::time::Duration;

use common::tb_emulator::{Recorded, TbEmulator};
use dlms_bridge::app::{self, Running};
use dlms_bridge::config::Config;
use rumqttc::{AsyncClient, QoS};
use serde_json::{json, Value};

const TOKEN: &str = "gateway-e2e-token";
/// Upper bound for any wait; the happy path takes milliseconds.
const WAIT: Duration = Duration::from_secs(30);
const METER_TYPE: &str = "DLMS Energy Meter";

fn config(dir: &Path, tb_port: u16, extra: &str) -> Config {
    common::bridge_config::test_config(dir, tb_port, TOKEN, extra)
}

async fn start(dir: &Path, emu: &TbEmulator, extra: &str) -> Running {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    app::start(config(dir, emu.port(), extra))
        .await
        .expect("bridge starts")
}

/// A local MQTT 3.1.1 client of the bridge's broker; incoming publishes go to the returned
/// channel.
async fn local_client(
    running: &Running,
    id: &str,
    user: Option<&str>,
) -> (
    AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<(String, Value)>,
) {
    let addr = running.broker_addr.expect("broker enabled");
    common::local_client::connect(addr, id, user, WAIT, |p| {
        let v = serde_json::from_slice(&p.payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&p.payload).into()));
        (p.topic, v)
    })
    .await
}

async fn publish(c: &AsyncClient, topic: &str, payload: impl Into<Vec<u8>>) {
    c.publish(topic, QoS::AtLeastOnce, false, payload.into())
        .await
        .expect("publish queued");
}

fn rpc_reply(r: &Recorded, id: i64) -> Option<Value> {
    r.rpc_replies.iter().find(|v| v["id"] == json!(id)).cloned()
}

/// Requirement 1: a meter's type survives an RPC reply and is what every re-announcement after
/// a reconnect carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_types_are_sticky_across_rpc_replies_and_reconnects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let running = start(
        dir.path(),
        &emu,
        "[simulator]\nmeters = 1\ninterval = \"200ms\"\n",
    )
    .await;
    let meter = "sim-meter-0001";
    emu.wait_for("meter data", WAIT, |r| r.telemetry.contains_key(meter))
        .await;
    assert!(
        emu.push_rpc(meter, 7, "get", json!({"obis": "1.0.32.7.0.255"}))
            .await
    );
    emu.wait_for("rpc reply", WAIT, |r| rpc_reply(r, 7).is_some())
        .await;
    let before = emu.snapshot().connects.len();
    emu.stop().await;
    emu.restart().await;
    let r = emu
        .wait_for("re-announcement", WAIT, |r| {
            r.sessions >= 2 && r.connects.len() > before
        })
        .await;
    for (device, ty) in &r.connects {
        assert_eq!(
            ty.as_deref(),
            Some(METER_TYPE),
            "{device} announced with {ty:?}: {:?}",
            r.connects
        );
    }
    assert!(running.shutdown().await.expect("shutdown"));
}

/// Requirement 4: one 206 KB local message with 9,000 keys reaches ThingsBoard key-complete in
/// several publishes under the packet limit, all under its timestamp; a value larger than a
/// packet alone is the only thing refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_delivered_key_complete_in_several_publishes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let running = start(dir.path(), &emu, "").await;
    let (c, _rx) = local_client(&running, "big-publisher", None).await;
    let mut values = serde_json::Map::new();
    for i in 0..9_000 {
        values.insert(format!("register_{i:05}"), json!(i * 1_000 + 7));
    }
    let ts = 1_700_000_000_000i64;
    let body = json!({"deviceName": "Big", "ts": ts, "values": values}).to_string();
    assert!(body.len() > 200_000, "{} bytes", body.len());
    publish(&c, "v1/devices/me/telemetry", body).await;
    let mut with_huge = serde_json::Map::new();
    with_huge.insert("small".into(), json!(1));
    with_huge.insert("huge".into(), json!("x".repeat(70_000)));
    let body = json!({"deviceName": "Huge", "ts": ts, "values": with_huge}).to_string();
    publish(&c, "v1/devices/me/telemetry", body).await;
    let r = emu
        .wait_for("all 9000 keys and the small value", WAIT, |r| {
            let big: usize = r
                .telemetry
                .get("Big")
                .into_iter()
                .flatten()
                .filter_map(|e| e["values"].as_object().map(|m| m.len()))
                .sum();
            big >= 9_000 && r.telemetry.contains_key("Huge")
        })
        .await;
    let mut got = serde_json::Map::new();
    for e in &r.telemetry["Big"] {
        assert_eq!(e["ts"], json!(ts), "every part keeps the timestamp");
        got.extend(e["values"].as_object().expect("values").clone());
    }
    assert!(
        got == values,
        "key-complete: {} of {} keys",
        got.len(),
        values.len()
    );
    assert!(r.telemetry["Big"].len() >= 4, "split into several entries");
    assert_eq!(r.oversize_packets, 0);
    assert_eq!(r.invalid_payloads, 0);
    let huge: Vec<&Value> = r.telemetry["Huge"].iter().collect();
    assert_eq!(huge.len(), 1);
    assert_eq!(huge[0]["values"], json!({"small": 1}));
    assert!(running.shutdown().await.expect("shutdown"));
}

fn values_of(r: &Recorded, device: &str, key: &str) -> Vec<i64> {
    r.telemetry
        .get(device)
        .into_iter()
        .flatten()
        .filter_map(|e| e["values"][key].as_i64())
        .collect()
}

/// Requirement 5: a rename made in ThingsBoard is applied and survives a restart; rows queued
/// for the old name follow it; the rule that names the device keeps producing the old name and
/// is translated; a deleted device is forgotten and re-created only by new data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_and_delete_apply_persist_across_restart_and_move_queued_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let running = start(dir.path(), &emu, "").await;
    let (c, _rx) = local_client(&running, "pump-client", None).await;
    let send = |k: i64| json!({"deviceName": "Pump", "k": k}).to_string();
    publish(&c, "v1/devices/me/telemetry", send(0)).await;
    emu.wait_for("Pump created", WAIT, |r| values_of(r, "Pump", "k") == [0])
        .await;

    // ThingsBoard keeps these without acknowledging them: they stay queued under "Pump".
    emu.set_withhold_pubacks(true);
    for k in 1..=3 {
        publish(&c, "v1/devices/me/telemetry", send(k)).await;
    }
    emu.wait_for("unacked rows seen", WAIT, |r| {
        values_of(r, "Pump", "k").len() >= 4
    })
    .await;
    // The uplink may send a record before its group commit; wait for that commit.
    let mut committed = running.store.subscribe();
    tokio::time::timeout(WAIT, async {
        while running.store.stats().await.expect("stats").depth < 3 {
            committed.changed().await.expect("store alive");
        }
    })
    .await
    .expect("the unacked rows are committed");
    assert!(emu.push_device_renamed(1, "Pump", "Pump 7").await);
    emu.wait_for("rename answered", WAIT, |r| {
        r.gateway_rpc_response(1).is_some()
    })
    .await;
    let _ = running.shutdown().await.expect("shutdown");
    drop(c);

    // Restart: the rename was persisted; the queued rows go out under the new name.
    emu.set_withhold_pubacks(false);
    let sessions_before = emu.snapshot().sessions;
    let running = start(dir.path(), &emu, "").await;
    let (c, _rx) = local_client(&running, "pump-client", None).await;
    publish(&c, "v1/devices/me/telemetry", send(4)).await;
    let r = emu
        .wait_for("queued and new rows under the new name", WAIT, |r| {
            let v = values_of(r, "Pump 7", "k");
            (1..=4).all(|k| v.contains(&k))
        })
        .await;
    assert!(
        r.events
            .iter()
            .all(|e| e.session <= sessions_before || e.device != "Pump"),
        "nothing under the old name after the restart: {:?}",
        r.events
    );
    assert!(r
        .connects
        .iter()
        .any(|(d, t)| d == "Pump 7" && t.as_deref() == Some(METER_TYPE)));

    // Delete: forgotten (not re-announced on reconnect) until the source sends new data.
    assert!(emu.push_device_deleted(2, "Pump 7").await);
    emu.wait_for("delete answered", WAIT, |r| {
        r.gateway_rpc_response(2).is_some()
    })
    .await;
    let connects_before = emu.snapshot().connects.len();
    emu.stop().await;
    emu.restart().await;
    let sessions = emu.snapshot().sessions;
    emu.wait_for("reconnected", WAIT, |r| r.sessions > sessions)
        .await;
    publish(&c, "v1/devices/me/telemetry", send(5)).await;
    let r = emu
        .wait_for("re-created by new data", WAIT, |r| {
            values_of(r, "Pump", "k").contains(&5)
        })
        .await;
    let later: Vec<&String> = r.connects[connects_before..]
        .iter()
        .map(|(d, _)| d)
        .collect();
    assert!(!later.iter().any(|d| *d == "Pump 7"), "{later:?}");
    assert!(later.iter().any(|d| *d == "Pump"), "{later:?}");
    assert!(!values_of(&r, "Pump 7", "k").contains(&5));
    assert!(running.shutdown().await.expect("shutdown"));
}

/// Requirement 6: gateway RPCs and the periodic statistics telemetry, with counts equal to what
/// the test sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_rpcs_and_statistics_telemetry_count_what_was_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let running = start(
        dir.path(),
        &emu,
        "[gateway]\nstats_interval = \"1s\"\n[simulator]\nmeters = 1\ninterval = \"200ms\"\n",
    )
    .await;
    let (c, _rx) = local_client(&running, "stats-client", None).await;
    for k in 0..7 {
        publish(
            &c,
            "v1/devices/me/telemetry",
            json!({"deviceName": "Counted", "k": k}).to_string(),
        )
        .await;
    }
    publish(&c, "v1/devices/me/telemetry", "not json").await;
    publish(&c, "v1/devices/me/telemetry", "[1]").await;
    emu.wait_for("7 readings and the meter", WAIT, |r| {
        values_of(r, "Counted", "k").len() == 7 && r.telemetry.contains_key("sim-meter-0001")
    })
    .await;
    assert!(emu.push_gateway_rpc(11, "gateway_ping", json!({})).await);
    assert!(emu.push_gateway_rpc(12, "gateway_version", json!({})).await);
    assert!(emu.push_gateway_rpc(13, "gateway_devices", json!({})).await);
    assert!(emu.push_gateway_rpc(14, "gateway_stats", json!({})).await);
    assert!(emu.push_gateway_rpc(15, "gateway_reboot", json!({})).await);
    let r = emu
        .wait_for("five replies", WAIT, |r| {
            (11..=15).all(|id| r.gateway_rpc_response(id).is_some())
        })
        .await;
    assert_eq!(
        r.gateway_rpc_response(11),
        Some(&json!({"code": 200, "resp": "pong"}))
    );
    let version = r.gateway_rpc_response(12).expect("version");
    assert_eq!(version["resp"]["version"], json!(env!("CARGO_PKG_VERSION")));
    let devices = &r.gateway_rpc_response(13).expect("devices")["resp"];
    assert_eq!(
        devices["Counted"],
        json!({"type": METER_TYPE, "source": "local", "status": "connected"})
    );
    assert_eq!(devices["sim-meter-0001"]["source"], json!("meter"));
    let stats = &r.gateway_rpc_response(14).expect("stats")["resp"];
    assert_eq!(stats["messages_in_local"], json!(9), "{stats}");
    assert_eq!(stats["malformed_dropped"], json!(2), "{stats}");
    assert!(stats["messages_in_meters"].as_u64() > Some(0), "{stats}");
    assert_eq!(stats["meters_ok"], json!(1), "{stats}");
    assert_eq!(stats["meters_failing"], json!(0), "{stats}");
    assert_eq!(r.gateway_rpc_response(15).expect("404")["code"], json!(404));

    // The periodic telemetry carries the same counters and the tb-gateway dashboard keys.
    let r = emu
        .wait_for("two statistics messages", WAIT, |r| {
            r.gateway_telemetry.len() >= 2
        })
        .await;
    let last = r.gateway_telemetry.last().expect("stats");
    assert_eq!(last["messages_in_local"], json!(9), "{last}");
    for key in [
        "queue_depth",
        "queue_oldest_age_s",
        "records_sent",
        "records_acknowledged",
        "records_dropped",
        "uptime_s",
        "rss_bytes",
        "meters_ok",
        "meters_failing",
    ] {
        assert!(last.get(key).is_some(), "{key} in {last}");
    }
    assert!(last["machineStats"]["msgsSentToPlatform"].as_u64() > Some(0));
    assert_eq!(
        last["connectorsStats"]["local"]["connectorMsgsReceived"],
        json!(9)
    );
    assert!(running.shutdown().await.expect("shutdown"));
}

/// A simulated meter on loopback, outside the bridge, so a `[[meters]]` entry can name it.
async fn sim_meter() -> (std::net::SocketAddr, tokio_util::sync::CancellationToken) {
    use dlms_bridge::sim::{spawn_meters, SimOptions};
    let cancel = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let addrs = spawn_meters(
        std::net::Ipv4Addr::LOCALHOST.into(),
        0,
        1,
        &SimOptions::default(),
        &tracker,
        cancel.clone(),
    )
    .await
    .expect("simulated meter");
    (addrs[0], cancel)
}

/// Requirement 7: `get` on a register is scaled with its unit; `set`/`action` only where
/// `rpc_write` allows, else refused with the reason; a meter that does not answer still gets the
/// RPC answered within `rpc_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meter_rpcs_are_scaled_guarded_and_answered_in_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let (addr, sim_cancel) = sim_meter().await;
    // A "meter" that accepts TCP and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = silent.accept().await {
            held.push(sock);
        }
    });
    let extra = format!(
        r#"
[gateway]
rpc_timeout = "1s"
[[meters]]
name = "Guarded"
host = "127.0.0.1"
port = {}
interval = "200ms"
rpc_write = ["0.0.96.3.10.255"]
[[meters]]
name = "Silent"
host = "127.0.0.1"
port = {}
timeout = "30s"
"#,
        addr.port(),
        silent_addr.port()
    );
    let running = start(dir.path(), &emu, &extra).await;
    emu.wait_for("meter online", WAIT, |r| {
        r.telemetry.contains_key("Guarded")
    })
    .await;
    let rpc = |id: i64, method: &'static str, params: Value| {
        let emu = &emu;
        async move { assert!(emu.push_rpc("Guarded", id, method, params).await) }
    };
    rpc(1, "get", json!({"obis": "1.0.32.7.0.255"})).await;
    rpc(
        2,
        "set",
        json!({"obis": "0.0.1.0.0.255", "class_id": 8, "value": 1}),
    )
    .await;
    rpc(
        3,
        "action",
        json!({"obis": "0.0.1.0.0.255", "class_id": 8, "method": 1, "value": 0, "type": "i8"}),
    )
    .await;
    rpc(
        4,
        "set",
        json!({"obis": "0.0.96.3.10.255", "class_id": 70, "attribute": 3, "value": 1, "type": "enum"}),
    )
    .await;
    assert!(
        emu.push_rpc("Silent", 5, "get", json!({"obis": "1.0.32.7.0.255"}))
            .await
    );
    let r = emu
        .wait_for("five replies", WAIT, |r| {
            (1..=5).all(|id| rpc_reply(r, id).is_some())
        })
        .await;
    let get = rpc_reply(&r, 1).expect("get")["data"].clone();
    assert_eq!(get["success"], json!(true), "{get}");
    assert_eq!(get["unit"], json!("V"), "{get}");
    let (value, raw) = (
        get["value"].as_f64().expect("value"),
        get["raw"].as_f64().expect("raw"),
    );
    assert!(value < raw, "scaled below the raw register value: {get}");
    for id in [2, 3] {
        let d = rpc_reply(&r, id).expect("reply")["data"].clone();
        assert_eq!(d["success"], json!(false), "{d}");
        assert!(
            d["error"].as_str().unwrap_or("").contains("not allowed"),
            "{d}"
        );
    }
    // The allowed OBIS code passes the guard (the meter's own answer follows).
    let allowed = rpc_reply(&r, 4).expect("reply")["data"].clone();
    assert!(
        !allowed["error"]
            .as_str()
            .unwrap_or("")
            .contains("rpc_write"),
        "{allowed}"
    );
    let late = rpc_reply(&r, 5).expect("reply")["data"].clone();
    assert_eq!(late["success"], json!(false), "{late}");
    assert!(
        late["error"].as_str().unwrap_or("").contains("rpc_timeout"),
        "{late}"
    );
    assert!(running.shutdown().await.expect("shutdown"));
    sim_cancel.cancel();
}

/// Requirement 9: `getSessionLimits` is asked after connect and the bridge stays under the
/// limits it answers; ThingsBoard (enforcing like the real one: PUBACK 0x97 and close) never
/// closes the session and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_limits_are_learned_and_the_session_is_never_closed_for_rate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    emu.set_session_limits(Some(json!({
        "maxPayloadSize": 65536,
        "maxInflightMessages": 100,
        "rateLimits": {"messages": null, "telemetryMessages": null, "telemetryDataPoints": null},
        "gatewayRateLimits": {"messages": "10:1", "telemetryMessages": null, "telemetryDataPoints": "200:1"},
    })));
    emu.set_rate_limit(Some((20, Duration::from_secs(1))));
    let running = start(dir.path(), &emu, "").await;
    let (c, _rx) = local_client(&running, "burst", None).await;
    let devices: Vec<String> = (0..10).map(|i| format!("Burst {i}")).collect();
    for (i, d) in devices.iter().enumerate() {
        publish(
            &c,
            "v1/devices/me/telemetry",
            json!({"deviceName": d, "k": i}).to_string(),
        )
        .await;
    }
    let r = emu
        .wait_for("every device's data", WAIT, |r| {
            devices.iter().all(|d| values_of(r, d, "k").len() == 1)
        })
        .await;
    assert_eq!(r.rate_limit_closes, 0, "never closed for rate");
    assert_eq!(r.sessions, 1);
    assert!(r
        .client_rpc_requests
        .iter()
        .any(|(_, v)| v["method"] == json!("getSessionLimits")));
    let st = running.uplink_status.borrow().clone();
    assert!(st.session_limits_known, "{st:?}");
    assert!(
        st.rate_limited > 0,
        "the limiter held publishes back: {st:?}"
    );
    assert!(running.shutdown().await.expect("shutdown"));
}

/// Requirement 10: two device-API clients subscribed to the same `v1/devices/me/...` topics; an
/// RPC for device A reaches client A's session only and A's answer reaches ThingsBoard; a shared
/// attribute update for device B reaches client B only (per-session delivery,
/// `BrokerHandle::publish_to`). Nothing is broadcast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_api_downlink_is_delivered_to_its_own_client_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let running = start(dir.path(), &emu, "").await;
    let (a, mut a_rx) = local_client(&running, "client-a", Some("Pump A")).await;
    let (b, mut b_rx) = local_client(&running, "client-b", Some("Pump B")).await;
    for c in [&a, &b] {
        for f in ["v1/devices/me/rpc/request/+", "v1/devices/me/attributes"] {
            c.subscribe(f, QoS::AtLeastOnce).await.expect("subscribe");
        }
        publish(c, "v1/devices/me/telemetry", json!({"t": 1}).to_string()).await;
    }
    emu.wait_for("both devices", WAIT, |r| {
        r.telemetry.contains_key("Pump A") && r.telemetry.contains_key("Pump B")
    })
    .await;
    assert!(
        emu.push_rpc("Pump A", 9, "setRelay", json!({"on": true}))
            .await
    );
    let (topic, req) = tokio::time::timeout(WAIT, a_rx.recv())
        .await
        .expect("client A gets its RPC in time")
        .expect("client A connected");
    let id = topic
        .strip_prefix("v1/devices/me/rpc/request/")
        .unwrap_or_else(|| panic!("an RPC request topic: {topic}"))
        .to_owned();
    assert_eq!(req["method"], json!("setRelay"), "{req}");
    assert_eq!(req["params"], json!({"on": true}), "{req}");
    publish(
        &a,
        &format!("v1/devices/me/rpc/response/{id}"),
        json!({"relay": "on"}).to_string(),
    )
    .await;
    let r = emu
        .wait_for("the RPC reply", WAIT, |r| rpc_reply(r, 9).is_some())
        .await;
    let reply = rpc_reply(&r, 9).expect("reply");
    assert_eq!(reply["device"], json!("Pump A"));
    assert_eq!(reply["data"], json!({"relay": "on"}), "{reply}");

    assert!(emu.push_attributes("Pump B", json!({"tariff": "T2"})).await);
    let (topic, attrs) = tokio::time::timeout(WAIT, b_rx.recv())
        .await
        .expect("client B gets its attribute update in time")
        .expect("client B connected");
    assert_eq!(topic, "v1/devices/me/attributes");
    assert_eq!(attrs, json!({"tariff": "T2"}));

    // Later data from both clients has gone through; by then any stray delivery would have
    // arrived (one session each, in order).
    publish(&a, "v1/devices/me/telemetry", json!({"t": 2}).to_string()).await;
    publish(&b, "v1/devices/me/telemetry", json!({"t": 2}).to_string()).await;
    emu.wait_for("later data", WAIT, |r| {
        values_of(r, "Pump A", "t").contains(&2) && values_of(r, "Pump B", "t").contains(&2)
    })
    .await;
    assert!(a_rx.try_recv().is_err(), "client A got only its own RPC");
    assert!(b_rx.try_recv().is_err(), "client B got only its own update");
    assert_eq!(emu.snapshot().rpc_replies.len(), 1);
    assert!(running.shutdown().await.expect("shutdown"));
}

fn polls(r: &Recorded, device: &str) -> usize {
    r.telemetry
        .get(device)
        .into_iter()
        .flatten()
        .filter(|e| e["values"]["poll_ok"] == json!(true))
        .count()
}

/// Requirement 8 (and `poll_now` of 7): shared attributes are requested after every connect,
/// and `poll_interval` is applied live, both from the answer and from an update. The meters
/// are configured to poll once an hour, so any stream of readings comes from `poll_interval`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_interval_shared_attribute_is_synced_on_connect_and_applied_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let (addr, sim_cancel) = sim_meter().await;
    emu.set_shared_attribute("Synced", "poll_interval", json!(0.2));
    let extra = ["Synced", "Updated", "Lazy"]
        .iter()
        .map(|n| {
            format!(
                "[[meters]]\nname = \"{n}\"\nhost = \"127.0.0.1\"\nport = {}\ninterval = \"1h\"\n",
                addr.port()
            )
        })
        .collect::<String>();
    let running = start(dir.path(), &emu, &extra).await;
    // Synced: one poll on demand announces it; its poll_interval comes with the answer to the
    // request sent right after the announcement.
    emu.wait_for("gateway connected", WAIT, |r| r.sessions >= 1)
        .await;
    assert!(emu.push_rpc("Synced", 1, "poll_now", json!({})).await);
    emu.wait_for("Synced polls every 200 ms", WAIT, |r| {
        polls(r, "Synced") >= 3
    })
    .await;
    // Updated: a live shared attribute update.
    assert!(
        emu.push_attributes("Updated", json!({"poll_interval": "0.2"}))
            .await
    );
    emu.wait_for("Updated polls every 200 ms", WAIT, |r| {
        polls(r, "Updated") >= 3
    })
    .await;
    // Lazy: poll_now polls at once and answers with the readings.
    assert!(emu.push_rpc("Lazy", 3, "poll_now", json!({})).await);
    let r = emu
        .wait_for("poll_now reply", WAIT, |r| rpc_reply(r, 3).is_some())
        .await;
    let reply = rpc_reply(&r, 3).expect("reply")["data"].clone();
    assert_eq!(reply["success"], json!(true), "{reply}");
    assert!(reply["values"]["voltage_l1"].is_number(), "{reply}");
    emu.wait_for("the readings as telemetry too", WAIT, |r| {
        polls(r, "Lazy") >= 1
    })
    .await;
    // After a reconnect the shared attributes are requested again.
    let asked = |r: &Recorded| {
        r.attribute_requests
            .iter()
            .filter(|q| q["device"] == json!("Synced"))
            .count()
    };
    let before = asked(&emu.snapshot());
    assert!(before >= 1);
    assert!(
        emu.snapshot().connect_precedes_data(),
        "announced before anything else"
    );
    emu.stop().await;
    emu.restart().await;
    emu.wait_for("requested again", WAIT, |r| asked(r) > before)
        .await;
    assert!(running.shutdown().await.expect("shutdown"));
    sim_cancel.cancel();
}

/// Requirement 7 (connectivity): a meter failing `disconnect_after` polls in a row is
/// `disconnect`ed with its health telemetry saying why, and `connect`ed again once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_that_stops_answering_is_disconnected_then_connected_again() {
    use dlms_bridge::sim::{spawn_meters, SimOptions};
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    // A port with nothing listening yet.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let extra = format!(
        "[[meters]]\nname = \"Flaky\"\nhost = \"127.0.0.1\"\nport = {port}\ninterval = \"100ms\"\ntimeout = \"1s\"\ndisconnect_after = 2\n"
    );
    let running = start(dir.path(), &emu, &extra).await;
    let r = emu
        .wait_for("disconnect", WAIT, |r| {
            r.disconnects.iter().any(|d| d == "Flaky")
        })
        .await;
    let entries = &r.telemetry["Flaky"];
    let last = entries.last().expect("health")["values"].clone();
    assert_eq!(last["poll_ok"], json!(false), "{last}");
    assert_eq!(last["consecutive_failures"], json!(2), "{last}");
    assert!(last["disconnect_reason"].as_str().is_some(), "{last}");
    assert!(last["last_error"].as_str().is_some(), "{last}");
    // The meter comes up on that port: connected again with readings.
    let cancel = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    spawn_meters(
        std::net::Ipv4Addr::LOCALHOST.into(),
        port,
        1,
        &SimOptions::default(),
        &tracker,
        cancel.clone(),
    )
    .await
    .expect("meter on the port");
    let connects_before = r.connects.iter().filter(|(d, _)| d == "Flaky").count();
    emu.wait_for("connected again with readings", WAIT, |r| {
        r.connects.iter().filter(|(d, _)| d == "Flaky").count() > connects_before
            && polls(r, "Flaky") >= 1
    })
    .await;
    assert!(running.shutdown().await.expect("shutdown"));
    cancel.cancel();
}
