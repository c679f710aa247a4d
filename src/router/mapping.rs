//! The tb-gateway-compatible mapping engine: local MQTT messages → ThingsBoard records, and
//! ThingsBoard attribute updates / RPCs → local publishes (spec §6, issue #6).
//!
//! Rules come from native `[[mappings]]` TOML entries or from tb-gateway MQTT connector files
//! (old ≤ 3.4 and new ≥ 3.5 formats) and are compiled once into [`MappingSet`]: topic filters,
//! `${…}` expressions and regexes are never parsed per message. The engine is pure: it reads
//! connector files while it is built, then does no I/O and reads no clock (callers pass times).
//! It never creates a device whose name is an unresolved `${field}`: such messages are errors.
//!
//! Native TOML, equivalent to a tb-gateway `mapping` entry and an RPC rule:
//!
//! ```toml
//! [[mappings]]
//! topic_filter = "meters/+/data"
//! device_name_topic = "meters/([^/]+)/data"       # or device_name_json = "${serial}", device_name = "M1"
//! device_type = "DLMS meter"                       # constant, or "${profile}" from the payload
//! timeseries = ["*"]                               # or [{ key = "kWh", type = "double", value = "${energy.import}" }]
//! attributes = [{ key = "model", type = "string", value = "${info.model}" }]
//! report_strategy = { type = "ON_CHANGE_OR_REPORT_PERIOD", report_period = "60s" }
//!
//! [[mappings]]
//! kind = "rpc"                                     # also connect, disconnect, attribute_request, attribute_update
//! method_filter = "^setRelay$"
//! topic_expression = "meters/${deviceName}/rpc/${requestId}"
//! response_topic_expression = "meters/${deviceName}/rpc/${requestId}/reply"
//! response_timeout = "5s"
//! value_expression = "${params}"
//!
//! [[mappings]]
//! tb_gateway_file = "/etc/thingsboard-gateway/config/mqtt.json"   # a connector file, used as is
//! ```
//!
//! Differences from tb-gateway, all reported rather than guessed: custom (Python) converters,
//! `useEval`, `tsField` and aggregation functions are configuration errors; a missing device
//! name or profile rejects the message instead of naming the device after the expression; topic
//! regexes support look-around only as a leading `(?<=…)` and a trailing `(?=…)`; `"*"` leaves
//! out the keys the device name/profile are read from and `ts`/`timestamp`.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::time::Duration;

use regex::Regex;
use serde_json::{json, Map, Value};

use super::convert::{self, ByteSlice, DataType};
use super::expr::{Render, Template, TopicFilter};
use crate::config::{
    ConfigError, ConverterKind, DatapointConfig, MappingConfig, MappingKind, ReportStrategyConfig,
};
use crate::model::{self, AttributeUpdate, Record, RecordKind, RpcRequest, TimestampMs};
use crate::sources::LocalPublish;

/// Profile tb-gateway gives a device when its connector names none (spec §6.3).
pub const TB_GATEWAY_DEFAULT_PROFILE: &str = "default";
/// Response timeout of the reserved `get` RPC method (spec §6.5).
pub const RESERVED_RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// Attribute requests awaiting ThingsBoard's answer; beyond this the oldest is forgotten
/// (ThingsBoard sometimes never answers, spec §2.6).
pub const MAX_PENDING_ATTRIBUTE_REQUESTS: usize = 10_000;

/// Why a message that matched a rule could not be mapped. The message is dropped and counted.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The payload is not JSON although a JSON rule matched.
    #[error("topic {topic}: payload is not valid JSON: {source}")]
    Json {
        topic: String,
        #[source]
        source: serde_json::Error,
    },
    /// A device name or profile expression selected nothing in the payload.
    #[error("topic {topic}: {what} expression `{expr}` found no `{field}` in the payload")]
    MissingField {
        topic: String,
        what: &'static str,
        expr: String,
        field: String,
    },
    /// A topic regex for the device name or profile did not match the topic.
    #[error("topic {topic}: {what} regex `{expr}` does not match the topic")]
    TopicNoMatch {
        topic: String,
        what: &'static str,
        expr: String,
    },
    /// The resolved device name would create a garbage device in ThingsBoard.
    #[error("topic {topic}: device name `{name}` rejected: {why}")]
    BadDeviceName {
        topic: String,
        name: String,
        why: &'static str,
    },
    /// An attribute request named no attribute.
    #[error("topic {topic}: attribute request names no attribute")]
    NoAttributeNames { topic: String },
}

impl Error {
    /// The kind of problem, for per-kind WARN rate limiting and the
    /// `dlms_bridge_mapping_errors_total{kind}` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Json { .. } => "not_json",
            Error::MissingField { .. } => "mapping_missing_field",
            Error::TopicNoMatch { .. } => "mapping_topic_no_match",
            Error::BadDeviceName { .. } => "bad_device_name",
            Error::NoAttributeNames { .. } => "mapping_no_attribute_names",
        }
    }
}

/// The name the router uses for [`Error`].
pub type MapError = Error;

/// A publish to the embedded broker, for local devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalOut {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// How to carry out one server-side RPC locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcRoute {
    /// What to publish for the device.
    pub request: LocalOut,
    /// Two-way calls: the first message on this topic is the answer. `None`: one-way, reply
    /// `{"success": true}` once published.
    pub response_topic: Option<String>,
    /// Two-way calls: how long to wait before replying `{"success": false}`. Zero for one-way.
    pub timeout: Duration,
}

/// When a datapoint is sent (tb-gateway `reportStrategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    /// Every received value.
    OnReceived,
    /// Only values that differ from the last one sent.
    OnChange,
    /// The latest value once per period (ms), repeated even if nothing new arrived.
    Period(i64),
    /// Changes at once, and the latest value again when a period passed without a send.
    ChangeOrPeriod(i64),
    /// Never.
    Disabled,
}

/// A regex over the topic (Python `re.search`): its last capture group, else the whole match.
#[derive(Debug, Clone)]
struct TopicRegex {
    raw: String,
    re: Regex,
}

impl TopicRegex {
    /// Compile, turning a leading `(?<=A)` and a trailing `(?=B)` (what tb-gateway users write,
    /// spec §6.3) into plain groups: the Rust regex engine has no look-around.
    fn compile(raw: &str) -> Result<Self, String> {
        let mut body = raw.to_string();
        let mut prefix = String::new();
        let mut suffix = String::new();
        let mut rewritten = false;
        if body.starts_with("(?<=") {
            let close = group_end(&body, 0).ok_or("unbalanced `(?<=`")?;
            prefix = format!("(?:{})", &body[4..close]);
            body = body[close + 1..].to_string();
            rewritten = true;
        }
        if let Some(open) = trailing_lookahead(&body) {
            suffix = format!("(?:{})", &body[open + 3..body.len() - 1]);
            body.truncate(open);
            rewritten = true;
        }
        if ["(?<=", "(?<!", "(?=", "(?!"]
            .iter()
            .any(|l| body.contains(l))
        {
            return Err(
                "look-around is only supported as a leading (?<=…) and a trailing (?=…)".into(),
            );
        }
        let pattern = if rewritten {
            format!("{prefix}({body}){suffix}")
        } else {
            body
        };
        let re = Regex::new(&pattern).map_err(|e| format!("bad regex `{raw}`: {e}"))?;
        Ok(TopicRegex {
            raw: raw.to_string(),
            re,
        })
    }

    fn extract<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let caps = self.re.captures(topic)?;
        (1..caps.len())
            .rev()
            .find_map(|i| caps.get(i))
            .or_else(|| caps.get(0))
            .map(|m| m.as_str())
    }
}

/// Index of the `)` closing the group that opens at `open`, skipping escapes and classes.
fn group_end(s: &str, open: usize) -> Option<usize> {
    let b = s.as_bytes();
    let mut depth = 0usize;
    let mut i = open;
    let mut in_class = false;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'[' if !in_class => in_class = true,
            b']' if in_class => in_class = false,
            b'(' if !in_class => depth += 1,
            b')' if !in_class => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Start of a `(?=…)` group that ends the pattern, if any.
fn trailing_lookahead(s: &str) -> Option<usize> {
    if !s.ends_with(')') {
        return None;
    }
    let mut from = 0;
    while let Some(p) = s[from..].find("(?=") {
        let open = from + p;
        if group_end(s, open) == Some(s.len() - 1) {
            return Some(open);
        }
        from = open + 3;
    }
    None
}

/// Literal text and byte slices of a `bytes` converter expression (`[0:4]-[4:]`).
#[derive(Debug, Clone)]
enum BytesPart {
    Literal(String),
    Slice(ByteSlice),
}

fn parse_bytes_expr(text: &str) -> Result<Vec<BytesPart>, String> {
    let t = text.replace("${[", "[").replace("]}", "]");
    let mut parts = Vec::new();
    let mut rest = t.as_str();
    while let Some(open) = rest.find('[') {
        let close = rest[open..]
            .find(']')
            .map(|c| c + open)
            .ok_or_else(|| format!("`{text}`: `[` without `]`"))?;
        if open > 0 {
            parts.push(BytesPart::Literal(rest[..open].to_string()));
        }
        parts.push(BytesPart::Slice(
            ByteSlice::parse(&rest[open..=close]).map_err(|e| e.to_string())?,
        ));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(BytesPart::Literal(rest.to_string()));
    }
    if !parts.iter().any(|p| matches!(p, BytesPart::Slice(_))) {
        return Err(format!("`{text}` has no byte slice like [0:4]"));
    }
    Ok(parts)
}

fn eval_bytes(parts: &[BytesPart], raw: &[u8], hex: bool) -> Value {
    if let [BytesPart::Slice(s)] = parts {
        return convert::bytes_value(s.apply(raw), hex);
    }
    let mut out = String::new();
    for p in parts {
        match p {
            BytesPart::Literal(l) => out.push_str(l),
            BytesPart::Slice(s) => {
                if let Value::String(x) = convert::bytes_value(s.apply(raw), hex) {
                    out.push_str(&x);
                }
            }
        }
    }
    Value::String(out)
}

/// Where a device name, profile or attribute-name list comes from.
#[derive(Debug, Clone)]
enum Source {
    Message(Template),
    Topic(TopicRegex),
    Constant(String),
    Bytes(Vec<BytesPart>),
}

/// What a [`Source`] is evaluated against.
struct Input<'a> {
    topic: &'a str,
    json: Option<&'a Value>,
    raw: &'a [u8],
}

impl Source {
    fn eval(&self, input: &Input<'_>, what: &'static str) -> Result<String, Error> {
        match self {
            Source::Constant(c) => Ok(c.clone()),
            Source::Message(t) => {
                let null = Value::Null;
                t.render(input.json.unwrap_or(&null), Render::Plain)
                    .map_err(|field| Error::MissingField {
                        topic: input.topic.to_string(),
                        what,
                        expr: t.as_str().to_string(),
                        field: field.to_string(),
                    })
            }
            Source::Topic(r) => {
                r.extract(input.topic)
                    .map(str::to_string)
                    .ok_or_else(|| Error::TopicNoMatch {
                        topic: input.topic.to_string(),
                        what,
                        expr: r.raw.clone(),
                    })
            }
            Source::Bytes(parts) => match eval_bytes(parts, input.raw, false) {
                Value::String(s) => Ok(s),
                other => Ok(other.to_string()),
            },
        }
    }

    fn needs_json(&self) -> bool {
        matches!(self, Source::Message(t) if !t.is_constant())
    }
}

#[derive(Debug, Clone)]
struct DeviceInfo {
    name: Source,
    profile: Source,
}

impl DeviceInfo {
    fn resolve(&self, input: &Input<'_>) -> Result<(String, String), Error> {
        let name = self.name.eval(input, "device name")?;
        if let Err(why) = model::check_device_name(&name) {
            return Err(Error::BadDeviceName {
                topic: input.topic.to_string(),
                name,
                why,
            });
        }
        let profile = self.profile.eval(input, "device profile")?;
        if profile.trim().is_empty() || profile.contains("${") {
            return Err(Error::BadDeviceName {
                topic: input.topic.to_string(),
                name: profile,
                why: "device profile is empty or an unresolved ${...} expression",
            });
        }
        Ok((name, profile))
    }

    fn needs_json(&self) -> bool {
        self.name.needs_json() || self.profile.needs_json()
    }

    /// Top-level payload keys the name/profile are read from: `"*"` does not send them.
    fn source_keys(&self) -> Vec<String> {
        [&self.name, &self.profile]
            .iter()
            .filter_map(|s| match s {
                Source::Message(t) => {
                    Some(t.top_level_keys().map(str::to_string).collect::<Vec<_>>())
                }
                _ => None,
            })
            .flatten()
            .collect()
    }
}

