//! Downlink for local clients that speak the ThingsBoard *device* API (`v1/devices/me/*`)
//! with no mapping written: the client whose messages the built-in rule maps to device D gets
//! D's RPCs on `v1/devices/me/rpc/request/{id}` (and answers on `.../rpc/response/{id}`), D's
//! shared-attribute updates on `v1/devices/me/attributes`, and answers to its attribute
//! requests on `v1/devices/me/attributes/response/{n}` — exactly as if it were connected to
//! ThingsBoard, and only in its own session (`me` means a different device for every client).
//!
//! This file holds the bookkeeping (which client is which device, pending RPCs and attribute
//! requests, the topic and payload rewriting); [`deliver_to_client`] is the one place that puts
//! a message into one client's session.
//!
//! Delivery goes through [`BrokerHandle::publish_to`], never a broadcast publish: every
//! device-API client subscribes to the same `v1/devices/me/...` topics and would otherwise
//! receive other devices' RPCs.

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use crate::broker::BrokerHandle;
use crate::model::{Record, RecordKind};

pub const TOPIC_RPC_REQUEST_PREFIX: &str = "v1/devices/me/rpc/request/";
pub const TOPIC_RPC_RESPONSE_PREFIX: &str = "v1/devices/me/rpc/response/";
pub const TOPIC_ATTRIBUTES: &str = "v1/devices/me/attributes";
pub const TOPIC_ATTRIBUTE_REQUEST_PREFIX: &str = "v1/devices/me/attributes/request/";
pub const TOPIC_ATTRIBUTE_RESPONSE_PREFIX: &str = "v1/devices/me/attributes/response/";

/// Attribute request ids we allocate start here, far from the ids mappings use.
const FIRST_ATTRIBUTE_REQUEST_ID: i64 = 1 << 40;

/// Most pending RPCs / attribute requests kept; the oldest are forgotten beyond it.
const MAX_PENDING: usize = 10_000;

/// Why a message could not be put into a client's session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    #[error("the local broker refused the message: {0}")]
    Refused(String),
    #[error("local client `{0}` is not connected")]
    NotConnected(String),
}

/// Publish `payload` on `topic` to the session of `client_id` only (never to other clients
/// subscribed to the same topic).
pub async fn deliver_to_client(
    broker: &BrokerHandle,
    client_id: &str,
    topic: &str,
    payload: Bytes,
) -> Result<(), DeliverError> {
    match broker.publish_to(client_id, topic, payload).await {
        Ok(()) => Ok(()),
        Err(crate::broker::Error::NoSession { client_id, .. }) => {
            Err(DeliverError::NotConnected(client_id))
        }
        Err(e) => Err(DeliverError::Refused(e.to_string())),
    }
}

/// One attribute request of a client, split into a client-scope and a shared-scope request to
/// ThingsBoard (one scope per gateway request, spec §2.6), merged back into one answer.
#[derive(Debug)]
struct PendingAttributes {
    client_id: String,
    /// The client's `{n}`.
    request: String,
    /// Our ids of the scopes still unanswered (with scope and keys), and what came back.
    waiting: Vec<(i64, bool, Vec<String>)>,
    client: Map<String, Value>,
    shared: Map<String, Value>,
}

/// Device-API clients and what they wait for; owned by the router task.
#[derive(Debug, Default)]
pub struct DeviceApi {
    /// Device → the client id whose messages map to it (the latest one wins).
    clients: HashMap<String, String>,
    /// (device, ThingsBoard RPC id) → where the client's answer goes.
    rpcs: HashMap<(String, i64), oneshot::Sender<Value>>,
    /// Our attribute request id → the pending request.
    attributes: HashMap<i64, usize>,
    pending_attributes: Vec<Option<PendingAttributes>>,
    next_id: i64,
}

impl DeviceApi {
    /// A client's message mapped to `device` by the built-in device-API rule.
    pub fn seen(&mut self, device: &str, client_id: &str) {
        if self.clients.get(device).map(String::as_str) != Some(client_id) {
            self.clients.insert(device.to_owned(), client_id.to_owned());
        }
    }

