//! HLS-GMAC (security suite 0) against an independent implementation: the Gurux meter with a
//! suite-0 cipher and known keys (`tests/fixtures/gurux_hls_meter.py`, built on the Gurux
//! library, which also checks our invocation counters for replays and prints each one it
//! accepts). Covers the four-pass association and ciphered GETs over HDLC and the wrapper,
//! telemetry through the poller and through the whole bridge to the ThingsBoard emulator, wrong
//! keys (clear error, bounded attempts), the invocation counter across a restart of the meter
//! actor and of the bridge, `dlms-bridge read --auth hls-gmac`, key file permissions, and keys
//! kept out of logs.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::meter_run::MeterRun;
use common::meter_sim::{free_port, GuruxMeter as Sim};
use dlms_bridge::config::{DlmsAuth, DlmsTransport, HlsKeys, MeterConfig};
use dlms_bridge::dlms::apdu::DataAccessResult;
use dlms_bridge::dlms::ciphering::Keys;
use dlms_bridge::model::{Record, RecordKind};
use dlms_bridge::sources::meters::client::ReadingValue;
use dlms_bridge::sources::meters::poller::{self, registers_of};
use serde_json::Value;
use tokio::time::timeout;

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

/// Sort one fixture line: a `client-ic <title> <n>` counter, or anything else.
fn sort_line(line: String, seen: &mut Vec<u32>, other: &mut Vec<String>) {
    match line.strip_prefix("client-ic ") {
        Some(rest) => {
            let (title, n) = rest.split_once(' ').expect("title and counter");
            assert_eq!(title, CLIENT_TITLE);
            seen.push(n.parse().expect("counter"));
        }
        None => other.push(line),
    }
}

/// The client invocation counters the fixture accepted so far, and its other lines.
fn accepted_counters(sim: &mut Sim, seen: &mut Vec<u32>, other: &mut Vec<String>) {
    while let Ok(line) = sim.lines.try_recv() {
        sort_line(line, seen, other);
    }
}

/// Like [`accepted_counters`], up to the fixture's `release` line: every counter of the
/// released association is in (its stdout is read by another task).
async fn counters_until_release(sim: &mut Sim, seen: &mut Vec<u32>, other: &mut Vec<String>) {
    loop {
        let line = timeout(STEP, sim.lines.recv())
            .await
            .expect("the meter saw the release in time")
            .expect("meter output open");
        if line == "release" {
            other.push(line);
            return;
        }
        sort_line(line, seen, other);
    }
}

async fn read_direct(transport: DlmsTransport, dedicated_key: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sim = Sim::start_hls(free_port(), &sim_args(transport)).await;
    let cfg = MeterConfig {
        dedicated_key,
        ..meter(sim.port, transport, keys(AK, EK), dir.path())
    };
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
    // A SET goes out ciphered as well, and its (ciphered) answer is opened: the fixture's
    // registers are read-only (Gurux's write path answers hardware-fault for them).
    let denied = timeout(
        STEP,
        c.set(&regs[0].attr, &dlms_bridge::dlms::apdu::Data::U16(23000)),
    )
    .await
    .expect("set in time")
    .expect("set answered");
    assert_ne!(denied, DataAccessResult::Success);
    timeout(STEP, c.release())
        .await
        .expect("release in time")
        .expect("release");
    let (mut ics, mut other) = (Vec::new(), Vec::new());
    counters_until_release(&mut sim, &mut ics, &mut other).await;
    assert!(
        other.iter().any(|l| l == "hls pass3 accepted"),
        "pass 3 not accepted: {other:?}"
    );
    // AARQ, pass 3, the GETs and the SET: every request ciphered, counters strictly increasing.
    assert!(ics.len() >= 5, "{ics:?}");
    assert!(ics.windows(2).all(|w| w[0] < w[1]), "{ics:?}");
}

#[tokio::test]
async fn hls_gmac_reads_registers_over_hdlc() {
    read_direct(DlmsTransport::Hdlc, false).await;
}

#[tokio::test]
async fn hls_gmac_reads_registers_over_the_wrapper() {
    read_direct(DlmsTransport::Wrapper, false).await;
}

/// With a dedicated key Gurux answers ded- APDUs and opens requests only under that key, so
/// this passes only when both directions use it.
#[tokio::test]
async fn hls_gmac_with_a_dedicated_key() {
    read_direct(DlmsTransport::Hdlc, true).await;
}

type Run = MeterRun;

