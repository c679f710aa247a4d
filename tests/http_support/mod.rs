//! Shared by the HTTP test binaries: a bridge started through `app::start` with a real store,
//! broker, simulated meters and the ThingsBoard emulator, an HTTP client, and bounded waits.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dlms_bridge::app::{self, Running};
use dlms_bridge::sim::{spawn_meters, SimOptions};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::common::tb_emulator::TbEmulator;

pub const TOKEN: &str = "http-gateway-token";
/// Upper bound for anything to happen; every wait ends as soon as its condition holds.
pub const WAIT: Duration = Duration::from_secs(30);

/// Simulated DLMS meters on loopback, outside the bridge (the bridge polls them as real ones).
pub struct Meters {
    pub addrs: Vec<SocketAddr>,
    cancel: CancellationToken,
    _tracker: TaskTracker,
}

impl Drop for Meters {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub async fn sim_meters(n: usize) -> Meters {
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let opts = SimOptions {
        any_address: true,
        ..SimOptions::default()
    };
    let addrs = spawn_meters(
        std::net::Ipv4Addr::LOCALHOST.into(),
        0,
        n,
        &opts,
        &tracker,
        cancel.clone(),
    )
    .await
    .expect("simulated meters");
    Meters {
        addrs,
        cancel,
        _tracker: tracker,
    }
}

/// A loopback port nothing listens on (bound, then released): a meter there always fails.
pub fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// An empty registry database with the original system's schema.
pub fn registry(dir: &Path) -> PathBuf {
    let path = dir.join("admin.db");
    let conn = rusqlite::Connection::open(&path).expect("registry");
    conn.execute_batch(
        "CREATE TABLE meters(id INTEGER PRIMARY KEY, name TEXT, ip_address TEXT, port INTEGER,
                             tb_host TEXT, tb_port INTEGER, tb_token TEXT);",
    )
    .expect("schema");
    path
}

/// Names in a registry database.
pub fn registry_rows(path: &Path) -> Vec<(String, String, u16)> {
    let conn = rusqlite::Connection::open(path).expect("registry");
    let mut st = conn
        .prepare("SELECT name, ip_address, port FROM meters ORDER BY id")
        .expect("select");
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// The bridge with `extra` TOML appended (meters, [http] tokens, ...). HTTP on an ephemeral port.
pub async fn start(dir: &Path, emu: &TbEmulator, extra: &str) -> Running {
    let cfg = crate::common::bridge_config::test_config(dir, emu.port(), TOKEN, extra);
    app::start(cfg).await.expect("bridge starts")
}

pub fn base(running: &Running) -> String {
    format!("http://{}", running.http_addr.expect("http enabled"))
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// GET with an optional bearer token: (status, body text).
pub async fn get(url: &str, token: Option<&str>) -> (u16, String) {
    let mut r = client().get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

pub async fn get_json(url: &str, token: Option<&str>) -> Value {
    let (status, body) = get(url, token).await;
    assert_eq!(status, 200, "{url}: {body}");
    serde_json::from_str(&body).expect("json")
}

/// Poll `url` until `pred` holds on its JSON (bounded by `WAIT`); returns that JSON.
pub async fn wait_json(
    url: &str,
    token: Option<&str>,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = get_json(url, token).await;
        if pred(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; last: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The meter named `name` in an `/api/meters` answer.
pub fn meter<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|m| m["name"] == name)
}

/// The value of one sample line (`name{labels} value`) in a Prometheus text page.
pub fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}
