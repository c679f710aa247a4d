//! Interop of our DLMS client and meter poller with an independent implementation: the Gurux
//! meter simulator in `shared/meter-sim` (a Python child process per test on a free
//! loopback port). Covers HDLC and wrapper, no auth and LLS, 1/2/4-byte server addresses,
//! segmentation and block transfer, GET-with-list split over several requests, every fault mode
//! with the poller recovering, and a faulty meter not disturbing a healthy one.

mod common;

use std::time::{Duration, Instant};

use dlms_bridge::config::{DlmsAuth, DlmsTransport, MeterConfig, Secret};
use dlms_bridge::dlms::apdu::{AttrRef, Data, DataAccessResult};
use dlms_bridge::dlms::obis::ObisCode;
use dlms_bridge::model::RecordKind;
use dlms_bridge::sources::meters::client::{ReadingValue, Register};
use dlms_bridge::sources::meters::poller::{self, registers_of};
use dlms_bridge::sources::meters::{spawn_meter, spawn_meter_with};
use dlms_bridge::sources::SourceEvent;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bound on one whole scenario step (python start-up on a busy 2-core box is slow).
const STEP: Duration = Duration::from_secs(60);

use common::meter_sim::GuruxMeter as Sim;

fn meter(name: &str, port: u16, transport: DlmsTransport) -> MeterConfig {
    MeterConfig {
        name: name.into(),
        host: "127.0.0.1".into(),
        port,
        transport,
        client_address: 16,
        logical_address: 1,
        physical_address: 17,
        address_size: 1,
        interval: Duration::from_millis(300),
        timeout: Duration::from_secs(2),
        ..MeterConfig::default()
    }
}

/// What the sim's meter #`index` starts from: its mean current (A) and initial energy (Wh),
/// computed with the sim's own seeded generator.
fn sim_state(index: u32) -> (f64, f64) {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import math, random\nr = random.Random(1000 + {index})\nr.uniform(0, 2 * math.pi)\n\
             print(r.uniform(3.0, 12.0), 1_000_000.0 + r.uniform(0, 5_000_000))"
        ))
        .output()
        .expect("python3");
    let s = String::from_utf8(out.stdout).expect("utf8");
    let v: Vec<f64> = s
        .split_whitespace()
        .map(|x| x.parse().expect("float"))
        .collect();
    (v[0], v[1])
}

fn decimals_at_most(v: f64, digits: i32) -> bool {
    let scaled = v * 10f64.powi(digits);
    (scaled - scaled.round()).abs() < 1e-6
}

/// Check the five default keys against what meter #0 of the sim serves, scaled.
fn check_values(values: &Map<String, Value>, energy_scaler: i32) {
    let (i_mean, energy0) = sim_state(0);
    let get = |k: &str| {
        values
            .get(k)
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("{k} missing or not a number in {values:?}"))
    };
    let v = get("voltage_l1");
    assert!(
        (225.0..=235.0).contains(&v) && decimals_at_most(v, 2),
        "voltage {v}"
    );
    let i = get("current_l1");
    assert!(
        (i - i_mean).abs() <= 2.6 && decimals_at_most(i, 3),
        "current {i} (mean {i_mean})"
    );
    let f = get("frequency");
    assert!(
        (49.9..=50.1).contains(&f) && decimals_at_most(f, 2),
        "frequency {f}"
    );
    let p = get("active_power");
    assert!(decimals_at_most(p, 0), "power {p}");
    let expect_p = v * i * 0.95;
    assert!(
        (p - expect_p).abs() <= expect_p * 0.1 + 5.0,
        "power {p} vs V*I*0.95 {expect_p}"
    );
    let e = get("active_energy");
    // Served as int(Wh // 10^s) with scaler s, so scaled back it is a multiple of 10^s.
    let step = 10f64.powi(energy_scaler);
    assert!(
        (e / step - (e / step).round()).abs() < 1e-6,
        "energy {e} not a multiple of {step}"
    );
    assert!(
        e >= energy0 - step && e <= energy0 + 600.0,
        "energy {e} vs initial {energy0}"
    );
}