#[derive(Debug, Clone)]
enum KeyExpr {
    Template(Template),
    Topic(TopicRegex),
}

#[derive(Debug, Clone)]
enum ValueExpr {
    Json(Template),
    Bytes(Vec<BytesPart>),
}

#[derive(Debug, Clone)]
struct Datapoint {
    key: KeyExpr,
    ty: DataType,
    value: ValueExpr,
    strategy: Option<Strategy>,
}

#[derive(Debug, Clone, Default)]
struct Datapoints {
    /// `"*"`: the whole payload.
    all: bool,
    list: Vec<Datapoint>,
}

/// A compiled data mapping (`mapping[]` entry or native `kind = "data"`).
#[derive(Debug, Clone)]
struct DataRule {
    filter: TopicFilter,
    /// `Some(hex_mode)` for the bytes converter.
    bytes: Option<bool>,
    device: DeviceInfo,
    attributes: Datapoints,
    timeseries: Datapoints,
    use_received_ts: bool,
    strategy: Strategy,
    /// Whether any strategy of this rule needs state (anything but `OnReceived`).
    stateful: bool,
    /// Keys `"*"` leaves out: the ones the device name/profile come from, and `ts`/`timestamp`.
    skip_keys: Vec<String>,
}

/// `connectRequests` / `disconnectRequests` entry.
#[derive(Debug, Clone)]
struct DeviceRequestRule {
    filter: TopicFilter,
    device: DeviceInfo,
}

/// `attributeRequests` entry.
#[derive(Debug, Clone)]
struct AttrRequestRule {
    filter: TopicFilter,
    device: DeviceInfo,
    names: Source,
    client: bool,
    topic: Template,
    value: Template,
    retain: bool,
}

/// `attributeUpdates` entry.
#[derive(Debug, Clone)]
struct AttrUpdateRule {
    device_filter: Regex,
    attr_filter: Regex,
    topic: Template,
    value: Template,
    retain: bool,
}

/// `serverSideRpc` entry.
#[derive(Debug, Clone)]
struct RpcRule {
    device_filter: Regex,
    method_filter: Regex,
    request_topic: Template,
    /// Two-way: response topic and timeout.
    two_way: Option<(Template, Duration)>,
    value: Template,
    retain: bool,
}

/// Report-strategy memory of one datapoint.
#[derive(Debug, Clone)]
struct KeyState {
    last: Value,
    /// Periodic strategies: period and next send time (ms); 0 = not periodic.
    period: i64,
    next_due: TimestampMs,
}

#[derive(Debug, Clone, Default)]
struct DeviceState {
    device_type: String,
    attributes: HashMap<String, KeyState>,
    timeseries: HashMap<String, KeyState>,
}

/// An attribute request sent to ThingsBoard whose answer goes to a local topic.
#[derive(Debug, Clone)]
struct PendingRequest {
    rule: usize,
    device: String,
    keys: Vec<String>,
}

/// Every compiled rule plus the little state the rules need (report strategies, pending
/// attribute requests). Owned by the router task.
#[derive(Debug, Default)]
pub struct MappingSet {
    data: Vec<DataRule>,
    connect: Vec<DeviceRequestRule>,
    disconnect: Vec<DeviceRequestRule>,
    attr_requests: Vec<AttrRequestRule>,
    attr_updates: Vec<AttrUpdateRule>,
    rpc: Vec<RpcRule>,
    /// Report-strategy state per device.
    state: HashMap<String, DeviceState>,
    /// Attribute requests awaiting ThingsBoard's answer, by request id, oldest first in `order`.
    pending: HashMap<i64, PendingRequest>,
    pending_order: VecDeque<i64>,
    next_request_id: i64,
}

impl MappingSet {
    /// Compile every `[[mappings]]` entry; connector files named by `tb_gateway_file` are read
    /// here. Returns every problem found, each naming its key.
    pub fn from_config(
        mappings: &[MappingConfig],
        default_device_type: &str,
    ) -> Result<Self, Vec<ConfigError>> {
        let mut set = MappingSet::default();
        let mut errs = Vec::new();
        for (i, m) in mappings.iter().enumerate() {
            let base = format!("mappings[{i}]");
            if let Some(path) = &m.tb_gateway_file {
                let key = format!("{base}.tb_gateway_file");
                match read_connector(path) {
                    Ok(v) => {
                        let mut c = Compiler::new(TB_GATEWAY_DEFAULT_PROFILE);
                        c.connector(&v);
                        let file = path.display();
                        errs.extend(c.errs.into_iter().map(|e| {
                            ConfigError::new(
                                key.clone(),
                                format!("{file} at {}: {}", e.key, e.message),
                            )
                        }));
                        set.absorb(c.set);
                    }
                    Err(msg) => errs.push(ConfigError::new(key, msg)),
                }
                continue;
            }
            let name_sources = [&m.device_name_json, &m.device_name_topic, &m.device_name]
                .iter()
                .filter(|o| o.is_some())
                .count();
            let needs_name = matches!(
                m.kind,
                MappingKind::Data
                    | MappingKind::Connect
                    | MappingKind::Disconnect
                    | MappingKind::AttributeRequest
            );
            if name_sources > 1 || (needs_name && name_sources == 0) {
                errs.push(ConfigError::new(
                    format!("{base}.device_name_json"),
                    "set exactly one of device_name_json, device_name_topic, device_name",
                ));
                continue;
            }
            let (json, aliases) = native_to_json(m);
            let mut c = Compiler::new(default_device_type);
            c.entry(m.kind, &json, "");
            errs.extend(c.errs.into_iter().map(|e| {
                ConfigError::new(
                    format!("{base}.{}", native_key(&aliases, &e.key)),
                    e.message,
                )
            }));
            set.absorb(c.set);
        }
        if errs.is_empty() {
            Ok(set)
        } else {
            Err(errs)
        }
    }

    /// Compile one tb-gateway MQTT connector document (old or new format). `origin` prefixes
    /// the error keys (a file name, say).
    pub fn from_connector_json(connector: &Value, origin: &str) -> Result<Self, Vec<ConfigError>> {
        let mut c = Compiler::new(TB_GATEWAY_DEFAULT_PROFILE);
        c.connector(connector);
        if c.errs.is_empty() {
            Ok(c.set)
        } else {
            Err(c
                .errs
                .into_iter()
                .map(|e| ConfigError::new(format!("{origin}:{}", e.key), e.message))
                .collect())
        }
    }

    fn absorb(&mut self, o: MappingSet) {
        self.data.extend(o.data);
        self.connect.extend(o.connect);
        self.disconnect.extend(o.disconnect);
        self.attr_requests.extend(o.attr_requests);
        self.attr_updates.extend(o.attr_updates);
        self.rpc.extend(o.rpc);
    }

    /// True when no rule at all was configured.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
            && self.connect.is_empty()
            && self.disconnect.is_empty()
            && self.attr_requests.is_empty()
            && self.attr_updates.is_empty()
            && self.rpc.is_empty()
    }

    /// Map one local publish. `None`: no rule's topic filter matched. `Some(Err)`: a rule
    /// matched but the message is unusable (drop and count it). Every matching rule applies.
    pub fn map(&mut self, msg: &LocalPublish) -> Option<Result<Vec<Record>, Error>> {
        let topic = msg.topic.as_str();
        let matched = self.data.iter().any(|r| r.filter.matches(topic))
            || self.connect.iter().any(|r| r.filter.matches(topic))
            || self.disconnect.iter().any(|r| r.filter.matches(topic))
            || self.attr_requests.iter().any(|r| r.filter.matches(topic));
        if !matched {
            return None;
        }
        Some(self.map_matched(msg))
    }

    fn map_matched(&mut self, msg: &LocalPublish) -> Result<Vec<Record>, Error> {
        let topic = msg.topic.as_str();
        let mut json_cache: Option<Value> = None;
        let parse = |cache: &mut Option<Value>| -> Result<(), Error> {
            if cache.is_none() {
                let v = serde_json::from_slice::<Value>(&msg.payload).map_err(|source| {
                    Error::Json {
                        topic: topic.to_string(),
                        source,
                    }
                })?;
                *cache = Some(v);
            }
            Ok(())
        };
        let mut out = Vec::new();
        let MappingSet {
            data,
            connect,
            disconnect,
            attr_requests,
            state,
            pending,
            pending_order,
            next_request_id,
            ..
        } = self;

        // The parsed payload is read by no rule after the last data rule (the usual case: one
        // data rule and nothing else on the topic): that rule may move its `"*"` values out of
        // it instead of copying them.
        let others = connect
            .iter()
            .chain(disconnect.iter())
            .any(|r| r.filter.matches(topic))
            || attr_requests.iter().any(|r| r.filter.matches(topic));
        let last = data.iter().rposition(|r| r.filter.matches(topic));
        for (i, rule) in data.iter().enumerate() {
            if !rule.filter.matches(topic) {
                continue;
            }
            if rule.bytes.is_none() {
                parse(&mut json_cache)?;
            }
            let last_use = !others && last == Some(i);
            apply_data_rule(rule, msg, json_cache.as_mut(), last_use, state, &mut out)?;
        }

        for (rules, kind) in [
            (&*connect, RecordKind::Connect),
            (&*disconnect, RecordKind::Disconnect),
        ] {
            for rule in rules.iter().filter(|r| r.filter.matches(topic)) {
                if rule.device.needs_json() {
                    parse(&mut json_cache)?;
                }
                let input = Input {
                    topic,
                    json: json_cache.as_ref(),
                    raw: &msg.payload,
                };
                let (device, device_type) = rule.device.resolve(&input)?;
                let payload = match kind {
                    RecordKind::Connect => json!({"device": device, "type": device_type}),
                    _ => json!({"device": device}),
                };
                out.push(Record {
                    device,
                    device_type,
                    kind,
                    payload,
                });
            }
        }

        for (idx, rule) in attr_requests.iter().enumerate() {
            if !rule.filter.matches(topic) {
                continue;
            }
            if rule.device.needs_json() || rule.names.needs_json() {
                parse(&mut json_cache)?;
            }
            let input = Input {
                topic,
                json: json_cache.as_ref(),
                raw: &msg.payload,
            };
            let (device, device_type) = rule.device.resolve(&input)?;
            let names = rule.names.eval(&input, "attribute name")?;
            let keys: Vec<String> = names
                .split(',')
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .collect();
            if keys.is_empty() {
                return Err(Error::NoAttributeNames {
                    topic: topic.to_string(),
                });
            }
            *next_request_id += 1;
            let id = *next_request_id;
            if pending.len() >= MAX_PENDING_ATTRIBUTE_REQUESTS {
                if let Some(old) = pending_order.pop_front() {
                    pending.remove(&old);
                }
            }
            pending.insert(
                id,
                PendingRequest {
                    rule: idx,
                    device: device.clone(),
                    keys: keys.clone(),
                },
            );
            pending_order.push_back(id);
            out.push(Record {
                device,
                device_type,
                kind: RecordKind::AttributeRequest,
                payload: json!({"id": id, "client": rule.client, "keys": keys}),
            });
        }
        Ok(out)
    }

    /// Records due under periodic report strategies at `now_ms` (the latest value of each
    /// datapoint whose period elapsed), stamped `now_ms`.
    pub fn due(&mut self, now_ms: TimestampMs) -> Vec<Record> {
        let mut out = Vec::new();
        for (device, st) in self.state.iter_mut() {
            for (map, is_ts) in [(&mut st.timeseries, true), (&mut st.attributes, false)] {
                let mut values = Map::new();
                for (k, ks) in map.iter_mut() {
                    if ks.period > 0 && ks.next_due <= now_ms {
                        values.insert(k.clone(), ks.last.clone());
                        ks.next_due = now_ms.saturating_add(ks.period);
                    }
                }
                if !values.is_empty() {
                    out.push(if is_ts {
                        Record::telemetry(device.clone(), st.device_type.clone(), now_ms, values)
                    } else {
                        Record::attributes(device.clone(), st.device_type.clone(), values)
                    });
                }
            }
        }
        out
    }

    /// The earliest time a periodic datapoint falls due, for the router's timer.
    pub fn next_due(&self) -> Option<TimestampMs> {
        self.state
            .values()
            .flat_map(|s| s.timeseries.values().chain(s.attributes.values()))
            .filter(|k| k.period > 0)
            .map(|k| k.next_due)
            .min()
    }

    /// Shared-attribute changes → one local publish per matching rule and key (`deleted` is
    /// not an attribute and is skipped).
    pub fn attribute_update_publishes(&self, upd: &AttributeUpdate) -> Vec<LocalOut> {
        let mut out = Vec::new();
        for rule in self
            .attr_updates
            .iter()
            .filter(|r| r.device_filter.is_match(&upd.device))
        {
            for (k, v) in upd.data.iter().filter(|(k, _)| k.as_str() != "deleted") {
                if !rule.attr_filter.is_match(k) {
                    continue;
                }
                let ctx = json!({"deviceName": upd.device, "attributeKey": k, "attributeValue": v});
                if let (Ok(topic), Ok(payload)) = (
                    rule.topic.render(&ctx, Render::Plain),
                    rule.value.render(&ctx, Render::Json),
                ) {
                    out.push(LocalOut {
                        topic,
                        payload: payload.into_bytes(),
                        retain: rule.retain,
                    });
                }
            }
        }
        out
    }

    /// How to carry out an RPC: the reserved `get`/`set` methods first, then the first
    /// `serverSideRpc` rule whose filters match. `None` means no rule applies: the caller must
    /// still reply (with an error), never stay silent.
    pub fn rpc_route(&self, req: &RpcRequest) -> Option<RpcRoute> {
        let ctx = json!({
            "deviceName": req.device,
            "methodName": req.method,
            "requestId": req.id,
            "params": req.params,
        });
        if let Some(route) = reserved_rpc(req, &ctx) {
            return Some(route);
        }
        let rule = self.rpc.iter().find(|r| {
            r.device_filter.is_match(&req.device) && r.method_filter.is_match(&req.method)
        })?;
        let topic = rule.request_topic.render(&ctx, Render::Plain).ok()?;
        let payload = rule.value.render(&ctx, Render::Json).ok()?;
        let (response_topic, timeout) = match &rule.two_way {
            Some((t, d)) => (Some(t.render(&ctx, Render::Plain).ok()?), *d),
            None => (None, Duration::ZERO),
        };
        Some(RpcRoute {
            request: LocalOut {
                topic,
                payload: payload.into_bytes(),
                retain: rule.retain,
            },
            response_topic,
            timeout,
        })
    }

    /// ThingsBoard answered attribute request `id`: what to publish locally (`None` when the
    /// id is unknown, belongs to another device, or the rule's expressions find nothing).
    /// `values` is the response's `value` (one key) or `values` object.
    pub fn attribute_response_publish(
        &mut self,
        device: &str,
        id: i64,
        values: &Value,
    ) -> Option<LocalOut> {
        let p = self.pending.get(&id)?;
        if p.device != device {
            return None;
        }
        let p = self.pending.remove(&id)?;
        self.pending_order.retain(|x| *x != id);
        let rule = self.attr_requests.get(p.rule)?;
        if let [key] = p.keys.as_slice() {
            let value = match values {
                Value::Object(o) if o.contains_key(key) => &o[key],
                v => v,
            };
            let ctx = json!({"deviceName": device, "attributeKey": key, "attributeValue": value});
            let topic = rule.topic.render(&ctx, Render::Plain).ok()?;
            let payload = rule.value.render(&ctx, Render::Json).ok()?;
            return Some(LocalOut {
                topic,
                payload: payload.into_bytes(),
                retain: rule.retain,
            });
        }
        let ctx = json!({"deviceName": device, "attributeKey": p.keys.join(","), "attributeValue": values});
        let topic = rule.topic.render(&ctx, Render::Plain).ok()?;
        Some(LocalOut {
            topic,
            payload: values.to_string().into_bytes(),
            retain: rule.retain,
        })
    }
}

