//! JSON handlers: status and meters (read), server-sent events for the page, and meter
//! administration for registry meters (admin). Every refusal is JSON: `{"error": ".."}`, or for
//! validation `{"errors": [{"key": "port", "message": ".."}]}` naming each bad field.

use std::convert::Infallible;
use std::path::PathBuf;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::{readiness, registry, AppState, HttpContext};
use crate::app::{MeterInfo, MeterOrigin};
use crate::model::now_ms;

/// How often a connected page is sent the status when something changed.
const EVENTS_EVERY: Duration = Duration::from_secs(1);
/// A page is sent the status at least this often even when nothing changed.
const EVENTS_IDLE_MAX: Duration = Duration::from_secs(10);

/// One bad field of a request body.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FieldError {
    pub key: String,
    pub message: String,
}

fn field(key: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        key: key.into(),
        message: message.into(),
    }
}

fn error(status: StatusCode, why: impl Into<String>) -> Response {
    (status, Json(json!({ "error": why.into() }))).into_response()
}

fn invalid(errors: Vec<FieldError>) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({ "errors": errors })),
    )
        .into_response()
}

/// One meter as the API shows it: where it is defined, and its live state.
fn meter_json(m: &MeterInfo, live: Option<&super::state::MeterLive>) -> Value {
    let mut values = Map::new();
    let mut out = json!({
        "name": m.name,
        "host": m.host,
        "port": m.port,
        "interval_ms": m.interval.as_millis() as u64,
        "origin": m.origin,
        "state": live.map_or("waiting", |l| l.state()),
    });
    if let Some(l) = live {
        for (k, v) in &l.values {
            values.insert(k.clone(), json!({ "value": v, "unit": l.units.get(k) }));
        }
        out["last_reading_ms"] = json!(l.last_reading_ms);
        out["last_poll_ms"] = json!(l.last_poll_ms);
        out["last_error"] = json!(l.last_error);
        out["last_error_ms"] = json!(l.last_error_ms);
        out["consecutive_failures"] = json!(l.consecutive_failures);
        out["polls"] = json!(l.polls);
        out["failures"] = json!(l.failures);
    } else {
        out["polls"] = json!(0);
        out["failures"] = json!(0);
        out["consecutive_failures"] = json!(0);
    }
    out["values"] = Value::Object(values);
    out
}

async fn meters_json(ctx: &HttpContext) -> Vec<Value> {
    let list = ctx.meters.list().await;
    ctx.live.with_meters(|live| {
        list.iter()
            .map(|m| meter_json(m, live.get(&m.name)))
            .collect()
    })
}

