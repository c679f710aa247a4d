//! The sd_notify side of `dlms_bridge::systemd`, observed as systemd would: a real Unix datagram
//! socket in a temporary directory, announced to the library through `NOTIFY_SOCKET`.
//!
//! The notify environment variables are process-global, so every test holds `ENV_LOCK` while it
//! sets them and talks to its socket.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dlms_bridge::systemd;
use tokio::net::UnixDatagram;
use tokio::sync::{Mutex, MutexGuard};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Serialises the tests of this file: they all set `NOTIFY_SOCKET` and the watchdog variables.
/// An async mutex, because each test holds it across its awaits.
static ENV_LOCK: Mutex<()> = Mutex::const_new(());

/// How long a test waits for a datagram it expects.
const EXPECT_WITHIN: Duration = Duration::from_secs(5);

/// Holds the environment for one test and restores it on drop, even when the test fails.
struct NotifyEnv {
    _guard: MutexGuard<'static, ()>,
    _dir: tempfile::TempDir,
    socket: UnixDatagram,
}

impl NotifyEnv {
    /// Binds a socket in a fresh tempdir and points `NOTIFY_SOCKET` at it; `watchdog` sets
    /// `WATCHDOG_USEC` (and `WATCHDOG_PID`) too.
    async fn new(watchdog: Option<(Duration, Option<u32>)>) -> Self {
        let guard = ENV_LOCK.lock().await;
        let dir = tempfile::tempdir().expect("create tempdir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        set_env(&path, watchdog);
        NotifyEnv {
            _guard: guard,
            _dir: dir,
            socket,
        }
    }

    /// The next datagram as text, failing the test if none arrives in time.
    async fn recv(&self) -> String {
        let mut buf = vec![0u8; 4096];
        let n = timeout(EXPECT_WITHIN, self.socket.recv(&mut buf))
            .await
            .expect("a notification arrives in time")
            .expect("recv from notify socket");
        String::from_utf8(buf[..n].to_vec()).expect("notifications are UTF-8")
    }

    /// True if a datagram arrives within `within`.
    async fn any_within(&self, within: Duration) -> Option<String> {
        let mut buf = vec![0u8; 4096];
        match timeout(within, self.socket.recv(&mut buf)).await {
            Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            _ => None,
        }
    }
}

impl Drop for NotifyEnv {
    fn drop(&mut self) {
        std::env::remove_var("NOTIFY_SOCKET");
        std::env::remove_var("WATCHDOG_USEC");
        std::env::remove_var("WATCHDOG_PID");
    }
}

fn set_env(path: &Path, watchdog: Option<(Duration, Option<u32>)>) {
    std::env::set_var("NOTIFY_SOCKET", path);
    std::env::remove_var("WATCHDOG_USEC");
    std::env::remove_var("WATCHDOG_PID");
    if let Some((period, pid)) = watchdog {
        std::env::set_var("WATCHDOG_USEC", period.as_micros().to_string());
        if let Some(pid) = pid {
            std::env::set_var("WATCHDOG_PID", pid.to_string());
        }
    }
}

fn lines(datagram: &str) -> Vec<&str> {
    datagram.lines().collect()
}

#[tokio::test]
async fn ready_reloading_status_stopping_arrive_in_order() {
    let env = NotifyEnv::new(None).await;
    assert!(systemd::enabled());

    systemd::notify_ready();
    let ready = env.recv().await;
    assert!(lines(&ready).contains(&"READY=1"), "{ready:?}");

    systemd::notify_reloading();
    let reloading = env.recv().await;
    assert!(lines(&reloading).contains(&"RELOADING=1"), "{reloading:?}");
    let usec = lines(&reloading)
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("RELOADING=1 carries MONOTONIC_USEC");
    assert!(usec.parse::<u64>().expect("MONOTONIC_USEC is a number") > 0);

    systemd::notify_ready();
    assert!(lines(&env.recv().await).contains(&"READY=1"));

    systemd::notify_status("2 meters, uplink live\nsecond line");
    let status = env.recv().await;
    assert_eq!(lines(&status), ["STATUS=2 meters, uplink live second line"]);

    systemd::notify_stopping();
    let stopping = env.recv().await;
    assert!(lines(&stopping).contains(&"STOPPING=1"), "{stopping:?}");
}

#[tokio::test]
async fn watchdog_pings_while_healthy_and_stops_when_unhealthy() {
    // 400 ms timeout: a ping every 200 ms, health answer due within 100 ms.
    let env = NotifyEnv::new(Some((Duration::from_millis(400), Some(std::process::id())))).await;
    assert_eq!(
        systemd::watchdog_timeout(),
        Some(Duration::from_millis(400))
    );

    let healthy = Arc::new(AtomicBool::new(true));
    let cancel = CancellationToken::new();
    let h = healthy.clone();
    let task = tokio::spawn(systemd::watchdog(
        move || {
            let h = h.clone();
            async move { h.load(Ordering::SeqCst) }
        },
        cancel.clone(),
    ));

    for _ in 0..3 {
        assert_eq!(lines(&env.recv().await), ["WATCHDOG=1"]);
    }

    healthy.store(false, Ordering::SeqCst);
    // At most one ping whose health check had already passed may still be on its way.
    let _ = env.any_within(Duration::from_millis(150)).await;
    assert_eq!(
        env.any_within(Duration::from_millis(1000)).await,
        None,
        "no WATCHDOG=1 while the health check fails"
    );

    healthy.store(true, Ordering::SeqCst);
    assert_eq!(lines(&env.recv().await), ["WATCHDOG=1"], "pings resume");

    cancel.cancel();
    timeout(EXPECT_WITHIN, task)
        .await
        .expect("watchdog ends on cancel")
        .expect("watchdog task does not panic");
}

#[tokio::test]
async fn watchdog_for_another_pid_is_ignored() {
    let other_pid = std::process::id().wrapping_add(1);
    let env = NotifyEnv::new(Some((Duration::from_millis(400), Some(other_pid)))).await;
    assert_eq!(systemd::watchdog_timeout(), None);
    // Returns at once without pinging, even though nobody cancels it.
    timeout(
        EXPECT_WITHIN,
        systemd::watchdog(|| async { true }, CancellationToken::new()),
    )
    .await
    .expect("watchdog returns at once when it is not ours");
    assert_eq!(env.any_within(Duration::from_millis(300)).await, None);
}

#[tokio::test]
async fn watchdog_without_pid_applies_to_us() {
    let env = NotifyEnv::new(Some((Duration::from_millis(400), None))).await;
    assert_eq!(
        systemd::watchdog_timeout(),
        Some(Duration::from_millis(400))
    );
    let cancel = CancellationToken::new();
    let task = tokio::spawn(systemd::watchdog(|| async { true }, cancel.clone()));
    assert_eq!(lines(&env.recv().await), ["WATCHDOG=1"]);
    cancel.cancel();
    timeout(EXPECT_WITHIN, task)
        .await
        .expect("watchdog ends on cancel")
        .expect("watchdog task does not panic");
}

#[tokio::test]
async fn everything_is_a_no_op_without_notify_socket() {
    let _guard = ENV_LOCK.lock().await;
    std::env::remove_var("NOTIFY_SOCKET");
    std::env::set_var("WATCHDOG_USEC", "400000");
    assert!(!systemd::enabled());
    assert_eq!(systemd::watchdog_timeout(), None);
    systemd::notify_ready();
    systemd::notify_reloading();
    systemd::notify_status("nobody listens");
    systemd::notify_stopping();
    timeout(
        EXPECT_WITHIN,
        systemd::watchdog(|| async { true }, CancellationToken::new()),
    )
    .await
    .expect("watchdog returns at once without a notify socket");
    std::env::remove_var("WATCHDOG_USEC");
}
