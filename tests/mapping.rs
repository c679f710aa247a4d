//! tb-gateway compatibility through the library: the connector fixtures (old and new format)
//! load and map as the spec says, and `import` of the fixture directory yields a configuration
//! that parses and validates. End-to-end through the broker needs the router (issue #6).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use dlms_bridge::config::{load_str, validate, MappingConfig, DEFAULT_DEVICE_TYPE};
use dlms_bridge::import::import_tb_gateway;
use dlms_bridge::model::{AttributeUpdate, Record, RecordKind, RpcRequest};
use dlms_bridge::router::mapping::MappingSet;
use dlms_bridge::sources::LocalPublish;
use serde_json::{json, Map, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tb-gateway")
}

fn file_mapping(name: &str) -> MappingSet {
    let m = MappingConfig {
        tb_gateway_file: Some(fixtures().join("config").join(name)),
        ..MappingConfig::default()
    };
    MappingSet::from_config(&[m], DEFAULT_DEVICE_TYPE).unwrap_or_else(|e| panic!("{name}: {e:?}"))
}

fn publish(topic: &str, payload: &[u8]) -> LocalPublish {
    LocalPublish {
        client_id: "poller".into(),
        username: None,
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload),
        received_ms: 1_700_000_000_000,
        ack: None,
    }
}

fn map(set: &mut MappingSet, topic: &str, payload: &str) -> Vec<Record> {
    set.map(&publish(topic, payload.as_bytes()))
        .unwrap_or_else(|| panic!("{topic}: no rule matched"))
        .unwrap_or_else(|e| panic!("{topic}: {e}"))
}

const ORIGINAL_PAYLOAD: &str = r#"{"deviceName":"Meter 1","voltage_l1":230.1,"current_l1":1.52,"frequency":50.0,"active_power":349.8,"active_energy":12345.6}"#;

/// What the built-in default (no mapping written) produces for the original poller's message.
fn builtin_default_record() -> Record {
    let mut values = Map::new();
    for (k, v) in [
        ("voltage_l1", 230.1),
        ("current_l1", 1.52),
        ("frequency", 50.0),
        ("active_power", 349.8),
        ("active_energy", 12345.6),
    ] {
        values.insert(k.into(), json!(v));
    }
    Record::telemetry("Meter 1", DEFAULT_DEVICE_TYPE, 1_700_000_000_000, values)
}

#[test]
fn original_connector_matches_the_builtin_default() {
    let mut set = file_mapping("mqtt.json");
    let out = map(&mut set, "v1/devices/me/telemetry", ORIGINAL_PAYLOAD);
    assert_eq!(out, vec![builtin_default_record()]);
    assert!(set
        .map(&publish("v1/devices/me/attributes", b"{}"))
        .is_none());
}

#[test]
fn native_equivalent_of_the_original_connector() {
    let raw = load_str(
        r#"
        [[mappings]]
        topic_filter = "v1/devices/me/telemetry"
        device_name_json = "${deviceName}"
        device_type = "DLMS Energy Meter"
        timeseries = [
          { key = "voltage_l1", type = "double" },
          { key = "current_l1", type = "double" },
          { key = "frequency", type = "double" },
          { key = "active_power", type = "double" },
          { key = "active_energy", type = "double" },
        ]
        "#,
    )
    .expect("parses");
    let mut set = MappingSet::from_config(&raw.mappings, DEFAULT_DEVICE_TYPE).expect("compiles");
    let out = map(&mut set, "v1/devices/me/telemetry", ORIGINAL_PAYLOAD);
    assert_eq!(out, vec![builtin_default_record()]);
}

