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
        .env_remove("JOURNAL_STREAM")
        .env_remove("NO_COLOR")
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
    let (code, _, err) = run(&["--config", &bad, "check-config", "--as-user", &me()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("thingsboard.port"), "{err}");
    assert!(err.contains("broker.listen"), "{err}");

    let typo = write(dir.path(), "typo.toml", "[store]\npaht = \"x\"\n");
    let (code, _, err) = run(
        &["--config", &typo, "check-config", "--as-user", &me()],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("paht"), "{err}");

    let (code, _, err) = run(&["--config", "/nonexistent/x.toml", "check-config"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/x.toml"), "{err}");

    // An environment override is checked like the file, and named.
    let ok = ok_config(dir.path());
    let (code, _, err) = run(
        &["--config", &ok, "check-config", "--as-user", &me()],
        &[("DLMS_BRIDGE_THINGSBOARD__PORT", "99999")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("thingsboard.port: port must be 1–65535 (found 99999) (from environment variable DLMS_BRIDGE_THINGSBOARD__PORT)"),
        "{err}"
    );
    let (code, out, err) = run(&["--config", &ok, "check-config", "--as-user", &me()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration ok"), "{out}");
}

#[test]
fn a_broker_tls_key_others_may_read_exits_2_naming_the_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let key_pair = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .self_signed(&key_pair)
        .expect("cert");
    let cert_file = write(dir.path(), "broker.pem", &cert.pem());
    let key_file = write(dir.path(), "broker.key", &key_pair.serialize_pem());
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let cfg = write(
        dir.path(),
        "tls.toml",
        &format!(
            "[thingsboard]\naccess_token = \"t0k\"\n[store]\npath = \"{}\"\n[broker]\n\
             tls_listen = \"127.0.0.1:8884\"\ntls_cert_file = {cert_file:?}\ntls_key_file = {key_file:?}\n",
            dir.path().join("q.db").display()
        ),
    );
    let (code, _, err) = run(&["--config", &cfg, "check-config", "--as-user", &me()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("broker.tls_key_file"), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    assert!(
        !err.contains("PRIVATE KEY"),
        "no key material in errors: {err}"
    );

    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (code, out, err) = run(&["--config", &cfg, "check-config", "--as-user", &me()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration ok"), "{out}");
}

/// The name of the user running the tests: `check-config` run as root checks as the service
/// user by default, so tests that expect success name themselves.
fn me() -> String {
    dlms_bridge::config::preflight::current_user()
}

/// A complete, valid config in `dir` (token set, queue in `dir`).
fn ok_config(dir: &Path) -> String {
    write(
        dir,
        "ok.toml",
        &format!(
            "[thingsboard]\naccess_token = \"t0k\"\n[store]\npath = \"{}\"\n",
            dir.join("q.db").display()
        ),
    )
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
    // It shows the config as written: connectors refer to their copies beside it, and stderr
    // says what would be copied where.
    let copy = "/etc/dlms-bridge/tb-gateway/mqtt.json";
    assert!(
        out.contains(&format!("tb_gateway_file = \"{copy}\"")),
        "{out}"
    );
    assert!(
        err.contains(&format!(
            "would copy {}",
            root.join("config/mqtt.json").display()
        )),
        "{err}"
    );
    // With the copies in place (the same files), it validates.
    let src = root.join("config").display().to_string();
    let as_copied = out.replace("/etc/dlms-bridge/tb-gateway", &src);
    let raw = dlms_bridge::config::load_str(&as_copied).expect("imported config parses");
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
                    // One row per group commit; `count` records in each (none acked
                    // while ThingsBoard is down).
                    c.query_row("SELECT coalesce(sum(count), 0) FROM queue", [], |r| {
                        r.get(0)
                    })
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
    // --config from the environment, and the CLI's own variables, coexist with configuration.
    let ok = ok_config(dir.path());
    let (code, _, err) = run(
        &["check-config", "--as-user", &me()],
        &[
            ("DLMS_BRIDGE_CONFIG", &ok),
            ("DLMS_BRIDGE_READ_PASSWORD", "x"),
            ("DLMS_BRIDGE_THINGSBOARD__PORT", "8883"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(
        &["--config", &ok, "check-config", "--as-user", &me()],
        &[("DLMS_BRIDGE_THINGSBORD__HOST", "x")],
    );
    assert_eq!(code, 2, "a misspelt section is an error");
    assert!(err.contains("thingsbord"), "{err}");
}

// ---- issue #11: the operator's path -------------------------------------------------------

fn fixture_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tb-gateway")
}

/// A copy of the tb-gateway fixture directory that a test may delete, as a purge would.
fn tb_gateway_copy(root: &Path) -> std::path::PathBuf {
    let dst = root.join("thingsboard-gateway/config");
    std::fs::create_dir_all(&dst).expect("mkdir");
    for e in std::fs::read_dir(fixture_dir().join("config")).expect("fixture dir") {
        let p = e.expect("entry").path();
        std::fs::copy(&p, dst.join(p.file_name().expect("name"))).expect("copy");
    }
    dst
}

fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777
}

fn group_of(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let gid = std::fs::metadata(p).expect("stat").gid();
    nix::unistd::Group::from_gid(gid.into())
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |g| g.name)
}

/// The group an import must give its files: dlms-bridge where that group exists (and we may
/// give it, as root), else the group new files get anyway.
fn expected_group(written_dir: &Path) -> String {
    let service_group = nix::unistd::Group::from_name("dlms-bridge").ok().flatten();
    if service_group.is_some() && nix::unistd::geteuid().is_root() {
        "dlms-bridge".into()
    } else {
        group_of(written_dir)
    }
}

#[test]
fn import_replaces_the_packaged_default_keeping_it_as_orig() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = tb_gateway_copy(dir.path());
    let etc = dir.path().join("etc-dlms-bridge");
    std::fs::create_dir(&etc).expect("mkdir");
    let conf = etc.join("config.toml");
    std::fs::write(&conf, dlms_bridge::config::PACKAGED_DEFAULT).expect("packaged default");
    let conf_s = conf.display().to_string();

    // --output defaults to the --config path.
    let (code, out, err) = run(
        &[
            "--config",
            &conf_s,
            "import",
            "tb-gateway",
            &gw.display().to_string(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let orig = etc.join("config.toml.orig");
    assert_eq!(
        std::fs::read_to_string(&orig).expect("orig kept"),
        dlms_bridge::config::PACKAGED_DEFAULT
    );
    let text = std::fs::read_to_string(&conf).expect("written");
    assert!(
        text.contains("GATEWAY_TOKEN_FIXTURE"),
        "token written in full"
    );
    // Connectors are copies under <config dir>/tb-gateway/, nothing points at tb-gateway's dir.
    let copy = etc.join("tb-gateway/mqtt.json");
    assert!(
        text.contains(&format!("tb_gateway_file = \"{}\"", copy.display())),
        "{text}"
    );
    assert!(!text.contains(&format!("\"{}", gw.display())), "{text}");
    assert_eq!(
        std::fs::read(&copy).expect("copied"),
        std::fs::read(gw.join("mqtt.json")).expect("source")
    );
    // The token's file and the copies: 0640, the service group; the directory 0750.
    let group = expected_group(&etc);
    for f in [&conf, &copy, &etc.join("tb-gateway/mqtt_new.json")] {
        assert_eq!(mode_of(f), 0o640, "{}", f.display());
        assert_eq!(group_of(f), group, "{}", f.display());
    }
    assert_eq!(mode_of(&etc.join("tb-gateway")), 0o750);
    // Atomic write: no temporary file left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&etc)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(out.contains("mode 0640"), "{out}");
}

#[test]
fn import_refuses_a_modified_config_unless_forced_and_keeps_a_backup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = tb_gateway_copy(dir.path()).display().to_string();
    let conf = dir.path().join("config.toml");
    let edited = format!(
        "{}\n# edited by the operator\n",
        dlms_bridge::config::PACKAGED_DEFAULT
    );
    std::fs::write(&conf, &edited).expect("write");
    let conf_s = conf.display().to_string();

    let (code, out, err) = run(&["import", "tb-gateway", &gw, "--output", &conf_s], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read_to_string(&conf).expect("read"), edited);
    assert!(!dir.path().join("tb-gateway").exists(), "nothing copied");

    let (code, out, err) = run(
        &["import", "tb-gateway", &gw, "--output", &conf_s, "--force"],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let backups: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("config.toml.bak-"))
        })
        .collect();
    assert_eq!(backups.len(), 1, "one timestamped backup: {backups:?}");
    assert_eq!(
        std::fs::read_to_string(&backups[0]).expect("backup"),
        edited
    );
    assert!(out.contains(&backups[0].display().to_string()), "{out}");
    assert!(std::fs::read_to_string(&conf)
        .expect("new")
        .contains("[[mappings]]"));
}

#[test]
fn imported_config_survives_deleting_tb_gateways_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = tb_gateway_copy(dir.path());
    let conf = dir.path().join("etc/config.toml");
    std::fs::create_dir_all(conf.parent().expect("parent")).expect("mkdir");
    let conf_s = conf.display().to_string();
    let (code, out, err) = run(
        &[
            "import",
            "tb-gateway",
            &gw.display().to_string(),
            "--mosquitto",
            &fixture_dir().join("mosquitto.conf").display().to_string(),
            "--output",
            &conf_s,
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    // `apt purge thingsboard-gateway` deletes its directory.
    std::fs::remove_dir_all(dir.path().join("thingsboard-gateway")).expect("purge");
    let queue = dir.path().join("q.db").display().to_string();
    let (code, out, err) = run(
        &["--config", &conf_s, "check-config", "--as-user", &me()],
        &[("DLMS_BRIDGE_STORE__PATH", &queue)],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("configuration ok"), "{out}");
}

#[test]
fn check_config_lists_every_error_in_plain_words_in_one_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write(
        dir.path(),
        "bad.toml",
        "[thingsboard]\nport = 99999\nacess_token = \"x\"\nkeep_alive = \"soon\"\n\
         [store]\npaht = \"/x\"\nmax_age = \"forever\"\n\
         [[meters]]\nname = \"M\"\nhost = \"h\"\nport = 0\n\
         [[mappings]]\ntb_gateway_file = \"/nonexistent/connector.json\"\n",
    );
    let (code, out, err) = run(&["--config", &cfg, "check-config", "--as-user", &me()], &[]);
    assert_eq!(code, 2, "{out}{err}");
    for line in [
        "thingsboard.port: port must be 1–65535 (found 99999)",
        "thingsboard.acess_token: unknown key",
        "thingsboard.keep_alive: must be a duration like",
        "store.paht: unknown key",
        "store.max_age: must be a duration like",
        "meters[0].port: port must be 1–65535",
        "thingsboard.access_token: is empty",
        "mappings[0].tb_gateway_file: /nonexistent/connector.json: does not exist",
    ] {
        assert!(err.contains(line), "missing `{line}` in:\n{err}");
    }
    assert!(!err.contains("expected u16"), "{err}");
}

#[test]
fn the_token_never_appears_in_any_output_for_a_broken_file() {
    const TOKEN: &str = "SECRET-TOKEN-9f3a";
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = [
        // unterminated string on the token's own line
        format!("[thingsboard]\naccess_token = \"{TOKEN}\n"),
        // a syntax error on the next line
        format!("[thingsboard]\naccess_token = \"{TOKEN}\"\nport = = 1\n"),
        // the token where a number belongs, and as the wrong type
        format!("[thingsboard]\nport = \"{TOKEN}\"\n"),
        "[thingsboard]\naccess_token = 4242424242\n".into(),
        // a duplicate key
        format!("[thingsboard]\naccess_token = \"{TOKEN}\"\naccess_token = \"{TOKEN}\"\n"),
    ];
    for (i, text) in broken.iter().enumerate() {
        let cfg = write(dir.path(), &format!("broken{i}.toml"), text);
        let secret = if text.contains(TOKEN) {
            TOKEN
        } else {
            "4242424242"
        };
        for args in [
            vec!["--config", cfg.as_str(), "check-config"],
            vec!["--config", cfg.as_str(), "print-config"],
            vec!["--config", cfg.as_str(), "run"],
        ] {
            let mut args = args;
            let user = me();
            if args[2] == "check-config" {
                args.extend(["--as-user", user.as_str()]);
            }
            let (code, out, err) = run(&args, &[]);
            assert_eq!(code, 2, "{args:?} on {text}: {out}{err}");
            assert!(
                !out.contains(secret) && !err.contains(secret),
                "{args:?} leaked the secret of case {i}:\n{out}{err}"
            );
            assert!(err.contains("thingsboard") || err.contains("line"), "{err}");
        }
    }
}

#[test]
fn a_missing_config_file_is_an_error_for_check_config_and_run() {
    for cmd in ["check-config", "run"] {
        let (code, _, err) = run(&["--config", "/nonexistent/dlms.toml", cmd], &[]);
        assert_eq!(code, 2, "{cmd}: {err}");
        assert!(
            err.contains("/nonexistent/dlms.toml does not exist"),
            "{err}"
        );
    }
}

#[test]
fn the_demo_config_passes_without_a_token_but_an_empty_token_fails_otherwise() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml");
    let (code, out, err) = run(
        &[
            "--config",
            &demo.display().to_string(),
            "check-config",
            "--as-user",
            &me(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    // The shipped default (empty token) is not ready to run.
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/dlms-bridge.toml");
    let (code, _, err) = run(
        &[
            "--config",
            &shipped.display().to_string(),
            "check-config",
            "--as-user",
            &me(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("thingsboard.access_token: is empty"), "{err}");
}

/// Runs `useradd`/`userdel` for a throw-away system user; removed on drop.
struct TempUser(String);
impl TempUser {
    fn create() -> TempUser {
        let name = format!("dlmsbt{}", std::process::id() % 100_000);
        let st = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ])
            .status()
            .expect("useradd");
        assert!(st.success(), "useradd {name}");
        TempUser(name)
    }
}
impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.0).status();
    }
}

#[test]
fn check_config_checks_files_as_the_service_user() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let connector = dir.path().join("connector.json");
    std::fs::copy(fixture_dir().join("config/mqtt.json"), &connector).expect("copy");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let cfg = write(
        dir.path(),
        "c.toml",
        &format!(
            "[thingsboard]\naccess_token = \"t\"\n[store]\npath = \"{}\"\n[[mappings]]\ntb_gateway_file = \"{}\"\n",
            state.join("q.db").display(),
            connector.display()
        ),
    );
    let set_mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    // Only the owner may read the connector file; everything else is open to the user.
    set_mode(dir.path(), 0o755);
    set_mode(Path::new(&cfg), 0o644);
    set_mode(&state, 0o777);
    set_mode(&connector, 0o600);

    if nix::unistd::geteuid().is_root() {
        // Root reads anything; the service user may not.
        let user = TempUser::create();
        let (code, out, err) = run(
            &["--config", &cfg, "check-config", "--as-user", "root"],
            &[],
        );
        assert_eq!(code, 0, "as root: {out}{err}");
        let (code, out, err) = run(
            &["--config", &cfg, "check-config", "--as-user", &user.0],
            &[],
        );
        assert_eq!(code, 2, "{out}{err}");
        assert!(
            err.contains(&format!(
                "mappings[0].tb_gateway_file: {}: permission denied (as user {})",
                connector.display(),
                user.0
            )),
            "{err}"
        );
        // The config itself unreadable: reported, exit 2.
        set_mode(Path::new(&cfg), 0o600);
        let (code, _, err) = run(
            &["--config", &cfg, "check-config", "--as-user", &user.0],
            &[],
        );
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("cannot read config file") && err.contains("ermission denied"),
            "{err}"
        );
    } else {
        // As a normal user, an unreadable file and a read-only queue directory.
        set_mode(&connector, 0o200);
        set_mode(&state, 0o500);
        let (code, out, err) = run(&["--config", &cfg, "check-config"], &[]);
        assert_eq!(code, 2, "{out}{err}");
        assert!(
            err.contains("mappings[0].tb_gateway_file") && err.contains("permission denied"),
            "{err}"
        );
        assert!(
            err.contains("store.path") && err.contains("not writable"),
            "{err}"
        );
        let (code, _, err) = run(
            &["--config", &cfg, "check-config", "--as-user", "root"],
            &[],
        );
        assert_eq!(code, 2);
        assert!(err.contains("needs root"), "{err}");
    }
}

/// Start `run` with stdout piped (as under systemd without journald, or `| tee`), lines sent to
/// the returned channel.
fn spawn_with_log(cfg: &str, env: &[(&str, &str)]) -> (Bridge, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(["--config", cfg, "run"])
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env_remove("JOURNAL_STREAM")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Bridge(child), rx)
}

/// Lines up to and including the first one containing `needle` (bounded wait).
fn lines_until(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let done = l.contains(needle);
                seen.push(l);
                if done {
                    return seen;
                }
            }
            Err(_) => panic!(
                "no line with `{needle}` within {WAIT:?}; got:\n{}",
                seen.join("\n")
            ),
        }
    }
}