    /// The client standing for `device`, if one has spoken the device API.
    pub fn client_of(&self, device: &str) -> Option<&str> {
        self.clients.get(device).map(String::as_str)
    }

    /// What to publish to the client for an RPC to its device, and where its answer will go.
    pub fn rpc_request(
        &mut self,
        device: &str,
        id: i64,
        method: &str,
        params: &Value,
    ) -> (String, Bytes, oneshot::Receiver<Value>) {
        if self.rpcs.len() >= MAX_PENDING {
            self.rpcs.retain(|_, tx| !tx.is_closed());
        }
        let (tx, rx) = oneshot::channel();
        self.rpcs.insert((device.to_owned(), id), tx);
        let body = json!({"method": method, "params": params});
        (
            format!("{TOPIC_RPC_REQUEST_PREFIX}{id}"),
            Bytes::from(body.to_string()),
            rx,
        )
    }

    /// A publish from a local client on `v1/devices/me/rpc/response/{id}`: `true` if it
    /// answered a pending RPC (consumed).
    pub fn rpc_response(&mut self, device: &str, topic: &str, payload: &[u8]) -> bool {
        let Some(id) = topic
            .strip_prefix(TOPIC_RPC_RESPONSE_PREFIX)
            .and_then(|i| i.parse::<i64>().ok())
        else {
            return false;
        };
        match self.rpcs.remove(&(device.to_owned(), id)) {
            Some(tx) => {
                let _ = tx.send(crate::downlink::parse_response(payload));
                true
            }
            None => false,
        }
    }

    /// A shared-attribute update for `device`: the client and the device-API payload
    /// (`{"k":v,..,"deleted":[..]}`).
    pub fn attribute_update(
        &self,
        device: &str,
        data: &Map<String, Value>,
    ) -> Option<(String, Bytes)> {
        let client = self.client_of(device)?.to_owned();
        Some((client, Bytes::from(Value::Object(data.clone()).to_string())))
    }

    /// A client's `v1/devices/me/attributes/request/{n}` (`{"clientKeys":"a,b",
    /// "sharedKeys":"c"}`, both optional; none = all): the gateway requests to queue.
    pub fn attribute_request(
        &mut self,
        device: &str,
        client_id: &str,
        topic: &str,
        payload: &[u8],
    ) -> Option<Vec<Record>> {
        let n = topic.strip_prefix(TOPIC_ATTRIBUTE_REQUEST_PREFIX)?;
        let body: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
        let keys = |k: &str| -> Option<Vec<String>> {
            body.get(k).and_then(Value::as_str).map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
        };
        let (ck, sk) = (keys("clientKeys"), keys("sharedKeys"));
        // Neither given: all of both scopes (an empty `keys` asks ThingsBoard for everything).
        let scopes: Vec<(bool, Vec<String>)> = match (ck, sk) {
            (None, None) => vec![(true, Vec::new())],
            (c, s) => c
                .map(|c| (true, c))
                .into_iter()
                .chain(s.map(|s| (false, s)))
                .collect(),
        };
        if self.pending_attributes.len() >= MAX_PENDING {
            self.pending_attributes.clear();
            self.attributes.clear();
        }
        let slot = self.pending_attributes.len();
        let mut waiting = Vec::new();
        let mut out = Vec::new();
        for (client, keys) in scopes {
            self.next_id += 1;
            let id = FIRST_ATTRIBUTE_REQUEST_ID + self.next_id;
            self.attributes.insert(id, slot);
            out.push(Record {
                device: device.to_owned(),
                device_type: String::new(),
                kind: RecordKind::AttributeRequest,
                payload: json!({"id": id, "client": client, "keys": keys}),
            });
            waiting.push((id, client, keys));
        }
        self.pending_attributes.push(Some(PendingAttributes {
            client_id: client_id.to_owned(),
            request: n.to_owned(),
            waiting,
            client: Map::new(),
            shared: Map::new(),
        }));
        Some(out)
    }