#[test]
fn new_format_fixture_data_mappings() {
    let mut set = file_mapping("mqtt_new.json");

    let out = map(
        &mut set,
        "sensor/data",
        r#"{"serialNumber":"SN-001","sensorType":"Thermometer","sensorModel":"T1000","temp":42.0,"hum":58,"ts":1700000000500}"#,
    );
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(out[0].kind, RecordKind::Attributes);
    assert_eq!(
        (out[0].device.as_str(), out[0].device_type.as_str()),
        ("SN-001", "Thermometer")
    );
    assert_eq!(out[0].payload, json!({"model": "T1000", "T1000": "on"}));
    assert_eq!(
        out[1].payload,
        json!({"ts": 1700000000500i64, "values": {"temperature": 42.0, "humidity": 58.0, "combine": "58:42.0"}})
    );

    // Device name from the topic, received ts, ON_CHANGE_OR_REPORT_PERIOD.
    let p = r#"{"sensorModel":"T2","temp":"21.5","counters":[{"value":"17.9"}],"ts":1}"#;
    let out = map(&mut set, "sensor/SN-002/data", p);
    assert_eq!(out[1].device, "SN-002");
    assert_eq!(out[1].device_type, "Thermometer");
    assert_eq!(
        out[1].payload,
        json!({"ts": 1_700_000_000_000i64, "values": {"temperature": 21.5, "pulses": 17}})
    );
    assert!(
        map(&mut set, "sensor/SN-002/data", p).is_empty(),
        "unchanged values wait for the period"
    );
    let due = set.due(1_700_000_060_000);
    assert_eq!(due.len(), 2, "telemetry and attributes re-sent: {due:?}");

    // Bytes converter.
    let out = map(&mut set, "sensor/raw/x", "AB12hello");
    assert_eq!(
        (out[0].device.as_str(), out[0].device_type.as_str()),
        ("AB12", "Raw Sensor")
    );
    assert_eq!(out[0].payload["values"], json!({"rawData": "hello"}));
}