/// The reserved `get`/`set` (`mqtt_get`/`mqtt_set`) methods: params
/// `requestTopicExpression=<t>;responseTopicExpression=<t>;value=<v>;`.
fn reserved_rpc(req: &RpcRequest, ctx: &Value) -> Option<RpcRoute> {
    let method = req.method.strip_prefix("mqtt_").unwrap_or(&req.method);
    if method != "get" && method != "set" {
        return None;
    }
    let params = req.params.as_str()?;
    let mut request = None;
    let mut response = None;
    let mut value = None;
    for part in params.split(';') {
        match part.split_once('=') {
            Some(("requestTopicExpression", t)) => request = Some(t.trim()),
            Some(("responseTopicExpression", t)) => response = Some(t.trim()),
            Some(("value", v)) => value = Some(v),
            _ => {}
        }
    }
    let render = |t: &str| {
        Template::parse(t)
            .ok()
            .and_then(|t| t.render(ctx, Render::Plain).ok())
    };
    let topic = render(request?)?;
    let response_topic = match response.filter(|r| !r.is_empty()) {
        Some(r) => Some(render(r)?),
        None => None,
    };
    let timeout = if response_topic.is_some() {
        RESERVED_RPC_TIMEOUT
    } else {
        Duration::ZERO
    };
    Some(RpcRoute {
        request: LocalOut {
            topic,
            payload: value.unwrap_or("").as_bytes().to_vec(),
            retain: false,
        },
        response_topic,
        timeout,
    })
}

/// Per-device output of one message, merged over array items.
struct DeviceOut {
    device: String,
    device_type: String,
    attributes: Map<String, Value>,
    telemetry: Vec<(TimestampMs, Map<String, Value>)>,
}

/// `last_use`: nothing reads `json` after this rule, so `"*"` values may be moved out of it.
fn apply_data_rule(
    rule: &DataRule,
    msg: &LocalPublish,
    json: Option<&mut Value>,
    last_use: bool,
    state: &mut HashMap<String, DeviceState>,
    out: &mut Vec<Record>,
) -> Result<(), Error> {
    let mut bytes_item = [Value::Null];
    let items: &mut [Value] = if rule.bytes.is_some() {
        &mut bytes_item[..]
    } else {
        match json {
            Some(Value::Array(a)) => a,
            Some(v) => std::slice::from_mut(v),
            None => &mut [],
        }
    };
    // Moving is safe only when the rule's telemetry reads nothing but `"*"`: listed
    // datapoints would evaluate their expressions on the item after the move.
    let take = last_use && rule.timeseries.all && rule.timeseries.list.is_empty();
    let mut devices: Vec<DeviceOut> = Vec::with_capacity(1);
    let mut pending: Vec<(String, Value, Strategy)> = Vec::new();
    for item in items.iter_mut() {
        let input = Input {
            topic: &msg.topic,
            json: if rule.bytes.is_some() {
                None
            } else {
                Some(item)
            },
            raw: &msg.payload,
        };
        let (device, device_type) = rule.device.resolve(&input)?;
        let mut ts = if rule.use_received_ts {
            msg.received_ms
        } else {
            payload_ts(item).unwrap_or(msg.received_ms)
        };
        let idx = match devices.iter().position(|d| d.device == device) {
            Some(i) => i,
            None => {
                devices.push(DeviceOut {
                    device,
                    device_type,
                    attributes: Map::new(),
                    telemetry: Vec::new(),
                });
                devices.len() - 1
            }
        };
        // Attributes.
        collect(
            rule,
            &rule.attributes,
            &input,
            item,
            &mut pending,
            &mut None,
        );
        let d = &mut devices[idx];
        filter_strategy(
            rule,
            state,
            &d.device,
            &d.device_type,
            false,
            msg.received_ms,
            &mut pending,
            &mut d.attributes,
        );
        // Telemetry: `"*"` over a `{"ts","values"}` payload takes its ts.
        let mut ts_override = None;
        if take {
            take_all(rule, item, &mut pending, &mut ts_override);
        } else {
            collect(
                rule,
                &rule.timeseries,
                &input,
                item,
                &mut pending,
                &mut ts_override,
            );
        }
        if let Some(t) = ts_override.filter(|_| !rule.use_received_ts) {
            ts = t;
        }
        let mut values = Map::new();
        filter_strategy(
            rule,
            state,
            &d.device,
            &d.device_type,
            true,
            msg.received_ms,
            &mut pending,
            &mut values,
        );
        if !values.is_empty() {
            match d.telemetry.iter_mut().find(|(t, _)| *t == ts) {
                Some((_, m)) => m.extend(values),
                None => d.telemetry.push((ts, values)),
            }
        }
    }
    for d in devices {
        if !d.attributes.is_empty() {
            out.push(Record::attributes(
                d.device.clone(),
                d.device_type.clone(),
                d.attributes,
            ));
        }
        for (ts, values) in d.telemetry {
            out.push(Record::telemetry(
                d.device.clone(),
                d.device_type.clone(),
                ts,
                values,
            ));
        }
    }
    Ok(())
}

/// A top-level `ts`/`timestamp` in ms (number or numeric text).
fn payload_ts(item: &Value) -> Option<TimestampMs> {
    let o = item.as_object()?;
    ts_ms(o.get("ts").or_else(|| o.get("timestamp"))?)
}

/// A timestamp in ms from a number or numeric text.
fn ts_ms(v: &Value) -> Option<TimestampMs> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64)),
        Value::String(s) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(|f| f as i64),
        _ => None,
    }
}

/// What [`collect`] gives for `"*"` alone, moving the keys and values out of `item` instead of
/// copying them (the item is not read again: see `apply_data_rule`).
fn take_all(
    rule: &DataRule,
    item: &mut Value,
    out: &mut Vec<(String, Value, Strategy)>,
    ts_override: &mut Option<TimestampMs>,
) {
    let Some(o) = item.as_object_mut() else {
        return;
    };
    if let Some(ts) = ts_values_form(o) {
        *ts_override = ts_ms(ts);
        if let Some(Value::Object(vals)) = o.remove("values") {
            out.extend(vals.into_iter().map(|(k, v)| (k, v, rule.strategy)));
        }
        return;
    }
    out.extend(
        std::mem::take(o)
            .into_iter()
            .filter(|(k, v)| star_keeps(rule, k, v))
            .map(|(k, v)| (k, v, rule.strategy)),
    );
}

/// The `ts` of an object in ThingsBoard's `{"ts": .., "values": {..}}` form, whose `"*"` is
/// the `values` (at that `ts`) rather than every key.
fn ts_values_form(o: &Map<String, Value>) -> Option<&Value> {
    o.get("values").filter(|v| v.is_object()).and(o.get("ts"))
}

/// Whether `"*"` over a plain object takes key `k`: not null, not the device name or time.
fn star_keeps(rule: &DataRule, k: &str, v: &Value) -> bool {
    !v.is_null() && !rule.skip_keys.iter().any(|s| s == k)
}

/// Evaluate datapoints into `(key, value, strategy)`; missing values are skipped (spec §6.4).
fn collect(
    rule: &DataRule,
    dps: &Datapoints,
    input: &Input<'_>,
    item: &Value,
    out: &mut Vec<(String, Value, Strategy)>,
    ts_override: &mut Option<TimestampMs>,
) {
    if dps.all {
        if let Some(o) = item.as_object() {
            if let Some(ts) = ts_values_form(o) {
                *ts_override = ts_ms(ts);
                if let Some(vals) = o.get("values").and_then(Value::as_object) {
                    out.extend(
                        vals.iter()
                            .map(|(k, v)| (k.clone(), v.clone(), rule.strategy)),
                    );
                }
            } else {
                out.extend(
                    o.iter()
                        .filter(|(k, v)| star_keeps(rule, k, v))
                        .map(|(k, v)| (k.clone(), v.clone(), rule.strategy)),
                );
            }
        }
    }
    for dp in &dps.list {
        let key: Cow<'_, str> = match &dp.key {
            KeyExpr::Template(t) => match t.single_path() {
                None if t.is_constant() => Cow::Borrowed(t.as_str()),
                _ => match t.render(item, Render::Plain) {
                    Ok(k) => Cow::Owned(k),
                    Err(_) => continue,
                },
            },
            KeyExpr::Topic(r) => match r.extract(input.topic) {
                Some(k) => Cow::Borrowed(k),
                None => continue,
            },
        };
        let value = match &dp.value {
            ValueExpr::Json(t) => match t.eval_value(item) {
                Ok(v) => convert::convert(&v, dp.ty),
                Err(_) => continue,
            },
            ValueExpr::Bytes(parts) => convert::convert(
                &eval_bytes(parts, input.raw, rule.bytes == Some(true)),
                dp.ty,
            ),
        };
        out.push((
            key.into_owned(),
            value,
            dp.strategy.unwrap_or(rule.strategy),
        ));
    }
}

