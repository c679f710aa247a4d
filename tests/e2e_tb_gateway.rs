//! tb-gateway MQTT connector mappings, end to end: a connector JSON used as is through
//! `tb_gateway_file`, local devices on the real embedded broker, the ThingsBoard emulator on the
//! other side. Covers telemetry/attributes, connect/disconnect requests, attribute requests and
//! updates, and RPC (two-way answered, two-way unanswered, one-way, no matching rule).

mod common;

use std::time::Duration;

use common::tb_emulator::TbEmulator;
use dlms_bridge::app::{self, Running};
use dlms_bridge::config;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const TOKEN: &str = "tbgw-token";
const WAIT: Duration = Duration::from_secs(30);

fn connector() -> Value {
    json!({
        "broker": {"host": "127.0.0.1", "port": 1884, "security": {"type": "anonymous"}},
        "mapping": [{
            "topicFilter": "sensor/data",
            "converter": {
                "type": "json",
                "deviceInfo": {
                    "deviceNameExpressionSource": "message",
                    "deviceNameExpression": "${serialNumber}",
                    "deviceProfileExpressionSource": "message",
                    "deviceProfileExpression": "${sensorType}"
                },
                "attributes": [{"type": "string", "key": "model", "value": "${sensorModel}"}],
                "timeseries": [
                    {"type": "double", "key": "temperature", "value": "${temp}"},
                    {"type": "string", "key": "combine", "value": "${hum}:${temp}"}
                ]
            }
        }],
        "requestsMapping": {
            "connectRequests": [{
                "topicFilter": "sensor/connect",
                "deviceInfo": {
                    "deviceNameExpressionSource": "message",
                    "deviceNameExpression": "${serialNumber}",
                    "deviceProfileExpressionSource": "constant",
                    "deviceProfileExpression": "Thermometer"
                }
            }],
            "disconnectRequests": [{
                "topicFilter": "sensor/disconnect",
                "deviceInfo": {"deviceNameExpressionSource": "message", "deviceNameExpression": "${serialNumber}"}
            }],
            "attributeRequests": [{
                "topicFilter": "v1/devices/me/attributes/request",
                "deviceInfo": {"deviceNameExpressionSource": "message", "deviceNameExpression": "${serialNumber}"},
                "attributeNameExpressionSource": "message",
                "attributeNameExpression": "${versionAttribute}",
                "scope": "shared",
                "topicExpression": "devices/${deviceName}/attrs",
                "valueExpression": "${attributeKey}: ${attributeValue}"
            }],
            "attributeUpdates": [{
                "retain": false,
                "deviceNameFilter": ".*",
                "attributeFilter": "firmwareVersion",
                "topicExpression": "sensor/${deviceName}/${attributeKey}",
                "valueExpression": "{\"${attributeKey}\":${attributeValue}}"
            }],
            "serverSideRpc": [
                {
                    "type": "twoWay",
                    "deviceNameFilter": ".*",
                    "methodFilter": "echo",
                    "requestTopicExpression": "sensor/${deviceName}/request/${methodName}/${requestId}",
                    "responseTopicExpression": "sensor/${deviceName}/response/${methodName}/${requestId}",
                    "responseTimeout": 500,
                    "valueExpression": "${params}"
                },
                {
                    "type": "oneWay",
                    "deviceNameFilter": ".*",
                    "methodFilter": "no-reply",
                    "requestTopicExpression": "sensor/${deviceName}/oneway/${methodName}",
                    "valueExpression": "${params}"
                }
            ]
        }
    })
}

async fn start(dir: &std::path::Path, emu: &TbEmulator) -> Running {
    let file = dir.join("mqtt.json");
    std::fs::write(&file, connector().to_string()).expect("write connector");
    let toml = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[broker]\nlisten = \"127.0.0.1:0\"\n[thingsboard]\nport = {}\naccess_token = \"{TOKEN}\"\nreconnect_min = \"50ms\"\n[store]\npath = \"{}\"\n[[mappings]]\ntb_gateway_file = \"{}\"\n",
        emu.port(),
        dir.join("q.db").display(),
        file.display()
    );
    let cfg = config::validate(config::load_str(&toml).expect("parses")).expect("valid");
    app::start(cfg).await.expect("bridge starts")
}

/// A local device: connected client plus the messages it receives.
struct Device {
    client: AsyncClient,
    inbox: mpsc::Receiver<(String, Vec<u8>)>,
}

