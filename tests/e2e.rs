//! End to end through the whole bridge (`app::start`): real embedded broker on an ephemeral
//! loopback port, real SQLite queue in a temp dir, built-in simulated meters over TCP, and the
//! ThingsBoard emulator (token check, one session per token, gateway payload rules).

mod common;

use std::path::Path;
use std::time::Duration;

use common::tb_emulator::TbEmulator;
use dlms_bridge::app::{self, Running};
use dlms_bridge::config::Config;
use rumqttc::{AsyncClient, QoS};
use serde_json::{json, Value};

const TOKEN: &str = "e2e-gateway-token";
/// Upper bound for anything to arrive; every wait is event-driven and ends as soon as it holds.
const WAIT: Duration = Duration::from_secs(30);

fn config(dir: &Path, tb_port: u16, extra: &str) -> Config {
    common::bridge_config::test_config(dir, tb_port, TOKEN, extra)
}

async fn start(dir: &Path, emu: &TbEmulator, extra: &str) -> Running {
    app::start(config(dir, emu.port(), extra))
        .await
        .expect("bridge starts")
}

/// A local MQTT 3.1.1 client connected to the bridge's broker; its event loop runs in a task.
async fn local_client(running: &Running, id: &str, user: Option<&str>) -> AsyncClient {
    let addr = running.broker_addr.expect("broker enabled");
    common::local_client::connect(addr, id, user, WAIT, drop)
        .await
        .0
}

async fn publish(c: &AsyncClient, topic: &str, payload: Value) {
    c.publish(topic, QoS::AtLeastOnce, false, payload.to_string())
        .await
        .expect("publish queued");
}