/// Apply report strategies to `pending` (drained) and put what is to be sent now into `dest`.
#[allow(clippy::too_many_arguments)]
fn filter_strategy(
    rule: &DataRule,
    state: &mut HashMap<String, DeviceState>,
    device: &str,
    device_type: &str,
    telemetry: bool,
    now: TimestampMs,
    pending: &mut Vec<(String, Value, Strategy)>,
    dest: &mut Map<String, Value>,
) {
    if !rule.stateful {
        dest.extend(pending.drain(..).map(|(k, v, _)| (k, v)));
        return;
    }
    let st = match state.get_mut(device) {
        Some(s) => s,
        None => state.entry(device.to_string()).or_default(),
    };
    if st.device_type != device_type {
        st.device_type = device_type.to_string();
    }
    let map = if telemetry {
        &mut st.timeseries
    } else {
        &mut st.attributes
    };
    for (k, v, strategy) in pending.drain(..) {
        let send = match strategy {
            Strategy::OnReceived => true,
            Strategy::Disabled => false,
            Strategy::OnChange => {
                let changed = map.get(&k).is_none_or(|s| s.last != v);
                if changed {
                    map.insert(
                        k.clone(),
                        KeyState {
                            last: v.clone(),
                            period: 0,
                            next_due: 0,
                        },
                    );
                }
                changed
            }
            Strategy::Period(p) => {
                match map.get_mut(&k) {
                    Some(s) => {
                        s.last = v;
                        s.period = p;
                    }
                    None => {
                        map.insert(
                            k,
                            KeyState {
                                last: v,
                                period: p,
                                next_due: now.saturating_add(p),
                            },
                        );
                    }
                }
                continue;
            }
            Strategy::ChangeOrPeriod(p) => {
                let changed = map.get(&k).is_none_or(|s| s.last != v);
                match map.get_mut(&k) {
                    Some(s) => {
                        s.last = v.clone();
                        s.period = p;
                        if changed {
                            s.next_due = now.saturating_add(p);
                        }
                    }
                    None => {
                        map.insert(
                            k.clone(),
                            KeyState {
                                last: v.clone(),
                                period: p,
                                next_due: now.saturating_add(p),
                            },
                        );
                    }
                }
                changed
            }
        };
        if send {
            dest.insert(k, v);
        }
    }
}

fn read_connector(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not valid JSON: {e}", path.display()))
}

/// Compiles tb-gateway connector JSON into rules, collecting errors keyed by JSON path.
struct Compiler<'a> {
    set: MappingSet,
    errs: Vec<ConfigError>,
    default_profile: &'a str,
    /// Connector-level `reportStrategy` / old `sendDataOnlyOnChange`.
    connector_strategy: Option<Strategy>,
}

fn join(base: &str, k: &str) -> String {
    if base.is_empty() {
        k.to_string()
    } else if k.starts_with('[') {
        format!("{base}{k}")
    } else {
        format!("{base}.{k}")
    }
}

impl<'a> Compiler<'a> {
    fn new(default_profile: &'a str) -> Self {
        Compiler {
            set: MappingSet::default(),
            errs: Vec::new(),
            default_profile,
            connector_strategy: None,
        }
    }

    fn err(&mut self, key: String, msg: impl Into<String>) {
        self.errs.push(ConfigError::new(key, msg));
    }