fn bridge_config(dir: &Path, extra: &str) -> String {
    let text = format!(
        "{extra}\n[http]\nlisten = \"127.0.0.1:0\"\n[broker]\nlisten = \"127.0.0.1:{}\"\n[thingsboard]\nport = {}\naccess_token = \"log-token-77\"\n[store]\npath = \"{}\"\n",
        free_port(),
        free_port(),
        dir.join("q.db").display()
    );
    write(dir, "run.toml", &text)
}

#[test]
fn piped_text_logs_have_no_ansi_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = bridge_config(dir.path(), "");
    // A JOURNAL_STREAM that names some other stream (inherited from a parent) is ignored.
    let (_b, rx) = spawn_with_log(&cfg, &[("JOURNAL_STREAM", "1:1")]);
    let lines = lines_until(&rx, "Local MQTT broker listening");
    assert!(lines.iter().all(|l| !l.contains('\u{1b}')), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("INFO")), "{lines:?}");
    assert!(
        lines.iter().all(|l| !l.contains("log-token-77")),
        "{lines:?}"
    );
}

#[test]
fn json_log_lines_parse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = bridge_config(dir.path(), "[log]\nformat = \"json\"");
    let (_b, rx) = spawn_with_log(&cfg, &[]);
    let lines = lines_until(&rx, "Local MQTT broker listening");
    assert!(lines.len() >= 2, "{lines:?}");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
        assert!(v["message"].is_string() && v["target"].is_string(), "{l}");
    }
    let start = lines
        .iter()
        .find(|l| l.contains("Starting dlms-bridge"))
        .expect("start line");
    let v: serde_json::Value = serde_json::from_str(start).expect("json");
    assert_eq!(
        v["version"],
        env!("CARGO_PKG_VERSION"),
        "fields are top-level keys: {start}"
    );
}