/// The whole status document (`/api/status`, the page's events, `dlms-bridge status`).
pub async fn status_json(ctx: &HttpContext) -> Value {
    let not_ready = readiness(ctx).await;
    let u = ctx.uplink_status.borrow().clone();
    let timeline = ctx.live.uplink();
    let now = now_ms();
    let store = ctx.store.stats().await.ok();
    let broker_listening =
        ctx.broker_addr.is_some() && !not_ready.iter().any(|w| w.starts_with("broker:"));
    // Connected clients come from the broker (address, protocol); what they published, and
    // clients seen publishing that have since left, from the live state.
    let seen = ctx.live.clients();
    let connected = ctx.broker.as_ref().map(|b| b.clients()).unwrap_or_default();
    let mut clients: Vec<Value> = connected
        .iter()
        .map(|c| {
            let s = seen.iter().find(|s| s.client_id == c.client_id);
            json!({
                "client_id": c.client_id,
                "username": c.username,
                "address": c.peer.to_string(),
                "protocol": c.protocol,
                "connected": true,
                "connected_since_ms": c.connected_since,
                "messages": s.map_or(c.messages_in, |s| s.messages),
                "bytes": s.map(|s| s.bytes),
                "first_seen_ms": s.map(|s| s.first_seen_ms),
                "last_seen_ms": s.map(|s| s.last_seen_ms),
                "last_topic": s.map(|s| s.last_topic.clone()),
            })
        })
        .collect();
    clients.extend(
        seen.iter()
            .filter(|s| !connected.iter().any(|c| c.client_id == s.client_id))
            .map(|c| {
                json!({
                    "client_id": c.client_id,
                    "username": c.username,
                    "address": Value::Null,
                    "protocol": Value::Null,
                    "connected": false,
                    "connected_since_ms": Value::Null,
                    "messages": c.messages,
                    "bytes": c.bytes,
                    "first_seen_ms": c.first_seen_ms,
                    "last_seen_ms": c.last_seen_ms,
                    "last_topic": c.last_topic,
                })
            }),
    );
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "now_ms": now,
        "started_ms": ctx.live.started_ms(),
        "ready": not_ready.is_empty(),
        "not_ready": not_ready,
        "uplink": {
            "alive": ctx.uplink_status.has_changed().is_ok(),
            "connected": u.connected,
            "protocol": u.protocol.map(|p| format!("{p:?}")),
            "connected_since_ms": timeline.connected_since_ms,
            "disconnected_since_ms": timeline.disconnected_since_ms,
            "connect_attempts": u.connect_attempts,
            "connects": u.connects,
            "session_takeovers": u.session_takeovers,
            "session_takeovers_last_hour": timeline.takeovers_since(now),
            "dead_links": u.dead_links,
            "published": u.published,
            "acked_records": u.acked_records,
            "failed_acks": u.failed_acks,
            "dropped_records": u.dropped_records,
            "last_error": u.last_error,
        },
        "queue": store.map(|s| json!({
            "depth": s.depth,
            "oldest_age_ms": s.oldest_created_ms.map(|t| (now - t).max(0)),
            "bytes_on_disk": s.bytes_on_disk,
            "enqueued": s.enqueued,
            "dropped_full": s.dropped_full,
            "dropped_age": s.dropped_age,
        })),
        "broker": {
            "enabled": ctx.broker_addr.is_some(),
            "listen": ctx.broker_addr.map(|a| a.to_string()),
            "tls_listen": ctx.broker.as_ref().and_then(|b| b.tls_local_addr()).map(|a| a.to_string()),
            "listening": broker_listening,
            "clients": clients,
        },
        "sparkline_key": ctx.live.sparkline_key(),
        "meters": meters_json(ctx).await,
    })
}

pub async fn status(State(s): State<AppState>) -> Json<Value> {
    Json(status_json(&s.ctx).await)
}

pub async fn meters(State(s): State<AppState>) -> Json<Value> {
    Json(Value::Array(meters_json(&s.ctx).await))
}

/// The sparkline key's last hour for every meter: `{"key": .., "meters": {name: [[ms, v], ..]}}`.
pub async fn history(State(s): State<AppState>) -> Json<Value> {
    let names: Vec<String> = s
        .ctx
        .meters
        .list()
        .await
        .into_iter()
        .map(|m| m.name)
        .collect();
    let meters: Map<String, Value> = s.ctx.live.with_meters(|live| {
        names
            .into_iter()
            .map(|n| {
                let points: Vec<Value> = live
                    .get(&n)
                    .map(|l| l.history.iter().map(|(t, v)| json!([t, v])).collect())
                    .unwrap_or_default();
                (n, Value::Array(points))
            })
            .collect()
    });
    Json(json!({ "key": s.ctx.live.sparkline_key(), "meters": meters }))
}