    /// A whole connector file: `mapping`/`dataMapping` plus request arrays at top level (old)
    /// or under `requestsMapping` (new).
    fn connector(&mut self, v: &Value) {
        let Some(o) = v.as_object() else {
            self.err(
                String::new(),
                "a tb-gateway connector file must be a JSON object",
            );
            return;
        };
        self.connector_strategy = match o.get("reportStrategy") {
            Some(s) => self.strategy(s, "reportStrategy"),
            None => None,
        };
        let old_on_change = o
            .get("broker")
            .and_then(|b| b.get("sendDataOnlyOnChange"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if self.connector_strategy.is_none() && old_on_change {
            self.connector_strategy = Some(Strategy::OnChange);
        }
        let mapping_key = if o.contains_key("mapping") {
            "mapping"
        } else {
            "dataMapping"
        };
        self.array(o, mapping_key, "", MappingKind::Data);
        let (req, base) = match o.get("requestsMapping").and_then(Value::as_object) {
            Some(r) => (r, "requestsMapping"),
            None => (o, ""),
        };
        for (k, kind) in [
            ("connectRequests", MappingKind::Connect),
            ("disconnectRequests", MappingKind::Disconnect),
            ("attributeRequests", MappingKind::AttributeRequest),
            ("attributeUpdates", MappingKind::AttributeUpdate),
            ("serverSideRpc", MappingKind::Rpc),
        ] {
            self.array(req, k, base, kind);
        }
    }

    fn array(&mut self, o: &Map<String, Value>, k: &str, base: &str, kind: MappingKind) {
        let key = join(base, k);
        match o.get(k) {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) => {
                for (i, e) in a.iter().enumerate() {
                    self.entry(kind, e, &format!("{key}[{i}]"));
                }
            }
            Some(_) => self.err(key, "must be an array"),
        }
    }

    /// One entry of any kind, in tb-gateway JSON (new or old keys).
    fn entry(&mut self, kind: MappingKind, v: &Value, key: &str) {
        let Some(o) = v.as_object() else {
            self.err(key.to_string(), "must be an object");
            return;
        };
        match kind {
            MappingKind::Data => self.data_rule(o, key),
            MappingKind::Connect | MappingKind::Disconnect => {
                let filter = self.topic_filter(o, key);
                let device = self.device_info(o, key, false);
                if let (Some(filter), Some(device)) = (filter, device) {
                    let r = DeviceRequestRule { filter, device };
                    if kind == MappingKind::Connect {
                        self.set.connect.push(r);
                    } else {
                        self.set.disconnect.push(r);
                    }
                }
            }
            MappingKind::AttributeRequest => self.attr_request(o, key),
            MappingKind::AttributeUpdate => self.attr_update(o, key),
            MappingKind::Rpc => self.rpc(o, key),
        }
    }

    fn str_opt<'v>(&mut self, o: &'v Map<String, Value>, k: &str, key: &str) -> Option<&'v str> {
        match o.get(k) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                self.err(join(key, k), "must be a string");
                None
            }
        }
    }

    fn bool_opt(&mut self, o: &Map<String, Value>, k: &str, key: &str) -> bool {
        match o.get(k) {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                self.err(join(key, k), "must be true or false");
                false
            }
        }
    }

    fn template(&mut self, text: &str, key: String) -> Option<Template> {
        Template::parse(text)
            .map_err(|e| self.err(key, e.to_string()))
            .ok()
    }

    fn template_req(&mut self, o: &Map<String, Value>, k: &str, key: &str) -> Option<Template> {
        match self.str_opt(o, k, key) {
            Some(s) => self.template(s, join(key, k)),
            None => {
                self.err(join(key, k), "is required");
                None
            }
        }
    }

    fn regex(
        &mut self,
        o: &Map<String, Value>,
        k: &str,
        key: &str,
        anchored: bool,
    ) -> Option<Regex> {
        let text = self.str_opt(o, k, key).unwrap_or(".*");
        let pattern = if anchored {
            format!("^(?:{text})")
        } else {
            text.to_string()
        };
        Regex::new(&pattern)
            .map_err(|e| self.err(join(key, k), format!("bad regex: {e}")))
            .ok()
    }

    fn topic_filter(&mut self, o: &Map<String, Value>, key: &str) -> Option<TopicFilter> {
        match self.str_opt(o, "topicFilter", key) {
            Some(f) => TopicFilter::parse(f)
                .map_err(|e| self.err(join(key, "topicFilter"), e.to_string()))
                .ok(),
            None => {
                self.err(join(key, "topicFilter"), "is required");
                None
            }
        }
    }

    /// A source given as (`message`|`topic`|`constant`, expression).
    fn source(&mut self, src: &str, expr: &str, key: String, bytes: bool) -> Option<Source> {
        match src {
            "message" | "" if bytes => parse_bytes_expr(expr)
                .map(Source::Bytes)
                .map_err(|e| self.err(key, e))
                .ok(),
            "message" | "" => self.template(expr, key).map(Source::Message),
            "topic" => TopicRegex::compile(expr)
                .map(Source::Topic)
                .map_err(|e| self.err(key, e))
                .ok(),
            "constant" => Some(Source::Constant(expr.to_string())),
            other => {
                self.err(
                    key,
                    format!(
                        "unknown expression source `{other}` (known: message, topic, constant)"
                    ),
                );
                None
            }
        }
    }

    /// `deviceInfo{…}` (new) or the old `deviceName*Expression`/`deviceType*Expression` keys.
    fn device_info(
        &mut self,
        o: &Map<String, Value>,
        key: &str,
        bytes: bool,
    ) -> Option<DeviceInfo> {
        let default_profile = Source::Constant(self.default_profile.to_string());
        if let Some(di) = o.get("deviceInfo") {
            let dkey = join(key, "deviceInfo");
            let Some(di) = di.as_object() else {
                self.err(dkey, "must be an object");
                return None;
            };
            let nsrc = self
                .str_opt(di, "deviceNameExpressionSource", &dkey)
                .unwrap_or("message");
            let name = match self.str_opt(di, "deviceNameExpression", &dkey) {
                Some(e) => self.source(nsrc, e, join(&dkey, "deviceNameExpression"), bytes),
                None => {
                    self.err(join(&dkey, "deviceNameExpression"), "is required");
                    None
                }
            };
            let psrc = self
                .str_opt(di, "deviceProfileExpressionSource", &dkey)
                .unwrap_or("message");
            let profile = match self.str_opt(di, "deviceProfileExpression", &dkey) {
                Some(e) => self.source(psrc, e, join(&dkey, "deviceProfileExpression"), bytes),
                None => Some(default_profile),
            };
            return Some(DeviceInfo {
                name: name?,
                profile: profile?,
            });
        }
        let pick = |c: &mut Self, keys: [(&str, &str); 3]| -> Option<Option<Source>> {
            for (k, src) in keys {
                if let Some(e) = c.str_opt(o, k, key) {
                    return Some(c.source(src, e, join(key, k), bytes && src == "message"));
                }
            }
            None
        };
        let name = pick(
            self,
            [
                ("deviceNameJsonExpression", "message"),
                ("deviceNameTopicExpression", "topic"),
                ("deviceNameExpression", "message"),
            ],
        );
        let profile = pick(
            self,
            [
                ("deviceTypeJsonExpression", "message"),
                ("deviceTypeTopicExpression", "topic"),
                ("deviceTypeExpression", "message"),
            ],
        )
        .unwrap_or(Some(default_profile));
        match name {
            Some(n) => Some(DeviceInfo {
                name: n?,
                profile: profile?,
            }),
            None => {
                self.err(
                    join(key, "deviceInfo"),
                    "no device name: set deviceInfo.deviceNameExpression (or the old deviceNameJsonExpression / deviceNameTopicExpression)",
                );
                None
            }
        }
    }

    fn strategy(&mut self, v: &Value, key: &str) -> Option<Strategy> {
        let Some(o) = v.as_object() else {
            self.err(
                key.to_string(),
                "must be an object like {\"type\": \"ON_CHANGE\"}",
            );
            return None;
        };
        let ty = self
            .str_opt(o, "type", key)
            .unwrap_or("ON_RECEIVED")
            .to_ascii_uppercase();
        if let Some(f) = self.str_opt(o, "aggregationFunction", key) {
            if !f.eq_ignore_ascii_case("NONE") {
                self.err(
                    join(key, "aggregationFunction"),
                    format!("`{f}` is not supported (only NONE)"),
                );
            }
        }
        let period = match o.get("reportPeriod") {
            Some(p) => match p.as_i64().filter(|p| *p > 0) {
                Some(p) => Some(p),
                None => {
                    self.err(
                        join(key, "reportPeriod"),
                        "must be a positive number of milliseconds",
                    );
                    return None;
                }
            },
            None => None,
        };
        let need_period = |c: &mut Self| {
            if period.is_none() {
                c.err(
                    join(key, "reportPeriod"),
                    format!("{ty} needs reportPeriod (ms)"),
                );
            }
            period
        };
        Some(match ty.as_str() {
            "ON_RECEIVED" => Strategy::OnReceived,
            "ON_CHANGE" => Strategy::OnChange,
            "DISABLED" => Strategy::Disabled,
            "ON_REPORT_PERIOD" => Strategy::Period(need_period(self)?),
            "ON_CHANGE_OR_REPORT_PERIOD" => Strategy::ChangeOrPeriod(need_period(self)?),
            other => {
                self.err(
                    join(key, "type"),
                    format!("unknown report strategy `{other}` (known: ON_RECEIVED, ON_CHANGE, ON_REPORT_PERIOD, ON_CHANGE_OR_REPORT_PERIOD, DISABLED)"),
                );
                return None;
            }
        })
    }

    fn data_rule(&mut self, o: &Map<String, Value>, key: &str) {
        let filter = self.topic_filter(o, key);
        let ckey = join(key, "converter");
        let Some(conv) = o.get("converter").and_then(Value::as_object) else {
            self.err(
                ckey,
                "is required (an object with type, deviceInfo, attributes, timeseries)",
            );
            return;
        };
        let ctype = self
            .str_opt(conv, "type", &ckey)
            .unwrap_or("json")
            .to_ascii_lowercase();
        let bytes = match ctype.as_str() {
            "json" => false,
            "bytes" => true,
            "custom" => {
                let ext = self.str_opt(conv, "extension", &ckey).unwrap_or("?");
                self.err(
                    join(&ckey, "type"),
                    format!("custom converter `{ext}` is Python code and cannot run in dlms-bridge: rewrite it as a json or bytes mapping"),
                );
                return;
            }
            other => {
                self.err(
                    join(&ckey, "type"),
                    format!("unknown converter type `{other}` (known: json, bytes)"),
                );
                return;
            }
        };
        for unsupported in [
            "useEval",
            "extension",
            "extensionConfig",
            "extension-config",
        ] {
            if conv
                .get(unsupported)
                .is_some_and(|v| !v.is_null() && v != &Value::Bool(false))
            {
                self.err(
                    join(&ckey, unsupported),
                    "is not supported (no Python code runs in dlms-bridge)",
                );
            }
        }
        let device = self.device_info(conv, &ckey, bytes);
        let hex = self.bool_opt(conv, "hexMode", &ckey);
        let use_received_ts = self.bool_opt(conv, "useReceivedTs", &ckey);
        let mut strategy = match o.get("reportStrategy") {
            Some(s) => self.strategy(s, &join(key, "reportStrategy")),
            None => None,
        };
        if strategy.is_none() {
            if let Some(s) = conv.get("reportStrategy") {
                strategy = self.strategy(s, &join(&ckey, "reportStrategy"));
            }
        }
        let old_on_change = self.bool_opt(conv, "sendDataOnlyOnChange", &ckey)
            || self.bool_opt(o, "sendDataOnlyOnChange", key);
        let strategy = strategy
            .or(old_on_change.then_some(Strategy::OnChange))
            .or(self.connector_strategy)
            .unwrap_or(Strategy::OnReceived);
        let attributes = self.datapoints(conv.get("attributes"), &join(&ckey, "attributes"), bytes);
        let timeseries = self.datapoints(conv.get("timeseries"), &join(&ckey, "timeseries"), bytes);
        let (Some(filter), Some(device)) = (filter, device) else {
            return;
        };
        let stateful = strategy != Strategy::OnReceived
            || attributes
                .list
                .iter()
                .chain(&timeseries.list)
                .any(|d| d.strategy.is_some_and(|s| s != Strategy::OnReceived));
        let mut skip_keys = device.source_keys();
        skip_keys.extend(["ts".to_string(), "timestamp".to_string()]);
        self.set.data.push(DataRule {
            filter,
            bytes: bytes.then_some(hex),
            device,
            attributes,
            timeseries,
            use_received_ts,
            strategy,
            stateful,
            skip_keys,
        });
    }

    fn datapoints(&mut self, v: Option<&Value>, key: &str, bytes: bool) -> Datapoints {
        let mut dps = Datapoints::default();
        let items: &[Value] = match v {
            None | Some(Value::Null) => &[],
            Some(Value::String(s)) if s == "*" => {
                dps.all = true;
                &[]
            }
            Some(Value::Array(a)) => a,
            Some(_) => {
                self.err(
                    key.to_string(),
                    "must be an array of {type, key, value} or \"*\"",
                );
                &[]
            }
        };
        for (i, item) in items.iter().enumerate() {
            let ikey = format!("{key}[{i}]");
            if item.as_str() == Some("*") || item.get("key").and_then(Value::as_str) == Some("*") {
                if bytes {
                    self.err(ikey, "\"*\" needs a JSON payload (converter type json)");
                } else {
                    dps.all = true;
                }
                continue;
            }
            let Some(o) = item.as_object() else {
                self.err(ikey, "must be an object {type, key, value} or \"*\"");
                continue;
            };
            if o.get("tsField").is_some() {
                self.err(join(&ikey, "tsField"), "is not supported yet: remove it to use the payload `ts`/`timestamp` or useReceivedTs");
            }
            let ty = match self
                .str_opt(o, "type", &ikey)
                .unwrap_or("raw")
                .parse::<DataType>()
            {
                Ok(t) => Some(t),
                Err(e) => {
                    self.err(join(&ikey, "type"), e.to_string());
                    None
                }
            };
            let key_src = self.str_opt(o, "keySource", &ikey).unwrap_or("constant");
            let key_expr = match (self.str_opt(o, "key", &ikey), key_src) {
                (None, _) => {
                    self.err(join(&ikey, "key"), "is required");
                    None
                }
                (Some(k), "topic") => TopicRegex::compile(k)
                    .map(KeyExpr::Topic)
                    .map_err(|e| self.err(join(&ikey, "key"), e))
                    .ok(),
                (Some(k), _) => self.template(k, join(&ikey, "key")).map(KeyExpr::Template),
            };
            let value = match self.str_opt(o, "value", &ikey) {
                Some(val) if bytes => parse_bytes_expr(val)
                    .map(ValueExpr::Bytes)
                    .map_err(|e| self.err(join(&ikey, "value"), e))
                    .ok(),
                Some(val) => self
                    .template(val, join(&ikey, "value"))
                    .map(ValueExpr::Json),
                None => {
                    self.err(join(&ikey, "value"), "is required");
                    None
                }
            };
            let strategy = match o.get("reportStrategy") {
                Some(s) => self.strategy(s, &join(&ikey, "reportStrategy")),
                None => None,
            };
            if let (Some(key), Some(ty), Some(value)) = (key_expr, ty, value) {
                dps.list.push(Datapoint {
                    key,
                    ty,
                    value,
                    strategy,
                });
            }
        }
        dps
    }

    fn attr_request(&mut self, o: &Map<String, Value>, key: &str) {
        let filter = self.topic_filter(o, key);
        let device = self.device_info(o, key, false);
        let names = if let Some(e) = self.str_opt(o, "attributeNameExpression", key) {
            let src = self
                .str_opt(o, "attributeNameExpressionSource", key)
                .unwrap_or("message");
            self.source(src, e, join(key, "attributeNameExpression"), false)
        } else if let Some(e) = self.str_opt(o, "attributeNameJsonExpression", key) {
            self.source(
                "message",
                e,
                join(key, "attributeNameJsonExpression"),
                false,
            )
        } else if let Some(e) = self.str_opt(o, "attributeNameTopicExpression", key) {
            self.source("topic", e, join(key, "attributeNameTopicExpression"), false)
        } else {
            self.err(join(key, "attributeNameExpression"), "is required");
            None
        };
        let client = match self.str_opt(o, "scope", key).unwrap_or("shared") {
            "shared" => false,
            "client" => true,
            other => {
                self.err(
                    join(key, "scope"),
                    format!("`{other}` is not `shared` or `client`"),
                );
                false
            }
        };
        let topic = self.template_req(o, "topicExpression", key);
        let value = match self.str_opt(o, "valueExpression", key) {
            Some(v) => self.template(v, join(key, "valueExpression")),
            None => Template::parse("${attributeValue}").ok(),
        };
        let retain = self.bool_opt(o, "retain", key);
        if let (Some(filter), Some(device), Some(names), Some(topic), Some(value)) =
            (filter, device, names, topic, value)
        {
            self.set.attr_requests.push(AttrRequestRule {
                filter,
                device,
                names,
                client,
                topic,
                value,
                retain,
            });
        }
    }

    fn attr_update(&mut self, o: &Map<String, Value>, key: &str) {
        let device_filter = self.regex(o, "deviceNameFilter", key, true);
        let attr_filter = self.regex(o, "attributeFilter", key, true);
        let topic = self.template_req(o, "topicExpression", key);
        let value = match self.str_opt(o, "valueExpression", key) {
            Some(v) => self.template(v, join(key, "valueExpression")),
            None => Template::parse("${attributeValue}").ok(),
        };
        let retain = self.bool_opt(o, "retain", key);
        if let (Some(device_filter), Some(attr_filter), Some(topic), Some(value)) =
            (device_filter, attr_filter, topic, value)
        {
            self.set.attr_updates.push(AttrUpdateRule {
                device_filter,
                attr_filter,
                topic,
                value,
                retain,
            });
        }
    }

    fn rpc(&mut self, o: &Map<String, Value>, key: &str) {
        let device_filter = self.regex(o, "deviceNameFilter", key, false);
        let method_filter = self.regex(o, "methodFilter", key, false);
        let request_topic = self.template_req(o, "requestTopicExpression", key);
        let value = match self.str_opt(o, "valueExpression", key) {
            Some(v) => self.template(v, join(key, "valueExpression")),
            None => Template::parse("${params}").ok(),
        };
        let retain = self.bool_opt(o, "retain", key);
        let ty = self.str_opt(o, "type", key).map(str::to_ascii_lowercase);
        let response = self.str_opt(o, "responseTopicExpression", key);
        let timeout = match o.get("responseTimeout") {
            None | Some(Value::Null) => None,
            Some(t) => match t.as_u64().filter(|t| *t > 0) {
                Some(ms) => Some(Duration::from_millis(ms)),
                None => {
                    self.err(
                        join(key, "responseTimeout"),
                        "must be a positive number of milliseconds",
                    );
                    None
                }
            },
        };
        let two_way = match ty.as_deref() {
            Some("oneway") => None,
            Some("twoway") | None => match (response, timeout) {
                (Some(r), Some(t)) => self
                    .template(r, join(key, "responseTopicExpression"))
                    .map(|r| (r, t)),
                (Some(_), None) if ty.is_some() => {
                    self.err(
                        join(key, "responseTimeout"),
                        "a twoWay RPC needs responseTimeout (ms)",
                    );
                    None
                }
                (None, _) if ty.is_some() => {
                    self.err(
                        join(key, "responseTopicExpression"),
                        "a twoWay RPC needs a response topic",
                    );
                    None
                }
                _ => None,
            },
            Some(other) => {
                self.err(
                    join(key, "type"),
                    format!("`{other}` is not twoWay or oneWay"),
                );
                None
            }
        };
        if let (Some(device_filter), Some(method_filter), Some(request_topic), Some(value)) =
            (device_filter, method_filter, request_topic, value)
        {
            self.set.rpc.push(RpcRule {
                device_filter,
                method_filter,
                request_topic,
                two_way,
                value,
                retain,
            });
        }
    }
}

