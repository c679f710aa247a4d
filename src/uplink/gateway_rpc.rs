//! RPCs to the gateway device itself (`v1/devices/me/rpc/request/{id}`, spec §3.5) and the
//! gateway's own statistics telemetry (spec §3.3).
//!
//! | method | reply |
//! |---|---|
//! | `gateway_ping` | `{"code":200,"resp":"pong"}` |
//! | `gateway_version` | `{"code":200,"resp":{"name":"dlms-bridge","version":..}}` |
//! | `gateway_devices` | `{"code":200,"resp":{"<device>":{"type":..,"source":"meter"\|"local","status":"connected"\|"known"}}}` |
//! | `gateway_stats` | `{"code":200,"resp":{<the statistics telemetry>}}` |
//! | `gateway_device_renamed` | params `{"Old":"New",..}`: applied, persisted, `{"success":true}` |
//! | `gateway_device_deleted` | params `"Name"` (or a list): forgotten, persisted, `{"success":true}` |
//! | anything else | `{"error":"Method not found","code":404}` |
//!
//! Parsing and payloads are pure functions; the `impl Uplink` block at the end applies them to
//! the session (it runs on the uplink task, the only owner of the session state).

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use bytes::Bytes;
use serde_json::{json, Map, Value};
use tracing::{info, warn};

use super::thingsboard::TOPIC_ME_RPC_RESPONSE_PREFIX;
use super::{Life, Out, Session, Uplink};

/// GW → TB: the gateway device's own telemetry (statistics).
pub const TOPIC_ME_TELEMETRY: &str = "v1/devices/me/telemetry";

/// Counters from outside the uplink (router, meters, broker), merged into `gateway_stats` and
/// the statistics telemetry. Called on the uplink task: it must only read atomics or take
/// short locks.
pub type ExtraStats = Arc<dyn Fn() -> Map<String, Value> + Send + Sync>;

/// Where a device's data comes from (`"meter"` or `"local"`), for `gateway_devices`.
pub type SourceOf = Arc<dyn Fn(&str) -> &'static str + Send + Sync>;

/// What the rest of the bridge lends the uplink for gateway RPCs and statistics.
#[derive(Clone, Default)]
pub struct GatewayInfo {
    pub extra_stats: Option<ExtraStats>,
    pub source_of: Option<SourceOf>,
}

/// A parsed RPC to the gateway device.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayRpc {
    Ping,
    Version,
    Devices,
    Stats,
    /// Old ThingsBoard name → new one.
    Renamed(Vec<(String, String)>),
    Deleted(Vec<String>),
    /// Not one of ours (or malformed): 404.
    Unknown(String),
}

/// The request id of `v1/devices/me/rpc/request/{id}`, if `topic` is one.
pub fn request_id(topic: &str) -> Option<&str> {
    let id = topic.strip_prefix(super::thingsboard::TOPIC_ME_RPC_REQUEST_PREFIX)?;
    (!id.is_empty() && !id.contains(['/', '+', '#'])).then_some(id)
}

pub fn parse(payload: &[u8]) -> GatewayRpc {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return GatewayRpc::Unknown("(not JSON)".into());
    };
    let method = v.get("method").and_then(Value::as_str).unwrap_or_default();
    let params = v.get("params").cloned().unwrap_or(Value::Null);
    match method {
        "gateway_ping" => GatewayRpc::Ping,
        "gateway_version" => GatewayRpc::Version,
        "gateway_devices" => GatewayRpc::Devices,
        "gateway_stats" => GatewayRpc::Stats,
        "gateway_device_renamed" => match params {
            Value::Object(m) => GatewayRpc::Renamed(
                m.into_iter()
                    .filter_map(|(old, new)| new.as_str().map(|n| (old, n.to_owned())))
                    .filter(|(old, new)| !old.is_empty() && !new.is_empty())
                    .collect(),
            ),
            _ => GatewayRpc::Unknown(method.into()),
        },
        "gateway_device_deleted" => match params {
            Value::String(s) if !s.is_empty() => GatewayRpc::Deleted(vec![s]),
            Value::Array(a) => GatewayRpc::Deleted(
                a.into_iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .filter(|s| !s.is_empty())
                    .collect(),
            ),
            _ => GatewayRpc::Unknown(method.into()),
        },
        other => GatewayRpc::Unknown(other.into()),
    }
}

fn ok(resp: Value) -> Value {
    json!({"code": 200, "resp": resp})
}

fn not_found() -> Value {
    json!({"error": "Method not found", "code": 404})
}

