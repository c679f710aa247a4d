//! `dlms-bridge status`: ask the running bridge's HTTP API for `/api/status` and print what the
//! original `verify_gateway_architecture.sh` checked: services up, the local MQTT port
//! listening, the uplink connected, no session takeovers in the last hour. Healthy only when all
//! hold. It reads the same config file as the bridge to find the address and the token.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;

/// How long the status request may take.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the status could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the HTTP server is disabled (http.enabled = false); nothing to ask")]
    Disabled,
    #[error("cannot reach the bridge at {url}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the bridge at {url} answered {status}")]
    Status { url: String, status: u16 },
}

/// The base URL of the bridge's HTTP server as configured.
pub fn base_url(cfg: &Config) -> String {
    format!("http://{}", super::probe_addr(cfg.http_listen))
}

/// Fetch `/api/status` from the bridge `cfg` describes.
pub async fn fetch_status(cfg: &Config) -> Result<Value, Error> {
    if !cfg.http.enabled {
        return Err(Error::Disabled);
    }
    let url = format!("{}/api/status", base_url(cfg));
    let client = reqwest::Client::builder()
        .timeout(STATUS_TIMEOUT)
        .build()
        .map_err(|source| Error::Request {
            url: url.clone(),
            source,
        })?;
    let mut req = client.get(&url);
    let token = cfg
        .http
        .token
        .as_ref()
        .or(cfg.http.admin_token.as_ref())
        .filter(|t| !t.is_empty());
    if let Some(t) = token {
        req = req.bearer_auth(t.expose());
    }
    let resp = req.send().await.map_err(|source| Error::Request {
        url: url.clone(),
        source,
    })?;
    if !resp.status().is_success() {
        return Err(Error::Status {
            url,
            status: resp.status().as_u16(),
        });
    }
    resp.json()
        .await
        .map_err(|source| Error::Request { url, source })
}

/// The terminal summary of a status document, and whether the bridge is healthy.
pub fn summarize(doc: &Value) -> (String, bool) {
    let mut out = String::new();
    let mut healthy = true;
    let mut line = |ok: bool, what: &str, detail: String| {
        healthy &= ok;
        let _ = writeln!(
            out,
            "{} {what:<22} {detail}",
            if ok { "[ ok ]" } else { "[FAIL]" }
        );
    };
    let not_ready: Vec<String> = doc["not_ready"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    line(
        doc["ready"].as_bool() == Some(true),
        "services",
        if not_ready.is_empty() {
            "store, uplink task and broker up".into()
        } else {
            not_ready.join("; ")
        },
    );
    let b = &doc["broker"];
    if b["enabled"].as_bool() == Some(true) {
        let listen = b["listen"].as_str().unwrap_or("?");
        let port = listen.rsplit(':').next().unwrap_or("?");
        line(
            b["listening"].as_bool() == Some(true),
            &format!("port {port} listening"),
            format!(
                "{listen}, {} local client(s) seen",
                b["clients"].as_array().map_or(0, Vec::len)
            ),
        );
    } else {
        line(true, "local broker", "disabled in the config".into());
    }
    let u = &doc["uplink"];
    let now = doc["now_ms"].as_i64().unwrap_or(0);
    let connected = u["connected"].as_bool() == Some(true);
    let detail = if connected {
        let since = u["connected_since_ms"]
            .as_i64()
            .map(|t| format!(" for {}s", (now - t).max(0) / 1000))
            .unwrap_or_default();
        format!(
            "connected{since} ({})",
            u["protocol"].as_str().unwrap_or("?")
        )
    } else {
        format!(
            "not connected: {}",
            u["last_error"].as_str().unwrap_or("no session yet")
        )
    };
    line(connected, "uplink connected", detail);
    let takeovers = u["session_takeovers_last_hour"].as_u64().unwrap_or(0);
    line(
        takeovers == 0,
        "no session takeovers",
        format!("{takeovers} in the last hour"),
    );
    if let Some(q) = doc["queue"].as_object() {
        let age = q
            .get("oldest_age_ms")
            .and_then(Value::as_i64)
            .map(|a| format!(", oldest {}s", a / 1000))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "       {:<22} {} record(s) waiting{age}",
            "queue",
            q.get("depth").and_then(Value::as_u64).unwrap_or(0)
        );
    }
    if let Some(ms) = doc["meters"].as_array() {
        let up = ms.iter().filter(|m| m["state"] == "up").count();
        let _ = writeln!(out, "       {:<22} {up}/{} answering", "meters", ms.len());
    }
    (out, healthy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn healthy_only_when_everything_holds() {
        let mut doc = json!({
            "now_ms": 10_000, "ready": true, "not_ready": [],
            "broker": {"enabled": true, "listen": "127.0.0.1:1884", "listening": true, "clients": []},
            "uplink": {"connected": true, "connected_since_ms": 4_000, "protocol": "V5",
                       "session_takeovers_last_hour": 0},
            "queue": {"depth": 0}, "meters": [{"state": "up"}]
        });
        let (text, ok) = summarize(&doc);
        assert!(ok, "{text}");
        assert!(text.contains("port 1884 listening"), "{text}");
        assert!(text.contains("connected for 6s"), "{text}");
        doc["uplink"]["session_takeovers_last_hour"] = json!(2);
        let (text, ok) = summarize(&doc);
        assert!(!ok);
        assert!(text.contains("[FAIL] no session takeovers"), "{text}");
    }
}