async fn device(running: &Running, id: &str, subscribe: &[&str]) -> Device {
    let addr = running.broker_addr.expect("broker");
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 100);
    let (tx, inbox) = mpsc::channel(100);
    let (suback_tx, mut suback_rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    let _ = tx.send((p.topic, p.payload.to_vec())).await;
                }
                Ok(Event::Incoming(Incoming::SubAck(_))) => {
                    let _ = suback_tx.send(()).await;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    for f in subscribe {
        client
            .subscribe(*f, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        tokio::time::timeout(WAIT, suback_rx.recv())
            .await
            .expect("suback in time");
    }
    Device { client, inbox }
}

impl Device {
    async fn publish(&self, topic: &str, payload: Value) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
            .await
            .expect("publish");
    }
    async fn next(&mut self) -> (String, Vec<u8>) {
        tokio::time::timeout(WAIT, self.inbox.recv())
            .await
            .expect("local message in time")
            .expect("client alive")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_attributes_and_requests_map_like_tb_gateway() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let running = start(dir.path(), &emu).await;
    let mut dev = device(
        &running,
        "sensor-1",
        &["devices/SN-1/attrs", "sensor/SN-1/+"],
    )
    .await;

    dev.publish(
        "sensor/data",
        json!({"serialNumber": "SN-1", "sensorType": "Thermometer", "sensorModel": "T1", "temp": 21.5, "hum": 40}),
    )
    .await;
    dev.publish("sensor/connect", json!({"serialNumber": "SN-2"}))
        .await;
    let rec = emu
        .wait_for("SN-1 data and SN-2 connect", WAIT, |r| {
            r.telemetry.contains_key("SN-1")
                && r.attributes.contains_key("SN-1")
                && r.connects.iter().any(|(d, _)| d == "SN-2")
        })
        .await;
    let v = &rec.telemetry["SN-1"][0]["values"];
    assert_eq!(v["temperature"], json!(21.5));
    assert_eq!(v["combine"], json!("40:21.5"));
    assert_eq!(rec.attributes["SN-1"]["model"], json!("T1"));
    let ty = |d: &str| {
        rec.connects
            .iter()
            .find(|(n, _)| n == d)
            .and_then(|(_, t)| t.clone())
    };
    assert_eq!(ty("SN-1").as_deref(), Some("Thermometer"));
    assert_eq!(ty("SN-2").as_deref(), Some("Thermometer"));

    dev.publish("sensor/disconnect", json!({"serialNumber": "SN-2"}))
        .await;
    emu.wait_for("SN-2 disconnect", WAIT, |r| {
        r.disconnects.iter().any(|d| d == "SN-2")
    })
    .await;

    // Attribute request: local → ThingsBoard; ThingsBoard's answer → the local topic.
    dev.publish(
        "v1/devices/me/attributes/request",
        json!({"serialNumber": "SN-1", "versionAttribute": "fw"}),
    )
    .await;
    // The bridge's own post-connect requests (`gateway.shared_attributes_on_connect`) ask for
    // `poll_interval`; this test's request is the other one.
    let ours = |q: &&Value| q["keys"] != json!(["poll_interval"]);
    let rec = emu
        .wait_for("attribute request", WAIT, |r| {
            r.attribute_requests.iter().any(|q| ours(&q))
        })
        .await;
    let req = rec
        .attribute_requests
        .iter()
        .find(ours)
        .expect("the mapped request");
    assert_eq!(req["device"], json!("SN-1"));
    assert_eq!(req["client"], json!(false));
    let id = req["id"].clone();
    assert!(
        emu.push(
            "v1/gateway/attributes/response",
            json!({"id": id, "device": "SN-1", "value": "1.0.7"})
        )
        .await
    );
    let (topic, payload) = dev.next().await;
    assert_eq!(topic, "devices/SN-1/attrs");
    assert_eq!(String::from_utf8_lossy(&payload), "fw: \"1.0.7\"");

    // Shared attribute update → one local publish per matching key.
    assert!(
        emu.push_attributes("SN-1", json!({"firmwareVersion": "2.0", "other": 1}))
            .await
    );
    let (topic, payload) = dev.next().await;
    assert_eq!(topic, "sensor/SN-1/firmwareVersion");
    let v: Value = serde_json::from_slice(&payload).expect("json");
    assert_eq!(v, json!({"firmwareVersion": "2.0"}));
    assert!(running.shutdown().await.expect("shutdown"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_is_answered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let running = start(dir.path(), &emu).await;
    emu.wait_for("uplink session", WAIT, |r| r.sessions >= 1)
        .await;
    let mut dev = device(
        &running,
        "sensor-1",
        &["sensor/SN-1/request/+/+", "sensor/SN-1/oneway/+"],
    )
    .await;

    // Two-way, the device answers on the response topic.
    assert!(emu.push_rpc("SN-1", 7, "echo", json!({"x": 1})).await);
    let (topic, payload) = dev.next().await;
    assert_eq!(topic, "sensor/SN-1/request/echo/7");
    assert_eq!(
        serde_json::from_slice::<Value>(&payload).expect("json"),
        json!({"x": 1})
    );
    dev.publish("sensor/SN-1/response/echo/7", json!({"echoed": {"x": 1}}))
        .await;

    // Two-way to a device that never answers: an error reply after the rule's 500 ms.
    assert!(emu.push_rpc("SN-9", 8, "echo", json!({})).await);
    // One-way: published, answered with success at once.
    assert!(
        emu.push_rpc("SN-1", 9, "no-reply", json!({"on": true}))
            .await
    );
    let (topic, _) = dev.next().await;
    assert_eq!(topic, "sensor/SN-1/oneway/no-reply");
    // No rule: an error reply, never silence.
    assert!(emu.push_rpc("SN-1", 10, "format-disk", json!({})).await);

    let rec = emu
        .wait_for("four RPC replies", WAIT, |r| r.rpc_replies.len() >= 4)
        .await;
    let reply = |id: i64| {
        rec.rpc_replies
            .iter()
            .find(|r| r["id"] == json!(id))
            .unwrap_or_else(|| panic!("no reply {id}: {:?}", rec.rpc_replies))["data"]
            .clone()
    };
    assert_eq!(reply(7), json!({"echoed": {"x": 1}}));
    assert_eq!(reply(8)["success"], json!(false));
    assert_eq!(reply(9), json!({"success": true}));
    assert_eq!(reply(10)["success"], json!(false));
    assert!(running.shutdown().await.expect("shutdown"));
}