    /// An attribute response from ThingsBoard: once every scope of the client's request has
    /// answered, the client and `(topic, payload)` to deliver. `None` if the id is not ours.
    pub fn attribute_response(
        &mut self,
        id: i64,
        values: &Value,
    ) -> Option<Option<(String, String, Bytes)>> {
        let slot = self.attributes.remove(&id)?;
        let p = self.pending_attributes.get_mut(slot)?.as_mut()?;
        let (client, keys) = p
            .waiting
            .iter()
            .find(|(i, _, _)| *i == id)
            .map(|(_, c, k)| (*c, k.clone()))?;
        p.waiting.retain(|(i, _, _)| *i != id);
        let scope = if client { &mut p.client } else { &mut p.shared };
        match values {
            Value::Object(m) => scope.extend(m.clone()),
            // One key asked and found: ThingsBoard answers with a bare `value`.
            Value::Null => {}
            v if keys.len() == 1 => {
                scope.insert(keys[0].clone(), v.clone());
            }
            _ => {}
        }
        if !p.waiting.is_empty() {
            return Some(None);
        }
        let p = self.pending_attributes[slot].take()?;
        let body = json!({"client": p.client, "shared": p.shared});
        Some(Some((
            p.client_id,
            format!("{TOPIC_ATTRIBUTE_RESPONSE_PREFIX}{}", p.request),
            Bytes::from(body.to_string()),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_device_routes_to_its_own_client() {
        let mut api = DeviceApi::default();
        api.seen("Pump A", "client-a");
        api.seen("Pump B", "client-b");
        assert_eq!(api.client_of("Pump A"), Some("client-a"));
        assert_eq!(api.client_of("Pump B"), Some("client-b"));
        assert_eq!(api.client_of("Pump C"), None);
        let (topic, body, mut rx) = api.rpc_request("Pump A", 42, "setRelay", &json!({"on": true}));
        assert_eq!(topic, "v1/devices/me/rpc/request/42");
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"method": "setRelay", "params": {"on": true}})
        );
        // Pump B answering id 42 does not answer Pump A's RPC.
        assert!(!api.rpc_response("Pump B", "v1/devices/me/rpc/response/42", b"{}"));
        assert!(api.rpc_response("Pump A", "v1/devices/me/rpc/response/42", br#"{"ok":1}"#));
        assert_eq!(rx.try_recv().unwrap(), json!({"ok": 1}));
        let mut data = Map::new();
        data.insert("tariff".into(), json!("T2"));
        let (client, payload) = api.attribute_update("Pump B", &data).unwrap();
        assert_eq!(client, "client-b");
        assert_eq!(&payload[..], br#"{"tariff":"T2"}"#);
    }

    #[test]
    fn attribute_requests_split_by_scope_and_merge_back() {
        let mut api = DeviceApi::default();
        let recs = api
            .attribute_request(
                "Pump A",
                "client-a",
                "v1/devices/me/attributes/request/7",
                br#"{"clientKeys":"fw, serial","sharedKeys":"tariff"}"#,
            )
            .unwrap();
        assert_eq!(recs.len(), 2);
        let id_c = recs[0].payload["id"].as_i64().unwrap();
        let id_s = recs[1].payload["id"].as_i64().unwrap();
        assert_eq!(recs[0].payload["keys"], json!(["fw", "serial"]));
        assert_eq!(recs[1].payload["client"], json!(false));
        assert_eq!(
            api.attribute_response(id_c, &json!({"fw": "1.2"})),
            Some(None)
        );
        let (client, topic, body) = api
            .attribute_response(id_s, &json!({"tariff": "T2"}))
            .unwrap()
            .unwrap();
        assert_eq!(client, "client-a");
        assert_eq!(topic, "v1/devices/me/attributes/response/7");
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"client": {"fw": "1.2"}, "shared": {"tariff": "T2"}})
        );
        assert_eq!(api.attribute_response(12345, &json!({})), None);
    }
}
