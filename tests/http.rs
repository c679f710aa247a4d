//! The HTTP server through `app::start`: real store, broker, simulated DLMS meters and the
//! ThingsBoard emulator. Every endpoint and its errors; metrics checked against what the test
//! did (messages published, meters failing); registry meter administration end to end.

mod common;
mod http_support;

use std::time::Duration;

use common::tb_emulator::TbEmulator;
use http_support::*;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{json, Value};

const READ: &str = "read-token-1";
const ADMIN: &str = "admin-token-1";

fn auth_section() -> String {
    format!("[http]\nlisten = \"127.0.0.1:0\"\ntoken = \"{READ}\"\nadmin_token = \"{ADMIN}\"\n")
}

async fn local_client(addr: std::net::SocketAddr, id: &str) -> AsyncClient {
    common::local_client::connect(addr, id, None, WAIT, drop)
        .await
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_status_and_metrics_match_what_happened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let sims = sim_meters(1).await;
    let dead = closed_port();
    let extra = format!(
        "{}\n[[meters]]\nname = \"Good Meter\"\nhost = \"127.0.0.1\"\nport = {}\ninterval = \"200ms\"\n\
         [[meters]]\nname = \"Broken Meter\"\nhost = \"127.0.0.1\"\nport = {dead}\ninterval = \"100ms\"\ntimeout = \"500ms\"\n",
        auth_section(),
        sims.addrs[0].port()
    );
    let running = start(dir.path(), &emu, &extra).await;
    let base = base(&running);

    // Health needs no credentials; everything else does.
    assert_eq!(
        get(&format!("{base}/healthz"), None).await,
        (200, "ok\n".into())
    );
    let (code, body) = get(&format!("{base}/readyz"), None).await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    for path in [
        "/metrics",
        "/api/status",
        "/api/meters",
        "/api/history",
        "/",
    ] {
        let resp = client()
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), 401, "{path} without credentials");
        assert!(resp.headers().contains_key("www-authenticate"), "{path}");
        assert_eq!(
            get(&format!("{base}{path}"), Some("wrong")).await.0,
            401,
            "{path}"
        );
        assert_eq!(
            get(&format!("{base}{path}"), Some(READ)).await.0,
            200,
            "{path}"
        );
        assert_eq!(
            get(&format!("{base}{path}"), Some(ADMIN)).await.0,
            200,
            "{path}"
        );
    }
    // Basic auth carries the token as the password (what a browser prompt sends).
    let resp = client()
        .get(format!("{base}/api/status"))
        .basic_auth("anyone", Some(READ))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 200);

    // A local publisher sends five messages.
    let publisher = local_client(running.broker_addr.expect("broker"), "pub-1").await;
    let mut bytes = 0;
    for i in 0..5 {
        let payload = json!({"deviceName": "Local Dev", "temp": i}).to_string();
        bytes += payload.len();
        publisher
            .publish("v1/devices/me/telemetry", QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish");
    }
    emu.wait_for("local telemetry", WAIT, |r| {
        r.telemetry.get("Local Dev").map_or(0, Vec::len) >= 5
    })
    .await;

    let meters_url = format!("{base}/api/meters");
    let meters = wait_json(
        &meters_url,
        Some(READ),
        "good meter up and broken meter down",
        |v| {
            meter(v, "Good Meter")
                .is_some_and(|m| m["state"] == "up" && m["values"]["voltage_l1"]["unit"] == "V")
                && meter(v, "Broken Meter")
                    .is_some_and(|m| m["consecutive_failures"].as_u64() >= Some(3))
        },
    )
    .await;
    let good = meter(&meters, "Good Meter").expect("good");
    assert!(good["values"]["voltage_l1"]["value"]
        .as_f64()
        .is_some_and(|v| v > 200.0));
    assert_eq!(good["origin"]["kind"], "config");
    let broken = meter(&meters, "Broken Meter").expect("broken");
    assert!(
        broken["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{broken}"
    );
    assert_eq!(broken["state"], "down", "{broken}");

    let status = wait_json(
        &format!("{base}/api/status"),
        Some(READ),
        "uplink connected",
        |v| v["uplink"]["connected"] == true,
    )
    .await;
    assert_eq!(status["ready"], true);
    assert_eq!(status["broker"]["listening"], true);
    let clients = status["broker"]["clients"].as_array().expect("clients");
    let pub1 = clients
        .iter()
        .find(|c| c["client_id"] == "pub-1")
        .expect("pub-1 listed");
    assert_eq!(pub1["messages"], 5);
    assert_eq!(pub1["bytes"], bytes);
    assert_eq!(pub1["connected"], true);
    assert!(
        pub1["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "the connected client's address: {pub1}"
    );
    assert_eq!(status["uplink"]["session_takeovers_last_hour"], 0);
    assert!(status["queue"]["depth"].is_u64());

    // Metrics: what the test did, and the families the issue lists.
    let (code, page) = get(&format!("{base}/metrics"), Some(READ)).await;
    assert_eq!(code, 200);
    assert_eq!(
        sample(&page, "dlms_bridge_messages_in_total{source=\"local\"}"),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &page,
            "dlms_bridge_message_bytes_in_total{source=\"local\"}"
        ),
        Some(bytes as f64)
    );
    assert_eq!(
        sample(
            &page,
            "dlms_bridge_local_client_messages_total{client=\"pub-1\"}"
        ),
        Some(5.0)
    );
    assert_eq!(sample(&page, "dlms_bridge_uplink_connected"), Some(1.0));
    assert_eq!(sample(&page, "dlms_bridge_broker_clients"), Some(1.0));
    assert_eq!(
        sample(&page, "dlms_bridge_meter_up{meter=\"Good Meter\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&page, "dlms_bridge_meter_up{meter=\"Broken Meter\"}"),
        Some(0.0)
    );
    assert_eq!(sample(&page, "dlms_bridge_meters"), Some(2.0));
    let failed = sample(
        &page,
        "dlms_bridge_meter_poll_failures_total{meter=\"Broken Meter\"}",
    )
    .expect("failures counted");
    // Every failure the meter list shows was counted (the recorder exists before the first poll).
    assert!(failed >= 3.0, "{failed}");
    assert_eq!(
        sample(
            &page,
            "dlms_bridge_meter_poll_failures_total{meter=\"Good Meter\"}"
        ),
        None,
        "the good meter never failed"
    );
    let good_polls = sample(
        &page,
        "dlms_bridge_meter_poll_duration_seconds_count{meter=\"Good Meter\"}",
    )
    .expect("poll histogram");
    assert!(good_polls >= 1.0);
    assert!(page.contains(
        "dlms_bridge_meter_poll_duration_seconds_bucket{meter=\"Good Meter\",le=\"0.5\"}"
    ));
    assert!(
        sample(&page, "dlms_bridge_uplink_puback_latency_seconds_count").is_some_and(|n| n >= 1.0)
    );
    assert!(sample(&page, "dlms_bridge_records_acked_total").is_some_and(|n| n >= 5.0));
    assert!(sample(&page, "dlms_bridge_records_queued_total").is_some_and(|n| n >= 5.0));
    assert_eq!(
        sample(
            &page,
            "dlms_bridge_records_dropped_total{reason=\"malformed_local\"}"
        ),
        Some(0.0)
    );
    for family in [
        "dlms_bridge_queue_depth",
        "dlms_bridge_queue_oldest_age_seconds",
        "dlms_bridge_uplink_reconnects_total",
        "dlms_bridge_uplink_session_takeovers_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(page.contains(&format!("\n{family}")), "{family} missing");
    }

    // A malformed local message is counted by kind.
    publisher
        .publish(
            "v1/devices/me/telemetry",
            QoS::AtLeastOnce,
            false,
            "not json",
        )
        .await
        .expect("publish");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, page) = get(&format!("{base}/metrics"), Some(READ)).await;
        if sample(
            &page,
            "dlms_bridge_records_dropped_total{reason=\"malformed_local\"}",
        ) == Some(1.0)
        {
            assert!(
                sample(&page, "dlms_bridge_mapping_errors_total{kind=\"not_json\"}")
                    .is_some_and(|n| n >= 1.0)
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "malformed message not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Sparkline history and the page's assets.
    let history = get_json(&format!("{base}/api/history"), Some(READ)).await;
    assert_eq!(history["key"], "active_power");
    assert!(history["meters"]["Good Meter"]
        .as_array()
        .is_some_and(|p| !p.is_empty()));
    let (_, html) = get(&format!("{base}/"), Some(READ)).await;
    assert!(html.contains("<script src=\"app.js\">"));
    assert_eq!(get(&format!("{base}/app.js"), Some(READ)).await.0, 200);
    assert_eq!(get(&format!("{base}/style.css"), Some(READ)).await.0, 200);

    // Server-sent events: the first event is the status document.
    let mut resp = client()
        .get(format!("{base}/api/events"))
        .bearer_auth(READ)
        .send()
        .await
        .expect("events");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/event-stream"));
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(WAIT, resp.chunk())
            .await
            .expect("event in time")
            .expect("chunk");
        text.push_str(&String::from_utf8_lossy(&chunk.expect("stream open")));
    }
    assert!(text.starts_with("event: status\ndata: "), "{text}");
    let doc: Value = serde_json::from_str(
        text.lines()
            .nth(1)
            .and_then(|l| l.strip_prefix("data: "))
            .expect("data"),
    )
    .expect("status json");
    assert!(doc["meters"].as_array().is_some_and(|m| m.len() == 2));
    drop(resp);

    // RPCs by outcome: one a meter answers, one for a device nobody serves.
    assert!(
        emu.push_rpc("Good Meter", 41, "get", json!({"obis": "1.0.32.7.0.255"}))
            .await
    );
    assert!(emu.push_rpc("Nobody", 42, "reboot", json!({})).await);
    emu.wait_for("two RPC replies", WAIT, |r| r.rpc_replies.len() >= 2)
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, page) = get(&format!("{base}/metrics"), Some(READ)).await;
        let ok = sample(&page, "dlms_bridge_rpc_total{outcome=\"ok\"}");
        let no_route = sample(&page, "dlms_bridge_rpc_total{outcome=\"no_route\"}");
        if ok == Some(1.0) && no_route == Some(1.0) {
            assert_eq!(sample(&page, "dlms_bridge_rpc_requests_total"), Some(2.0));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "RPC outcomes not counted: ok {ok:?}, no_route {no_route:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A store that stops answering makes the bridge not ready, with the reason.
    running.store.close().await.expect("close store");
    let (code, body) = get(&format!("{base}/readyz"), None).await;
    assert_eq!(code, 503);
    assert!(body.contains("store"), "{body}");
    running.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_meters_are_managed_live_and_config_meters_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let sims = sim_meters(3).await;
    let db = registry(dir.path());
    let extra = format!(
        "{}\n[[meters]]\nname = \"File Meter\"\nhost = \"127.0.0.1\"\nport = {}\ninterval = \"200ms\"\n\
         [[meters]]\ndatabase = \"{}\"\ninterval = \"200ms\"\n",
        auth_section(),
        sims.addrs[0].port(),
        db.display()
    );
    let running = start(dir.path(), &emu, &extra).await;
    let base = base(&running);
    let url = format!("{base}/api/meters");
    let http = client();
    let post = |token: Option<&'static str>, body: Value| {
        let mut r = http.post(&url).json(&body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let new = json!({"name": "Reg Meter", "host": "127.0.0.1", "port": sims.addrs[1].port()});

    // Rights: none → 401, read-only → 403.
    assert_eq!(
        post(None, new.clone())
            .await
            .expect("post")
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        post(Some(READ), new.clone())
            .await
            .expect("post")
            .status()
            .as_u16(),
        403
    );

    // Only JSON bodies (a cross-site form posts text/plain without a preflight).
    let resp = http
        .post(&url)
        .bearer_auth(ADMIN)
        .header("content-type", "text/plain")
        .body(new.to_string())
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 415);

    // Validation names each bad field.
    let resp = post(
        Some(ADMIN),
        json!({"name": "", "host": "127.0.0.1", "port": 0, "colour": 1}),
    )
    .await
    .expect("post");
    assert_eq!(resp.status().as_u16(), 422);
    let errs: Value = resp.json().await.expect("json");
    let keys: Vec<&str> = errs["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["key"].as_str())
        .collect();
    for k in ["name", "port", "colour"] {
        assert!(keys.contains(&k), "{k} not named in {errs}");
    }
    let resp = post(Some(ADMIN), json!({"name": "X", "port": 70000}))
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 422);
    let errs: Value = resp.json().await.expect("json");
    assert!(errs.to_string().contains("\"key\":\"host\""), "{errs}");
    assert!(errs.to_string().contains("\"key\":\"port\""), "{errs}");

    // Create: persisted in the registry, polled at once.
    let resp = post(Some(ADMIN), new.clone()).await.expect("post");
    assert_eq!(resp.status().as_u16(), 201, "{:?}", resp.text().await);
    assert_eq!(
        registry_rows(&db),
        vec![("Reg Meter".into(), "127.0.0.1".into(), sims.addrs[1].port())]
    );
    let list = wait_json(&url, Some(READ), "registry meter polled", |v| {
        meter(v, "Reg Meter").is_some_and(|m| m["state"] == "up" && m["polls"].as_u64() >= Some(1))
    })
    .await;
    assert_eq!(
        meter(&list, "Reg Meter").expect("listed")["origin"]["kind"],
        "registry"
    );
    emu.wait_for("registry meter telemetry", WAIT, |r| {
        !r.telemetry_ts("Reg Meter").is_empty()
    })
    .await;

    // Duplicates and config-file meters: 409.
    assert_eq!(
        post(Some(ADMIN), new.clone())
            .await
            .expect("post")
            .status()
            .as_u16(),
        409
    );
    let dup_file = json!({"name": "File Meter", "host": "127.0.0.1", "port": 1});
    assert_eq!(
        post(Some(ADMIN), dup_file)
            .await
            .expect("post")
            .status()
            .as_u16(),
        409
    );
    let file_url = format!("{url}/File%20Meter");
    let resp = http
        .put(&file_url)
        .bearer_auth(ADMIN)
        .json(&json!({"port": 2}))
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status().as_u16(), 409);
    let why: Value = resp.json().await.expect("json");
    assert!(
        why["error"]
            .as_str()
            .is_some_and(|e| e.contains("config file")),
        "{why}"
    );
    let resp = http
        .delete(&file_url)
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status().as_u16(), 409);
    let resp = http
        .delete(format!("{url}/Nobody"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status().as_u16(), 404);
    let resp = http
        .delete(format!("{url}/Reg%20Meter"))
        .bearer_auth(READ)
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status().as_u16(), 403);

    // Update: moved to another simulated meter, restarted live.
    let reg_url = format!("{url}/Reg%20Meter");
    let resp = http
        .put(&reg_url)
        .bearer_auth(ADMIN)
        .json(&json!({"port": sims.addrs[2].port()}))
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["applied"]["started"], json!(["Reg Meter"]));
    assert_eq!(body["applied"]["stopped"], json!(["Reg Meter"]));
    assert_eq!(registry_rows(&db)[0].2, sims.addrs[2].port());
    let list = get_json(&url, Some(READ)).await;
    assert_eq!(
        meter(&list, "Reg Meter").expect("listed")["port"],
        sims.addrs[2].port()
    );
    let resp = http
        .put(&reg_url)
        .bearer_auth(ADMIN)
        .json(&json!({"port": "x"}))
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status().as_u16(), 422);

    // Delete: gone from the database and from the running set.
    let resp = http
        .delete(&reg_url)
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(registry_rows(&db).is_empty());
    let list = get_json(&url, Some(READ)).await;
    assert!(meter(&list, "Reg Meter").is_none(), "{list}");
    assert!(meter(&list, "File Meter").is_some());
    running.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_registry_new_meters_are_refused_with_409() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let running = start(dir.path(), &emu, "").await;
    // Loopback without tokens: no credentials needed, admin included.
    let resp = client()
        .post(format!("{}/api/meters", base(&running)))
        .json(&json!({"name": "M", "host": "127.0.0.1", "port": 4059}))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 409);
    let why: Value = resp.json().await.expect("json");
    assert!(
        why["error"]
            .as_str()
            .is_some_and(|e| e.contains("database")),
        "{why}"
    );
    // DNS rebinding: a page of a foreign name resolving to 127.0.0.1 is refused.
    let resp = client()
        .get(format!("{}/api/status", base(&running)))
        .header("host", "rebind.example:8484")
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status().as_u16(), 401);
    running.shutdown().await.expect("shutdown");
}