impl MeterRun {
    /// The next telemetry values of the meter.
    async fn next_poll(&mut self) -> serde_json::Map<String, Value> {
        loop {
            let records = self.next_records(STEP).await.expect("telemetry in time");
            for Record { kind, payload, .. } in records {
                if kind == RecordKind::Telemetry {
                    if let Some(v) = payload["values"].as_object() {
                        return v.clone();
                    }
                }
            }
        }
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
    run.stop(STEP).await;
    let (mut ics, mut other) = (Vec::new(), Vec::new());
    counters_until_release(sim, &mut ics, &mut other).await;
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

/// Log lines written by the code under test, for assertions.
#[derive(Clone, Default)]
struct LogBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

/// With a wrong key the meter refuses us: the poll reports the HLS failure, an ERROR names the
/// meter and the keys to check, no key appears in any log line, and the meter sees one
/// association attempt, not a retry storm.
async fn wrong_key(ak: &str, ek: &str) {
    let logs = LogBuf::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().expect("tempdir");
    let mut sim = Sim::start_hls(free_port(), &sim_args(DlmsTransport::Hdlc)).await;
    let mut cfg = meter(sim.port, DlmsTransport::Hdlc, keys(ak, ek), dir.path());
    cfg.interval = Duration::from_millis(50);
    assert!(!format!("{cfg:?}").contains(ak) && !format!("{cfg:?}").contains(ek));
    let mut run = Run::start(cfg);
    let v = run.next_poll().await;
    assert_eq!(v["poll_ok"], Value::Bool(false), "{v:?}");
    let err = v["last_error"].as_str().expect("last_error");
    assert!(err.contains("HLS authentication failed"), "{err}");
    assert!(err.contains("authentication_key"), "{err}");
    // A storm would associate every 50 ms; a permanent failure waits at least 30 s.
    let window = Instant::now() + Duration::from_secs(2);
    while Instant::now() < window {
        let left = window.saturating_duration_since(Instant::now());
        if let Some(r) = run.next_records(left).await {
            assert!(
                r.iter().all(|r| r.kind != RecordKind::Telemetry),
                "another poll during the backoff: {r:?}"
            );
        }
    }
    run.stop(STEP).await;
    let (mut ics, mut other) = (Vec::new(), Vec::new());
    accepted_counters(&mut sim, &mut ics, &mut other);
    let attempts = other.iter().filter(|l| *l == "aarq").count();
    assert_eq!(attempts, 1, "association attempts: {other:?}");
    let text = logs.text();
    let error_line = text
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("HLS authentication failed"))
        .unwrap_or_else(|| panic!("no ERROR about HLS in {text}"));
    assert!(error_line.contains("HLS Meter"), "{error_line}");
    for key in [AK, EK, "d0d1d2d3d4d5d6d7", "0001020304050607"] {
        assert!(
            !text.to_uppercase().contains(&key.to_uppercase()),
            "key material {key} in the logs"
        );
    }
    for key in [ak, ek] {
        assert!(!text.to_uppercase().contains(&key.to_uppercase()));
    }
}

#[tokio::test]
async fn wrong_authentication_key_is_a_clear_error_without_retry_storm() {
    wrong_key("D0D1D2D3D4D5D6D7D8D9DADBDCDDDE00", EK).await;
}

#[tokio::test]
async fn wrong_block_cipher_key_is_a_clear_error_without_retry_storm() {
    wrong_key(AK, "000102030405060708090A0B0C0D0E00").await;
}

const BIN: &str = env!("CARGO_BIN_EXE_dlms-bridge");

/// Run the binary (blocking, off the runtime's thread); (exit code, stdout, stderr).
async fn run_bin(args: Vec<String>) -> (i32, String, String) {
    let out = timeout(
        STEP,
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(BIN)
                .args(&args)
                .env_remove("RUST_LOG")
                .env_remove("DLMS_BRIDGE_READ_PASSWORD")
                .output()
                .expect("run dlms-bridge")
        }),
    )
    .await
    .expect("dlms-bridge finished in time")
    .expect("join");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_mode(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[tokio::test]
async fn read_cli_with_hls_gmac_keys_and_key_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = Sim::start_hls(free_port(), &sim_args(DlmsTransport::Hdlc)).await;
    let counter = dir.path().join("read.ic");
    let base = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "read",
            "--host",
            "127.0.0.1",
            "--port",
            &sim.port.to_string(),
            "--client-address",
            "1",
            "--auth",
            "hls-gmac",
            "--counter-file",
            &counter.display().to_string(),
            "--obis",
            "1.0.32.7.0.255",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let (code, out, err) = run_bin(base(&[
        "--authentication-key",
        AK,
        "--block-cipher-key",
        EK,
        "--system-title",
        CLIENT_TITLE,
    ]))
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("voltage_l1") && l.ends_with(" V")),
        "{out}"
    );
    assert!(!out.contains(AK) && !err.contains(AK), "{out}{err}");

    // The same from a key file (TOML-style quoting); the counter file makes the second run
    // continue above the first, which the meter checks.
    let keys = dir.path().join("meter.keys");
    let text = format!(
        "# HLS keys\nauthentication_key = \"{AK}\"\nblock_cipher_key = \"{EK}\"\nsystem_title = {CLIENT_TITLE}\n"
    );
    write_mode(&keys, &text, 0o600);
    let with_file = base(&["--key-file", &keys.display().to_string()]);
    let (code, out, err) = run_bin(with_file.clone()).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("voltage_l1"), "{out}");

    // Readable by others: refused, naming the file, before any connection.
    write_mode(&keys, &text, 0o644);
    let (code, out, err) = run_bin(with_file).await;
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("--key-file") && err.contains("chmod 600"),
        "{err}"
    );

    // A wrong key: the clear error, non-zero exit.
    let (code, out, err) = run_bin(base(&[
        "--authentication-key",
        AK,
        "--block-cipher-key",
        "000102030405060708090A0B0C0D0E00",
        "--system-title",
        CLIENT_TITLE,
    ]))
    .await;
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("HLS authentication failed"), "{err}");
}

