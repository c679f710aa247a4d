//! Profile generic (load profile) reading against the independent Gurux meter
//! (`shared/meter-sim --profile-rows N --profile-period S`, entries a function of time:
//! energy = entry time // period): range access with block transfer over thousands of entries,
//! entry access, the read position persisted so that a restart sends nothing twice, and catch-up
//! of the intervals missed while the meter was unreachable.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::meter_run::MeterRun;
use common::meter_sim::{free_port, GuruxMeter as Sim};
use dlms_bridge::config::{MeterConfig, ProfileConfig};
use dlms_bridge::dlms::obis::ObisCode;
use dlms_bridge::model::{now_ms, Record, RecordKind};
use dlms_bridge::sources::meters::cli::{read, Error as ReadError, ReadArgs, Transport};
use dlms_bridge::sources::meters::poller::connect;
use dlms_bridge::sources::meters::profile::{self, ProfileReader};
use serde_json::Value;
use tokio::time::timeout;

/// Bound on one scenario step (Gurux serialising thousands of rows on a busy box is slow).
const STEP: Duration = Duration::from_secs(120);

const LOAD_PROFILE: ObisCode = ObisCode::new(1, 0, 99, 1, 0, 255);

fn meter(port: u16, state_dir: &Path, period_s: u64) -> MeterConfig {
    MeterConfig {
        name: "Profile Meter".into(),
        host: "127.0.0.1".into(),
        port,
        interval: Duration::from_millis(300),
        timeout: Duration::from_secs(5),
        profiles: vec![ProfileConfig {
            obis: LOAD_PROFILE.to_string(),
            interval: Duration::from_secs(period_s),
            columns: vec![],
        }],
        state_dir: Some(state_dir.to_path_buf()),
        ..MeterConfig::default()
    }
}

/// What the sim stores for the entry at `ts_ms`.
fn energy_at(ts_ms: i64, period_s: i64) -> f64 {
    ((ts_ms / 1000 / period_s) % 100_000_000) as f64
}

/// Check profile entries: on the period grid, values as the sim computes them, strictly
/// increasing times (so none twice).
fn check_entries(entries: &[(i64, Value)], period_s: i64) {
    let mut last = i64::MIN;
    for (ts, v) in entries {
        assert_eq!(
            ts % (period_s * 1000),
            0,
            "entry time {ts} off the period grid"
        );
        assert!(
            *ts > last,
            "entry {ts} not after {last}: sent twice or out of order"
        );
        last = *ts;
        assert_eq!(
            v["active_energy"].as_f64(),
            Some(energy_at(*ts, period_s)),
            "{v}"
        );
        assert!(v.get("poll_ok").is_none());
    }
}

type Run = MeterRun;

impl MeterRun {
    /// Telemetry until `good_polls` good polls arrived after the first profile read: returns
    /// (profile entries, poll records).
    async fn collect(&mut self, good_polls: usize) -> (Vec<(i64, Value)>, Vec<Value>) {
        let mut entries = Vec::new();
        let mut polls = Vec::new();
        let deadline = Instant::now() + STEP;
        while polls
            .iter()
            .filter(|p: &&Value| p["poll_ok"] == Value::Bool(true))
            .count()
            < good_polls
        {
            let left = deadline.saturating_duration_since(Instant::now());
            let records = self.next_records(left).await.unwrap_or_else(|| {
                panic!("{} polls, {} entries in time", polls.len(), entries.len())
            });
            for Record { kind, payload, .. } in records {
                if kind != RecordKind::Telemetry {
                    continue;
                }
                let values = payload["values"].clone();
                if values.get("poll_ok").is_some() {
                    assert!(values.get("profile_error").is_none(), "{values}");
                    polls.push(values);
                } else {
                    entries.push((payload["ts"].as_i64().expect("ts"), values));
                }
            }
        }
        (entries, polls)
    }
}