/// Server-sent events: `status` with the status document when something changed (checked once a
/// second), and at least every 10 s. Costs nothing while no page is open.
pub async fn events(
    State(s): State<AppState>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    struct St {
        app: AppState,
        tick: tokio::time::Interval,
        seen: Option<u64>,
        uplink: tokio::sync::watch::Receiver<crate::uplink::UplinkStatus>,
        last_sent: tokio::time::Instant,
    }
    let mut tick = tokio::time::interval(EVENTS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let uplink = s.ctx.uplink_status.clone();
    let st = St {
        app: s,
        tick,
        seen: None,
        uplink,
        last_sent: tokio::time::Instant::now(),
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            tokio::select! {
                _ = st.app.cancel.cancelled() => return None,
                _ = st.tick.tick() => {}
            }
            let v = st.app.ctx.live.version();
            let uplink_changed = st.uplink.has_changed().unwrap_or(false);
            if st.seen == Some(v) && !uplink_changed && st.last_sent.elapsed() < EVENTS_IDLE_MAX {
                continue;
            }
            st.uplink.borrow_and_update();
            st.seen = Some(v);
            st.last_sent = tokio::time::Instant::now();
            let doc = status_json(&st.app.ctx).await;
            let ev = Event::default().event("status").data(doc.to_string());
            return Some((Ok(ev), st));
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A meter as the admin API takes it: the columns of the registry table.
#[derive(Debug, Default)]
struct MeterBody {
    name: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    database: Option<PathBuf>,
}

/// Only JSON bodies: a cross-site HTML form can post `text/plain` without a CORS preflight.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"))
}

fn not_json() -> Response {
    error(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "the body must be JSON (Content-Type: application/json)",
    )
}

/// Parse and check a body by hand, so that every error names its field.
fn parse_body(body: &Bytes, create: bool) -> Result<MeterBody, Vec<FieldError>> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| vec![field("body", format!("not JSON: {e}"))])?;
    let Value::Object(obj) = v else {
        return Err(vec![field("body", "must be a JSON object")]);
    };
    let mut errs = Vec::new();
    let mut out = MeterBody::default();
    for (k, v) in &obj {
        match k.as_str() {
            "name" => match v.as_str() {
                Some(s) => match crate::model::check_device_name(s) {
                    Ok(()) => out.name = Some(s.trim().to_string()),
                    Err(why) => errs.push(field("name", why)),
                },
                None => errs.push(field("name", "must be a string")),
            },
            "host" => match v.as_str().map(str::trim) {
                Some("") => errs.push(field("host", "must not be empty")),
                Some(h) if h.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                    errs.push(field("host", "must be a host name or IP address"))
                }
                Some(h) => out.host = Some(h.to_string()),
                None => errs.push(field("host", "must be a string")),
            },
            "port" => match v.as_u64() {
                Some(0) => errs.push(field("port", "must not be 0")),
                Some(p) => match u16::try_from(p) {
                    Ok(p) => out.port = Some(p),
                    Err(_) => errs.push(field("port", "must be at most 65535")),
                },
                None => errs.push(field("port", "must be an integer 1..65535")),
            },
            "database" => match v.as_str() {
                Some(s) if !s.is_empty() => out.database = Some(PathBuf::from(s)),
                _ => errs.push(field("database", "must be a path")),
            },
            other => errs.push(field(
                other,
                "unknown field (known: name, host, port, database)",
            )),
        }
    }
    if create {
        for (k, missing) in [
            ("name", out.name.is_none()),
            ("host", out.host.is_none()),
            ("port", out.port.is_none()),
        ] {
            if missing && !errs.iter().any(|e| e.key == k) {
                errs.push(field(k, "is required"));
            }
        }
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(errs)
    }
}

/// Which registry database a new meter goes to.
async fn pick_registry(s: &AppState, asked: Option<PathBuf>) -> Result<PathBuf, Response> {
    let dbs: Vec<PathBuf> = s
        .ctx
        .meters
        .entries()
        .await
        .into_iter()
        .filter_map(|e| e.database)
        .collect();
    if dbs.is_empty() {
        return Err(error(
            StatusCode::CONFLICT,
            "no registry database is configured ([[meters]] database = \"...\"); meters of the \
             config file are changed by editing it",
        ));
    }
    match asked {
        Some(a) if dbs.contains(&a) => Ok(a),
        Some(a) => Err(invalid(vec![field(
            "database",
            format!("`{}` is not a configured registry", a.display()),
        )])),
        None if dbs.len() == 1 => Ok(dbs[0].clone()),
        None => Err(invalid(vec![field(
            "database",
            "is required: several registries are configured",
        )])),
    }
}

/// The 409 for a name some running meter (of any origin) already has.
async fn name_taken(s: &AppState, name: &str) -> Option<Response> {
    s.ctx
        .meters
        .list()
        .await
        .into_iter()
        .find(|m| m.name == name)
        .map(|m| conflict_for(&m))
}

fn conflict_for(m: &MeterInfo) -> Response {
    let why = match m.origin {
        MeterOrigin::Config => format!(
            "meter `{}` is defined in the config file; change it there and reload (SIGHUP)",
            m.name
        ),
        MeterOrigin::Simulator => format!(
            "meter `{}` is a built-in simulated meter ([simulator] in the config file)",
            m.name
        ),
        MeterOrigin::Registry(_) => format!("meter `{}` already exists", m.name),
    };
    error(StatusCode::CONFLICT, why)
}

async fn blocking(
    f: impl FnOnce() -> Result<(), registry::Error> + Send + 'static,
) -> Result<(), Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            crate::sources::meters::poller::error_chain(&e),
        )),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

async fn apply(s: &AppState) -> Result<Value, Response> {
    match s.ctx.meters.reload_registries().await {
        Ok(r) => Ok(json!({ "started": r.meters_started, "stopped": r.meters_stopped })),
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("saved, but not applied: {e:#}"),
        )),
    }
}

