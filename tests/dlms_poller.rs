//! The meter poller against the built-in simulator: records it emits (connect, units, the five
//! keys, health), reconnection after the meter goes away, backoff on an unreachable meter,
//! RPC commands through `MeterHandle`, and shutdown.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use dlms_bridge::config::{DlmsTransport, MeterConfig};
use dlms_bridge::dlms::apdu::{AttrRef, Data, MethodRef};
use dlms_bridge::dlms::obis::ObisCode;
use dlms_bridge::model::{Record, RecordKind};
use dlms_bridge::sim::{spawn_meters, SimOptions};
use dlms_bridge::sources::meters::{spawn_meter, CommandError};
use dlms_bridge::sources::SourceEvent;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bound on every wait for an event.
const WAIT: Duration = Duration::from_secs(30);

const KEYS: [&str; 5] = [
    "voltage_l1",
    "current_l1",
    "frequency",
    "active_power",
    "active_energy",
];

const RELAY: ObisCode = ObisCode::new(0, 0, 96, 3, 10, 255);

struct Sim {
    addr: SocketAddr,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Sim {
    async fn start(port: u16, transport: DlmsTransport) -> Sim {
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let opts = SimOptions {
            transport,
            ..SimOptions::default()
        };
        let addrs = spawn_meters(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            1,
            &opts,
            &tracker,
            cancel.clone(),
        )
        .await
        .expect("simulator starts");
        Sim {
            addr: addrs[0],
            tracker,
            cancel,
        }
    }

    /// Stop the meter: listener and every connection close.
    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        timeout(WAIT, self.tracker.wait()).await.expect("sim stops");
    }
}

fn meter_cfg(name: &str, addr: SocketAddr, transport: DlmsTransport) -> MeterConfig {
    MeterConfig {
        name: name.into(),
        host: addr.ip().to_string(),
        port: addr.port(),
        transport,
        physical_address: 17,
        interval: Duration::from_millis(100),
        timeout: Duration::from_secs(2),
        ..MeterConfig::default()
    }
}

struct Poller {
    rx: mpsc::Receiver<SourceEvent>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    handle: dlms_bridge::sources::meters::MeterHandle,
}

impl Poller {
    fn start(cfg: MeterConfig) -> Poller {
        let (tx, rx) = mpsc::channel(64);
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let handle = spawn_meter(cfg, tx, &tracker, cancel.clone());
        Poller {
            rx,
            tracker,
            cancel,
            handle,
        }
    }

