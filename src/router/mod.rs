//! The router task: turns [`SourceEvent`]s into [`Record`]s (configured mappings first, then
//! the built-in rules) and makes them durable through the store; carries ThingsBoard's
//! downlink (RPC, shared attributes, attribute responses) to meters and local topics, and queues
//! every RPC reply. It must not talk to ThingsBoard (the uplink owns that session) nor touch
//! SQLite directly.

pub mod builtin;
pub mod convert;
pub mod expr;
pub mod mapping;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::broker::BrokerHandle;
use crate::config::LocalConfig;
use crate::model::{now_ms, Downlink, Record, RecordKind, RpcRequest};
use crate::router::mapping::MappingSet;
use crate::sources::dlms::MeterHandle;
use crate::sources::{LocalPublish, SourceEvent};
use crate::store::StoreHandle;

/// Most events folded into one store enqueue (one transaction).
pub const MAX_EVENTS_PER_ENQUEUE: usize = 1024;
/// How often periodic report strategies are evaluated.
const DUE_EVERY: Duration = Duration::from_millis(500);
/// How often the router logs its counters at INFO.
const STATS_EVERY: Duration = Duration::from_secs(60);
/// Longest a malformed message is quoted in a log line.
const LOG_SNIPPET: usize = 120;

/// Meter name → actor handle, replaced on reload; read (briefly, never across an await) to route
/// an RPC.
pub type MeterMap = Arc<RwLock<HashMap<String, MeterHandle>>>;

/// Capacity of the reload channel (new mapping sets from SIGHUP).
pub const RELOAD_CAPACITY: usize = 4;

/// Counters the router keeps; shared for health/metrics.
#[derive(Debug, Default)]
pub struct RouterStats {
    pub local_messages: AtomicU64,
    pub records_queued: AtomicU64,
    /// Local messages on a handled topic that could not be used (bad JSON, bad device name).
    pub malformed_dropped: AtomicU64,
    /// Local messages on topics no rule handles (normal local traffic).
    pub unmatched: AtomicU64,
    /// Records the store refused (full with drop_newest, or failing).
    pub store_rejected: AtomicU64,
    pub rpc_requests: AtomicU64,
}

/// The channels the router reads.
pub struct RouterInputs {
    /// From the broker front and every meter actor; closes when they are all gone.
    pub events_rx: mpsc::Receiver<SourceEvent>,
    /// From the uplink: RPCs, shared attribute updates, attribute responses.
    pub downlink_rx: mpsc::Receiver<Downlink>,
    /// New mapping sets from a configuration reload (SIGHUP).
    pub reload_rx: mpsc::Receiver<MappingSet>,
}

pub struct Router {
    /// From the broker front and every meter actor; closes when they are all gone.
    events_rx: mpsc::Receiver<SourceEvent>,
    /// From the uplink: RPCs, shared attribute updates, attribute responses.
    downlink_rx: mpsc::Receiver<Downlink>,
    store: StoreHandle,
    mappings: MappingSet,
    local: LocalConfig,
    /// Where RPCs and attribute updates for local devices are published.
    broker: Option<BrokerHandle>,
    /// RPCs for a meter queue behind its polls on the one association its actor owns.
    meters: MeterMap,
    /// New mapping sets from a configuration reload (SIGHUP).
    reload_rx: mpsc::Receiver<MappingSet>,
    stats: Arc<RouterStats>,
    /// Live per-meter and per-client view for the HTTP status API; sees every event.
    live: Option<Arc<crate::http::state::LiveState>>,
}

impl Router {
    pub fn new(
        inputs: RouterInputs,
        store: StoreHandle,
        mappings: MappingSet,
        local: LocalConfig,
        broker: Option<BrokerHandle>,
        meters: MeterMap,
    ) -> Self {
        Router {
            events_rx: inputs.events_rx,
            downlink_rx: inputs.downlink_rx,
            store,
            mappings,
            local,
            broker,
            meters,
            reload_rx: inputs.reload_rx,
            stats: Arc::default(),
            live: None,
        }
    }