/// `POST /api/meters`: add a meter to a registry database and start polling it.
pub async fn create_meter(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if !is_json(&headers) {
        return not_json();
    }
    let b = match parse_body(&body, true) {
        Ok(b) => b,
        Err(e) => return invalid(e),
    };
    let _guard = s.admin_lock.lock().await;
    let (Some(name), Some(host), Some(port)) = (b.name, b.host, b.port) else {
        return invalid(vec![field("body", "name, host and port are required")]);
    };
    if let Some(r) = name_taken(&s, &name).await {
        return r;
    }
    let db = match pick_registry(&s, b.database).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let (n, h, d) = (name.clone(), host.clone(), db.clone());
    if let Err(r) = blocking(move || registry::insert(&d, &n, &h, port)).await {
        return r;
    }
    tracing::info!(meter = %name, registry = %db.display(), "Meter added through the HTTP API.");
    match apply(&s).await {
        Ok(applied) => (
            StatusCode::CREATED,
            Json(json!({ "name": name, "host": host, "port": port,
                         "database": db, "applied": applied })),
        )
            .into_response(),
        Err(r) => r,
    }
}

async fn registry_meter(s: &AppState, name: &str) -> Result<(MeterInfo, PathBuf), Response> {
    let Some(m) = s
        .ctx
        .meters
        .list()
        .await
        .into_iter()
        .find(|m| m.name == name)
    else {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("no meter named `{name}`"),
        ));
    };
    match &m.origin {
        MeterOrigin::Registry(db) => {
            let db = db.clone();
            Ok((m, db))
        }
        _ => Err(conflict_for(&m)),
    }
}

/// `PUT /api/meters/{name}`: change a registry meter's name, host or port.
pub async fn update_meter(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !is_json(&headers) {
        return not_json();
    }
    let b = match parse_body(&body, false) {
        Ok(b) => b,
        Err(e) => return invalid(e),
    };
    if b.database.is_some() {
        return invalid(vec![field(
            "database",
            "cannot move a meter between registries; delete and add it",
        )]);
    }
    let _guard = s.admin_lock.lock().await;
    let (m, db) = match registry_meter(&s, &name).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let new_name = b.name.unwrap_or_else(|| m.name.clone());
    if new_name != m.name {
        if let Some(r) = name_taken(&s, &new_name).await {
            return r;
        }
    }
    let host = b.host.unwrap_or(m.host.clone());
    let port = b.port.unwrap_or(m.port);
    let (old, n, h, d) = (name.clone(), new_name.clone(), host.clone(), db.clone());
    if let Err(r) = blocking(move || registry::update(&d, &old, &n, &h, port)).await {
        return r;
    }
    tracing::info!(meter = %name, new_name = %new_name, "Meter changed through the HTTP API.");
    match apply(&s).await {
        Ok(applied) => Json(json!({ "name": new_name, "host": host, "port": port,
                                    "database": db, "applied": applied }))
        .into_response(),
        Err(r) => r,
    }
}

/// `DELETE /api/meters/{name}`: remove a registry meter and stop polling it.
pub async fn delete_meter(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let _guard = s.admin_lock.lock().await;
    let (_, db) = match registry_meter(&s, &name).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let (n, d) = (name.clone(), db.clone());
    if let Err(r) = blocking(move || registry::delete(&d, &n)).await {
        return r;
    }
    tracing::info!(meter = %name, "Meter removed through the HTTP API.");
    match apply(&s).await {
        Ok(applied) => Json(json!({ "deleted": name, "applied": applied })).into_response(),
        Err(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_errors_name_their_fields() {
        let errs = parse_body(
            &Bytes::from_static(br#"{"name":"","port":70000,"hots":"x"}"#),
            true,
        )
        .expect_err("invalid");
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        for k in ["name", "port", "hots", "host"] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        let ok = parse_body(
            &Bytes::from_static(br#"{"name":"M","host":"10.0.0.1","port":4059}"#),
            true,
        )
        .expect("valid");
        assert_eq!(ok.port, Some(4059));
        assert_eq!(
            parse_body(&Bytes::from_static(b"nope"), true).expect_err("not json")[0].key,
            "body"
        );
        assert!(parse_body(&Bytes::from_static(br#"{"port":1}"#), false).is_ok());
    }
}