#[tokio::test]
async fn range_reads_thousands_of_entries_then_a_restart_sends_nothing_twice() {
    // 30 s period: the default one-day backfill is 2,880 entries, by block transfer.
    let period = 30;
    let sim = Sim::start(&["--profile-rows", "4000", "--profile-period", "30"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut run = Run::start(meter(sim.port, dir.path(), 3600));
    let (entries, polls) = run.collect(2).await;
    run.stop(STEP).await;
    let now = now_ms();
    assert!(
        (2879..=2881).contains(&entries.len()),
        "{} entries in a day of 30 s periods",
        entries.len()
    );
    check_entries(&entries, period);
    let last = entries.last().expect("entries").0;
    assert!(
        now - last <= 2 * period * 1000,
        "the newest entry is recent"
    );
    assert!(polls[0]["clock_drift_s"].as_f64().expect("drift").abs() < 5.0);
    let pos = profile::position_path(dir.path(), "Profile Meter", LOAD_PROFILE);
    assert_eq!(profile::load_position(&pos).await, Some(last));

    // Restart with the stored position: only entries after it (if a period passed).
    let mut run = Run::start(meter(sim.port, dir.path(), 3600));
    let (again, _) = run.collect(2).await;
    run.stop(STEP).await;
    assert!(again.len() <= 1, "{} entries after a restart", again.len());
    assert!(
        again.iter().all(|(ts, _)| *ts > last),
        "an entry was sent twice"
    );
    check_entries(&again, period);

    // The bridge was down for ten periods: exactly those are caught up.
    let newest = again.last().map_or(last, |e| e.0);
    profile::store_position(&pos, newest - 10 * period * 1000)
        .await
        .expect("rewind");
    let mut run = Run::start(meter(sim.port, dir.path(), 3600));
    let (caught, _) = run.collect(2).await;
    run.stop(STEP).await;
    assert!(
        (10..=11).contains(&caught.len()),
        "{} caught up",
        caught.len()
    );
    assert_eq!(caught[0].0, newest - 9 * period * 1000);
    check_entries(&caught, period);
}

#[tokio::test]
async fn missed_intervals_are_caught_up_when_the_meter_answers_again() {
    let period = 60;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let grid = now_ms() / (period * 1000) * (period * 1000);
    // Delivered up to five periods ago; then the meter became unreachable.
    let pos = profile::position_path(dir.path(), "Profile Meter", LOAD_PROFILE);
    profile::store_position(&pos, grid - 5 * period * 1000)
        .await
        .expect("seed");
    let mut run = Run::start(meter(port, dir.path(), 3600));
    // The poller fails against the closed port (health says so) ...
    let deadline = Instant::now() + STEP;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let records = run.next_records(left).await.expect("failure reported");
        if records
            .iter()
            .any(|r| r.kind == RecordKind::Telemetry && r.payload["values"]["poll_ok"] == false)
        {
            break;
        }
    }
    // ... then the meter comes up on that port.
    let _sim = Sim::start_on(port, &["--profile-rows", "100", "--profile-period", "60"]).await;
    let (entries, _) = run.collect(1).await;
    run.stop(STEP).await;
    assert!(
        (5..=6).contains(&entries.len()),
        "{} caught up",
        entries.len()
    );
    assert_eq!(entries[0].0, grid - 4 * period * 1000);
    check_entries(&entries, period);
}

#[tokio::test]
async fn entry_access_gives_the_same_entries_as_range_access() {
    let period = 900;
    let sim = Sim::start(&["--profile-rows", "50", "--profile-period", "900"]).await;
    let cfg = meter(sim.port, Path::new("."), 3600);
    let mut c = timeout(STEP, connect(&cfg, 1024))
        .await
        .expect("in time")
        .expect("associate");
    let now = now_ms();
    let after = now / (period * 1000) * (period * 1000) - 7 * period * 1000;
    let mut by_range = ProfileReader::new(LOAD_PROFILE, vec![]);
    let range = timeout(STEP, by_range.read_since(&mut c, after, now))
        .await
        .expect("in time")
        .expect("range");
    let mut by_entry = ProfileReader::new(LOAD_PROFILE, vec![]).entry_access_only();
    let entry = timeout(STEP, by_entry.read_since(&mut c, after, now))
        .await
        .expect("in time")
        .expect("entry");
    assert_eq!(range.len(), 7, "{range:?}");
    assert_eq!(range, entry);
    let pairs: Vec<(i64, Value)> = range
        .iter()
        .map(|e| (e.ts_ms, Value::Object(e.values.clone())))
        .collect();
    check_entries(&pairs, period);
    // Only the requested columns.
    let mut energy_only = ProfileReader::new(LOAD_PROFILE, vec![ObisCode::new(1, 0, 1, 8, 0, 255)]);
    let e = timeout(STEP, energy_only.read_since(&mut c, after, now))
        .await
        .expect("in time")
        .expect("columns");
    assert_eq!(e.len(), 7);
    assert_eq!(e[0].values.len(), 1);
    let _ = c.release().await;
}

#[tokio::test]
async fn read_cli_reads_a_profile_range() {
    let sim = Sim::start(&["--profile-rows", "50", "--profile-period", "900"]).await;
    let to = std::time::SystemTime::now();
    let args = ReadArgs {
        host: "127.0.0.1".into(),
        port: sim.port,
        transport: Transport::Hdlc,
        obis: vec![],
        client_address: 16,
        logical_address: 1,
        physical_address: 17,
        address_size: 1,
        password: None,
        timeout: Duration::from_secs(5),
        retries: 3,
        profile: Some("1.0.99.1.0.255".into()),
        from: Some(to - Duration::from_secs(6 * 3600)),
        to: Some(to),
        security: Default::default(),
    };
    timeout(STEP, read(args.clone()))
        .await
        .expect("in time")
        .expect("profile read");
    let bad = ReadArgs {
        profile: Some("1.0.99".into()),
        ..args
    };
    let r = timeout(STEP, read(bad)).await.expect("in time");
    assert!(matches!(r, Err(ReadError::Argument(_))), "{r:?}");
}
