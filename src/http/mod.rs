//! The embedded HTTP server (issue #13): `/healthz`, `/readyz`, `/metrics`, the JSON API
//! (`/api/status`, `/api/meters`, `/api/history`, server-sent events on `/api/events`), meter
//! administration for registry meters, and the status page at `/` (plain HTML/CSS/JS embedded
//! with `include_str!`, no build step, no CDN).
//!
//! It only observes and administers: it reads state that other tasks keep (uplink status watch,
//! store stats, router counters, [`state::LiveState`]) and changes meters only through
//! [`crate::app::MeterSet`]. It must never sit on the data path: a slow or absent HTTP client
//! cannot delay a reading.

pub mod api;
pub mod auth;
pub mod client;
pub mod metrics;
pub mod registry;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::app::MeterSet;
use crate::config::HttpConfig;
use crate::router::RouterStats;
use crate::shutdown::Tasks;
use crate::store::StoreHandle;
use crate::uplink::UplinkStatus;
use state::LiveState;

/// How long a readiness probe waits for the store and for the broker's port.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often histogram buffers of the metrics recorder are drained.
const UPKEEP_EVERY: Duration = Duration::from_secs(10);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the handlers read. Everything here is a handle to state another task owns.
pub struct HttpContext {
    pub store: StoreHandle,
    pub uplink_status: watch::Receiver<UplinkStatus>,
    /// The local broker's bound address (None when `broker.enabled = false`).
    pub broker_addr: Option<SocketAddr>,
    /// The local broker: its connected clients (address, protocol) for the status API and the
    /// `dlms_bridge_broker_clients` gauge.
    pub broker: Option<crate::broker::BrokerHandle>,
    pub router_stats: Arc<RouterStats>,
    pub live: Arc<LiveState>,
    pub meters: Arc<MeterSet>,
}

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub ctx: Arc<HttpContext>,
    /// Serialises meter administration (registry write + live apply).
    pub admin_lock: Arc<tokio::sync::Mutex<()>>,
    /// Server shutdown: ends open event streams, which graceful shutdown would otherwise wait
    /// for forever.
    pub cancel: CancellationToken,
}

/// Bind the server's socket. Done first at start-up, so a taken port fails the start before
/// any other task is running.
pub async fn bind(listen: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Bind {
            addr: listen,
            source,
        })
}

/// Serve on `listener` until `cancel`. Returns the bound address.
pub fn start(
    cfg: &HttpConfig,
    listener: TcpListener,
    ctx: HttpContext,
    tasks: &Tasks,
    cancel: CancellationToken,
) -> Result<SocketAddr, Error> {
    let addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    metrics::recorder();
    let ctx = Arc::new(ctx);
    let live = ctx.live.clone();
    let status = ctx.uplink_status.clone();
    let c = cancel.clone();
    tasks.spawn("http-uplink-follow", async move {
        live.follow_uplink(status, c).await;
    });
    let c = cancel.clone();
    tasks.spawn("http-metrics-upkeep", async move {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = c.cancelled() => return,
                _ = tick.tick() => metrics::upkeep(),
            }
        }
    });
    let app = router(cfg, ctx, cancel.clone());
    let authenticated = cfg.token.as_ref().is_some_and(|t| !t.is_empty())
        || cfg.admin_token.as_ref().is_some_and(|t| !t.is_empty());
    info!(listen = %addr, authenticated, "HTTP server listening.");
    tasks.spawn("http", async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned());
        if let Err(e) = serve.await {
            warn!(error = %e, "HTTP server stopped.");
        }
    });
    Ok(addr)
}

/// The routes; `cancel` ends the server's event streams.
pub fn router(cfg: &HttpConfig, ctx: Arc<HttpContext>, cancel: CancellationToken) -> Router {
    let auth = auth::Auth::from_config(cfg);
    let state = AppState {
        ctx,
        admin_lock: Arc::default(),
        cancel,
    };
    let admin = Router::new()
        .route("/api/meters", axum::routing::post(api::create_meter))
        .route(
            "/api/meters/{name}",
            axum::routing::put(api::update_meter).delete(api::delete_meter),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            auth.clone(),
            auth::require_admin,
        ));
    let read = Router::new()
        .route("/", get(page_html))
        .route("/app.js", get(page_js))
        .route("/style.css", get(page_css))
        .route("/metrics", get(metrics_handler))
        .route("/api/status", get(api::status))
        .route("/api/meters", get(api::meters))
        .route("/api/history", get(api::history))
        .route("/api/events", get(api::events))
        .route_layer(axum::middleware::from_fn_with_state(
            auth,
            auth::require_read,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(admin)
        .merge(read)
        .with_state(state)
}

/// Why the bridge is not ready, if it is not: store answers, uplink task alive, broker listens.
pub async fn readiness(ctx: &HttpContext) -> Vec<String> {
    let mut why = Vec::new();
    match tokio::time::timeout(PROBE_TIMEOUT, ctx.store.stats()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => why.push(format!("store: {e}")),
        Err(_) => why.push(format!("store: no answer within {PROBE_TIMEOUT:?}")),
    }
    if ctx.uplink_status.has_changed().is_err() {
        why.push("uplink: task stopped".into());
    }
    if let Some(addr) = ctx.broker_addr {
        let target = probe_addr(addr);
        match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => why.push(format!("broker: not listening on {addr}: {e}")),
            Err(_) => why.push(format!(
                "broker: no answer on {addr} within {PROBE_TIMEOUT:?}"
            )),
        }
    }
    why
}

/// Where to connect to reach a listener bound to `addr` (an unspecified IP means loopback).
pub fn probe_addr(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

async fn readyz(State(s): State<AppState>) -> Response {
    let why = readiness(&s.ctx).await;
    if why.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", why.join("; ")),
        )
            .into_response()
    }
}

async fn metrics_handler(State(s): State<AppState>) -> Response {
    let ctx = &s.ctx;
    // The queue answers between its group commits; render the facade part meanwhile.
    let facade = tokio::task::spawn_blocking(metrics::render_facade);
    let store = tokio::time::timeout(PROBE_TIMEOUT, ctx.store.stats())
        .await
        .ok()
        .and_then(Result::ok);
    let meters = ctx.meters.list().await;
    let uplink = ctx.uplink_status.borrow().clone();
    let mut out = facade.await.unwrap_or_default();
    metrics::render_state(
        &metrics::Snapshot {
            uplink: &uplink,
            store,
            router: &ctx.router_stats,
            live: &ctx.live,
            meters: &meters,
            broker_clients: ctx.broker.as_ref().map(|b| b.client_count()),
            now_ms: crate::model::now_ms(),
        },
        &mut out,
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

async fn page_html() -> Response {
    asset(
        "text/html; charset=utf-8",
        include_str!("assets/index.html"),
    )
}

async fn page_js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    )
}

async fn page_css() -> Response {
    asset("text/css; charset=utf-8", include_str!("assets/style.css"))
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