    async fn next(&mut self) -> Vec<Record> {
        match timeout(WAIT, self.rx.recv()).await.expect("event in time") {
            Some(SourceEvent::Records(r)) => r,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Records until one satisfies `pred`; returns everything seen, that one last.
    async fn until(&mut self, mut pred: impl FnMut(&Record) -> bool) -> Vec<Record> {
        let mut seen = Vec::new();
        loop {
            for r in self.next().await {
                let hit = pred(&r);
                seen.push(r);
                if hit {
                    return seen;
                }
            }
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        timeout(WAIT, self.tracker.wait())
            .await
            .expect("poller stops");
    }
}

fn is_ok_telemetry(r: &Record) -> bool {
    r.kind == RecordKind::Telemetry && r.payload["values"]["poll_ok"] == Value::Bool(true)
}

fn is_failed_telemetry(r: &Record) -> bool {
    r.kind == RecordKind::Telemetry && r.payload["values"]["poll_ok"] == Value::Bool(false)
}

#[tokio::test]
async fn emits_connect_units_five_keys_and_health() {
    for transport in [DlmsTransport::Hdlc, DlmsTransport::Wrapper] {
        let sim = Sim::start(0, transport).await;
        let mut p = Poller::start(meter_cfg("Meter 1", sim.addr, transport));
        let first = p.next().await;
        let kinds: Vec<RecordKind> = first.iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [
                RecordKind::Connect,
                RecordKind::Attributes,
                RecordKind::Telemetry
            ]
        );
        for r in &first {
            assert_eq!(r.device, "Meter 1");
            assert_eq!(r.device_type, "DLMS Energy Meter");
        }
        let units = &first[1].payload;
        assert_eq!(units["unit_voltage_l1"], "V");
        assert_eq!(units["unit_current_l1"], "A");
        assert_eq!(units["unit_frequency"], "Hz");
        assert_eq!(units["unit_active_power"], "W");
        assert_eq!(units["unit_active_energy"], "Wh");
        let t = &first[2].payload;
        assert!(t["ts"].as_i64().is_some_and(|ts| ts > 1_600_000_000_000));
        let values = t["values"].as_object().expect("values");
        for k in KEYS {
            assert!(values[k].is_f64(), "{k}: {:?}", values[k]);
        }
        let v = values["voltage_l1"].as_f64().expect("voltage");
        assert!((200.0..=260.0).contains(&v), "voltage {v}");
        let f = values["frequency"].as_f64().expect("frequency");
        assert!((49.0..=51.0).contains(&f), "frequency {f}");
        assert_eq!(values["poll_ok"], true);
        assert_eq!(values["consecutive_failures"], 0);
        assert!(values.get("last_error").is_none());

        // Later polls: telemetry only (no repeated connect or units on the same association).
        let second = p.next().await;
        assert_eq!(second.len(), 1);
        assert!(is_ok_telemetry(&second[0]));
        p.stop().await;
        sim.stop().await;
    }
}

#[tokio::test]
async fn reconnects_after_the_meter_goes_away() {
    let sim = Sim::start(0, DlmsTransport::Hdlc).await;
    let addr = sim.addr;
    let mut p = Poller::start(meter_cfg("m", addr, DlmsTransport::Hdlc));
    p.until(is_ok_telemetry).await;

    sim.stop().await;
    let seen = p.until(|r| r.kind == RecordKind::Disconnect).await;
    let failures: Vec<&Record> = seen.iter().filter(|r| is_failed_telemetry(r)).collect();
    assert!(failures.len() >= 3, "{seen:?}");
    let last = &failures[failures.len() - 1].payload["values"];
    assert_eq!(last["consecutive_failures"], 3);
    assert!(
        last["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{last}"
    );

    // The meter comes back on the same address: a new association, Connect, units again.
    let sim = Sim::start(addr.port(), DlmsTransport::Hdlc).await;
    let seen = p.until(is_ok_telemetry).await;
    let n = seen.len();
    assert_eq!(seen[n - 2].kind, RecordKind::Attributes, "{seen:?}");
    assert_eq!(seen[n - 3].kind, RecordKind::Connect, "{seen:?}");
    assert_eq!(seen[n - 1].payload["values"]["consecutive_failures"], 0);
    p.stop().await;
    sim.stop().await;
}

#[tokio::test]
async fn unreachable_meter_reports_health_goes_down_and_backs_off() {
    // A port nobody listens on.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let mut p = Poller::start(meter_cfg("down", addr, DlmsTransport::Wrapper));
    let mut seen = Vec::new();
    let mut at = Vec::new();
    while !seen.contains(&RecordKind::Disconnect) {
        for r in p.next().await {
            seen.push(r.kind);
            if r.kind == RecordKind::Telemetry {
                assert!(is_failed_telemetry(&r), "{r:?}");
                assert_eq!(
                    r.payload["values"]["consecutive_failures"],
                    at.len() as u64 + 1
                );
                at.push(Instant::now());
            }
        }
    }
    // The device appears with its health, then is reported down.
    use RecordKind::*;
    assert_eq!(seen, [Connect, Telemetry, Telemetry, Telemetry, Disconnect]);
    // First retry on the next tick, the next after a jittered 1 s step (>= 0.5 s). Lower
    // bounds only: a slow box can stretch a wait, never shorten it.
    assert!(at[2] - at[1] >= Duration::from_millis(500), "{at:?}");
    assert!(at[2] - at[1] > at[1] - at[0], "{at:?}");
    // Down: silent (records would re-announce the device) while probing with backoff.
    assert!(
        timeout(Duration::from_millis(1500), p.rx.recv())
            .await
            .is_err(),
        "records while down"
    );
    p.stop().await;
}

#[tokio::test]
async fn rpc_commands_run_on_the_poll_association() {
    let sim = Sim::start(0, DlmsTransport::Wrapper).await;
    let mut p = Poller::start(meter_cfg("rpc", sim.addr, DlmsTransport::Wrapper));
    p.until(is_ok_telemetry).await;
    let relay = AttrRef::new(1, RELAY, 2);
    let h = p.handle.clone();
    assert_eq!(h.name(), "rpc");
    assert_eq!(
        timeout(WAIT, h.get(relay)).await.expect("in time"),
        Ok(Data::Bool(true))
    );
    timeout(WAIT, h.set(relay, Data::Bool(false)))
        .await
        .expect("in time")
        .expect("set");
    assert_eq!(
        timeout(WAIT, h.get(relay)).await.expect("in time"),
        Ok(Data::Bool(false))
    );
    let none = timeout(
        WAIT,
        h.action(
            MethodRef {
                class_id: 1,
                obis: RELAY,
                method: 1,
            },
            Some(Data::I8(0)),
        ),
    )
    .await
    .expect("in time")
    .expect("action");
    assert_eq!(none, None);
    let missing = timeout(
        WAIT,
        h.get(AttrRef::new(3, ObisCode::new(1, 0, 99, 99, 0, 255), 2)),
    )
    .await
    .expect("in time");
    assert!(
        matches!(missing, Err(CommandError::Refused(_))),
        "{missing:?}"
    );
    // Polls go on after the commands.
    p.until(is_ok_telemetry).await;
    p.stop().await;
    // After the actor stopped, the handle says so instead of hanging.
    assert_eq!(
        timeout(WAIT, h.get(relay)).await.expect("in time"),
        Err(CommandError::Stopped)
    );
    sim.stop().await;
}

#[tokio::test]
async fn clock_drift_is_reported_and_sync_clock_needs_rpc_write() {
    let sim = Sim::start(0, DlmsTransport::Hdlc).await;
    // Default: writes disabled.
    let mut p = Poller::start(meter_cfg("clock", sim.addr, DlmsTransport::Hdlc));
    let first = p.until(is_ok_telemetry).await;
    let values = &first
        .iter()
        .find(|r| is_ok_telemetry(r))
        .expect("ok telemetry")
        .payload["values"];
    let drift = values["clock_drift_s"]
        .as_f64()
        .expect("drift on the first poll");
    assert!(
        drift.abs() < 5.0,
        "simulator follows the host clock: {drift}"
    );
    let h = p.handle.clone();
    let r = timeout(WAIT, h.sync_clock()).await.expect("in time");
    assert_eq!(r, Err(CommandError::WritesDisabled));
    let rpc = dlms_bridge::downlink::meter_rpc(
        &h,
        &dlms_bridge::model::RpcRequest {
            device: "clock".into(),
            id: 1,
            method: "sync_clock".into(),
            params: Value::Null,
        },
    )
    .await;
    assert!(
        rpc["error"]
            .as_str()
            .is_some_and(|e| e.contains("rpc_write")),
        "{rpc}"
    );
    p.stop().await;
    // Enabled: the clock is written on the poll association.
    let mut cfg = meter_cfg("clock", sim.addr, DlmsTransport::Hdlc);
    cfg.rpc_write = dlms_bridge::config::RpcWrite::All(true);
    let mut p = Poller::start(cfg);
    p.until(is_ok_telemetry).await;
    let drift = timeout(WAIT, p.handle.sync_clock())
        .await
        .expect("in time")
        .expect("clock set");
    assert!(drift.abs() < 5.0, "{drift}");
    p.until(is_ok_telemetry).await;
    p.stop().await;
    sim.stop().await;
}