/// Read the default registers once through `poller::connect` and the client.
async fn read_once(cfg: &MeterConfig, pdu: u16) -> Map<String, Value> {
    let mut c = timeout(STEP, poller::connect(cfg, pdu))
        .await
        .expect("connect in time")
        .unwrap_or_else(|e| panic!("connect: {}", poller::error_chain(&e)));
    let regs = registers_of(cfg);
    let mut out = Map::new();
    for _ in 0..2 {
        // Twice: the second read uses the cached scalers on the same association.
        let readings = timeout(STEP, c.read_registers(&regs))
            .await
            .expect("read in time")
            .expect("read");
        for r in readings {
            let r = r.expect("register readable");
            let unit = r.unit.expect("unit");
            let want_unit = match r.key.as_str() {
                "voltage_l1" => "V",
                "current_l1" => "A",
                "frequency" => "Hz",
                "active_power" => "W",
                _ => "Wh",
            };
            assert_eq!(unit, want_unit, "{}", r.key);
            match r.value {
                ReadingValue::Number(v) => out.insert(r.key, v.into()),
                other => panic!("{other:?}"),
            };
        }
    }
    timeout(STEP, c.release())
        .await
        .expect("release in time")
        .expect("release");
    out
}

#[tokio::test]
async fn hdlc_no_auth_one_byte_address() {
    let sim = Sim::start(&["--transport", "hdlc"]).await;
    let cfg = meter("m", sim.port, DlmsTransport::Hdlc);
    check_values(&read_once(&cfg, 1024).await, 0);
}

#[tokio::test]
async fn hdlc_two_and_four_byte_addresses() {
    for (size, server) in [(2u8, "1/17"), (4u8, "291/1234")] {
        let sim = Sim::start(&["--transport", "hdlc", "--server-address", server]).await;
        let mut cfg = meter("m", sim.port, DlmsTransport::Hdlc);
        cfg.address_size = size;
        let (l, p) = server.split_once('/').expect("pair");
        cfg.logical_address = l.parse().expect("logical");
        cfg.physical_address = p.parse().expect("physical");
        check_values(&read_once(&cfg, 1024).await, 0);
    }
}

#[tokio::test]
async fn wrapper_no_auth_and_energy_scaler() {
    let sim = Sim::start(&["--transport", "wrapper", "--energy-scaler", "2"]).await;
    let cfg = meter("m", sim.port, DlmsTransport::Wrapper);
    check_values(&read_once(&cfg, 1024).await, 2);
}

#[tokio::test]
async fn lls_hdlc_and_wrapper_and_wrong_password() {
    for transport in [DlmsTransport::Hdlc, DlmsTransport::Wrapper] {
        let t = if transport == DlmsTransport::Hdlc {
            "hdlc"
        } else {
            "wrapper"
        };
        let sim = Sim::start(&[
            "--transport",
            t,
            "--auth",
            "low",
            "--password",
            "12345678",
            "--no-public",
        ])
        .await;
        let mut cfg = meter("m", sim.port, transport);
        cfg.client_address = 17;
        cfg.auth = DlmsAuth::Lls;
        cfg.password = Some(Secret::new("12345678"));
        // Gurux answers LLS with an AARE that names no mechanism: it must still associate.
        check_values(&read_once(&cfg, 1024).await, 0);

        cfg.password = Some(Secret::new("Xy9-not-it"));
        let err = match timeout(STEP, poller::connect(&cfg, 1024))
            .await
            .expect("in time")
        {
            Ok(_) => panic!("wrong password accepted"),
            Err(e) => poller::error_chain(&e),
        };
        assert!(err.contains("association rejected"), "{err}");
        assert!(!err.contains("Xy9-not-it"), "password leaked into {err}");
    }
}