#[tokio::test]
async fn config_key_file_mode_and_bad_keys_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("meter.keys");
    let user = dlms_bridge::config::preflight::current_user();
    let config = |meter: &str| {
        let p = dir.path().join("config.toml");
        std::fs::write(
            &p,
            format!(
                "[thingsboard]\naccess_token = \"t0k\"\n[store]\npath = \"{}\"\n\
                 [[meters]]\nname = \"HLS Meter\"\nhost = \"127.0.0.1\"\nport = 4059\n\
                 auth = \"hls-gmac\"\n{meter}",
                dir.path().join("q.db").display()
            ),
        )
        .expect("write config");
        vec![
            "--config".to_string(),
            p.display().to_string(),
            "check-config".into(),
            "--as-user".into(),
            user.clone(),
        ]
    };
    let key_file = format!("key_file = \"{}\"\n", keys.display());
    write_mode(
        &keys,
        &format!(
            "authentication_key = {AK}\nblock_cipher_key = {EK}\nsystem_title = {CLIENT_TITLE}\n"
        ),
        0o640,
    );
    let (code, out, err) = run_bin(config(&key_file)).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("meters[0].key_file") && err.contains("readable by group or others"),
        "{err}"
    );
    std::fs::set_permissions(&keys, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let (code, out, err) = run_bin(config(&key_file)).await;
    assert_eq!(code, 0, "{out}{err}");

    // Keys in the config: a short one is named, never quoted; a missing one is named.
    let (code, out, err) = run_bin(config(&format!(
        "authentication_key = \"D0D1D2\"\nblock_cipher_key = \"{EK}\"\n"
    )))
    .await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("meters[0].authentication_key"), "{err}");
    assert!(err.contains("meters[0].system_title"), "{err}");
    assert!(!err.contains("D0D1D2") && !err.contains(EK), "{err}");
}

/// The whole bridge, twice on the same queue directory: a `[[meters]]` entry with
/// `auth = "hls-gmac"` and a key file, telemetry reaching the ThingsBoard emulator, and after
/// the restart the invocation counter continues above the first run's (the meter accepts it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_restart_continues_the_invocation_counter() {
    use common::tb_emulator::TbEmulator;
    const TOKEN: &str = "hls-gateway-token";
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sim = Sim::start_hls(free_port(), &sim_args(DlmsTransport::Wrapper)).await;
    let emu = TbEmulator::start(TOKEN).await;
    let keys = dir.path().join("meter.keys");
    write_mode(
        &keys,
        &format!("authentication_key = \"{AK}\"\nblock_cipher_key = \"{EK}\"\n"),
        0o600,
    );
    let extra = format!(
        "[[meters]]\nname = \"HLS Meter\"\nhost = \"127.0.0.1\"\nport = {}\n\
         transport = \"wrapper\"\nclient_address = 1\ninterval = \"200ms\"\ntimeout = \"3s\"\n\
         auth = \"hls-gmac\"\nsystem_title = \"{CLIENT_TITLE}\"\nkey_file = {:?}\n",
        sim.port,
        keys.display().to_string()
    );
    let (mut ics, mut other) = (Vec::new(), Vec::new());
    let mut last_of_first = 0;
    for round in 1..=2usize {
        let cfg = common::bridge_config::test_config(dir.path(), emu.port(), TOKEN, &extra);
        let running = dlms_bridge::app::start(cfg).await.expect("bridge starts");
        let rec = emu
            .wait_for("HLS meter telemetry", STEP, |r| {
                r.telemetry
                    .get("HLS Meter")
                    .into_iter()
                    .flatten()
                    .filter(|e| e["values"]["voltage_l1"].is_number())
                    .count()
                    >= 2 * round
            })
            .await;
        assert!(rec.connect_precedes_data());
        assert!(running.shutdown().await.expect("shutdown"));
        counters_until_release(&mut sim, &mut ics, &mut other).await;
        if round == 1 {
            last_of_first = *ics.last().expect("counters in the first run");
            ics.clear();
        }
    }
    assert!(
        ics.first().is_some_and(|&f| f > last_of_first),
        "second run {ics:?} after {last_of_first}"
    );
    assert!(!other.iter().any(|l| l.starts_with("replay")), "{other:?}");
}