    /// Show every event to the HTTP server's live state (meters' last values, local clients).
    pub fn with_live(mut self, live: Arc<crate::http::state::LiveState>) -> Self {
        self.live = Some(live);
        self
    }

    pub fn stats(&self) -> Arc<RouterStats> {
        self.stats.clone()
    }

    /// Runs until every source has gone (the events channel closed), then returns.
    pub async fn run(mut self) {
        let mut due = tokio::time::interval(DUE_EVERY);
        due.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut stats_tick = tokio::time::interval(STATS_EVERY);
        stats_tick.tick().await;
        let mut downlink_open = true;
        let mut reload_open = true;
        let mut batch = Vec::with_capacity(MAX_EVENTS_PER_ENQUEUE);
        loop {
            tokio::select! {
                n = self.events_rx.recv_many(&mut batch, MAX_EVENTS_PER_ENQUEUE) => {
                    if n == 0 {
                        break;
                    }
                    let records = self.map_events(batch.drain(..));
                    self.enqueue(records).await;
                }
                dl = self.downlink_rx.recv(), if downlink_open => match dl {
                    Some(dl) => self.downlink(dl).await,
                    None => downlink_open = false,
                },
                m = self.reload_rx.recv(), if reload_open => match m {
                    Some(m) => {
                        self.mappings = m;
                        info!("Mappings reloaded.");
                    }
                    None => reload_open = false,
                },
                _ = due.tick() => {
                    let records = self.mappings.due(now_ms());
                    self.enqueue(records).await;
                }
                _ = stats_tick.tick() => self.log_stats(),
            }
        }
        self.log_stats();
        debug!("Router drained; all sources are gone.");
    }

    fn log_stats(&self) {
        let s = &self.stats;
        info!(
            local_messages = s.local_messages.load(Ordering::Relaxed),
            records_queued = s.records_queued.load(Ordering::Relaxed),
            malformed_dropped = s.malformed_dropped.load(Ordering::Relaxed),
            unmatched = s.unmatched.load(Ordering::Relaxed),
            store_rejected = s.store_rejected.load(Ordering::Relaxed),
            "Router totals."
        );
    }

    fn map_events(&mut self, events: impl Iterator<Item = SourceEvent>) -> Vec<Record> {
        let mut out = Vec::new();
        for ev in events {
            if let Some(live) = &self.live {
                live.observe(&ev);
            }
            match ev {
                SourceEvent::Records(rs) => out.extend(rs),
                SourceEvent::Local(msg) => {
                    self.stats.local_messages.fetch_add(1, Ordering::Relaxed);
                    self.map_local(&msg, &mut out);
                }
            }
        }
        out
    }

