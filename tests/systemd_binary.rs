//! The binary under a pretend systemd: the test plays the service manager with a Unix datagram
//! socket as NOTIFY_SOCKET, runs `dlms-bridge run`, and checks
//!   1. READY=1 arrives, and only after the local broker accepts TCP connections;
//!   2. WATCHDOG=1 arrives repeatedly (WATCHDOG_USEC set, WATCHDOG_PID absent = "this process");
//!   3. SIGHUP with a changed meter list → RELOADING=1 (+ MONOTONIC_USEC) then READY=1, and the
//!      new meter's readings reach the ThingsBoard emulator;
//!   4. SIGTERM → STOPPING=1, exit status 0 within the grace period.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::net::UnixDatagram;
use tokio::time::timeout;

const BIN: &str = env!("CARGO_BIN_EXE_dlms-bridge");
const WAIT: Duration = Duration::from_secs(20);

/// Receives datagrams until one contains `line`; returns that datagram.
async fn expect_line(sock: &UnixDatagram, line: &str) -> String {
    let mut buf = vec![0u8; 4096];
    timeout(WAIT, async {
        loop {
            let n = sock.recv(&mut buf).await.expect("recv");
            let d = String::from_utf8_lossy(&buf[..n]).into_owned();
            if d.lines().any(|l| l == line) {
                return d;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {line} within {WAIT:?}"))
}

/// SIGKILLs the bridge if the test fails before it exits by itself.
struct KillOnDrop(u32);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

fn signal(pid: u32, sig: &str) {
    // No libc/nix in the test: kill(1) is enough and keeps the test crate free of unsafe.
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(ok.success(), "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_reload_and_stop_under_pretend_systemd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");

    let tb = common::tb_emulator::TbEmulator::start("TEST_TOKEN").await;
    let sims_tracker = tokio_util::task::TaskTracker::new();
    let sims_cancel = tokio_util::sync::CancellationToken::new();
    let sims = dlms_bridge::sim::spawn_meters(
        std::net::Ipv4Addr::LOCALHOST.into(),
        0,
        2,
        &Default::default(),
        &sims_tracker,
        sims_cancel.clone(),
    )
    .await
    .expect("simulated meters");
    let (meter_a, meter_b) = (sims[0], sims[1]);
    let broker_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");

    let config = dir.path().join("config.toml");
    let write_config = |meters: &[(&str, std::net::SocketAddr)]| {
        let mut s = format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[broker]\nlisten = \"127.0.0.1:{broker_port}\"\n\
             [thingsboard]\nhost = \"127.0.0.1\"\nport = {}\naccess_token = \"TEST_TOKEN\"\n\
             [store]\npath = \"{}\"\n[shutdown]\ngrace = \"5s\"\n",
            tb.port(),
            dir.path().join("queue.db").display()
        );
        for (name, addr) in meters {
            s += &format!(
                "[[meters]]\nname = \"{name}\"\nhost = \"{}\"\nport = {}\ninterval = \"200ms\"\n",
                addr.ip(),
                addr.port()
            );
        }
        std::fs::write(&config, s).expect("write config");
    };
    write_config(&[("Meter A", meter_a)]);

    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "2000000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn dlms-bridge");
    let pid = child.id();
    let _guard = KillOnDrop(pid);

    // 1. READY only once the broker listens.
    expect_line(&notify, "READY=1").await;
    tokio::net::TcpStream::connect(("127.0.0.1", broker_port))
        .await
        .expect("broker accepts connections once READY=1 was sent");

    // 2. Watchdog pings (every ~1 s for a 2 s timeout).
    expect_line(&notify, "WATCHDOG=1").await;
    expect_line(&notify, "WATCHDOG=1").await;
    tb.wait_for("Meter A telemetry", WAIT, |r| {
        r.telemetry.contains_key("Meter A")
    })
    .await;

    // 3. Reload with a changed meter list.
    write_config(&[("Meter A", meter_a), ("Meter B", meter_b)]);
    signal(pid, "-HUP");
    let reloading = expect_line(&notify, "RELOADING=1").await;
    assert!(reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")));
    expect_line(&notify, "READY=1").await;
    tb.wait_for("Meter B telemetry", WAIT, |r| {
        r.telemetry.contains_key("Meter B")
    })
    .await;

    // 4. Stop.
    signal(pid, "-TERM");
    expect_line(&notify, "STOPPING=1").await;
    let status = timeout(WAIT, tokio::task::spawn_blocking(move || child.wait()))
        .await
        .expect("exits within the grace period")
        .expect("join")
        .expect("wait");
    assert!(status.success(), "exit status {status}");
    sims_cancel.cancel();
    sims_tracker.close();
    sims_tracker.wait().await;
}