#[tokio::test]
async fn small_frames_small_pdu_block_transfer_and_split_list() {
    let sim = Sim::start(&[
        "--transport",
        "hdlc",
        "--max-info",
        "32",
        "--pdu-size",
        "100",
    ])
    .await;
    let cfg = meter("m", sim.port, DlmsTransport::Hdlc);
    // Our PDU of 100 makes the meter answer the 10-attribute list in blocks; its PDU of 100
    // makes us split the list into two requests; 32-byte frames segment both directions.
    check_values(&read_once(&cfg, 100).await, 0);

    let mut c = poller::connect(&cfg, 100).await.expect("connect");
    assert_eq!(c.association().expect("assoc").server_max_receive_pdu, 100);
    // 15 attributes: every register's value and scaler_unit, the device name and the clock.
    let regs = registers_of(&cfg);
    let mut attrs: Vec<AttrRef> = regs.iter().map(|r| r.attr).collect();
    attrs.extend(regs.iter().map(|r| AttrRef {
        attribute: 3,
        ..r.attr
    }));
    attrs.push(AttrRef::new(1, ObisCode::new(0, 0, 42, 0, 0, 255), 2));
    attrs.push(AttrRef::new(8, ObisCode::new(0, 0, 1, 0, 0, 255), 2));
    // Gurux 1.0.203 mis-encodes a failed entry inside a with-list answer; the client falls back
    // to single GETs for that request and still reports a per-attribute error.
    attrs.push(AttrRef::new(3, ObisCode::new(1, 0, 99, 99, 0, 255), 2));
    let results = timeout(STEP, c.get(&attrs))
        .await
        .expect("in time")
        .expect("get");
    assert_eq!(results.len(), attrs.len());
    assert!(
        matches!(results[0], Ok(Data::U16(21_000..=24_000))),
        "{:?}",
        results[0]
    );
    assert_eq!(
        results[5],
        Ok(Data::Structure(vec![Data::I8(-2), Data::Enum(35)]))
    );
    assert_eq!(
        results[10],
        Ok(Data::OctetString(b"MSE0000012345678".to_vec()))
    );
    match &results[11] {
        Ok(Data::OctetString(b)) if b.len() == 12 => {}
        other => panic!("clock {other:?}"),
    }
    assert_eq!(results[12], Err(DataAccessResult::ObjectUndefined));
    // Asked alone: a per-attribute error, the association stays usable.
    let missing = AttrRef::new(3, ObisCode::new(1, 0, 99, 99, 0, 255), 2);
    let r = timeout(STEP, c.get_one(&missing))
        .await
        .expect("in time")
        .expect("get");
    assert_eq!(r, Err(DataAccessResult::ObjectUndefined));
    // A single long value through normal GET with block transfer too.
    let name = timeout(STEP, c.get_one(&attrs[10]))
        .await
        .expect("in time")
        .expect("get");
    assert_eq!(name, Ok(Data::OctetString(b"MSE0000012345678".to_vec())));
    let _ = c.release().await;
}