    fn map_local(&mut self, msg: &LocalPublish, out: &mut Vec<Record>) {
        let res = match self.mappings.map(msg) {
            Some(r) => r.map_err(|e| (e.kind(), e.to_string())),
            None => match builtin::map(msg, &self.local) {
                Some(r) => r.map_err(|e| (e.kind(), e.to_string())),
                None => {
                    self.stats.unmatched.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
        };
        match res {
            Ok(records) => out.extend(records),
            Err((kind, error)) => {
                metrics::counter!("dlms_bridge_mapping_errors_total", "kind" => kind).increment(1);
                let n = self.stats.malformed_dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // The first few, then every 1000th: a broken publisher must not flood the log.
                if n <= 10 || n % 1000 == 0 {
                    let snippet: String = String::from_utf8_lossy(&msg.payload)
                        .chars()
                        .take(LOG_SNIPPET)
                        .collect();
                    warn!(
                        topic = %msg.topic,
                        client = %msg.client_id,
                        %error,
                        payload = %snippet,
                        dropped_total = n,
                        "Dropped a malformed local message."
                    );
                }
            }
        }
    }

    async fn enqueue(&self, records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        let n = records.len() as u64;
        if tracing::enabled!(tracing::Level::DEBUG) {
            for r in records.iter().filter(|r| r.kind == RecordKind::Telemetry) {
                debug!(device = %r.device, data = %r.payload, "Queued telemetry.");
            }
        }
        match self.store.enqueue(records).await {
            Ok(()) => {
                self.stats.records_queued.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.store_rejected.fetch_add(n, Ordering::Relaxed);
                error!(error = %e, records = n, "Queue refused records; they are lost.");
            }
        }
    }

    async fn downlink(&mut self, dl: Downlink) {
        match dl {
            Downlink::Rpc(req) => self.rpc(req),
            Downlink::Attributes(upd) => {
                let outs = self.mappings.attribute_update_publishes(&upd);
                if outs.is_empty() {
                    debug!(device = %upd.device, "Shared attribute update matches no attributeUpdates rule.");
                }
                for o in outs {
                    self.publish_local(&o.topic, o.payload, o.retain).await;
                }
            }
            Downlink::AttributeResponse { device, id, values } => {
                match self
                    .mappings
                    .attribute_response_publish(&device, id, &values)
                {
                    Some(o) => self.publish_local(&o.topic, o.payload, o.retain).await,
                    None => {
                        debug!(%device, id, "Attribute response with no pending local request.")
                    }
                }
            }
            Downlink::DeviceDisconnected { device, reason } => {
                info!(%device, ?reason, "ThingsBoard closed a device session.");
            }
        }
    }

    async fn publish_local(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        let Some(b) = &self.broker else {
            warn!(%topic, "No local broker to publish to (broker.enabled = false).");
            return;
        };
        if let Err(e) = b.publish(topic, payload.into(), retain).await {
            warn!(%topic, error = %e, "Local publish failed.");
        }
    }

    /// Every RPC gets exactly one reply: the meter's answer, the local device's answer, or an
    /// error (no route, timeout). Each runs in its own task so a slow device never blocks the
    /// router.
    fn rpc(&mut self, req: RpcRequest) {
        self.stats.rpc_requests.fetch_add(1, Ordering::Relaxed);
        let store = self.store.clone();
        let meter = self
            .meters
            .read()
            .ok()
            .and_then(|m| m.get(&req.device).cloned());
        if let Some(meter) = meter {
            tokio::spawn(async move {
                let data = crate::downlink::meter_rpc(&meter, &req).await;
                queue_reply(&store, &req, data).await;
            });
            return;
        }
        match (self.mappings.rpc_route(&req), self.broker.clone()) {
            (Some(route), Some(broker)) => {
                tokio::spawn(async move {
                    let data = crate::downlink::local_rpc(&broker, route).await;
                    queue_reply(&store, &req, data).await;
                });
            }
            (route, _) => {
                let why = if route.is_none() {
                    format!(
                        "no RPC route for device `{}` method `{}`",
                        req.device, req.method
                    )
                } else {
                    "local broker disabled".to_string()
                };
                warn!(device = %req.device, method = %req.method, "RPC has no route; answering with an error.");
                tokio::spawn(async move {
                    queue_reply(&store, &req, json!({ "success": false, "error": why })).await;
                });
            }
        }
    }
}

async fn queue_reply(store: &StoreHandle, req: &RpcRequest, data: Value) {
    metrics::counter!("dlms_bridge_rpc_total", "outcome" => crate::http::metrics::rpc_outcome(&data)).increment(1);
    let rec = Record {
        device: req.device.clone(),
        device_type: String::new(),
        kind: RecordKind::RpcReply,
        payload: json!({ "id": req.id, "data": data }),
    };
    if let Err(e) = store.enqueue(vec![rec]).await {
        error!(device = %req.device, id = req.id, error = %e, "RPC reply could not be queued.");
    }
}