/// A native `[[mappings]]` entry as tb-gateway new-format JSON, plus which TOML key each JSON
/// key came from (so errors name the key the user wrote).
fn native_to_json(m: &MappingConfig) -> (Value, Vec<(String, String)>) {
    let mut aliases: Vec<(String, String)> = vec![("topicFilter".into(), "topic_filter".into())];
    let alias =
        |a: &mut Vec<(String, String)>, j: &str, t: &str| a.push((j.to_string(), t.to_string()));
    let mut device_info = Map::new();
    let name = [
        (&m.device_name_json, "message", "device_name_json"),
        (&m.device_name_topic, "topic", "device_name_topic"),
        (&m.device_name, "constant", "device_name"),
    ];
    let set_names: Vec<_> = name.iter().filter(|(v, _, _)| v.is_some()).collect();
    if let Some((Some(expr), src, toml)) = set_names.first() {
        device_info.insert("deviceNameExpressionSource".into(), json!(src));
        device_info.insert("deviceNameExpression".into(), json!(expr));
        alias(&mut aliases, "deviceInfo.deviceNameExpression", toml);
        alias(
            &mut aliases,
            "converter.deviceInfo.deviceNameExpression",
            toml,
        );
    }
    if let Some(t) = &m.device_type_topic {
        device_info.insert("deviceProfileExpressionSource".into(), json!("topic"));
        device_info.insert("deviceProfileExpression".into(), json!(t));
        alias(
            &mut aliases,
            "deviceInfo.deviceProfileExpression",
            "device_type_topic",
        );
        alias(
            &mut aliases,
            "converter.deviceInfo.deviceProfileExpression",
            "device_type_topic",
        );
    } else if let Some(t) = &m.device_type {
        let src = if t.contains("${") {
            "message"
        } else {
            "constant"
        };
        device_info.insert("deviceProfileExpressionSource".into(), json!(src));
        device_info.insert("deviceProfileExpression".into(), json!(t));
        alias(
            &mut aliases,
            "deviceInfo.deviceProfileExpression",
            "device_type",
        );
        alias(
            &mut aliases,
            "converter.deviceInfo.deviceProfileExpression",
            "device_type",
        );
    }
    alias(&mut aliases, "deviceInfo", "device_name_json");
    alias(&mut aliases, "converter.deviceInfo", "device_name_json");
    let strategy = |s: &ReportStrategyConfig| {
        let mut o = json!({"type": s.strategy});
        if let Some(p) = s.report_period {
            o["reportPeriod"] = json!(p.as_millis() as u64);
        }
        o
    };
    let dps = |list: &[DatapointConfig]| -> Value {
        Value::Array(
            list.iter()
                .map(|d| match d {
                    DatapointConfig::Key(k) if k == "*" => json!("*"),
                    DatapointConfig::Key(k) => {
                        json!({"type": "raw", "key": k, "value": format!("${{{k}}}")})
                    }
                    DatapointConfig::Entry(e) => {
                        let mut o = json!({
                            "type": e.data_type.as_deref().unwrap_or("raw"),
                            "key": e.key,
                            "value": e.value.clone().unwrap_or_else(|| format!("${{{}}}", e.key)),
                        });
                        if let Some(s) = &e.report_strategy {
                            o["reportStrategy"] = strategy(s);
                        }
                        o
                    }
                })
                .collect(),
        )
    };
    let mut o = Map::new();
    o.insert("topicFilter".into(), json!(m.topic_filter));
    match m.kind {
        MappingKind::Data => {
            let mut conv = Map::new();
            conv.insert(
                "type".into(),
                json!(match m.converter {
                    ConverterKind::Json => "json",
                    ConverterKind::Bytes => "bytes",
                }),
            );
            conv.insert("deviceInfo".into(), Value::Object(device_info));
            conv.insert("attributes".into(), dps(&m.attributes));
            conv.insert("timeseries".into(), dps(&m.timeseries));
            conv.insert("useReceivedTs".into(), json!(m.use_received_ts));
            conv.insert("hexMode".into(), json!(m.hex_mode));
            conv.insert(
                "sendDataOnlyOnChange".into(),
                json!(m.send_data_only_on_change),
            );
            alias(&mut aliases, "converter.attributes", "attributes");
            alias(&mut aliases, "converter.timeseries", "timeseries");
            alias(&mut aliases, "converter", "converter");
            o.insert("converter".into(), Value::Object(conv));
            if let Some(s) = &m.report_strategy {
                o.insert("reportStrategy".into(), strategy(s));
                alias(&mut aliases, "reportStrategy", "report_strategy");
            }
        }
        _ => {
            o.insert("deviceInfo".into(), Value::Object(device_info));
            let mut put = |j: &str, t: &str, v: &Option<String>| {
                if let Some(v) = v {
                    o.insert(j.into(), json!(v));
                }
                aliases.push((j.to_string(), t.to_string()));
            };
            put(
                "deviceNameFilter",
                "device_name_filter",
                &m.device_name_filter,
            );
            put("attributeFilter", "attribute_filter", &m.attribute_filter);
            put("methodFilter", "method_filter", &m.method_filter);
            put("valueExpression", "value_expression", &m.value_expression);
            put("scope", "scope", &m.scope);
            put(
                "responseTopicExpression",
                "response_topic_expression",
                &m.response_topic_expression,
            );
            let topic_key = if m.kind == MappingKind::Rpc {
                "requestTopicExpression"
            } else {
                "topicExpression"
            };
            put(topic_key, "topic_expression", &m.topic_expression);
            if let Some(t) = &m.attribute_names_topic {
                o.insert("attributeNameExpressionSource".into(), json!("topic"));
                o.insert("attributeNameExpression".into(), json!(t));
                aliases.push((
                    "attributeNameExpression".into(),
                    "attribute_names_topic".into(),
                ));
            } else if let Some(t) = &m.attribute_names {
                let src = if t.contains("${") {
                    "message"
                } else {
                    "constant"
                };
                o.insert("attributeNameExpressionSource".into(), json!(src));
                o.insert("attributeNameExpression".into(), json!(t));
                aliases.push(("attributeNameExpression".into(), "attribute_names".into()));
            }
            o.insert("retain".into(), json!(m.retain));
            if m.kind == MappingKind::Rpc {
                let two_way = m.response_topic_expression.is_some();
                o.insert(
                    "type".into(),
                    json!(if two_way { "twoWay" } else { "oneWay" }),
                );
                if let Some(t) = m.response_timeout {
                    o.insert("responseTimeout".into(), json!(t.as_millis() as u64));
                }
                aliases.push(("responseTimeout".into(), "response_timeout".into()));
            }
        }
    }
    (Value::Object(o), aliases)
}

