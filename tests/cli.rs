//! The binary as a user runs it: exit codes, messages naming keys, masked secrets, the field
//! engineer's `read`, `import --dry-run`, and the durability guarantee across SIGKILL.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::tb_emulator::TbEmulator;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_dlms-bridge");
const WAIT: Duration = Duration::from_secs(30);

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .expect("run dlms-bridge");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.display().to_string()
}

#[test]
fn check_config_exits_2_and_names_every_bad_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = write(
        dir.path(),
        "bad.toml",
        "[thingsboard]\nport = 0\n[broker]\nlisten = \"nowhere\"\n",
    );
    let (code, _, err) = run(&["--config", &bad, "check-config"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("thingsboard.port"), "{err}");
    assert!(err.contains("broker.listen"), "{err}");

    let typo = write(dir.path(), "typo.toml", "[store]\npaht = \"x\"\n");
    let (code, _, err) = run(&["--config", &typo, "check-config"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("paht"), "{err}");

    let (code, _, err) = run(&["--config", "/nonexistent/x.toml", "check-config"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/x.toml"), "{err}");

    // An environment override is checked like the file.
    let ok = write(dir.path(), "ok.toml", "");
    let (code, _, err) = run(
        &["--config", &ok, "check-config"],
        &[("DLMS_BRIDGE_THINGSBOARD__PORT", "99999")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("thingsboard.port"), "{err}");
    let (code, out, _) = run(&["--config", &ok, "check-config"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("ok"));
}

#[test]
fn print_config_masks_the_token_and_shows_env_overrides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write(
        dir.path(),
        "c.toml",
        "[thingsboard]\naccess_token = \"file-secret-123\"\n[broker]\nusername = \"u\"\npassword = \"pw-secret-456\"\n",
    );
    let (code, out, err) = run(
        &["--config", &cfg, "print-config"],
        &[("DLMS_BRIDGE_THINGSBOARD__HOST", "tb.example.com")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tb.example.com"), "{out}");
    assert!(out.contains("***"), "{out}");
    for secret in ["file-secret-123", "pw-secret-456"] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "secret leaked: {out}{err}"
        );
    }
}

#[test]
fn import_dry_run_prints_a_valid_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tb-gateway");
    let (code, out, err) = run(
        &[
            "import",
            "tb-gateway",
            &root.join("config").display().to_string(),
            "--mosquitto",
            &root.join("mosquitto.conf").display().to_string(),
            "--dry-run",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let raw = dlms_bridge::config::load_str(&out).expect("imported config parses");
    dlms_bridge::config::validate(raw).expect("imported config validates");
}

/// Kills the child on drop so a failing test leaves no process behind.
struct Bridge(Child);
impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_bridge(cfg: &str) -> Bridge {
    Bridge(
        Command::new(BIN)
            .args(["--config", cfg, "run"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    )
}

/// Wait (bounded) until the bridge's log says the broker is listening; returns the rest of stdout
/// drained in a thread so the pipe never fills.
fn wait_listening(b: &mut Bridge) {
    let out = b.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("Local MQTT broker listening") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(WAIT).expect("bridge started listening");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_committed_before_sigkill_are_delivered_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start("kill-token").await;
    emu.stop().await; // ThingsBoard down: everything waits in the queue.
    let local = free_port();
    let db = dir.path().join("queue.db");
    let cfg = write(
        dir.path(),
        "c.toml",
        &format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[broker]\nlisten = \"127.0.0.1:{local}\"\n[thingsboard]\nport = {}\naccess_token = \"kill-token\"\nreconnect_min = \"50ms\"\nreconnect_max = \"200ms\"\n[store]\npath = \"{}\"\n",
            emu.port(),
            db.display()
        ),
    );
    let mut bridge = spawn_bridge(&cfg);
    wait_listening(&mut bridge);

    let mut opts = rumqttc::MqttOptions::new("killer", "127.0.0.1", local);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 1000);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    for i in 0..500 {
        client
            .publish(
                "v1/devices/me/telemetry",
                rumqttc::QoS::AtLeastOnce,
                false,
                json!({"deviceName": "K", "ts": 10_000 + i, "i": i}).to_string(),
            )
            .await
            .expect("queued");
    }
    // Read the queue file as an outside observer (WAL allows a concurrent reader) until every
    // record is committed, then kill without any chance to flush.
    let committed = tokio::time::timeout(WAIT, async {
        loop {
            let n = tokio::task::spawn_blocking({
                let db = db.clone();
                move || -> rusqlite::Result<i64> {
                    let c = rusqlite::Connection::open_with_flags(
                        &db,
                        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                    )?;
                    c.query_row("SELECT count(*) FROM queue", [], |r| r.get(0))
                }
            })
            .await
            .expect("join")
            .unwrap_or(0);
            if n >= 500 {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("records committed in time");
    assert_eq!(committed, 500);
    bridge.0.kill().expect("SIGKILL");
    bridge.0.wait().expect("reaped");

    emu.restart().await;
    let mut bridge = spawn_bridge(&cfg);
    wait_listening(&mut bridge);
    let rec = emu
        .wait_for("all 500 after the kill", WAIT, |r| {
            r.telemetry_ts("K").len() == 500
        })
        .await;
    assert_eq!(
        rec.telemetry_ts("K"),
        (0..500).map(|i| 10_000 + i).collect::<Vec<i64>>()
    );
}

#[test]
fn import_dry_run_masks_the_token() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tb-gateway/config");
    let tb: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tb_gateway.json")).expect("fixture"),
    )
    .expect("json");
    let token = tb["thingsboard"]["security"]["accessToken"]
        .as_str()
        .expect("fixture has a token")
        .to_string();
    let (code, out, err) = run(
        &[
            "import",
            "tb-gateway",
            &root.display().to_string(),
            "--dry-run",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains(&token) && !err.contains(&token), "{out}");
    assert!(out.contains("access_token = \"***\""), "{out}");
}

#[test]
fn non_config_variables_with_the_prefix_are_not_config_but_typos_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ok = write(dir.path(), "ok.toml", "");
    // --config from the environment, and the CLI's own variables, coexist with configuration.
    let (code, _, err) = run(
        &["check-config"],
        &[
            ("DLMS_BRIDGE_CONFIG", &ok),
            ("DLMS_BRIDGE_READ_PASSWORD", "x"),
            ("DLMS_BRIDGE_THINGSBOARD__PORT", "8883"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(
        &["--config", &ok, "check-config"],
        &[("DLMS_BRIDGE_THINGSBORD__HOST", "x")],
    );
    assert_eq!(code, 2, "a misspelt section is an error");
    assert!(err.contains("thingsbord"), "{err}");
}