/// Process CPU time (s) and resident memory (bytes), from /proc (Linux); `None` elsewhere.
fn process_usage() -> (Option<f64>, Option<u64>) {
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
        });
    // Fields 14 and 15 (utime, stime) in clock ticks; USER_HZ is 100 on Linux.
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / 100.0)
        });
    (cpu, rss)
}

/// CPU use since the previous sample, in percent of one core.
#[derive(Debug, Default)]
pub(super) struct CpuSampler {
    last: Option<(StdInstant, f64)>,
}

impl CpuSampler {
    fn sample(&mut self) -> Option<f64> {
        let (cpu, _) = process_usage();
        let cpu = cpu?;
        let now = StdInstant::now();
        let pct = self.last.and_then(|(at, before)| {
            let wall = now.duration_since(at).as_secs_f64();
            (wall > 0.0).then(|| ((cpu - before) / wall * 100.0).max(0.0))
        });
        self.last = Some((now, cpu));
        pct
    }
}

impl Uplink {
    /// The statistics telemetry of the gateway device (documented in docs/GATEWAY.md).
    pub(super) async fn stats_values(&self, life: &mut Life) -> Map<String, Value> {
        let st = self.status_tx.borrow().clone();
        let store = self.store.stats().await.ok();
        let now = crate::model::now_ms();
        let mut m = Map::new();
        if let Some(f) = &self.info.extra_stats {
            m.extend(f());
        }
        m.insert("records_sent".into(), json!(st.published));
        m.insert("records_acknowledged".into(), json!(st.acked_records));
        m.insert("records_dropped".into(), json!(st.dropped_records));
        m.insert("publishes_acknowledged".into(), json!(st.acked_publishes));
        m.insert("failed_acks".into(), json!(st.failed_acks));
        m.insert("downlink_messages".into(), json!(st.downlink_forwarded));
        m.insert("uplink_connects".into(), json!(st.connects));
        if let Some(s) = store {
            m.insert("queue_depth".into(), json!(s.depth));
            m.insert(
                "queue_oldest_age_s".into(),
                json!(s.oldest_created_ms.map_or(0, |c| (now - c).max(0) / 1000)),
            );
            m.insert("queue_bytes".into(), json!(s.bytes_on_disk));
            m.insert(
                "records_dropped_queue_full".into(),
                json!(s.dropped_full + s.dropped_age),
            );
        }
        m.insert("uptime_s".into(), json!(life.started.elapsed().as_secs()));
        let (_, rss) = process_usage();
        if let Some(rss) = rss {
            m.insert("rss_bytes".into(), json!(rss));
        }
        if let Some(cpu) = life.cpu.sample() {
            m.insert("cpu_percent".into(), json!((cpu * 10.0).round() / 10.0));
        }
        m.insert("devices".into(), json!(life.known.len()));
        // The names a tb-gateway dashboard charts, where we have an equivalent (spec §3.3).
        let get = |k: &str| m.get(k).cloned().unwrap_or(Value::Null);
        let machine = json!({
            "gwProcessCpuUsage": get("cpu_percent"),
            "gwMemory": get("rss_bytes"),
            "msgsSentToPlatform": get("records_sent"),
            "msgsReceivedFromPlatform": get("downlink_messages"),
        });
        let service = json!({
            "storageMsgCount": get("queue_depth"),
            "platformMsgPushed": get("records_acknowledged"),
        });
        let connectors = json!({
            "local": {
                "connectorMsgsReceived": get("messages_in_local"),
                "convertersMsgDropped": get("malformed_dropped"),
            },
            "meters": {
                "connectorMsgsReceived": get("messages_in_meters"),
            },
        });
        m.insert("machineStats".into(), machine);
        m.insert("serviceStats".into(), service);
        m.insert("connectorsStats".into(), connectors);
        m
    }

    /// Publish the statistics telemetry (fire-and-forget like tb-gateway's: no store row).
    pub(super) async fn send_stats(&self, life: &mut Life, s: &mut Session) {
        let values = self.stats_values(life).await;
        s.pending.push_back(Out {
            topic: Cow::Borrowed(TOPIC_ME_TELEMETRY),
            payload: Bytes::from(Value::Object(values).to_string()),
            ids: Vec::new(),
            device: String::new(),
        });
    }

