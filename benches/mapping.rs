//! Throughput of the mapping engine on one core: local publishes → ThingsBoard records.
//! `cargo bench --bench mapping` prints mapped messages per second for each rule set.
//! No criterion (not vendored here): a warm-up, then a fixed wall-clock run per case.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dlms_bridge::config::{load_str, DEFAULT_DEVICE_TYPE};
use dlms_bridge::router::mapping::MappingSet;
use dlms_bridge::sources::LocalPublish;

/// How long each case runs after its warm-up.
const RUN_FOR: Duration = Duration::from_secs(2);
/// Distinct devices the messages rotate through.
const DEVICES: usize = 1000;

fn messages(topic: impl Fn(usize) -> String) -> Vec<LocalPublish> {
    (0..DEVICES)
        .map(|i| LocalPublish {
            client_id: format!("c{i}"),
            username: None,
            topic: topic(i),
            payload: Bytes::from(format!(
                r#"{{"deviceName":"Meter {i}","voltage_l1":{:.1},"current_l1":{:.2},"frequency":50.01,"active_power":{},"active_energy":{}.5}}"#,
                230.0 + (i % 7) as f64 * 0.1,
                1.0 + (i % 13) as f64 * 0.01,
                300 + i,
                100_000 + i
            )),
            received_ms: 1_700_000_000_000 + i as i64,
            ack: None,
        })
        .collect()
}

fn run(name: &str, set: &mut MappingSet, msgs: &[LocalPublish]) {
    let mut records = 0usize;
    for m in msgs.iter().take(200) {
        black_box(set.map(m));
    }
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < RUN_FOR {
        for m in msgs {
            match set.map(m) {
                Some(Ok(r)) => records += r.len(),
                other => panic!("{name}: message not mapped: {other:?}"),
            }
        }
        n += msgs.len();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name:<48} {:>10.0} msgs/s  ({n} messages, {records} records, {secs:.2}s)",
        n as f64 / secs
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it, and a
    // benchmark has no place in the test run.
    if !std::env::args().any(|a| a == "--bench") {
        println!("mapping benchmark: run it with `cargo bench --bench mapping`");
        return;
    }
    let native = load_str(
        r#"
        [[mappings]]
        topic_filter = "sensors/+/telemetry"
        device_name_json = "${deviceName}"
        timeseries = ["*"]
        "#,
    )
    .expect("bench config parses");
    let mut set = MappingSet::from_config(&native.mappings, DEFAULT_DEVICE_TYPE).expect("compiles");
    run(
        "native sensors/+/telemetry, timeseries [\"*\"]",
        &mut set,
        &messages(|i| format!("sensors/s{i}/telemetry")),
    );

    let original = serde_json::json!({"mapping": [{
        "topicFilter": "v1/devices/me/telemetry",
        "converter": {"type": "json", "deviceNameJsonExpression": "${deviceName}",
            "deviceTypeJsonExpression": "DLMS Energy Meter",
            "timeseries": [
                {"type": "double", "key": "voltage_l1", "value": "${voltage_l1}"},
                {"type": "double", "key": "current_l1", "value": "${current_l1}"},
                {"type": "double", "key": "frequency", "value": "${frequency}"},
                {"type": "double", "key": "active_power", "value": "${active_power}"},
                {"type": "double", "key": "active_energy", "value": "${active_energy}"}]}}]});
    let mut set = MappingSet::from_connector_json(&original, "original").expect("compiles");
    run(
        "tb-gateway old format, 5 double timeseries",
        &mut set,
        &messages(|_| "v1/devices/me/telemetry".to_string()),
    );

    let on_change = load_str(
        r#"
        [[mappings]]
        topic_filter = "sensors/+/telemetry"
        device_name_json = "${deviceName}"
        timeseries = ["*"]
        report_strategy = { type = "ON_CHANGE" }
        "#,
    )
    .expect("bench config parses");
    let mut set =
        MappingSet::from_config(&on_change.mappings, DEFAULT_DEVICE_TYPE).expect("compiles");
    run(
        "native, reportStrategy ON_CHANGE (state lookups)",
        &mut set,
        &messages(|i| format!("sensors/s{i}/telemetry")),
    );
}