/// Rewrite a JSON error path (`converter.timeseries[2].value`) to the TOML key
/// (`timeseries[2].value`) by its longest known prefix.
fn native_key(aliases: &[(String, String)], json_key: &str) -> String {
    aliases
        .iter()
        .filter(|(j, _)| {
            json_key == j
                || json_key
                    .strip_prefix(j.as_str())
                    .is_some_and(|r| r.starts_with('.') || r.starts_with('['))
        })
        .max_by_key(|(j, _)| j.len())
        .map(|(j, t)| format!("{t}{}", &json_key[j.len()..]))
        .unwrap_or_else(|| json_key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_str, DEFAULT_DEVICE_TYPE};
    use bytes::Bytes;

    fn publish(topic: &str, payload: &str) -> LocalPublish {
        LocalPublish {
            client_id: "c1".into(),
            username: None,
            topic: topic.into(),
            payload: Bytes::from(payload.to_string()),
            received_ms: 1_000,
            ack: None,
        }
    }

    fn native(toml: &str) -> MappingSet {
        let raw = load_str(toml).expect("toml parses");
        MappingSet::from_config(&raw.mappings, DEFAULT_DEVICE_TYPE).expect("compiles")
    }

    fn native_errs(toml: &str) -> Vec<ConfigError> {
        let raw = load_str(toml).expect("toml parses");
        MappingSet::from_config(&raw.mappings, DEFAULT_DEVICE_TYPE).expect_err("must not compile")
    }

    fn connector(v: Value) -> MappingSet {
        MappingSet::from_connector_json(&v, "test").unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn values(r: &Record) -> &Value {
        match r.kind {
            RecordKind::Telemetry => &r.payload["values"],
            _ => &r.payload,
        }
    }

    const BENCH_TOML: &str = r#"
        [[mappings]]
        topic_filter = "sensors/+/telemetry"
        device_name_json = "${deviceName}"
        timeseries = ["*"]
    "#;

    /// `"*"` moves its values out of the parsed payload only on its last use: a second rule on
    /// the same topic, the attributes of the same rule and every item of an array still see
    /// every value, and both payload shapes give what they gave when the values were copied.
    #[test]
    fn star_values_are_the_same_whether_moved_or_copied() {
        let mut set = native(
            r#"
            [[mappings]]
            topic_filter = "s/+/t"
            device_name_json = "${deviceName}"
            attributes = ["*"]
            timeseries = ["*"]
            [[mappings]]
            topic_filter = "s/#"
            device_name_json = "${deviceName}-copy"
            timeseries = ["*"]
            "#,
        );
        let out = set
            .map(&publish(
                "s/a/t",
                r#"[{"deviceName":"A","ts":5,"t":1.5,"on":true,"n":null},
                    {"deviceName":"B","ts":6,"values":{"t":2}}]"#,
            ))
            .expect("matched")
            .expect("mapped");
        let got: Vec<(String, RecordKind, Value)> = out
            .iter()
            .map(|r| (r.device.clone(), r.kind, r.payload.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "A".into(),
                    RecordKind::Attributes,
                    json!({"t": 1.5, "on": true})
                ),
                (
                    "A".into(),
                    RecordKind::Telemetry,
                    json!({"ts": 5, "values": {"t": 1.5, "on": true}})
                ),
                ("B".into(), RecordKind::Attributes, json!({"t": 2})),
                (
                    "B".into(),
                    RecordKind::Telemetry,
                    json!({"ts": 6, "values": {"t": 2}})
                ),
                (
                    "A-copy".into(),
                    RecordKind::Telemetry,
                    json!({"ts": 5, "values": {"t": 1.5, "on": true}})
                ),
                (
                    "B-copy".into(),
                    RecordKind::Telemetry,
                    json!({"ts": 6, "values": {"t": 2}})
                ),
            ]
        );
    }

    #[test]
    fn native_pass_through_maps_every_key_but_the_name() {
        let mut set = native(BENCH_TOML);
        let out = set
            .map(&publish(
                "sensors/a/telemetry",
                r#"{"deviceName":"S1","t":21.5,"on":true}"#,
            ))
            .expect("matched")
            .expect("mapped");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].device, "S1");
        assert_eq!(out[0].device_type, DEFAULT_DEVICE_TYPE);
        assert_eq!(out[0].kind, RecordKind::Telemetry);
        assert_eq!(
            out[0].payload,
            json!({"ts": 1000, "values": {"t": 21.5, "on": true}})
        );
        assert!(set.map(&publish("sensors/a/other", "{}")).is_none());
    }

    fn original_connector() -> Value {
        json!({
            "broker": {"name": "Local", "host": "127.0.0.1", "port": 1884},
            "mapping": [{
                "topicFilter": "v1/devices/me/telemetry",
                "converter": {
                    "type": "json",
                    "deviceNameJsonExpression": "${deviceName}",
                    "deviceTypeJsonExpression": "DLMS Energy Meter",
                    "timeseries": [
                        {"type": "double", "key": "voltage_l1", "value": "${voltage_l1}"},
                        {"type": "double", "key": "current_l1", "value": "${current_l1}"},
                        {"type": "double", "key": "frequency", "value": "${frequency}"},
                        {"type": "double", "key": "active_power", "value": "${active_power}"},
                        {"type": "double", "key": "active_energy", "value": "${active_energy}"}
                    ]
                }
            }]
        })
    }

    #[test]
    fn old_format_original_connector() {
        let mut set = connector(original_connector());
        let out = set
            .map(&publish(
                "v1/devices/me/telemetry",
                r#"{"deviceName":"Meter 1","voltage_l1":230.1,"current_l1":"1.5","frequency":50,"active_power":345,"ts":1700000000000}"#,
            ))
            .expect("matched")
            .expect("mapped");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].device, "Meter 1");
        assert_eq!(out[0].device_type, "DLMS Energy Meter");
        assert_eq!(
            out[0].payload,
            json!({"ts": 1700000000000i64, "values": {
                "voltage_l1": 230.1, "current_l1": 1.5, "frequency": 50.0, "active_power": 345.0}})
        );
    }

    fn new_connector() -> Value {
        json!({
            "mapping": [{
                "topicFilter": "meters/+/data",
                "converter": {
                    "type": "json",
                    "deviceInfo": {
                        "deviceNameExpressionSource": "topic",
                        "deviceNameExpression": "(?<=meters/)(.*?)(?=/data)",
                        "deviceProfileExpressionSource": "constant",
                        "deviceProfileExpression": "DLMS meter"
                    },
                    "attributes": [{"type": "string", "key": "model", "value": "${info.model}"}],
                    "timeseries": [
                        {"type": "double", "key": "kWh", "value": "${energy.import}"},
                        {"type": "string", "key": "label", "value": "${id}:${phase}"},
                        {"type": "integer", "key": "${name}", "value": "${list[1].v}"}
                    ]
                }
            }],
            "requestsMapping": {
                "connectRequests": [{"topicFilter": "sensor/connect",
                    "deviceInfo": {"deviceNameExpressionSource": "message", "deviceNameExpression": "${SerialNumber}",
                                   "deviceProfileExpressionSource": "constant", "deviceProfileExpression": "Thermometer"}}],
                "disconnectRequests": [{"topicFilter": "sensor/+/disconnect",
                    "deviceInfo": {"deviceNameExpressionSource": "topic", "deviceNameExpression": "sensor/(.*)/disconnect"}}],
                "attributeRequests": [{"topicFilter": "v1/devices/me/attributes/request",
                    "deviceInfo": {"deviceNameExpressionSource": "message", "deviceNameExpression": "${serialNumber}"},
                    "attributeNameExpressionSource": "message", "attributeNameExpression": "${versionAttribute}, ${pduAttribute}",
                    "topicExpression": "devices/${deviceName}/attrs", "valueExpression": "${attributeKey}: ${attributeValue}",
                    "retain": false}],
                "attributeUpdates": [{"retain": true, "deviceNameFilter": "SN.*", "attributeFilter": "firmware.*",
                    "topicExpression": "sensor/${deviceName}/${attributeKey}", "valueExpression": "{\"${attributeKey}\":${attributeValue}}"}],
                "serverSideRpc": [
                    {"type": "twoWay", "deviceNameFilter": ".*", "methodFilter": "echo",
                     "requestTopicExpression": "sensor/${deviceName}/request/${methodName}/${requestId}",
                     "responseTopicExpression": "sensor/${deviceName}/response/${methodName}/${requestId}",
                     "responseTimeout": 10000, "valueExpression": "${params}"},
                    {"type": "oneWay", "deviceNameFilter": ".*", "methodFilter": "no-reply",
                     "requestTopicExpression": "sensor/${deviceName}/request/${methodName}/${requestId}",
                     "valueExpression": "${params.pin}"}
                ]
            }
        })
    }

    #[test]
    fn new_format_data_mapping() {
        let mut set = connector(new_connector());
        let out = set
            .map(&publish(
                "meters/M-7/data",
                r#"{"info":{"model":"X1"},"energy":{"import":"12.5"},"id":3,"phase":"L1","name":"pulses","list":[{"v":1},{"v":"7.9"}]}"#,
            ))
            .expect("matched")
            .expect("mapped");
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].kind, RecordKind::Attributes);
        assert_eq!(out[0].device, "M-7");
        assert_eq!(out[0].device_type, "DLMS meter");
        assert_eq!(out[0].payload, json!({"model": "X1"}));
        assert_eq!(
            out[1].payload["values"],
            json!({"kWh": 12.5, "label": "3:L1", "pulses": 7})
        );
        // Missing datapoint fields are skipped, not errors.
        let out = set
            .map(&publish("meters/M-7/data", r#"{"id":1}"#))
            .expect("matched")
            .expect("mapped");
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn unusable_messages_are_errors_never_panics() {
        let mut set = connector(original_connector());
        let topic = "v1/devices/me/telemetry";
        let cases: &[(&str, &str)] = &[
            ("not json", "not valid JSON"),
            ("", "not valid JSON"),
            ("{\"voltage_l1\": 1}", "found no `deviceName`"),
            ("{\"deviceName\": null}", "found no `deviceName`"),
            ("{\"deviceName\": \"\"}", "empty"),
            ("{\"deviceName\": \"${deviceName}\"}", "unresolved"),
            ("[{\"deviceName\":\"A\"}, 5]", "found no `deviceName`"),
            ("42", "found no `deviceName`"),
            ("\"text\"", "found no `deviceName`"),
        ];
        for (payload, want) in cases {
            let err = set
                .map(&publish(topic, payload))
                .expect("matched")
                .expect_err(payload);
            assert!(err.to_string().contains(want), "{payload}: {err}");
        }
        // Non-object items and odd values never panic.
        let _ = set.map(&publish(topic, "[]"));
        let _ = set.map(&publish(
            topic,
            r#"{"deviceName":"A","voltage_l1":{"x":[1]}}"#,
        ));
        let _ = set.map(&publish(topic, r#"{"deviceName":"A","ts":"soon"}"#));
    }

    #[test]
    fn topic_regex_without_match_is_an_error() {
        let mut set = connector(new_connector());
        let err = set
            .map(&publish("sensor//disconnect", ""))
            .expect("matched")
            .expect_err("regex needs a name");
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[test]
    fn arrays_are_merged_per_device_and_timestamps_honoured() {
        let mut set = native(
            r#"
            [[mappings]]
            topic_filter = "batch"
            device_name_json = "${dev}"
            timeseries = ["*"]
            attributes = [{ key = "fw", type = "string" }]
            "#,
        );
        let out = set
            .map(&publish(
                "batch",
                r#"[{"dev":"A","t":1,"ts":5000,"fw":2},{"dev":"B","t":2},{"dev":"A","u":3,"timestamp":5000},{"dev":"A","t":9,"ts":6000}]"#,
            ))
            .expect("matched")
            .expect("mapped");
        let summary: Vec<(String, RecordKind, Value)> = out
            .iter()
            .map(|r| (r.device.clone(), r.kind, r.payload.clone()))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("A".into(), RecordKind::Attributes, json!({"fw": "2"})),
                (
                    "A".into(),
                    RecordKind::Telemetry,
                    json!({"ts": 5000, "values": {"t": 1, "fw": 2, "u": 3}})
                ),
                (
                    "A".into(),
                    RecordKind::Telemetry,
                    json!({"ts": 6000, "values": {"t": 9}})
                ),
                (
                    "B".into(),
                    RecordKind::Telemetry,
                    json!({"ts": 1000, "values": {"t": 2}})
                ),
            ]
        );
    }

    #[test]
    fn ts_values_payloads_and_received_ts() {
        let cases: &[(bool, &str, i64, Value)] = &[
            (
                false,
                r#"{"dev":"A","ts":7000,"values":{"k":1}}"#,
                7000,
                json!({"k": 1}),
            ),
            (
                true,
                r#"{"dev":"A","ts":7000,"values":{"k":1}}"#,
                1000,
                json!({"k": 1}),
            ),
            (
                false,
                r#"{"dev":"A","ts":"8000","k":2}"#,
                8000,
                json!({"k": 2}),
            ),
            (
                true,
                r#"{"dev":"A","ts":8000,"k":2}"#,
                1000,
                json!({"k": 2}),
            ),
        ];
        for (received, payload, ts, vals) in cases {
            let mut set = native(&format!(
                "[[mappings]]\ntopic_filter = \"t\"\ndevice_name = \"A\"\ntimeseries = [\"*\"]\nuse_received_ts = {received}\n"
            ));
            let out = set
                .map(&publish("t", payload))
                .expect("matched")
                .expect("mapped");
            assert_eq!(out[0].payload["ts"], json!(ts), "{payload}");
            assert_eq!(
                out[0].payload["values"].get("k"),
                vals.get("k"),
                "{payload}"
            );
        }
    }

    #[test]
    fn report_strategies() {
        let mk = |strategy: &str| {
            native(&format!(
                "[[mappings]]\ntopic_filter = \"t\"\ndevice_name = \"A\"\ntimeseries = [\"v\"]\nreport_strategy = {strategy}\n"
            ))
        };
        let send = |set: &mut MappingSet, v: i64, at: i64| -> Vec<Value> {
            let mut p = publish("t", &format!("{{\"v\":{v}}}"));
            p.received_ms = at;
            set.map(&p)
                .expect("matched")
                .expect("mapped")
                .iter()
                .map(|r| values(r).clone())
                .collect()
        };
        // ON_RECEIVED: everything.
        let mut s = mk(r#"{ type = "ON_RECEIVED" }"#);
        assert_eq!(send(&mut s, 1, 0).len(), 1);
        assert_eq!(send(&mut s, 1, 1).len(), 1);
        // ON_CHANGE: only changes.
        let mut s = mk(r#"{ type = "ON_CHANGE" }"#);
        assert_eq!(send(&mut s, 1, 0), vec![json!({"v": 1})]);
        assert!(send(&mut s, 1, 1).is_empty());
        assert_eq!(send(&mut s, 2, 2), vec![json!({"v": 2})]);
        assert!(s.due(1_000_000).is_empty());
        // DISABLED: nothing.
        let mut s = mk(r#"{ type = "DISABLED" }"#);
        assert!(send(&mut s, 1, 0).is_empty());
        // ON_REPORT_PERIOD: latest value once per period, repeated.
        let mut s = mk(r#"{ type = "ON_REPORT_PERIOD", report_period = "1s" }"#);
        assert!(send(&mut s, 1, 0).is_empty());
        assert!(send(&mut s, 2, 500).is_empty());
        assert_eq!(s.next_due(), Some(1000));
        assert!(s.due(999).is_empty());
        let due = s.due(1000);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].payload, json!({"ts": 1000, "values": {"v": 2}}));
        assert_eq!(due[0].device_type, DEFAULT_DEVICE_TYPE);
        assert!(s.due(1500).is_empty());
        assert_eq!(s.due(2000).len(), 1, "re-sent without new data");
        // ON_CHANGE_OR_REPORT_PERIOD: changes at once, repeats when quiet.
        let mut s = mk(r#"{ type = "ON_CHANGE_OR_REPORT_PERIOD", report_period = "1s" }"#);
        assert_eq!(send(&mut s, 1, 0).len(), 1);
        assert!(send(&mut s, 1, 400).is_empty());
        assert!(s.due(999).is_empty());
        assert_eq!(s.due(1000).len(), 1);
        assert_eq!(send(&mut s, 3, 1200).len(), 1);
        assert!(s.due(2000).is_empty(), "a change restarted the period");
        assert_eq!(s.due(2200).len(), 1);
        // Old sendDataOnlyOnChange.
        let mut s = native("[[mappings]]\ntopic_filter = \"t\"\ndevice_name = \"A\"\ntimeseries = [\"v\"]\nsend_data_only_on_change = true\n");
        assert_eq!(send(&mut s, 1, 0).len(), 1);
        assert!(send(&mut s, 1, 1).is_empty());
    }

    #[test]
    fn datapoint_strategy_overrides_rule_strategy() {
        let mut set = connector(json!({"mapping": [{
            "topicFilter": "t",
            "converter": {"deviceInfo": {"deviceNameExpressionSource": "constant", "deviceNameExpression": "A"},
                "timeseries": [
                    {"type": "raw", "key": "a", "value": "${a}", "reportStrategy": {"type": "ON_CHANGE"}},
                    {"type": "raw", "key": "b", "value": "${b}"}]}}]}));
        let first = set
            .map(&publish("t", r#"{"a":1,"b":1}"#))
            .expect("m")
            .expect("ok");
        assert_eq!(values(&first[0]), &json!({"a": 1, "b": 1}));
        let second = set
            .map(&publish("t", r#"{"a":1,"b":1}"#))
            .expect("m")
            .expect("ok");
        assert_eq!(values(&second[0]), &json!({"b": 1}));
    }

    #[test]
    fn connect_disconnect_and_attribute_requests() {
        let mut set = connector(new_connector());
        let out = set
            .map(&publish("sensor/connect", r#"{"SerialNumber":"SN-1"}"#))
            .expect("m")
            .expect("ok");
        assert_eq!(out[0].kind, RecordKind::Connect);
        assert_eq!(
            (out[0].device.as_str(), out[0].device_type.as_str()),
            ("SN-1", "Thermometer")
        );
        let out = set
            .map(&publish("sensor/SN-1/disconnect", ""))
            .expect("m")
            .expect("ok");
        assert_eq!(out[0].kind, RecordKind::Disconnect);
        assert_eq!(out[0].device, "SN-1");

        let out = set
            .map(&publish(
                "v1/devices/me/attributes/request",
                r#"{"serialNumber":"SN-1","versionAttribute":"fw","pduAttribute":"pdu"}"#,
            ))
            .expect("m")
            .expect("ok");
        assert_eq!(out[0].kind, RecordKind::AttributeRequest);
        let id = out[0].payload["id"].as_i64().expect("id");
        assert_eq!(
            out[0].payload,
            json!({"id": id, "client": false, "keys": ["fw", "pdu"]})
        );
        assert_eq!(
            set.attribute_response_publish("other", id, &json!({})),
            None
        );
        let answer = set
            .attribute_response_publish("SN-1", id, &json!({"fw": "1.2", "pdu": 3}))
            .expect("routed");
        assert_eq!(answer.topic, "devices/SN-1/attrs");
        assert_eq!(answer.payload, br#"{"fw":"1.2","pdu":3}"#.to_vec());
        assert_eq!(
            set.attribute_response_publish("SN-1", id, &json!({})),
            None,
            "answered once"
        );

        // One key: the value expression applies.
        let out = set
            .map(&publish(
                "v1/devices/me/attributes/request",
                r#"{"serialNumber":"SN-1","versionAttribute":"fw"}"#,
            ))
            .expect("m");
        // `${pduAttribute}` is missing: the expression fails, the request is refused.
        assert!(out.is_err());
        let mut set = connector(json!({"requestsMapping": {"attributeRequests": [{
            "topicFilter": "req", "deviceInfo": {"deviceNameExpressionSource": "constant", "deviceNameExpression": "D"},
            "attributeNameExpressionSource": "constant", "attributeNameExpression": "fw",
            "topicExpression": "devices/${deviceName}/${attributeKey}", "valueExpression": "${attributeKey}: ${attributeValue}"}]}}));
        let out = set.map(&publish("req", "")).expect("m").expect("ok");
        let id = out[0].payload["id"].as_i64().expect("id");
        let answer = set
            .attribute_response_publish("D", id, &json!("1.2"))
            .expect("routed");
        assert_eq!(
            (answer.topic.as_str(), answer.payload.as_slice()),
            ("devices/D/fw", &b"fw: \"1.2\""[..])
        );
    }

    #[test]
    fn attribute_updates_publish_one_message_per_key() {
        let set = connector(new_connector());
        let mut data = Map::new();
        data.insert("firmwareVersion".into(), json!("2.0"));
        data.insert("other".into(), json!(1));
        data.insert("deleted".into(), json!(["x"]));
        let outs = set.attribute_update_publishes(&AttributeUpdate {
            device: "SN-1".into(),
            data: data.clone(),
        });
        assert_eq!(
            outs,
            vec![LocalOut {
                topic: "sensor/SN-1/firmwareVersion".into(),
                payload: br#"{"firmwareVersion":"2.0"}"#.to_vec(),
                retain: true
            }]
        );
        let none = set.attribute_update_publishes(&AttributeUpdate {
            device: "XSN-1".into(),
            data,
        });
        assert!(
            none.is_empty(),
            "deviceNameFilter is anchored at the start (re.match)"
        );
    }

    #[test]
    fn rpc_routes() {
        let set = connector(new_connector());
        let req = |method: &str, params: Value| RpcRequest {
            device: "SN-1".into(),
            id: 42,
            method: method.into(),
            params,
        };
        let r = set
            .rpc_route(&req("echo", json!({"a": 1})))
            .expect("two-way");
        assert_eq!(r.request.topic, "sensor/SN-1/request/echo/42");
        assert_eq!(r.request.payload, br#"{"a":1}"#.to_vec());
        assert_eq!(
            r.response_topic.as_deref(),
            Some("sensor/SN-1/response/echo/42")
        );
        assert_eq!(r.timeout, Duration::from_secs(10));
        let r = set
            .rpc_route(&req("no-reply", json!({"pin": 4})))
            .expect("one-way");
        assert_eq!(
            (r.request.payload.as_slice(), r.response_topic, r.timeout),
            (&b"4"[..], None, Duration::ZERO)
        );
        assert_eq!(
            set.rpc_route(&req("unknown", json!(null))),
            None,
            "no rule: caller replies an error"
        );
        let r = set
            .rpc_route(&req("get", json!("requestTopicExpression=dev/${deviceName}/get;responseTopicExpression=dev/${deviceName}/val;value=1;")))
            .expect("reserved get");
        assert_eq!(
            (
                r.request.topic.as_str(),
                r.response_topic.as_deref(),
                r.timeout
            ),
            ("dev/SN-1/get", Some("dev/SN-1/val"), RESERVED_RPC_TIMEOUT)
        );
        let r = set
            .rpc_route(&req(
                "mqtt_set",
                json!("requestTopicExpression=dev/set;value=on;"),
            ))
            .expect("reserved set");
        assert_eq!(
            (
                r.request.topic.as_str(),
                r.request.payload.as_slice(),
                r.response_topic
            ),
            ("dev/set", &b"on"[..], None)
        );
        // Reserved names with non-string params fall through to the rules (none here).
        assert_eq!(set.rpc_route(&req("set", json!({"x": 1}))), None);
    }

    #[test]
    fn bytes_converter() {
        let mut set = native(
            r#"
            [[mappings]]
            topic_filter = "raw/+"
            converter = "bytes"
            device_name_json = "dev-[0:2]"
            hex_mode = true
            timeseries = [{ key = "body", value = "[2:]" }]
            "#,
        );
        let out = set
            .map(&publish("raw/x", "AB\u{1}\u{ff}"))
            .expect("m")
            .expect("ok");
        assert_eq!(out[0].device, "dev-AB");
        assert_eq!(values(&out[0]), &json!({"body": "01c3bf"}));
    }

    #[test]
    fn config_errors_name_their_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("[[mappings]]\ntopic_filter = \"a/#/b\"\ndevice_name = \"x\"\n", "mappings[0].topic_filter", "#"),
            ("[[mappings]]\ntopic_filter = \"a\"\n", "mappings[0].device_name_json", "exactly one"),
            ("[[mappings]]\ntopic_filter = \"a\"\ndevice_name = \"x\"\ndevice_name_json = \"${x}\"\n", "mappings[0].device_name_json", "exactly one"),
            ("[[mappings]]\ntopic_filter = \"a\"\ndevice_name_topic = \"(\"\n", "mappings[0].device_name_topic", "regex"),
            ("[[mappings]]\ntopic_filter = \"a\"\ndevice_name_json = \"${x\"\n", "mappings[0].device_name_json", "not closed"),
            ("[[mappings]]\ntopic_filter = \"a\"\ndevice_name = \"x\"\ntimeseries = [{ key = \"k\", type = \"decimal\" }]\n", "mappings[0].timeseries[0].type", "decimal"),
            ("[[mappings]]\ntopic_filter = \"a\"\ndevice_name = \"x\"\nreport_strategy = { type = \"ON_REPORT_PERIOD\" }\n", "mappings[0].report_strategy.reportPeriod", "needs"),
            ("[[mappings]]\nkind = \"rpc\"\nmethod_filter = \"(\"\ntopic_expression = \"t\"\n", "mappings[0].method_filter", "regex"),
            ("[[mappings]]\nkind = \"rpc\"\n", "mappings[0].topic_expression", "required"),
            ("[[mappings]]\ntb_gateway_file = \"/nonexistent/mqtt.json\"\n", "mappings[0].tb_gateway_file", "cannot read"),
        ];
        for (toml, key, msg) in cases {
            let errs = native_errs(toml);
            assert!(
                errs.iter()
                    .any(|e| e.key == *key && e.message.contains(msg)),
                "{toml}: want {key} ~ {msg}, got {errs:?}"
            );
        }
    }

    #[test]
    fn connector_errors_name_their_json_path() {
        let cases: &[(Value, &str, &str)] = &[
            (
                json!({"mapping": [{"topicFilter": "a", "converter": {"type": "custom", "extension": "CustomMqttUplinkConverter"}}]}),
                "test:mapping[0].converter.type",
                "CustomMqttUplinkConverter",
            ),
            (
                json!({"mapping": [{"topicFilter": "a", "converter": {"type": "json", "useEval": true, "deviceNameJsonExpression": "x"}}]}),
                "test:mapping[0].converter.useEval",
                "not supported",
            ),
            (
                json!({"mapping": [{"converter": {"deviceNameJsonExpression": "x"}}]}),
                "test:mapping[0].topicFilter",
                "required",
            ),
            (
                json!({"requestsMapping": {"serverSideRpc": [{"type": "twoWay", "requestTopicExpression": "r", "responseTopicExpression": "s"}]}}),
                "test:requestsMapping.serverSideRpc[0].responseTimeout",
                "responseTimeout",
            ),
            (
                json!({"mapping": [{"topicFilter": "a", "converter": {"deviceInfo": {"deviceNameExpressionSource": "header", "deviceNameExpression": "x"}}}]}),
                "test:mapping[0].converter.deviceInfo.deviceNameExpression",
                "header",
            ),
            (json!([1, 2]), "test:", "JSON object"),
        ];
        for (v, key, msg) in cases {
            let errs = MappingSet::from_connector_json(v, "test").expect_err("invalid");
            assert!(
                errs.iter()
                    .any(|e| e.key == *key && e.message.contains(msg)),
                "want {key} ~ {msg}, got {errs:?}"
            );
        }
    }

    #[test]
    fn native_request_rules() {
        let mut set = native(
            r#"
            [[mappings]]
            kind = "connect"
            topic_filter = "dev/+/up"
            device_name_topic = "dev/([^/]+)/up"
            device_type = "Sensor"

            [[mappings]]
            kind = "disconnect"
            topic_filter = "dev/+/down"
            device_name_topic = "dev/([^/]+)/down"

            [[mappings]]
            kind = "attribute_request"
            topic_filter = "dev/req"
            device_name_json = "${id}"
            attribute_names = "${keys}"
            scope = "client"
            topic_expression = "dev/${deviceName}/attr/${attributeKey}"
            value_expression = "${attributeValue}"

            [[mappings]]
            kind = "attribute_update"
            device_name_filter = "dev-.*"
            attribute_filter = "target"
            topic_expression = "dev/${deviceName}/set/${attributeKey}"
            value_expression = "${attributeValue}"
            retain = true

            [[mappings]]
            kind = "rpc"
            method_filter = "^read$"
            topic_expression = "dev/${deviceName}/rpc/${requestId}"
            response_topic_expression = "dev/${deviceName}/rpc/${requestId}/reply"
            response_timeout = "3s"

            [[mappings]]
            kind = "rpc"
            method_filter = ".*"
            topic_expression = "dev/${deviceName}/cmd/${methodName}"
            value_expression = "${params.on}"
            "#,
        );
        let out = set
            .map(&publish("dev/dev-1/up", ""))
            .expect("m")
            .expect("ok");
        assert_eq!(
            (
                out[0].kind,
                out[0].device.as_str(),
                out[0].device_type.as_str()
            ),
            (RecordKind::Connect, "dev-1", "Sensor")
        );
        let out = set
            .map(&publish("dev/dev-1/down", ""))
            .expect("m")
            .expect("ok");
        assert_eq!(
            (out[0].kind, out[0].device_type.as_str()),
            (RecordKind::Disconnect, DEFAULT_DEVICE_TYPE)
        );
        let out = set
            .map(&publish("dev/req", r#"{"id":"dev-1","keys":"target"}"#))
            .expect("m")
            .expect("ok");
        let id = out[0].payload["id"].as_i64().expect("id");
        assert_eq!(out[0].payload["client"], json!(true));
        let a = set
            .attribute_response_publish("dev-1", id, &json!(21.5))
            .expect("routed");
        assert_eq!(
            (a.topic.as_str(), a.payload.as_slice()),
            ("dev/dev-1/attr/target", &b"21.5"[..])
        );
        let mut data = Map::new();
        data.insert("target".into(), json!(22));
        let ups = set.attribute_update_publishes(&AttributeUpdate {
            device: "dev-1".into(),
            data,
        });
        assert_eq!(
            ups,
            vec![LocalOut {
                topic: "dev/dev-1/set/target".into(),
                payload: b"22".to_vec(),
                retain: true
            }]
        );
        let req = |m: &str| RpcRequest {
            device: "dev-1".into(),
            id: 5,
            method: m.into(),
            params: json!({"on": true}),
        };
        let r = set.rpc_route(&req("read")).expect("two-way");
        assert_eq!(
            (r.response_topic.as_deref(), r.timeout),
            (Some("dev/dev-1/rpc/5/reply"), Duration::from_secs(3))
        );
        assert_eq!(r.request.payload, br#"{"on":true}"#.to_vec());
        let r = set.rpc_route(&req("relay")).expect("one-way");
        assert_eq!(
            (
                r.request.topic.as_str(),
                r.request.payload.as_slice(),
                r.response_topic
            ),
            ("dev/dev-1/cmd/relay", &b"true"[..], None)
        );
    }

    #[test]
    fn arbitrary_payloads_never_panic() {
        let mut set = connector(new_connector());
        set.absorb(connector(original_connector()));
        let topics = [
            "meters/a/data",
            "sensor/connect",
            "sensor/x/disconnect",
            "v1/devices/me/attributes/request",
            "v1/devices/me/telemetry",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let pieces = [
            "{",
            "}",
            "[",
            "]",
            "\"deviceName\"",
            ":",
            ",",
            "\"SN\"",
            "1e999",
            "-0",
            "null",
            "\"${x}\"",
            "\"\\u0000\"",
            "true",
            "\"serialNumber\"",
        ];
        for i in 0..5_000 {
            let len = (next() % 12) as usize;
            let payload: String = (0..len)
                .map(|_| pieces[(next() % pieces.len() as u64) as usize])
                .collect();
            let _ = set.map(&publish(topics[i % topics.len()], &payload));
        }
    }

    #[test]
    fn huge_report_periods_do_not_overflow() {
        let mut set = connector(json!({"mapping": [{
            "topicFilter": "t",
            "reportStrategy": {"type": "ON_CHANGE_OR_REPORT_PERIOD", "reportPeriod": i64::MAX},
            "converter": {"deviceInfo": {"deviceNameExpressionSource": "constant", "deviceNameExpression": "A"},
                "timeseries": "*"}}]}));
        let mut p = publish("t", r#"{"v":1}"#);
        p.received_ms = i64::MAX - 5;
        assert_eq!(set.map(&p).expect("m").expect("ok").len(), 1);
        assert!(set.due(i64::MAX - 1).is_empty());
        assert_eq!(set.due(i64::MAX).len(), 1);
    }

    #[test]
    fn topic_regexes() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("(?<=meters/)(.*?)(?=/data)", "meters/M1/data", Some("M1")),
            ("meters/(.*)/data", "x/meters/M2/data", Some("M2")),
            ("meters/[^/]+", "meters/M3/data", Some("meters/M3")),
            ("(a)|(b)", "b", Some("b")),
            ("(?<=x/)[^/]+", "x/y/z", Some("y")),
            ("nomatch", "meters/M1", None),
        ];
        for (re, topic, want) in cases {
            let r = TopicRegex::compile(re).unwrap_or_else(|e| panic!("{re}: {e}"));
            assert_eq!(r.extract(topic), *want, "{re} on {topic}");
        }
        for bad in ["(", "a(?=b)c", "(?<!x)y"] {
            assert!(TopicRegex::compile(bad).is_err(), "{bad}");
        }
    }
}