    /// Handle one RPC to the gateway device and queue its reply first in line.
    pub(super) async fn gateway_rpc(
        &self,
        id: &str,
        payload: &[u8],
        life: &mut Life,
        s: &mut Session,
    ) {
        let rpc = parse(payload);
        let reply = match rpc {
            GatewayRpc::Ping => json!({"code": 200, "resp": "pong"}),
            GatewayRpc::Version => ok(json!({
                "name": env!("CARGO_PKG_NAME"),
                "version": env!("CARGO_PKG_VERSION"),
            })),
            GatewayRpc::Devices => {
                let mut m = Map::new();
                let mut names: Vec<&String> = life.known.keys().collect();
                names.sort();
                for name in names {
                    let source_name = life.names.source_name(name);
                    let source = self
                        .info
                        .source_of
                        .as_ref()
                        .map_or("local", |f| f(source_name));
                    let status = if s.announced.contains(name) {
                        "connected"
                    } else {
                        "known"
                    };
                    m.insert(
                        name.clone(),
                        json!({"type": life.known[name], "source": source, "status": status}),
                    );
                }
                ok(Value::Object(m))
            }
            GatewayRpc::Stats => ok(Value::Object(self.stats_values(life).await)),
            GatewayRpc::Renamed(pairs) => {
                self.apply_renames(pairs, life, s).await;
                json!({"success": true})
            }
            GatewayRpc::Deleted(names) => {
                self.apply_deletes(names, life, s).await;
                json!({"success": true})
            }
            GatewayRpc::Unknown(method) => {
                warn!(%method, "Unknown RPC to the gateway device; answering 404.");
                not_found()
            }
        };
        s.pending.push_front(Out {
            topic: Cow::Owned(format!("{TOPIC_ME_RPC_RESPONSE_PREFIX}{id}")),
            payload: Bytes::from(reply.to_string()),
            ids: Vec::new(),
            device: String::new(),
        });
    }

    async fn apply_renames(&self, pairs: Vec<(String, String)>, life: &mut Life, s: &mut Session) {
        let mut affected = HashSet::new();
        let mut sources = Vec::new();
        for (old, new) in pairs {
            sources.extend(life.names.rename(&old, &new));
            if let Some(ty) = life.known.remove(&old) {
                life.known.insert(new.clone(), ty);
            }
            s.announced.remove(&old);
            info!(old = %old, new = %new, "Device renamed in ThingsBoard; its data (queued too) now goes to the new name.");
            affected.insert(old);
        }
        self.persist_names(life, sources).await;
        replan(s, &affected);
    }

    async fn apply_deletes(&self, names: Vec<String>, life: &mut Life, s: &mut Session) {
        let last_row = *self.store.subscribe().borrow();
        let mut affected = HashSet::new();
        let mut sources = Vec::new();
        for name in names {
            sources.extend(life.names.delete(&name, last_row));
            life.known.remove(&name);
            s.announced.remove(&name);
            info!(device = %name, "Device deleted in ThingsBoard; forgotten (its queued data is dropped) until its source sends new data.");
            affected.insert(name);
        }
        self.persist_names(life, sources).await;
        replan(s, &affected);
    }

    pub(super) async fn persist_names(&self, life: &Life, sources: Vec<String>) {
        let Some(reg) = &self.registry else {
            return;
        };
        if let Err(e) = reg.save(&life.names, sources).await {
            warn!(error = %e, path = %reg.path().display(), "Could not persist a device rename/delete; it holds until restart.");
        }
    }
}

/// Publishes already planned under a name that changed are withdrawn; their rows are read again
/// (from the oldest) once the window drains, and planned under the new name.
fn replan(s: &mut Session, affected: &HashSet<String>) {
    let before = s.pending.len();
    s.pending.retain(|o| !affected.contains(&o.device));
    if s.pending.len() != before || !s.inflight.is_empty() {
        s.resend_at = Some(tokio::time::Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_rpcs_parse() {
        assert_eq!(parse(br#"{"method":"gateway_ping"}"#), GatewayRpc::Ping);
        assert_eq!(
            parse(br#"{"method":"gateway_device_renamed","params":{"Old":"New"}}"#),
            GatewayRpc::Renamed(vec![("Old".into(), "New".into())])
        );
        assert_eq!(
            parse(br#"{"method":"gateway_device_deleted","params":"Gone"}"#),
            GatewayRpc::Deleted(vec!["Gone".into()])
        );
        assert!(matches!(
            parse(br#"{"method":"gateway_device_deleted","params":5}"#),
            GatewayRpc::Unknown(_)
        ));
        assert!(matches!(parse(b"garbage"), GatewayRpc::Unknown(_)));
        assert_eq!(request_id("v1/devices/me/rpc/request/17"), Some("17"));
        assert_eq!(request_id("v1/devices/me/rpc/request/"), None);
        assert_eq!(request_id("v1/gateway/rpc"), None);
    }
}