/// Collect telemetry of `device` until `want_ok` good polls arrived (bounded by `STEP`).
/// Returns (good polls, failed polls, kinds seen).
async fn collect(
    rx: &mut mpsc::Receiver<SourceEvent>,
    device: &str,
    want_ok: usize,
) -> (Vec<Map<String, Value>>, usize, Vec<RecordKind>) {
    let mut ok = Vec::new();
    let mut failed = 0;
    let mut kinds = Vec::new();
    let deadline = Instant::now() + STEP;
    while ok.len() < want_ok {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = timeout(left, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{device}: {} good polls, {failed} failed", ok.len()))
            .expect("events channel open");
        let SourceEvent::Records(records) = ev else {
            continue;
        };
        for r in records {
            if r.device != device {
                continue;
            }
            kinds.push(r.kind);
            if r.kind != RecordKind::Telemetry {
                continue;
            }
            let values = r.payload["values"].as_object().expect("values").clone();
            if values["poll_ok"] == Value::Bool(true) {
                ok.push(values);
            } else {
                assert!(values["last_error"].is_string(), "{values:?}");
                failed += 1;
            }
        }
    }
    (ok, failed, kinds)
}

/// `check`: compare values with the sim. Off for wrapper + corruption: the wrapper has no
/// checksum, so a flipped byte inside a value is indistinguishable from a real reading.
async fn poller_recovers(
    fault: &[&str],
    transport: DlmsTransport,
    expect_failures: bool,
    check: bool,
) {
    let t = if transport == DlmsTransport::Hdlc {
        "hdlc"
    } else {
        "wrapper"
    };
    let mut args = vec!["--transport", t];
    args.extend_from_slice(fault);
    let sim = Sim::start(&args).await;
    let mut cfg = meter("faulty", sim.port, transport);
    cfg.timeout = Duration::from_millis(800);
    cfg.interval = Duration::from_millis(200);
    let (tx, mut rx) = mpsc::channel(64);
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let _h = spawn_meter(cfg, tx, &tracker, cancel.clone());
    let (ok, failed, kinds) = collect(&mut rx, "faulty", 12).await;
    assert_eq!(kinds.first(), Some(&RecordKind::Connect), "{kinds:?}");
    for v in ok.iter().filter(|_| check) {
        check_values(v, 0);
    }
    if expect_failures {
        // Requests 1..=N include the association; in 12 polls the fault fired at least once,
        // and each time the poller came back (it reached 12 good polls).
        eprintln!("{fault:?}: {failed} failed polls");
    } else {
        assert_eq!(failed, 0, "{fault:?}");
    }
    cancel.cancel();
    tracker.close();
    timeout(STEP, tracker.wait()).await.expect("poller stops");
}

#[tokio::test]
async fn poller_recovers_from_delay() {
    poller_recovers(&["--delay-ms", "50"], DlmsTransport::Hdlc, false, true).await;
}

#[tokio::test]
async fn poller_recovers_from_dropped_connections() {
    poller_recovers(&["--drop-every", "5"], DlmsTransport::Hdlc, true, true).await;
    poller_recovers(&["--drop-every", "5"], DlmsTransport::Wrapper, true, true).await;
}

#[tokio::test]
async fn poller_recovers_from_swallowed_requests() {
    poller_recovers(&["--no-reply-every", "6"], DlmsTransport::Hdlc, true, true).await;
    poller_recovers(
        &["--no-reply-every", "6"],
        DlmsTransport::Wrapper,
        true,
        true,
    )
    .await;
}

#[tokio::test]
async fn poller_recovers_from_corrupted_replies() {
    poller_recovers(&["--corrupt-every", "5"], DlmsTransport::Hdlc, true, true).await;
    poller_recovers(
        &["--corrupt-every", "5"],
        DlmsTransport::Wrapper,
        true,
        false,
    )
    .await;
}

#[tokio::test]
async fn faulty_meter_does_not_disturb_a_healthy_one() {
    let good = Sim::start(&["--transport", "hdlc"]).await;
    let bad = Sim::start(&[
        "--transport",
        "hdlc",
        "--no-reply-every",
        "2",
        "--delay-ms",
        "100",
    ])
    .await;
    let (tx, mut rx) = mpsc::channel(256);
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let mut good_cfg = meter("good", good.port, DlmsTransport::Hdlc);
    good_cfg.interval = Duration::from_millis(250);
    let mut bad_cfg = meter("bad", bad.port, DlmsTransport::Hdlc);
    bad_cfg.timeout = Duration::from_millis(500);
    bad_cfg.interval = Duration::from_millis(250);
    let _g = spawn_meter(good_cfg, tx.clone(), &tracker, cancel.clone());
    let _b = spawn_meter_with(bad_cfg, tx, &tracker, cancel.clone(), 1024);

    let started = Instant::now();
    let mut good_ts = Vec::new();
    let mut bad_failed = 0;
    let deadline = started + STEP;
    while good_ts.len() < 16 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(SourceEvent::Records(records)) =
            timeout(left, rx.recv()).await.expect("events in time")
        else {
            continue;
        };
        for r in records
            .into_iter()
            .filter(|r| r.kind == RecordKind::Telemetry)
        {
            let ok = r.payload["values"]["poll_ok"] == Value::Bool(true);
            match r.device.as_str() {
                "good" => {
                    assert!(ok, "good meter failed: {}", r.payload);
                    good_ts.push(r.payload["ts"].as_i64().expect("ts"));
                }
                _ if !ok => bad_failed += 1,
                _ => {}
            }
        }
    }
    assert!(bad_failed > 0, "the faulty meter never failed");
    // On schedule: 16 polls at 250 ms span ~3.75 s; gaps stay near the interval (generous
    // bounds for a loaded CI box, but a meter blocked behind 500 ms timeouts would exceed them).
    let gaps: Vec<i64> = good_ts.windows(2).map(|w| w[1] - w[0]).collect();
    let max_gap = *gaps.iter().max().expect("gaps");
    assert!(max_gap < 750, "good meter stalled: gaps {gaps:?}");
    cancel.cancel();
    tracker.close();
    timeout(STEP, tracker.wait()).await.expect("pollers stop");
}

