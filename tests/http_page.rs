//! The status page in a real headless Chromium (Debian's `chromium`), driven over the DevTools
//! protocol: it loads with no console errors, shows the simulated meters' live values updating,
//! and its form adds a registry meter that then appears polled. With `DLMS_BRIDGE_SCREENSHOT`
//! set to a path, a PNG of the page is written there (docs/status-page.png is made this way).

mod common;
mod http_support;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use common::tb_emulator::TbEmulator;
use futures_util::{SinkExt, StreamExt};
use http_support::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A minimal DevTools client: one page session, sequential calls; events seen while waiting for
/// an answer are kept (console messages, exceptions, log entries).
struct Cdp {
    ws: Ws,
    next_id: u64,
    session: Option<String>,
    events: Vec<Value>,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .expect("send to chromium");
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("devtools socket open")
                .expect("devtools message");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).expect("devtools json");
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method} failed: {v}");
                return v["result"].clone();
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Evaluate an expression in the page and return its value.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Evaluate `expr` until it is truthy (bounded); returns its value.
    async fn wait(&mut self, what: &str, expr: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.eval(expr).await;
            if !(v.is_null() || v == false || v == "" || v == 0) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what} ({expr})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Console errors, uncaught exceptions and error log entries seen so far.
    fn errors(&self) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| match e["method"].as_str() {
                Some("Runtime.exceptionThrown") => true,
                Some("Runtime.consoleAPICalled") => {
                    matches!(e["params"]["type"].as_str(), Some("error" | "assert"))
                }
                Some("Log.entryAdded") => e["params"]["entry"]["level"] == "error",
                _ => false,
            })
            .collect()
    }
}

/// Start headless Chromium with a fresh profile; returns the process and a page session.
async fn chromium(profile: &std::path::Path) -> (tokio::process::Child, Cdp) {
    let mut child = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("chromium is installed (apt-get install chromium; .ci/run does it)");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let url = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(u) = line.strip_prefix("DevTools listening on ") {
                return u.trim().to_string();
            }
        }
        panic!("chromium exited without a DevTools endpoint");
    })
    .await
    .expect("chromium starts in time");
    // Keep draining stderr so chromium never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("devtools websocket");
    let mut cdp = Cdp {
        ws,
        next_id: 0,
        session: None,
        events: Vec::new(),
    };
    let target = cdp
        .call("Target.createTarget", json!({ "url": "about:blank" }))
        .await;
    let attached = cdp
        .call(
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        )
        .await;
    cdp.session = attached["sessionId"].as_str().map(str::to_string);
    for m in ["Runtime.enable", "Log.enable", "Page.enable"] {
        cdp.call(m, json!({})).await;
    }
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
    )
    .await;
    (child, cdp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_live_meters_and_adds_a_registry_meter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = TbEmulator::start(TOKEN).await;
    let sims = sim_meters(3).await;
    let db = registry(dir.path());
    let dead = closed_port();
    let extra = format!(
        "[[meters]]\nname = \"Meter A\"\nhost = \"127.0.0.1\"\nport = {}\ninterval = \"300ms\"\n\
         [[meters]]\nname = \"Meter B\"\nhost = \"127.0.0.1\"\nport = {}\ninterval = \"300ms\"\n\
         [[meters]]\nname = \"Unplugged Meter\"\nhost = \"127.0.0.1\"\nport = {dead}\ninterval = \"500ms\"\ntimeout = \"300ms\"\n\
         [[meters]]\ndatabase = \"{}\"\ninterval = \"300ms\"\n",
        sims.addrs[0].port(),
        sims.addrs[1].port(),
        db.display()
    );
    let running = start(dir.path(), &emu, &extra).await;
    let base = base(&running);
    let profile = tempfile::tempdir().expect("profile dir");
    let (mut child, mut cdp) = chromium(profile.path()).await;

    cdp.call("Page.navigate", json!({ "url": format!("{base}/") }))
        .await;
    // Page.navigate answers before the new document exists: wait for it to load first.
    cdp.wait(
        "the page to load",
        &format!("location.href === '{base}/' && document.readyState === 'complete'"),
    )
    .await;
    cdp.wait(
        "the page to go live",
        "document.getElementById('live').textContent === 'live'",
    )
    .await;
    cdp.wait(
        "three meter rows",
        "document.querySelectorAll('#meter-rows tr').length === 3",
    )
    .await;
    let voltage = "(() => { const b = document.querySelector('tr[data-meter=\"Meter A\"] [data-key=\"voltage_l1\"]'); return b ? b.textContent : ''; })()";
    let polls = "(() => { const c = document.querySelector('tr[data-meter=\"Meter A\"] .polls'); return c ? parseInt(c.textContent, 10) : 0; })()";
    let first = cdp.wait("Meter A's voltage", voltage).await;
    assert!(
        first.as_str().is_some_and(|t| t.ends_with(" V")),
        "value with its unit: {first}"
    );
    let n0 = cdp.wait("Meter A's poll count", polls).await;
    // Live: the count and the reading change without reloading the page.
    cdp.wait(
        "Meter A's poll count to grow",
        &format!("{polls} > {}", n0.as_u64().expect("count") + 2),
    )
    .await;
    let mut seen = HashMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < 2 {
        let v = cdp.eval(voltage).await;
        seen.insert(v.to_string(), ());
        assert!(
            tokio::time::Instant::now() < deadline,
            "Meter A's voltage never changed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cdp.wait(
        "the unplugged meter shown failing",
        "(() => { const r = document.querySelector('tr[data-meter=\"Unplugged Meter\"]'); return r && /failing|down/.test(r.textContent) && r.querySelector('.err').textContent.length > 0; })()",
    )
    .await;
    cdp.wait(
        "the uplink shown connected",
        "document.getElementById('uplink-state').textContent === 'connected'",
    )
    .await;

    // The form adds a registry meter, which then appears polled.
    let port = sims.addrs[2].port();
    cdp.eval(&format!(
        "document.getElementById('f-name').value = 'Meter C'; \
         document.getElementById('f-host').value = '127.0.0.1'; \
         document.getElementById('f-port').value = '{port}'; \
         document.getElementById('f-submit').click(); true"
    ))
    .await;
    let msg = cdp
        .wait(
            "the form's answer",
            "document.getElementById('form-msg').textContent",
        )
        .await;
    assert!(
        msg.as_str().is_some_and(|m| m.starts_with("Added Meter C")),
        "{msg}"
    );
    cdp.wait(
        "Meter C polled on the page",
        "(() => { const r = document.querySelector('tr[data-meter=\"Meter C\"]'); return r && r.querySelector('.badge').textContent === 'up' && r.querySelector('[data-key=\"voltage_l1\"]') !== null; })()",
    )
    .await;
    assert_eq!(registry_rows(&db).len(), 1);

    if let Ok(path) = std::env::var("DLMS_BRIDGE_SCREENSHOT") {
        // For the docs: let the sparklines fill for a while first when asked to.
        let secs: u64 = std::env::var("DLMS_BRIDGE_SCREENSHOT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if secs > 0 {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            cdp.eval("loadHistory().then(() => true)").await;
        }
        let shot = cdp
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        use base64::Engine as _;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("png data"))
            .expect("base64");
        std::fs::write(&path, png).expect("write screenshot");
    }

    let errors = cdp.errors();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    // The page's open event stream does not hold up shutdown.
    assert!(
        running.shutdown().await.expect("shutdown"),
        "clean shutdown"
    );
    let _ = child.kill().await;
}