#[test]
fn a_non_loopback_listen_without_token_is_a_config_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[http]\nlisten = \"0.0.0.0:8484\"\n").expect("write");
    for cmd in ["check-config", "run"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dlms-bridge"))
            .args(["--config", cfg.to_str().expect("utf-8"), cmd])
            .output()
            .expect("run binary");
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("http.token"), "{cmd}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_command_is_healthy_only_with_a_live_uplink_and_no_takeover() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let port = closed_port();
    let section = format!("[http]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{READ}\"\n");
    let running = start(dir.path(), &emu, &section).await;
    // The same file for the CLI: it finds the address and the token there.
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "{section}[broker]\nlisten = \"{}\"\n",
            running.broker_addr.expect("broker")
        ),
    )
    .expect("write");
    let status = || {
        let cfg = cfg.clone();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_dlms-bridge"))
                .args(["--config", cfg.to_str().expect("utf-8"), "status"])
                .output()
                .await
                .expect("run binary");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).to_string(),
            )
        }
    };
    wait_json(
        &format!("{}/api/status", base(&running)),
        Some(READ),
        "uplink connected",
        |v| v["uplink"]["connected"] == true,
    )
    .await;
    let (code, out) = status().await;
    assert_eq!(code, Some(0), "{out}");
    let broker_port = running.broker_addr.expect("broker").port();
    assert!(
        out.contains(&format!("[ ok ] port {broker_port} listening")),
        "{out}"
    );
    assert!(out.contains("[ ok ] uplink connected"), "{out}");
    assert!(out.contains("[ ok ] no session takeovers"), "{out}");

    // Another client takes the gateway session over with the same token.
    let mut opts = MqttOptions::new("intruder", "127.0.0.1", emu.port());
    opts.set_credentials(TOKEN, "");
    let (_intruder, mut el) = AsyncClient::new(opts, 10);
    let intruder = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    wait_json(
        &format!("{}/api/status", base(&running)),
        Some(READ),
        "a takeover",
        |v| v["uplink"]["session_takeovers_last_hour"].as_u64() >= Some(1),
    )
    .await;
    intruder.abort();
    let (code, out) = status().await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("[FAIL] no session takeovers"), "{out}");

    running.shutdown().await.expect("shutdown");
    let (code, out) = status().await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not reachable"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_http_port_fails_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let toml = format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\n[broker]\nlisten = \"127.0.0.1:0\"\n\
         [store]\npath = \"{}/q.db\"\n",
        dir.path().display()
    );
    let cfg = dlms_bridge::config::validate(dlms_bridge::config::load_str(&toml).expect("parses"))
        .expect("valid");
    let err = match dlms_bridge::app::start(cfg).await {
        Ok(_) => panic!("started on a taken port"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(&format!("HTTP server on 127.0.0.1:{port}")),
        "{err}"
    );
}