#[tokio::test]
async fn meter_handle_get_queues_behind_polls() {
    let sim = Sim::start(&["--transport", "wrapper"]).await;
    let cfg = meter("rpc", sim.port, DlmsTransport::Wrapper);
    let (tx, mut rx) = mpsc::channel(64);
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let h = spawn_meter(cfg, tx, &tracker, cancel.clone());
    let _ = collect(&mut rx, "rpc", 1).await;
    let name = timeout(
        STEP,
        h.get(AttrRef::new(1, ObisCode::new(0, 0, 42, 0, 0, 255), 2)),
    )
    .await
    .expect("in time")
    .expect("get");
    assert_eq!(name, Data::OctetString(b"MSE0000012345678".to_vec()));
    let scaler = timeout(
        STEP,
        h.get(AttrRef::new(3, ObisCode::new(1, 0, 32, 7, 0, 255), 3)),
    )
    .await
    .expect("in time")
    .expect("get");
    assert_eq!(scaler, Data::Structure(vec![Data::I8(-2), Data::Enum(35)]));
    // Polls continue after the RPCs on the same association.
    let (ok, _, _) = collect(&mut rx, "rpc", 2).await;
    assert_eq!(ok.len(), 2);
    drop(rx);
    cancel.cancel();
    tracker.close();
    timeout(STEP, tracker.wait()).await.expect("poller stops");
    let _unused: Option<Register> = None;
}

#[tokio::test]
async fn read_cli_answers_and_fails_clearly() {
    use dlms_bridge::sources::meters::cli::{read, ReadArgs, Transport};
    let sim = Sim::start(&[
        "--transport",
        "wrapper",
        "--auth",
        "low",
        "--password",
        "12345678",
    ])
    .await;
    let args = ReadArgs {
        host: "127.0.0.1".into(),
        port: sim.port,
        transport: Transport::Wrapper,
        obis: vec![],
        client_address: 17,
        logical_address: 1,
        physical_address: 17,
        address_size: 1,
        password: Some("12345678".into()),
        timeout: Duration::from_secs(5),
        retries: 3,
        profile: None,
        from: None,
        to: None,
        security: Default::default(),
    };
    timeout(STEP, read(args.clone()))
        .await
        .expect("in time")
        .expect("default registers");
    let with_clock = ReadArgs {
        obis: vec![
            "1-0:1.8.0*255".into(),
            "8/0.0.1.0.0.255/2".into(),
            "1/0.0.42.0.0.255/2".into(),
        ],
        ..args.clone()
    };
    timeout(STEP, read(with_clock))
        .await
        .expect("in time")
        .expect("explicit registers");
    let unknown = ReadArgs {
        obis: vec!["1.0.99.99.0.255".into()],
        ..args.clone()
    };
    let e = timeout(STEP, read(unknown))
        .await
        .expect("in time")
        .expect_err("an unreadable register fails the exit code");
    assert!(e.to_string().contains("1 of 1 registers"), "{e}");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let e = timeout(
        STEP,
        read(ReadArgs {
            port: closed,
            ..args
        }),
    )
    .await
    .expect("in time")
    .expect_err("nothing listens");
    assert!(
        poller::error_chain(&e).contains("cannot reach the meter"),
        "{}",
        poller::error_chain(&e)
    );
}