#[test]
fn reload_names_only_what_changed_and_what_needs_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = bridge_config(dir.path(), "[log]\nlevel = \"info\"");
    let (b, rx) = spawn_with_log(&cfg, &[]);
    lines_until(&rx, "Local MQTT broker listening");
    let pid = b.0.id().to_string();
    let hup = || {
        let st = Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill");
        assert!(st.success(), "kill -HUP");
    };

    hup();
    let lines = lines_until(&rx, "Reload: configuration unchanged.");
    assert!(
        lines.iter().all(|l| !l.contains("need a restart")),
        "{lines:?}"
    );

    let text = std::fs::read_to_string(&cfg).expect("read");
    let changed = text
        .replace(
            "level = \"info\"",
            "level = \"info,dlms_bridge::uplink=debug\"",
        )
        .replace("[thingsboard]\n", "[thingsboard]\nhost = \"127.0.0.2\"\n");
    std::fs::write(&cfg, changed).expect("write");
    hup();
    let lines = lines_until(&rx, "need a restart");
    let all = lines.join("\n");
    assert!(
        all.contains("Reload: changes applied.") && all.contains("log.level"),
        "{all}"
    );
    let restart = lines.last().expect("line");
    assert!(
        restart.contains("WARN") && restart.contains("thingsboard.host"),
        "{restart}"
    );
    assert!(
        !restart.contains("broker") && !restart.contains("store"),
        "{restart}"
    );

    // Still pending at the next reload, and nothing else is claimed.
    hup();
    let lines = lines_until(&rx, "need a restart");
    assert!(
        lines.iter().all(|l| !l.contains("changes applied")),
        "{lines:?}"
    );
    assert!(lines.last().expect("line").contains("thingsboard.host"));

    // A broken file on reload: kept running, reported, the token never logged.
    let text = std::fs::read_to_string(&cfg).expect("read");
    std::fs::write(
        &cfg,
        text.replace(
            "access_token = \"log-token-77\"",
            "access_token = \"log-token-77",
        ),
    )
    .expect("write");
    hup();
    let lines = lines_until(&rx, "Reload: configuration not applied");
    let all = lines.join("\n");
    // An ERROR, like Mosquitto's for a configuration it cannot load: `journalctl -p err` shows it.
    let refused = lines.last().expect("line");
    assert!(refused.contains("ERROR"), "{refused}");
    assert!(
        all.contains("line") && all.contains("access_token = ***"),
        "{all}"
    );
    assert!(!all.contains("log-token-77"), "{all}");
}
