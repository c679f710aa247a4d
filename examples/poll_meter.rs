//! Polls one meter with the bridge's meter actor for a fixed time and prints one JSON line:
//! polls that delivered readings, failed polls, and the meter's health counters. Used by
//! `bench/dlms_faults.py` to compare our poller with Gurux's client on a faulty meter.
//!
//! `cargo run --release --example poll_meter -- HOST PORT INTERVAL_MS TIMEOUT_MS SECONDS [wrapper]`

use std::time::Duration;

use dlms_bridge::config::{DlmsTransport, MeterConfig};
use dlms_bridge::model::RecordKind;
use dlms_bridge::sources::meters::spawn_meter;
use dlms_bridge::sources::SourceEvent;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 5,
        "usage: poll_meter HOST PORT INTERVAL_MS TIMEOUT_MS SECONDS [wrapper]"
    );
    let ms = |i: usize| -> anyhow::Result<Duration> { Ok(Duration::from_millis(args[i].parse()?)) };
    let cfg = MeterConfig {
        name: "bench".into(),
        host: args[0].clone(),
        port: args[1].parse()?,
        interval: ms(2)?,
        timeout: ms(3)?,
        transport: if args.get(5).map(String::as_str) == Some("wrapper") {
            DlmsTransport::Wrapper
        } else {
            DlmsTransport::Hdlc
        },
        ..MeterConfig::default()
    };
    let run_for = Duration::from_secs(args[4].parse()?);
    let (tx, mut rx) = mpsc::channel(64);
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let _h = spawn_meter(cfg, tx, &tracker, cancel.clone());
    let (mut good, mut failed) = (0u64, 0u64);
    let mut last = Value::Null;
    let deadline = tokio::time::Instant::now() + run_for;
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = tokio::time::sleep_until(deadline) => break,
        };
        let Some(SourceEvent::Records(records)) = ev else {
            continue;
        };
        for r in records
            .into_iter()
            .filter(|r| r.kind == RecordKind::Telemetry)
        {
            let values = r.payload["values"].clone();
            if values["poll_ok"] == Value::Bool(true) {
                good += 1;
            } else {
                failed += 1;
            }
            last = values;
        }
    }
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    println!(
        "{}",
        json!({
            "client": "dlms-bridge",
            "good": good,
            "failed": failed,
            "link_retries_total": last["link_retries_total"],
            "poll_overruns_total": last["poll_overruns_total"],
            "reassociations_total": last["reassociations_total"],
        })
    );
    Ok(())
}
