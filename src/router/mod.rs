//! The router task: turns [`SourceEvent`]s into [`Record`]s (configured mappings first, then
//! the built-in rules) and makes them durable through the store; carries ThingsBoard's
//! downlink (RPC, shared attributes, attribute responses) to meters and local topics, and queues
//! every RPC reply. It must not talk to ThingsBoard (the uplink owns that session) nor touch
//! SQLite directly.

pub mod builtin;
pub mod convert;
pub mod device_api;
pub mod expr;
pub mod mapping;
pub mod warn;

use std::collections::{HashMap, VecDeque};
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
use crate::router::warn::{Verdict, WarnLimiter};
use crate::sources::meters::MeterHandle;
use crate::sources::{Durable, LocalPublish, SourceEvent};
use crate::store::StoreHandle;

/// Most events folded into one store enqueue (one transaction).
pub const MAX_EVENTS_PER_ENQUEUE: usize = 1024;
/// Records the router keeps in flight to the store at once (submitted, commit not yet answered).
/// One enqueue at a time would make everything that arrives during a commit wait for the next
/// group: one publisher with a window of 1,000 messages was capped near 27,000 msg/s by that.
/// With several in flight, new records join the store's open group at once, and that group
/// commits early once it holds `store::COMMIT_EARLY_BYTES`. The bound is in records, not
/// enqueues, so that many tiny enqueues cannot stall the router before the group is big enough
/// to commit early (8,192 records are far more than 64 KiB); it also bounds what a QoS 0 flood
/// can pile up in memory.
pub const MAX_RECORDS_IN_FLIGHT: usize = 8 * MAX_EVENTS_PER_ENQUEUE;
/// How often periodic report strategies are evaluated.
const DUE_EVERY: Duration = Duration::from_millis(500);
/// How often the router logs its counters at INFO.
const STATS_EVERY: Duration = Duration::from_secs(60);
/// Longest a malformed message is quoted in a log line.
const LOG_SNIPPET: usize = 120;

/// One enqueue handed to the store, awaiting its commit.
struct InFlight {
    done: crate::store::PendingEnqueue,
    n: u64,
    acks: Vec<Durable>,
}

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
    /// Values refused because one alone needs a larger packet than ThingsBoard accepts.
    pub oversize_values_dropped: AtomicU64,
    /// Records split into several because they did not fit one ThingsBoard packet.
    pub records_split: AtomicU64,
    /// Batches of records from meters (one per poll or connectivity change).
    pub meter_messages: AtomicU64,
    /// Meters whose last poll succeeded / failed (from their `poll_ok` health telemetry).
    pub meters_ok: AtomicU64,
    pub meters_failing: AtomicU64,
}

