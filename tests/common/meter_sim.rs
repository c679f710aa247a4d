//! The independent Gurux meter (`shared/meter-sim/gurux_meter.py`) as a child process on a free
//! loopback port, for the interop tests, or our HLS-GMAC fixture built on it
//! (`tests/fixtures/gurux_hls_meter.py`). Killed when dropped; its stdout lines (fault logs,
//! the HLS fixture's `client-ic` lines) are kept for the test to read.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::time::timeout;

/// Python start-up on a busy 2-core box is slow; still bounded.
const START: Duration = Duration::from_secs(60);

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// A Gurux meter child process; `kill_on_drop` ends it with the test.
pub struct GuruxMeter {
    _child: tokio::process::Child,
    pub port: u16,
    /// Every stdout line after the banner, in order.
    pub lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

/// The HLS-GMAC fixture meter (Gurux with a suite-0 cipher and known keys).
pub fn hls_fixture_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gurux_hls_meter.py")
}

impl GuruxMeter {
    /// Start it with extra `gurux_meter.py` arguments; returns once its banner says every
    /// listener is bound.
    pub async fn start(args: &[&str]) -> GuruxMeter {
        Self::start_on(free_port(), args).await
    }

    /// Like `start`, on a given port (e.g. one a poller already tries in vain).
    pub async fn start_on(port: u16, args: &[&str]) -> GuruxMeter {
        Self::start_script(super::meter_sim_path(), port, args).await
    }

    /// The HLS-GMAC fixture with `gurux_meter.py` arguments plus its own (`--authentication-key`,
    /// `--block-cipher-key`, `--server-system-title`, `--hls-only`).
    pub async fn start_hls(port: u16, args: &[&str]) -> GuruxMeter {
        Self::start_script(hls_fixture_path(), port, args).await
    }

    async fn start_script(script: std::path::PathBuf, port: u16, args: &[&str]) -> GuruxMeter {
        let mut child = tokio::process::Command::new("python3")
            .arg(script)
            .env("METER_SIM", super::meter_sim_path())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start python3 meter-sim");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let banner = timeout(START, lines.next_line())
            .await
            .expect("meter-sim started in time")
            .expect("read meter-sim stdout");
        assert!(
            banner
                .as_deref()
                .is_some_and(|l| l.starts_with("gurux_meter")),
            "unexpected meter-sim output {banner:?}"
        );
        // Keep draining stdout so the child never blocks on a full pipe.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send(l);
            }
        });
        GuruxMeter {
            _child: child,
            port,
            lines: rx,
        }
    }

    /// A TCP connection to it (no Nagle: DLMS is request/response).
    pub async fn connect(&self) -> tokio::net::TcpStream {
        let s = timeout(
            START,
            tokio::net::TcpStream::connect(("127.0.0.1", self.port)),
        )
        .await
        .expect("connect in time")
        .expect("connect");
        s.set_nodelay(true).expect("nodelay");
        s
    }
}