fn values(rec: &common::tb_emulator::Recorded, device: &str) -> Vec<Value> {
    rec.telemetry
        .get(device)
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("values").cloned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_local_publisher_shapes_reach_thingsboard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let running = start(dir.path(), &emu, "").await;

    // 1. The original system's shape: deviceName in the JSON, no mapping written.
    let orig = local_client(&running, "poller", None).await;
    publish(
        &orig,
        "v1/devices/me/telemetry",
        json!({"deviceName": "Meter 1", "voltage_l1": 230.1, "active_energy": 12345.5}),
    )
    .await;
    // 2. The ThingsBoard device API: the device is named by the MQTT username.
    let dev = local_client(&running, "cid-pump", Some("Pump 7")).await;
    publish(
        &dev,
        "v1/devices/me/telemetry",
        json!({"ts": 1_700_000_000_000i64, "values": {"temp": 21.5}}),
    )
    .await;
    publish(
        &dev,
        "v1/devices/me/attributes",
        json!({"firmware": "1.2.3"}),
    )
    .await;
    // ... or by its client id when it has no username.
    let anon = local_client(&running, "boiler-3", None).await;
    publish(&anon, "v1/devices/me/telemetry", json!({"pressure": 1.8})).await;
    // 3. The gateway API spoken locally: forwarded through our single uplink.
    let gw = local_client(&running, "legacy-gw", None).await;
    publish(
        &gw,
        "v1/gateway/connect",
        json!({"device": "Valve 2", "type": "Valve"}),
    )
    .await;
    publish(
        &gw,
        "v1/gateway/telemetry",
        json!({"Valve 2": [{"ts": 1_700_000_000_001i64, "values": {"open": true}}]}),
    )
    .await;
    publish(
        &gw,
        "v1/gateway/attributes",
        json!({"Valve 2": {"model": "V-100"}}),
    )
    .await;

    let rec = emu
        .wait_for("all local shapes", WAIT, |r| {
            ["Meter 1", "Pump 7", "boiler-3", "Valve 2"]
                .iter()
                .all(|d| r.telemetry.contains_key(*d))
                && r.attributes.contains_key("Pump 7")
                && r.attributes.contains_key("Valve 2")
        })
        .await;
    assert_eq!(
        values(&rec, "Meter 1"),
        vec![json!({"voltage_l1": 230.1, "active_energy": 12345.5})]
    );
    assert_eq!(
        rec.telemetry["Pump 7"],
        vec![json!({"ts": 1_700_000_000_000i64, "values": {"temp": 21.5}})]
    );
    assert_eq!(values(&rec, "boiler-3"), vec![json!({"pressure": 1.8})]);
    assert_eq!(rec.attributes["Pump 7"]["firmware"], json!("1.2.3"));
    assert_eq!(rec.attributes["Valve 2"]["model"], json!("V-100"));
    let ty = |d: &str| {
        rec.connects
            .iter()
            .find(|(n, _)| n == d)
            .and_then(|(_, t)| t.clone())
    };
    assert_eq!(ty("Meter 1").as_deref(), Some("DLMS Energy Meter"));
    assert_eq!(ty("Valve 2").as_deref(), Some("Valve"));
    assert!(
        rec.connect_precedes_data(),
        "connect must precede each device's data"
    );
    assert_eq!(
        rec.multi_device_publishes, 0,
        "one device per gateway publish"
    );
    assert_eq!(rec.invalid_payloads, 0);
    assert_eq!(rec.sessions, 1, "exactly one uplink session");
    assert!(running.shutdown().await.expect("shutdown"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_meter_delivers_the_five_scaled_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let running = start(
        dir.path(),
        &emu,
        "[simulator]\nmeters = 2\ninterval = \"100ms\"\n",
    )
    .await;
    let rec = emu
        .wait_for("two readings from each simulated meter", WAIT, |r| {
            ["sim-meter-0001", "sim-meter-0002"]
                .iter()
                .all(|d| r.telemetry_ts(d).len() >= 2)
        })
        .await;
    for dev in ["sim-meter-0001", "sim-meter-0002"] {
        let v = &values(&rec, dev)[0];
        let num = |k: &str| {
            v[k].as_f64()
                .unwrap_or_else(|| panic!("{dev}: {k} missing in {v}"))
        };
        assert!((200.0..260.0).contains(&num("voltage_l1")), "{v}");
        assert!((0.0..100.0).contains(&num("current_l1")), "{v}");
        assert!((49.0..51.0).contains(&num("frequency")), "{v}");
        assert!(num("active_power") >= 0.0, "{v}");
        assert!(num("active_energy") > 0.0, "{v}");
        assert_eq!(v["poll_ok"], json!(true));
        let ty = rec
            .connects
            .iter()
            .find(|(n, _)| n == dev)
            .and_then(|(_, t)| t.clone());
        assert_eq!(ty.as_deref(), Some("DLMS Energy Meter"));
    }
    assert!(rec.connect_precedes_data());
    assert!(running.shutdown().await.expect("shutdown"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_local_messages_are_dropped_and_others_flow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let running = start(dir.path(), &emu, "").await;
    let bad = local_client(&running, "broken", None).await;
    let good = local_client(&running, "fine", None).await;
    for payload in [
        "{not json",
        "[1,2,3]",
        r#"{"deviceName": ""}"#,
        r#"{"deviceName": "${serial}", "v": 1}"#,
    ] {
        bad.publish("v1/devices/me/telemetry", QoS::AtLeastOnce, false, payload)
            .await
            .expect("queued");
    }
    bad.publish(
        "v1/gateway/telemetry",
        QoS::AtLeastOnce,
        false,
        r#"[{"x":1}]"#,
    )
    .await
    .expect("queued");
    publish(
        &good,
        "v1/devices/me/telemetry",
        json!({"deviceName": "Good", "v": 1}),
    )
    .await;
    let rec = emu
        .wait_for("the good message", WAIT, |r| {
            r.telemetry.contains_key("Good")
        })
        .await;
    assert_eq!(
        rec.invalid_payloads, 0,
        "nothing malformed reached ThingsBoard"
    );
    assert!(
        rec.connects.iter().all(|(d, _)| d == "Good"),
        "no device created from bad input: {:?}",
        rec.connects
    );
    assert!(running.shutdown().await.expect("shutdown"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_mapping_routes_sensor_topics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let running = start(
        dir.path(),
        &emu,
        "[[mappings]]\ntopic_filter = \"sensors/+/telemetry\"\ndevice_name_json = \"${deviceName}\"\ntimeseries = [\"*\"]\n",
    )
    .await;
    let c = local_client(&running, "bench", None).await;
    for seq in 0..5 {
        publish(
            &c,
            "sensors/meter-0001/telemetry",
            json!({"deviceName": "meter-0001", "ts": 1_700_000_000_000i64 + seq, "seq": seq, "sent_us": 1}),
        )
        .await;
    }
    let rec = emu
        .wait_for("five mapped messages", WAIT, |r| {
            r.telemetry_ts("meter-0001").len() == 5
        })
        .await;
    let seqs: Vec<i64> = values(&rec, "meter-0001")
        .iter()
        .filter_map(|v| v["seq"].as_i64())
        .collect();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4], "in order");
    assert!(running.shutdown().await.expect("shutdown"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_round_trips_to_a_meter_and_unknown_targets_get_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let running = start(
        dir.path(),
        &emu,
        "[simulator]\nmeters = 1\ninterval = \"200ms\"\n",
    )
    .await;
    emu.wait_for("meter online", WAIT, |r| {
        r.telemetry.contains_key("sim-meter-0001")
    })
    .await;
    assert!(
        emu.push_rpc(
            "sim-meter-0001",
            41,
            "get",
            json!({"obis": "1.0.32.7.0.255"})
        )
        .await
    );
    assert!(
        emu.push_rpc(
            "sim-meter-0001",
            42,
            "set",
            json!({"obis": "0.0.96.3.10.255", "class_id": 1, "value": true})
        )
        .await
    );
    assert!(emu.push_rpc("nobody", 43, "reboot", json!({})).await);
    assert!(
        emu.push_rpc("sim-meter-0001", 44, "get", json!({"obis": "9.9.9.9.9.9"}))
            .await
    );
    let rec = emu
        .wait_for("four RPC replies", WAIT, |r| r.rpc_replies.len() >= 4)
        .await;
    let reply = |id: i64| {
        rec.rpc_replies
            .iter()
            .find(|r| r["id"] == json!(id))
            .unwrap_or_else(|| panic!("no reply {id} in {:?}", rec.rpc_replies))
            .clone()
    };
    let r41 = reply(41);
    assert_eq!(r41["device"], json!("sim-meter-0001"));
    assert_eq!(r41["data"]["success"], json!(true), "{r41}");
    assert!(r41["data"]["value"].is_number(), "{r41}");
    // Writes need `rpc_write` on the meter (issue #10): refused, saying why.
    assert_eq!(reply(42)["data"]["success"], json!(false), "{}", reply(42));
    assert!(reply(42)["data"]["error"]
        .as_str()
        .unwrap_or("")
        .contains("rpc_write"));
    assert_eq!(reply(43)["data"]["success"], json!(false));
    assert!(reply(43)["data"]["error"]
        .as_str()
        .unwrap_or("")
        .contains("no RPC route"));
    assert_eq!(reply(44)["data"]["success"], json!(false), "{}", reply(44));
    assert!(running.shutdown().await.expect("shutdown"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thingsboard_restart_reconnects_reannounces_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let running = start(dir.path(), &emu, "").await;
    let c = local_client(&running, "p", None).await;
    let send = |from: i64, to: i64| {
        let c = c.clone();
        async move {
            for i in from..to {
                publish(
                    &c,
                    "v1/devices/me/telemetry",
                    json!({"deviceName": "R", "ts": 1_000 + i, "i": i}),
                )
                .await;
            }
        }
    };
    send(0, 20).await;
    emu.wait_for("first batch", WAIT, |r| r.telemetry_ts("R").len() == 20)
        .await;
    emu.stop().await;
    send(20, 60).await;
    // Every record of the outage is durable in the queue (row ids 21..=60) before ThingsBoard
    // returns.
    let mut committed = running.store.subscribe();
    tokio::time::timeout(WAIT, committed.wait_for(|id| *id >= 60))
        .await
        .expect("outage records queued in time")
        .expect("store alive");
    assert!(running.store.stats().await.expect("stats").depth >= 40);
    emu.restart().await;
    let rec = emu
        .wait_for("all 60 after restart", WAIT, |r| {
            r.telemetry_ts("R").len() == 60
        })
        .await;
    let ts = rec.telemetry_ts("R");
    assert_eq!(
        ts,
        (0..60).map(|i| 1_000 + i).collect::<Vec<i64>>(),
        "per-device order"
    );
    assert!(rec.sessions >= 2);
    let announced = rec.connects.iter().filter(|(d, _)| d == "R").count();
    assert!(
        announced >= 2,
        "re-announced after reconnect: {:?}",
        rec.connects
    );
    assert!(rec.connect_precedes_data());
    assert!(running.shutdown().await.expect("shutdown"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_within_the_grace_period_and_keeps_unacked_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    emu.set_withhold_pubacks(true);
    let running = start(
        dir.path(),
        &emu,
        "[simulator]\nmeters = 3\ninterval = \"50ms\"\n",
    )
    .await;
    emu.wait_for("data in flight", WAIT, |r| r.telemetry_publishes >= 3)
        .await;
    let t0 = tokio::time::Instant::now();
    let clean = running.shutdown().await.expect("shutdown");
    assert!(clean, "every task finished inside the grace period");
    assert!(t0.elapsed() < Duration::from_secs(5) + Duration::from_secs(2));
    // Nothing was acknowledged, so everything is still queued for the next start.
    let store =
        dlms_bridge::store::open(&config(dir.path(), emu.port(), "").store).expect("reopen");
    assert!(store.stats().await.expect("stats").depth >= 3);
    store.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_starts_and_stops_meters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    // Two meters served by a separate simulator: the bridge polls the first, then (reload) the
    // second instead.
    let tracker = tokio_util::task::TaskTracker::new();
    let cancel = tokio_util::sync::CancellationToken::new();
    let sims = dlms_bridge::sim::spawn_meters(
        std::net::Ipv4Addr::LOCALHOST.into(),
        0,
        2,
        &Default::default(),
        &tracker,
        cancel.clone(),
    )
    .await
    .expect("simulators");
    let meter = |name: &str, port: u16| {
        format!("[[meters]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\ninterval = \"100ms\"\n")
    };
    let mut running = start(dir.path(), &emu, &meter("A", sims[0].port())).await;
    emu.wait_for("meter A", WAIT, |r| r.telemetry.contains_key("A"))
        .await;
    let report = running
        .reload(&config(dir.path(), emu.port(), &meter("B", sims[1].port())))
        .await
        .expect("reload");
    assert_eq!(report.meters_started, vec!["B".to_string()]);
    assert_eq!(report.meters_stopped, vec!["A".to_string()]);
    emu.wait_for("meter B", WAIT, |r| r.telemetry.contains_key("B"))
        .await;
    assert_eq!(app::meter_names(&running.meters), vec!["B".to_string()]);
    assert!(running.shutdown().await.expect("shutdown"));
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}