impl RouterStats {
    /// The router's share of the gateway statistics telemetry (docs/GATEWAY.md).
    pub fn gateway_stats(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        let get = |a: &AtomicU64| json!(a.load(Ordering::Relaxed));
        m.insert("messages_in_local".into(), get(&self.local_messages));
        m.insert("messages_in_meters".into(), get(&self.meter_messages));
        m.insert("records_queued".into(), get(&self.records_queued));
        m.insert("malformed_dropped".into(), get(&self.malformed_dropped));
        m.insert(
            "oversize_values_dropped".into(),
            get(&self.oversize_values_dropped),
        );
        m.insert("records_refused_by_queue".into(), get(&self.store_rejected));
        m.insert("rpc_requests".into(), get(&self.rpc_requests));
        m.insert("meters_ok".into(), get(&self.meters_ok));
        m.insert("meters_failing".into(), get(&self.meters_failing));
        m
    }
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
    /// WARNs about bad local input, rate-limited per kind of problem.
    warns: WarnLimiter,
    /// Largest publish ThingsBoard accepts: larger records are split before they are queued.
    max_packet_size: usize,
    /// Meter → whether its last poll succeeded, for the ok/failing counts.
    meter_health: HashMap<String, bool>,
    /// Every RPC is answered within this (`gateway.rpc_timeout`).
    rpc_timeout: Duration,
    /// Device-API clients (`v1/devices/me/*`) and their pending RPCs and attribute requests.
    device_api: device_api::DeviceApi,
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
            warns: WarnLimiter::default(),
            max_packet_size: crate::config::ThingsboardConfig::default().max_packet_size,
            meter_health: HashMap::new(),
            rpc_timeout: crate::config::GatewayConfig::default().rpc_timeout,
            device_api: device_api::DeviceApi::default(),
            live: None,
        }
    }

    /// Answer every RPC within `timeout` (`gateway.rpc_timeout`), with an error if need be.
    pub fn with_rpc_timeout(mut self, timeout: Duration) -> Self {
        self.rpc_timeout = timeout;
        self
    }

    /// Split records that would not fit one publish of `max` bytes (`thingsboard.max_packet_size`).
    pub fn with_max_packet_size(mut self, max: usize) -> Self {
        self.max_packet_size = max;
        self
    }

    /// Show every event to the HTTP server's live state (meters' last values, local clients).
    pub fn with_live(mut self, live: Arc<crate::http::state::LiveState>) -> Self {
        self.live = Some(live);
        self
    }

    pub fn stats(&self) -> Arc<RouterStats> {
        self.stats.clone()
    }

    /// Runs until every source has gone (the events channel closed), then returns once every
    /// enqueue it submitted has been answered.
    pub async fn run(mut self) {
        let mut due = tokio::time::interval(DUE_EVERY);
        due.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut stats_tick = tokio::time::interval(STATS_EVERY);
        stats_tick.tick().await;
        let mut downlink_open = true;
        let mut reload_open = true;
        let mut batch = Vec::with_capacity(MAX_EVENTS_PER_ENQUEUE);
        // Enqueues handed to the store and not yet committed, oldest first. Several may be in
        // flight so that what arrives while one waits for its commit joins the store's open
        // group at once instead of waiting for the next one (see `MAX_RECORDS_IN_FLIGHT`).
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut records_in_flight = 0usize;
        loop {
            tokio::select! {
                // Oldest first: commits are answered in the order submitted.
                res = async { (&mut in_flight.front_mut().expect("guarded").done).await },
                    if !in_flight.is_empty() =>
                {
                    let f = in_flight.pop_front().expect("guarded");
                    records_in_flight -= f.n as usize;
                    self.committed(f.n, f.acks, res);
                }
                n = self.events_rx.recv_many(&mut batch, MAX_EVENTS_PER_ENQUEUE),
                    if records_in_flight < MAX_RECORDS_IN_FLIGHT =>
                {
                    if n == 0 {
                        break;
                    }
                    let (records, acks) = self.map_events(batch.drain(..));
                    let records = self.fit_packets(records);
                    if let Some(f) = self.submit(records, acks).await {
                        records_in_flight += f.n as usize;
                        in_flight.push_back(f);
                    }
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
                    let records = self.fit_packets(records);
                    if let Some(f) = self.submit(records, Vec::new()).await {
                        records_in_flight += f.n as usize;
                        in_flight.push_back(f);
                    }
                }
                _ = stats_tick.tick() => self.log_stats(),
            }
        }
        while let Some(f) = in_flight.pop_front() {
            let res = f.done.await;
            self.committed(f.n, f.acks, res);
        }
        self.log_stats();
        debug!("Router drained; all sources are gone.");
    }

    fn log_stats(&mut self) {
        for (kind, suppressed, total) in self.warns.due_summaries(std::time::Instant::now()) {
            warn!(
                kind,
                suppressed_since_last = suppressed,
                kind_total = total,
                "Malformed local messages of this kind were dropped without a log line."
            );
        }
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

    /// Map a batch; also returns the completion handles of its local QoS 1/2 messages, to be
    /// released once the records are committed.
    fn map_events(
        &mut self,
        events: impl Iterator<Item = SourceEvent>,
    ) -> (Vec<Record>, Vec<Durable>) {
        let mut out = Vec::new();
        let mut acks = Vec::new();
        for ev in events {
            if let Some(live) = &self.live {
                live.observe(&ev);
            }
            match ev {
                SourceEvent::Records(rs) => {
                    self.stats.meter_messages.fetch_add(1, Ordering::Relaxed);
                    self.track_meter_health(&rs);
                    out.extend(rs);
                }
                SourceEvent::Local(mut msg) => {
                    self.stats.local_messages.fetch_add(1, Ordering::Relaxed);
                    acks.extend(msg.ack.take());
                    self.map_local(&msg, &mut out);
                }
            }
        }
        (out, acks)
    }

    /// A device-API client answering an RPC or asking for attributes; `true` if consumed.
    fn device_api_downlink(&mut self, msg: &LocalPublish, out: &mut Vec<Record>) -> bool {
        let t = msg.topic.as_str();
        if t.starts_with(device_api::TOPIC_RPC_RESPONSE_PREFIX) {
            let me = builtin::device_api_name(msg, &self.local);
            if !self.device_api.rpc_response(&me, t, &msg.payload) {
                debug!(topic = %t, client = %msg.client_id, "RPC response for no pending RPC.");
            }
            return true;
        }
        if t.starts_with(device_api::TOPIC_ATTRIBUTE_REQUEST_PREFIX) {
            let me = builtin::device_api_name(msg, &self.local);
            let generated =
                self.local.reject_generated_client_ids && builtin::is_generated_client_id(&me);
            if generated || crate::model::check_device_name(&me).is_err() {
                debug!(client = %msg.client_id, "Attribute request from a client with no usable device name; ignored.");
                return true;
            }
            if let Some(recs) =
                self.device_api
                    .attribute_request(&me, &msg.client_id, t, &msg.payload)
            {
                out.extend(recs);
            }
            return true;
        }
        false
    }

    fn track_meter_health(&mut self, records: &[Record]) {
        for r in records.iter().filter(|r| r.kind == RecordKind::Telemetry) {
            if let Some(ok) = r.payload["values"].get("poll_ok").and_then(Value::as_bool) {
                self.meter_health.insert(r.device.clone(), ok);
            }
        }
        let ok = self.meter_health.values().filter(|v| **v).count() as u64;
        let failing = self.meter_health.len() as u64 - ok;
        self.stats.meters_ok.store(ok, Ordering::Relaxed);
        self.stats.meters_failing.store(failing, Ordering::Relaxed);
    }

    fn map_local(&mut self, msg: &LocalPublish, out: &mut Vec<Record>) {
        let res = match self.mappings.map(msg) {
            Some(r) => r.map_err(|e| (e.kind(), e.to_string())),
            None if self.device_api_downlink(msg, out) => return,
            None => match builtin::map(msg, &self.local) {
                Some(r) => {
                    if matches!(
                        msg.topic.as_str(),
                        builtin::TOPIC_DEVICE_TELEMETRY | builtin::TOPIC_DEVICE_ATTRIBUTES
                    ) {
                        let me = builtin::device_api_name(msg, &self.local);
                        if r.as_ref().is_ok_and(|rs| rs.iter().any(|x| x.device == me)) {
                            self.device_api.seen(&me, &msg.client_id);
                        }
                    }
                    r.map_err(|e| (e.kind(), e.to_string()))
                }
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
                // Rate-limited per kind: one broken publisher must neither flood the log nor
                // hide another kind of problem.
                if let Verdict::Log { suppressed, total } =
                    self.warns.hit(kind, std::time::Instant::now())
                {
                    let snippet: String = String::from_utf8_lossy(&msg.payload)
                        .chars()
                        .take(LOG_SNIPPET)
                        .collect();
                    let topic: String = msg.topic.chars().take(LOG_SNIPPET).collect();
                    let client: String = msg.client_id.chars().take(LOG_SNIPPET).collect();
                    let error: String = error.chars().take(4 * LOG_SNIPPET).collect();
                    warn!(
                        kind,
                        %topic,
                        %client,
                        %error,
                        payload = %snippet,
                        suppressed_since_last = suppressed,
                        kind_total = total,
                        dropped_total = n,
                        "Dropped a malformed local message."
                    );
                }
            }
        }
    }

    /// Split records larger than one ThingsBoard publish (keys of one timestamp stay under that
    /// timestamp); refuse, with a WARN naming device and key, only values too large alone.
    /// Returns each record with its payload as JSON text: serialised once here, it sizes the
    /// record, is what the store writes and what the uplink sends.
    fn fit_packets(&mut self, records: Vec<Record>) -> Vec<(Record, String)> {
        let mut out = Vec::with_capacity(records.len());
        for rec in records {
            let text = match serde_json::to_string(&rec.payload) {
                Ok(text) => text,
                Err(e) => {
                    // A `Value` always serialises; kept for completeness, never seen.
                    error!(device = %rec.device, error = %e, "Cannot serialise a record; dropped.");
                    continue;
                }
            };
            if crate::uplink::split::fits_as_is(&rec, text.len(), self.max_packet_size) {
                out.push((rec, text));
                continue;
            }
            let (parts, oversize) = crate::uplink::split::split_record(rec, self.max_packet_size);
            if parts.len() > 1 {
                self.stats.records_split.fetch_add(1, Ordering::Relaxed);
            }
            for part in parts {
                match serde_json::to_string(&part.payload) {
                    Ok(text) => out.push((part, text)),
                    Err(e) => {
                        error!(device = %part.device, error = %e, "Cannot serialise a record; dropped.")
                    }
                }
            }
            for o in oversize {
                let n = self
                    .stats
                    .oversize_values_dropped
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                if let Verdict::Log { suppressed, .. } =
                    self.warns.hit("oversize_value", std::time::Instant::now())
                {
                    warn!(
                        device = %o.device,
                        key = %o.key,
                        needed_bytes = o.needed,
                        max_packet_size = o.max,
                        suppressed_since_last = suppressed,
                        oversize_values_dropped = n,
                        "Dropped a value larger than one ThingsBoard packet; the device's other values are sent."
                    );
                }
            }
        }
        out
    }

    /// Hand `records` to the store; `acks` (the completion handles of their local QoS 1/2
    /// messages) are released by [`Router::committed`] once they are durable. `None` when there
    /// was nothing to store or the store refused at once (then the acks are withheld: those
    /// publishers never get a PUBACK for records that are lost).
    async fn submit(&self, records: Vec<(Record, String)>, acks: Vec<Durable>) -> Option<InFlight> {
        if records.is_empty() {
            // Nothing to make durable (unmatched or malformed messages): ack at once.
            drop(acks);
            return None;
        }
        let n = records.len() as u64;
        if tracing::enabled!(tracing::Level::DEBUG) {
            for (r, text) in records
                .iter()
                .filter(|(r, _)| r.kind == RecordKind::Telemetry)
            {
                debug!(device = %r.device, data = %text, "Queued telemetry.");
            }
        }
        match self.store.submit_encoded(records).await {
            Ok(done) => Some(InFlight { done, n, acks }),
            Err(e) => {
                self.committed(n, acks, Err(e));
                None
            }
        }
    }

    /// The store answered an enqueue: count it and release (or withhold) its acks.
    fn committed(&self, n: u64, acks: Vec<Durable>, res: Result<(), crate::store::Error>) {
        match res {
            Ok(()) => {
                self.stats.records_queued.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.store_rejected.fetch_add(n, Ordering::Relaxed);
                error!(error = %e, records = n, "Queue refused records; they are lost.");
                acks.iter().for_each(Durable::fail);
            }
        }
        // Dropping the handles sends the PUBACKs of the ones not failed.
        drop(acks);
    }

    async fn downlink(&mut self, dl: Downlink) {
        match dl {
            Downlink::Rpc(req) => self.rpc(req),
            Downlink::Attributes(upd) => {
                self.meter_attributes(&upd);
                if let Some((client, payload)) =
                    self.device_api.attribute_update(&upd.device, &upd.data)
                {
                    self.deliver(&client, device_api::TOPIC_ATTRIBUTES, payload)
                        .await;
                }
                let outs = self.mappings.attribute_update_publishes(&upd);
                if outs.is_empty() {
                    debug!(device = %upd.device, "Shared attribute update matches no attributeUpdates rule.");
                }
                for o in outs {
                    self.publish_local(&o.topic, o.payload, o.retain).await;
                }
            }
            Downlink::AttributeResponse { device, id, values } => {
                if let Some(done) = self.device_api.attribute_response(id, &values) {
                    if let Some((client, topic, payload)) = done {
                        self.deliver(&client, &topic, payload).await;
                    }
                    return;
                }
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

    /// Shared attributes a meter acts on: `poll_interval` (seconds), applied live.
    fn meter_attributes(&self, upd: &crate::model::AttributeUpdate) {
        let Some(v) = upd.data.get("poll_interval") else {
            return;
        };
        let meter = self
            .meters
            .read()
            .ok()
            .and_then(|m| m.get(&upd.device).cloned());
        let Some(meter) = meter else {
            return;
        };
        match crate::downlink::poll_interval(v) {
            Ok(period) => {
                tokio::spawn(async move {
                    if let Err(e) = meter.set_interval(period).await {
                        warn!(meter = %meter.name(), error = %e, "Could not change the poll interval.");
                    }
                });
            }
            Err(why) => {
                warn!(meter = %upd.device, %why, "Ignoring the shared attribute poll_interval.")
            }
        }
    }

    /// Put a message into one device-API client's session (see [`device_api`]).
    async fn deliver(&self, client: &str, topic: &str, payload: bytes::Bytes) {
        let Some(b) = &self.broker else {
            return;
        };
        if let Err(e) = device_api::deliver_to_client(b, client, topic, payload).await {
            debug!(%client, %topic, error = %e, "Device-API downlink not delivered.");
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
        let deadline = self.rpc_timeout;
        let late = move || {
            crate::downlink::rpc_error(format!("no answer within rpc_timeout ({deadline:?})"))
        };
        if let Some(meter) = meter {
            tokio::spawn(async move {
                let data = tokio::time::timeout(deadline, crate::downlink::meter_rpc(&meter, &req))
                    .await
                    .unwrap_or_else(|_| late());
                queue_typed_reply(&store, &req, data, meter.device_type()).await;
            });
            return;
        }
        match (self.mappings.rpc_route(&req), self.broker.clone()) {
            (Some(route), Some(broker)) => {
                tokio::spawn(async move {
                    let data =
                        tokio::time::timeout(deadline, crate::downlink::local_rpc(&broker, route))
                            .await
                            .unwrap_or_else(|_| late());
                    queue_reply(&store, &req, data).await;
                });
            }
            (None, Some(broker)) if self.device_api.client_of(&req.device).is_some() => {
                let client = self
                    .device_api
                    .client_of(&req.device)
                    .unwrap_or_default()
                    .to_owned();
                let (topic, payload, answer) =
                    self.device_api
                        .rpc_request(&req.device, req.id, &req.method, &req.params);
                tokio::spawn(async move {
                    let data = match device_api::deliver_to_client(
                        &broker, &client, &topic, payload,
                    )
                    .await
                    {
                        Err(e) => crate::downlink::rpc_error(e),
                        Ok(()) => match tokio::time::timeout(deadline, answer).await {
                            Ok(Ok(v)) => v,
                            Ok(Err(_)) => crate::downlink::rpc_error("RPC forgotten"),
                            Err(_) => late(),
                        },
                    };
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
    queue_typed_reply(store, req, data, "").await
}

/// A reply that knows the device's profile (a meter's): it announces the device with it if the
/// reply is the first record of the device, and never changes a known type.
async fn queue_typed_reply(store: &StoreHandle, req: &RpcRequest, data: Value, device_type: &str) {
    metrics::counter!("dlms_bridge_rpc_total", "outcome" => crate::http::metrics::rpc_outcome(&data)).increment(1);
    let rec = Record {
        device: req.device.clone(),
        device_type: device_type.to_owned(),
        kind: RecordKind::RpcReply,
        payload: json!({ "id": req.id, "data": data }),
    };
    if let Err(e) = store.enqueue(vec![rec]).await {
        error!(device = %req.device, id = req.id, error = %e, "RPC reply could not be queued.");
    }
}