#[test]
fn new_format_fixture_requests() {
    let mut set = file_mapping("mqtt_new.json");

    let out = map(&mut set, "sensor/connect", r#"{"serialNumber":"SN-001"}"#);
    assert_eq!(out[0].kind, RecordKind::Connect);
    assert_eq!(
        (out[0].device.as_str(), out[0].device_type.as_str()),
        ("SN-001", "Thermometer")
    );
    let out = map(&mut set, "sensor/SN-009/connect", "");
    assert_eq!(
        (out[0].device.as_str(), out[0].device_type.as_str()),
        ("SN-009", "default")
    );
    let out = map(
        &mut set,
        "sensor/disconnect",
        r#"{"serialNumber":"SN-001"}"#,
    );
    assert_eq!(
        (out[0].kind, out[0].device.as_str()),
        (RecordKind::Disconnect, "SN-001")
    );
    let err = set
        .map(&publish("sensor/disconnect", br#"{"serial":"SN-001"}"#))
        .expect("matched")
        .expect_err("no serialNumber: never a device named ${serialNumber}");
    assert!(err.to_string().contains("serialNumber"), "{err}");

    let out = map(
        &mut set,
        "v1/devices/me/attributes/request",
        r#"{"serialNumber":"SN-001","versionAttribute":"firmwareVersion","pduAttribute":"pdu"}"#,
    );
    assert_eq!(out[0].kind, RecordKind::AttributeRequest);
    let id = out[0].payload["id"].as_i64().expect("id");
    assert_eq!(out[0].payload["keys"], json!(["firmwareVersion", "pdu"]));
    assert_eq!(out[0].payload["client"], json!(false));
    let answer = set
        .attribute_response_publish("SN-001", id, &json!({"firmwareVersion": "1.1", "pdu": 2}))
        .expect("routed");
    assert_eq!(answer.topic, "devices/SN-001/attrs");
    assert_eq!(
        serde_json::from_slice::<Value>(&answer.payload).expect("json"),
        json!({"firmwareVersion": "1.1", "pdu": 2})
    );

    let mut data = Map::new();
    data.insert("firmwareVersion".into(), json!("2.0"));
    data.insert("unrelated".into(), json!(1));
    let outs = set.attribute_update_publishes(&AttributeUpdate {
        device: "SN-001".into(),
        data,
    });
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0].topic, "sensor/SN-001/firmwareVersion");
    assert_eq!(outs[0].payload, br#"{"firmwareVersion":"2.0"}"#.to_vec());
    assert!(outs[0].retain);

    let rpc = |method: &str| RpcRequest {
        device: "SN-001".into(),
        id: 7,
        method: method.into(),
        params: json!({"v": 1}),
    };
    let two = set.rpc_route(&rpc("echo")).expect("two-way rule");
    assert_eq!(two.request.topic, "sensor/SN-001/request/echo/7");
    assert_eq!(
        two.response_topic.as_deref(),
        Some("sensor/SN-001/response/echo/7")
    );
    assert_eq!(two.timeout.as_millis(), 10_000);
    let one = set.rpc_route(&rpc("no-reply")).expect("one-way rule");
    assert_eq!(one.response_topic, None);
    assert!(
        set.rpc_route(&rpc("reboot")).is_none(),
        "no rule: the router replies an error"
    );
}

#[test]
fn import_of_the_fixture_directory_validates() {
    let dir = fixtures().join("config");
    let result =
        import_tb_gateway(&dir, Some(&fixtures().join("mosquitto.conf"))).expect("imports");
    let raw = load_str(&result.toml).unwrap_or_else(|e| panic!("{e}\n{}", result.toml));
    assert_eq!(raw.thingsboard.host, "tb.example.com");
    assert_eq!(raw.thingsboard.port, 1883);
    assert_eq!(
        raw.thingsboard.access_token.expose(),
        "GATEWAY_TOKEN_FIXTURE"
    );
    assert_eq!(raw.broker.listen, "0.0.0.0:1884");
    assert_eq!(raw.broker.username, None);
    assert_eq!(raw.store.max_age.as_secs(), 7 * 86_400);
    assert_eq!(raw.mappings.len(), 2, "both mqtt connectors, not modbus");
    let config = validate(raw).unwrap_or_else(|e| panic!("{e:?}\n{}", result.toml));

    // The imported mappings map the original message exactly as the built-in default.
    let mut set =
        MappingSet::from_config(&config.mappings, &config.local.device_type).expect("compiles");
    assert_eq!(
        map(&mut set, "v1/devices/me/telemetry", ORIGINAL_PAYLOAD),
        vec![builtin_default_record()]
    );

    let nc = result.not_carried.join("\n");
    for expect in [
        "Modbus Connector",
        "keep_alive",
        "remoteConfiguration",
        "statistics",
        "storage",
        "persistence",
        "grpc",
    ] {
        assert!(nc.contains(expect), "`{expect}` not listed in:\n{nc}");
    }
    assert!(result.toml.contains("#   - "), "the list heads the file");
}

#[test]
fn import_reports_what_cannot_be_carried() {
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        d.path().join("tb_gateway.json"),
        serde_json::to_string(&json!({
            "thingsboard": {"host": "tb", "port": 1883, "qos": 0,
                "security": {"type": "usernamePassword", "username": "u", "password": "p"}},
            "storage": {"type": "memory", "max_records_count": 100000},
            "connectors": [{"type": "mqtt", "name": "Custom", "configuration": "custom.json"}]
        }))
        .expect("json"),
    )
    .expect("write");
    std::fs::write(
        d.path().join("custom.json"),
        serde_json::to_string(&json!({"mapping": [{"topicFilter": "x",
            "converter": {"type": "custom", "extension": "MyConverter"}}]}))
        .expect("json"),
    )
    .expect("write");
    let conf = d.path().join("mosquitto.conf");
    std::fs::write(&conf, "listener 1884 127.0.0.1\nlistener 8883\nallow_anonymous false\npassword_file /etc/mosquitto/passwd\n").expect("write");

    let result = import_tb_gateway(d.path(), Some(&conf)).expect("imports");
    let nc = result.not_carried.join("\n");
    for expect in [
        "usernamePassword",
        "qos 0",
        "max_records_count",
        "MyConverter",
        "password_file",
        "listener 8883",
    ] {
        assert!(nc.contains(expect), "`{expect}` not listed in:\n{nc}");
    }
    let raw = load_str(&result.toml).unwrap_or_else(|e| panic!("{e}\n{}", result.toml));
    assert_eq!(raw.broker.listen, "127.0.0.1:1884");
    assert!(
        raw.mappings.is_empty(),
        "the unusable connector is commented out"
    );
    assert!(result.toml.contains("# tb_gateway_file"), "{}", result.toml);
    validate(raw).unwrap_or_else(|e| panic!("{e:?}"));
}