/// Link recovery inside the association: under each fault mode of the Gurux meter, every poll
/// delivers (no failed poll at all), and the recovery shows in the meter's health telemetry.
/// `same_association`: the faults are recovered without opening a new association.
async fn every_poll_delivers(fault: &[&str], transport: DlmsTransport, same_association: bool) {
    let t = if transport == DlmsTransport::Hdlc {
        "hdlc"
    } else {
        "wrapper"
    };
    let mut args = vec!["--transport", t];
    args.extend_from_slice(fault);
    let sim = Sim::start(&args).await;
    let mut cfg = meter("noisy", sim.port, transport);
    // Generous against a busy CI box: the timeout only matters when a reply is swallowed.
    cfg.timeout = Duration::from_millis(700);
    cfg.interval = Duration::from_millis(300);
    let (tx, mut rx) = mpsc::channel(64);
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let _h = spawn_meter(cfg, tx, &tracker, cancel.clone());
    let (ok, failed, _) = collect(&mut rx, "noisy", 12).await;
    assert_eq!(failed, 0, "{fault:?}: a poll failed");
    for v in &ok {
        check_values(v, 0);
        for k in [
            "link_retries",
            "link_retries_total",
            "poll_overruns_total",
            "reassociations_total",
        ] {
            assert!(v[k].is_u64(), "{k} missing in {v:?}");
        }
    }
    let last = ok.last().expect("12 polls");
    let retries = last["link_retries_total"].as_u64().expect("u64");
    let reassociations = last["reassociations_total"].as_u64().expect("u64");
    if same_association {
        assert!(retries >= 3, "{fault:?}: {retries} retries in 12 polls");
        assert_eq!(reassociations, 0, "{fault:?}: association was given up");
        let per_poll: u64 = ok
            .iter()
            .map(|v| v["link_retries"].as_u64().expect("u64"))
            .sum();
        assert!(per_poll >= 3, "{fault:?}: per-poll retries {per_poll}");
    } else {
        assert!(reassociations >= 1, "{fault:?}: never re-associated");
    }
    cancel.cancel();
    tracker.close();
    timeout(STEP, tracker.wait()).await.expect("poller stops");
}

#[tokio::test]
async fn recovery_corrupt_every_3_hdlc() {
    every_poll_delivers(&["--corrupt-every", "3"], DlmsTransport::Hdlc, true).await;
}

#[tokio::test]
async fn recovery_no_reply_every_4_hdlc_and_wrapper() {
    every_poll_delivers(&["--no-reply-every", "4"], DlmsTransport::Hdlc, true).await;
    every_poll_delivers(&["--no-reply-every", "4"], DlmsTransport::Wrapper, true).await;
}

#[tokio::test]
async fn recovery_drop_every_5_reassociates_at_once() {
    every_poll_delivers(&["--drop-every", "5"], DlmsTransport::Hdlc, false).await;
    every_poll_delivers(&["--drop-every", "5"], DlmsTransport::Wrapper, false).await;
}
