//! Issue #10: bad-input WARNs are rate-limited per kind (one flood never hides another kind)
//! and a client with no client id is told to set one instead of creating `auto-<uuid>` devices.
//! Its own test binary: it installs a global log capture.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::tb_emulator::TbEmulator;
use dlms_bridge::app;
use dlms_bridge::config;
use rumqttc::{AsyncClient, QoS};
use serde_json::json;

const TOKEN: &str = "warn-token";
const WAIT: Duration = Duration::from_secs(30);

/// Everything logged by the bridge in this test binary.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(Default::default)
}

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        logs().lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn captured() -> String {
    String::from_utf8_lossy(&logs().lock().expect("log lock")).into_owned()
}

async fn client(addr: std::net::SocketAddr, id: &str) -> AsyncClient {
    common::local_client::connect(addr, id, None, WAIT, drop)
        .await
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_bad_input_is_logged_and_generated_client_ids_are_refused() {
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(|| Capture)
        .with_env_filter("dlms_bridge=info")
        .init();
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let toml = format!(
        "[broker]\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"127.0.0.1:0\"\n[thingsboard]\nport = {}\naccess_token = \"{TOKEN}\"\n\
         reconnect_min = \"50ms\"\n[store]\npath = \"{}/queue.db\"\n",
        emu.port(),
        dir.path().display()
    );
    let cfg = config::validate(config::load_str(&toml).expect("parses")).expect("valid");
    let running = app::start(cfg).await.expect("bridge starts");
    let addr = running.broker_addr.expect("broker");
    let c = client(addr, "sensor-a").await;
    let topic = "v1/devices/me/telemetry";
    // A flood of one kind first: it used to use up the global log budget.
    for i in 0..25 {
        c.publish(topic, QoS::AtLeastOnce, false, format!("not json {i}"))
            .await
            .expect("publish");
    }
    let long = json!({"deviceName": "x".repeat(10_000), "v": 1}).to_string();
    c.publish(topic, QoS::AtLeastOnce, false, long)
        .await
        .expect("publish");
    c.publish(topic, QoS::AtLeastOnce, false, "42")
        .await
        .expect("publish");
    // No client id: the broker generates `auto-<uuid>`, which must not become a device.
    let anon = client(addr, "").await;
    anon.publish(topic, QoS::AtLeastOnce, false, json!({"t": 1}).to_string())
        .await
        .expect("publish");
    // A good message after them: once it reached ThingsBoard, the router has handled the rest.
    anon.publish(
        topic,
        QoS::AtLeastOnce,
        false,
        json!({"deviceName": "Good", "t": 2}).to_string(),
    )
    .await
    .expect("publish");
    let r = emu
        .wait_for("the good message", WAIT, |r| {
            r.telemetry.contains_key("Good")
        })
        .await;
    assert!(
        r.telemetry.keys().all(|d| !d.starts_with("auto-")),
        "no auto-<uuid> device: {:?}",
        r.telemetry.keys()
    );
    assert!(r.connects.iter().all(|(d, _)| !d.starts_with("auto-")));
    let text = captured();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Dropped a malformed local message."))
        .collect();
    let count = |kind: &str| {
        lines
            .iter()
            .filter(|l| l.contains(&format!("kind=\"{kind}\"")))
            .count()
    };
    assert_eq!(count("not_json"), 1, "one line for the flood: {lines:#?}");
    assert_eq!(count("bad_device_name"), 1, "{lines:#?}");
    assert_eq!(count("bad_shape"), 1, "{lines:#?}");
    assert_eq!(count("generated_client_id"), 1, "{lines:#?}");
    let generated = lines
        .iter()
        .find(|l| l.contains("generated_client_id"))
        .expect("line");
    assert!(generated.contains("set a client id or"), "{generated}");
    // The 10,000-character name is cut in the log line, not quoted whole.
    assert!(lines.iter().all(|l| l.len() < 2_000), "{lines:#?}");
    assert!(running.shutdown().await.expect("shutdown"));
}
