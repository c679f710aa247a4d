//! A ThingsBoard emulator for integration tests: a packet-level MQTT server on loopback that
//! behaves like ThingsBoard's MQTT transport for a gateway device (spec/thingsboard-gateway-api.md
//! §1–2), and records everything it accepted behind an async, wait-able API.
//!
//! What it enforces like ThingsBoard: the access token in the CONNECT username (else CONNACK v3 5
//! / v5 0x86 and close); one session per token (a new session evicts the old one: v5 DISCONNECT
//! 0x8E, v3 a plain close); only ThingsBoard's exact subscription filters (else SUBACK failure);
//! the gateway payload rules (an invalid payload closes a v3 connection and gets PUBACK 0x99 on
//! v5); QoS 2 answered with a PUBACK; packets over 65 536 bytes close the connection.
//! Switches: withhold PUBACKs, refuse MQTT 5 like a 3.1.1-only server, stop and restart on the
//! same port, push RPCs and attribute updates to the connected gateway.
//! TLS mode ([`TbEmulator::start_tls`]): a tokio-rustls acceptor in front of the same MQTT
//! logic, optionally requiring a client certificate from a given CA; a session that presented
//! one is authenticated by it (ThingsBoard's X.509 device credentials) and needs no token.
//! It must not sleep to synchronise: waiters are woken by a watch channel on every change.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dlms_bridge::config::{MqttProtocol, Secret, ThingsboardConfig};
use rumqttc::mqttbytes::{v4, QoS};
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// ThingsBoard's default `NETTY_MAX_PAYLOAD_SIZE`.
pub const MAX_PACKET_SIZE: usize = 65_536;

/// Exact filters ThingsBoard grants (spec §1.3, gateway-relevant subset).
pub const ALLOWED_FILTERS: [&str; 7] = [
    "v1/gateway/attributes",
    "v1/gateway/attributes/response",
    "v1/gateway/rpc",
    "v1/devices/me/attributes",
    "v1/devices/me/attributes/response/+",
    "v1/devices/me/rpc/request/+",
    "v1/devices/me/rpc/response/+",
];

/// One accepted gateway message, in arrival order across all sessions.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Number of the session (1-based, counting accepted sessions) that carried it.
    pub session: u64,
    pub device: String,
    /// `connect`, `disconnect`, `telemetry`, `attributes`, `rpc_reply`, `attribute_request`.
    pub kind: &'static str,
}

/// Everything the emulator saw and accepted.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    /// CONNECT packets received (accepted or not).
    pub connect_attempts: u64,
    /// CONNECTs refused for a wrong token.
    pub auth_failures: u64,
    /// CONNECTs with MQTT 5 refused because `refuse_v5` was on.
    pub v5_refusals: u64,
    /// Sessions accepted; `protocol_levels[i]` is session i+1's MQTT level (4 or 5).
    pub sessions: u64,
    pub protocol_levels: Vec<u8>,
    /// Client id and peer address of every CONNECT, accepted or not.
    pub clients: Vec<(String, SocketAddr)>,
    /// Sessions closed because a newer one used the same token.
    pub evictions: u64,
    pub granted_filters: Vec<String>,
    pub refused_filters: Vec<String>,
    /// `(device, type)` of every `v1/gateway/connect`.
    pub connects: Vec<(String, Option<String>)>,
    pub disconnects: Vec<String>,
    /// Telemetry entries per device, in arrival order (replays included).
    pub telemetry: HashMap<String, Vec<Value>>,
    pub telemetry_publishes: u64,
    /// Publishes naming more than one device (ThingsBoard < 4.2.1 mis-acks these).
    pub multi_device_publishes: u64,
    pub attributes: HashMap<String, Map<String, Value>>,
    pub rpc_replies: Vec<Value>,
    pub attribute_requests: Vec<Value>,
    /// `(request id, body)` of replies to RPCs addressed to the gateway device itself.
    pub gateway_rpc_responses: Vec<(String, Value)>,
    /// Telemetry of the gateway device itself (`v1/devices/me/telemetry`), one per publish.
    pub gateway_telemetry: Vec<Value>,
    /// Client-side RPCs of the gateway (`v1/devices/me/rpc/request/{id}`): id and body.
    pub client_rpc_requests: Vec<(String, Value)>,
    /// Sessions closed because the gateway exceeded the rate limit.
    pub rate_limit_closes: u64,
    pub invalid_payloads: u64,
    pub oversize_packets: u64,
    /// PUBACKs not sent because withholding was on.
    pub pubacks_withheld: u64,
    pub pubacks_sent: u64,
    pub events: Vec<Event>,
    /// TLS mode: handshakes that failed (untrusted, refused client certificate, ...).
    pub tls_handshake_failures: u64,
    /// TLS mode: sessions accepted on a client certificate (X.509 credentials).
    pub x509_sessions: u64,
}

impl Recorded {
    /// Distinct telemetry `ts` values of a device, in first-arrival order.
    /// The reply to the gateway-device RPC `id`, if it came.
    pub fn gateway_rpc_response(&self, id: i64) -> Option<&Value> {
        let id = id.to_string();
        self.gateway_rpc_responses
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| v)
    }

    pub fn telemetry_ts(&self, device: &str) -> Vec<i64> {
        let mut seen = std::collections::HashSet::new();
        self.telemetry
            .get(device)
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("ts").and_then(Value::as_i64))
            .filter(|ts| seen.insert(*ts))
            .collect()
    }

    /// Whether, in every session, each device's first message was its `connect`.
    pub fn connect_precedes_data(&self) -> bool {
        let mut first: HashMap<(u64, &str), &str> = HashMap::new();
        for e in &self.events {
            first
                .entry((e.session, e.device.as_str()))
                .or_insert(e.kind);
        }
        first
            .values()
            .all(|k| *k == "connect" || *k == "disconnect")
    }
}

enum Cmd {
    /// A newer session with the same token: leave (v5: DISCONNECT 0x8E first).
    Evict,
    /// Publish to the gateway at QoS 1.
    Push { topic: String, payload: Vec<u8> },
}

struct Slot {
    id: u64,
    tx: mpsc::Sender<Cmd>,
}

struct Inner {
    token: String,
    rec: Mutex<Recorded>,
    /// Bumped on every change so `wait_for` re-checks without polling.
    version: watch::Sender<u64>,
    withhold: AtomicBool,
    refuse_v5: AtomicBool,
    /// Telemetry for this device is refused as invalid (like a value TB's validation rejects).
    reject_device: Mutex<Option<String>>,
    /// The one live session for the token.
    current: Mutex<Option<Slot>>,
    next_id: AtomicU64,
    /// The answer to `getSessionLimits` (TB ≥ 3.8 answers it itself); `None`: never answered,
    /// like older ThingsBoard.
    session_limits: Mutex<Option<Value>>,
    /// Enforced like ThingsBoard: more than `capacity` gateway publishes within `period` →
    /// PUBACK 0x97 (v5) and the session is closed.
    rate_limit: Mutex<Option<(usize, Duration)>>,
    /// Shared attributes per device, answered to `v1/gateway/attributes/request`.
    shared: Mutex<HashMap<String, Map<String, Value>>>,
    /// TLS mode: the acceptor of new connections (replaceable, like a server's new certificate).
    tls: Mutex<Option<tokio_rustls::TlsAcceptor>>,
}

/// The TLS identity of the emulator (PEM), and the CA its clients' certificates must chain to
/// (`None`: no client certificate asked for).
#[derive(Clone)]
pub struct TlsServer {
    pub cert_chain_pem: String,
    pub key_pem: String,
    pub client_ca_pem: Option<String>,
}

impl TlsServer {
    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.cert_chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("emulator certificate PEM");
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("emulator key PEM");
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("TLS versions");
        let builder = match &self.client_ca_pem {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                    roots.add(c.expect("client CA PEM")).expect("client CA");
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(chain, key)
            .expect("emulator certificate and key");
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

impl Inner {
    fn accept_publish(
        &self,
        session: u64,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), v5::PubAckReason> {
        let rejected = self.reject_device.lock().expect("emulator lock").clone();
        self.update(|r| accept(r, session, topic, payload, rejected.as_deref()))
    }

    fn update<R>(&self, f: impl FnOnce(&mut Recorded) -> R) -> R {
        let r = {
            let mut rec = self.rec.lock().expect("emulator state lock");
            f(&mut rec)
        };
        self.version.send_modify(|v| *v += 1);
        r
    }
}

/// The running emulator. Dropping it stops it.
pub struct TbEmulator {
    inner: Arc<Inner>,
    addr: SocketAddr,
    /// Cancels the listener and every session of the current run.
    run: Mutex<CancellationToken>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for TbEmulator {
    fn drop(&mut self) {
        if let Ok(run) = self.run.lock() {
            run.cancel();
        }
    }
}

impl TbEmulator {
    /// Listen on an ephemeral loopback port, accepting `token` as the gateway access token.
    pub async fn start(token: &str) -> TbEmulator {
        Self::start_with(token, None).await
    }

    /// [`start`](Self::start) speaking TLS with `server`'s certificate.
    pub async fn start_tls(token: &str, server: &TlsServer) -> TbEmulator {
        Self::start_with(token, Some(server.acceptor())).await
    }

    /// New connections get this TLS identity from now on (a server whose certificate changed).
    pub fn set_tls(&self, server: &TlsServer) {
        *self.inner.tls.lock().expect("emulator lock") = Some(server.acceptor());
    }

    async fn start_with(token: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> TbEmulator {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind emulator on loopback");
        let addr = listener.local_addr().expect("emulator address");
        let inner = Arc::new(Inner {
            token: token.to_owned(),
            rec: Mutex::new(Recorded::default()),
            version: watch::channel(0).0,
            withhold: AtomicBool::new(false),
            refuse_v5: AtomicBool::new(false),
            reject_device: Mutex::new(None),
            current: Mutex::new(None),
            next_id: AtomicU64::new(1),
            tls: Mutex::new(tls),
            session_limits: Mutex::new(Some(default_session_limits())),
            rate_limit: Mutex::new(None),
            shared: Mutex::new(HashMap::new()),
        });
        let run = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, inner.clone(), run.clone()));
        TbEmulator {
            inner,
            addr,
            run: Mutex::new(run),
            accept_task: Mutex::new(Some(task)),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// An uplink config pointing at this emulator with its token, tuned for tests: fast
    /// reconnects, a short PUBACK deadline, the auto protocol.
    pub fn thingsboard_config(&self) -> ThingsboardConfig {
        ThingsboardConfig {
            host: self.addr.ip().to_string(),
            port: self.addr.port(),
            access_token: Secret::new(self.inner.token.clone()),
            client_id: "dlms-bridge-test".into(),
            protocol: MqttProtocol::Auto,
            keep_alive: Duration::from_secs(5),
            max_packet_size: MAX_PACKET_SIZE,
            max_inflight: 80,
            batch_linger: Duration::from_millis(20),
            ack_timeout: Duration::from_secs(2),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(400),
            auth_retry: Duration::from_secs(60),
            ..ThingsboardConfig::default()
        }
    }

    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> Recorded {
        self.inner.rec.lock().expect("emulator state lock").clone()
    }

    /// Wait until `pred` holds (checked on every change), or panic after `timeout` with `what`.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Recorded) -> bool,
    ) -> Recorded {
        let mut rx = self.inner.version.subscribe();
        let check = async {
            loop {
                {
                    let rec = self.inner.rec.lock().expect("emulator state lock");
                    if pred(&rec) {
                        return rec.clone();
                    }
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        match tokio::time::timeout(timeout, check).await {
            Ok(rec) => rec,
            Err(_) => {
                let r = self.snapshot();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; sessions={} attempts={} \
                     connects={} telemetry_publishes={} devices={:?} withheld={} invalid={}",
                    r.sessions,
                    r.connect_attempts,
                    r.connects.len(),
                    r.telemetry_publishes,
                    r.telemetry
                        .iter()
                        .map(|(d, v)| (d.clone(), v.len()))
                        .collect::<Vec<_>>(),
                    r.pubacks_withheld,
                    r.invalid_payloads,
                )
            }
        }
    }

    /// Stop sending PUBACKs (messages are still recorded, like a ThingsBoard that queued them but
    /// whose acks never make it back), or resume.
    pub fn set_withhold_pubacks(&self, on: bool) {
        self.inner.withhold.store(on, Ordering::SeqCst);
    }

    /// Answer MQTT 5 CONNECTs like a 3.1.1-only server: CONNACK return code 1, then close.
    pub fn set_refuse_v5(&self, on: bool) {
        self.inner.refuse_v5.store(on, Ordering::SeqCst);
    }

    /// Refuse every telemetry publish for `device` as an invalid payload (v5: PUBACK 0x99; v3:
    /// close), or stop refusing with `None`.
    pub fn set_reject_device(&self, device: Option<&str>) {
        *self.inner.reject_device.lock().expect("emulator lock") = device.map(str::to_owned);
    }

    /// What `getSessionLimits` answers (`None`: no answer at all, like ThingsBoard < 3.8).
    pub fn set_session_limits(&self, limits: Option<Value>) {
        *self.inner.session_limits.lock().expect("emulator lock") = limits;
    }

    /// Enforce a message rate limit like ThingsBoard: a publish beyond `capacity` within
    /// `period` gets PUBACK 0x97 (v5) and the session is closed (counted in
    /// `rate_limit_closes`).
    pub fn set_rate_limit(&self, limit: Option<(usize, Duration)>) {
        *self.inner.rate_limit.lock().expect("emulator lock") = limit;
    }

    /// Set a shared attribute of `device`; from then on the gateway's shared-scope attribute
    /// requests for `device` are answered like ThingsBoard does (not pushed: use
    /// [`push_attributes`](Self::push_attributes) for an update).
    pub fn set_shared_attribute(&self, device: &str, key: &str, value: Value) {
        self.inner
            .shared
            .lock()
            .expect("emulator lock")
            .entry(device.to_owned())
            .or_default()
            .insert(key.to_owned(), value);
    }

    /// Whether a gateway session is currently open.
    pub fn connected(&self) -> bool {
        self.inner
            .current
            .lock()
            .expect("emulator session lock")
            .is_some()
    }

    /// Close the listener and every session (ThingsBoard down).
    pub async fn stop(&self) {
        self.run.lock().expect("emulator run lock").cancel();
        let task = self.accept_task.lock().expect("emulator task lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
        self.inner
            .current
            .lock()
            .expect("emulator session lock")
            .take();
        self.inner.version.send_modify(|v| *v += 1);
    }

    /// Listen again on the same port after [`stop`](Self::stop).
    pub async fn restart(&self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("re-bind emulator on the same port");
        let run = CancellationToken::new();
        *self.run.lock().expect("emulator run lock") = run.clone();
        let task = tokio::spawn(accept_loop(listener, self.inner.clone(), run));
        *self.accept_task.lock().expect("emulator task lock") = Some(task);
    }

    /// Publish `payload` on `topic` to the connected gateway; false when none is connected.
    pub async fn push(&self, topic: &str, payload: Value) -> bool {
        let tx = {
            let cur = self.inner.current.lock().expect("emulator session lock");
            cur.as_ref().map(|s| s.tx.clone())
        };
        match tx {
            Some(tx) => tx
                .send(Cmd::Push {
                    topic: topic.to_owned(),
                    payload: payload.to_string().into_bytes(),
                })
                .await
                .is_ok(),
            None => false,
        }
    }

    /// Server-side RPC to a sub-device (`v1/gateway/rpc`).
    pub async fn push_rpc(&self, device: &str, id: i64, method: &str, params: Value) -> bool {
        self.push(
            "v1/gateway/rpc",
            json!({"device": device, "data": {"id": id, "method": method, "params": params}}),
        )
        .await
    }

    /// Shared-attribute update for a sub-device (`v1/gateway/attributes`).
    pub async fn push_attributes(&self, device: &str, data: Value) -> bool {
        self.push(
            "v1/gateway/attributes",
            json!({"device": device, "data": data}),
        )
        .await
    }

    /// RPC to the gateway device itself (`v1/devices/me/rpc/request/{id}`).
    pub async fn push_gateway_rpc(&self, id: i64, method: &str, params: Value) -> bool {
        self.push(
            &format!("v1/devices/me/rpc/request/{id}"),
            json!({"method": method, "params": params}),
        )
        .await
    }

    /// ThingsBoard's rename notification (spec §2.8): `{"Old":"New"}`.
    pub async fn push_device_renamed(&self, id: i64, old: &str, new: &str) -> bool {
        let mut params = Map::new();
        params.insert(old.to_owned(), json!(new));
        self.push_gateway_rpc(id, "gateway_device_renamed", Value::Object(params))
            .await
    }

    /// ThingsBoard's delete notification (spec §2.8): params is the name.
    pub async fn push_device_deleted(&self, id: i64, name: &str) -> bool {
        self.push_gateway_rpc(id, "gateway_device_deleted", json!(name))
            .await
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>, run: CancellationToken) {
    loop {
        tokio::select! {
            _ = run.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    tokio::spawn(accept_one(sock, peer, inner.clone(), run.clone()));
                }
                Err(_) => return,
            },
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    V4,
    V5,
}

/// Protocol-neutral view of a client packet.
enum In {
    Publish {
        topic: String,
        qos: u8,
        pkid: u16,
        payload: Bytes,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    PingReq,
    Disconnect,
    Ignored,
}

enum Parsed<T> {
    Packet(T),
    NeedMore,
    Bad { oversize: bool },
}

fn classify_err(insufficient: bool, oversize: bool) -> Parsed<In> {
    if insufficient {
        Parsed::NeedMore
    } else {
        Parsed::Bad { oversize }
    }
}

fn read_in(proto: Proto, buf: &mut BytesMut) -> Parsed<In> {
    match proto {
        Proto::V4 if frame_len(buf).is_some_and(|n| n > MAX_PACKET_SIZE) => {
            Parsed::Bad { oversize: true }
        }
        Proto::V4 => match v4::Packet::read(buf, MAX_PACKET_SIZE) {
            Ok(v4::Packet::Publish(p)) => Parsed::Packet(In::Publish {
                topic: p.topic,
                qos: p.qos as u8,
                pkid: p.pkid,
                payload: p.payload,
            }),
            Ok(v4::Packet::Subscribe(s)) => Parsed::Packet(In::Subscribe {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| (f.path, f.qos as u8))
                    .collect(),
            }),
            Ok(v4::Packet::PingReq) => Parsed::Packet(In::PingReq),
            Ok(v4::Packet::Disconnect) => Parsed::Packet(In::Disconnect),
            Ok(v4::Packet::Connect(_)) => Parsed::Bad { oversize: false },
            Ok(_) => Parsed::Packet(In::Ignored),
            Err(e) => classify_err(
                matches!(e, rumqttc::mqttbytes::Error::InsufficientBytes(_)),
                matches!(e, rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_)),
            ),
        },
        Proto::V5 => {
            // rumqttc keeps its v5 codec error private: frame the packet here first.
            match frame_len(buf) {
                None => return Parsed::NeedMore,
                Some(n) if n > MAX_PACKET_SIZE => return Parsed::Bad { oversize: true },
                Some(n) if buf.len() < n => return Parsed::NeedMore,
                Some(_) => {}
            }
            match v5::Packet::read(buf, Some(MAX_PACKET_SIZE as u32)) {
                Ok(v5::Packet::Publish(p)) => Parsed::Packet(In::Publish {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    payload: p.payload,
                }),
                Ok(v5::Packet::Subscribe(s)) => Parsed::Packet(In::Subscribe {
                    pkid: s.pkid,
                    filters: s
                        .filters
                        .into_iter()
                        .map(|f| (f.path, f.qos as u8))
                        .collect(),
                }),
                Ok(v5::Packet::PingReq(_)) => Parsed::Packet(In::PingReq),
                Ok(v5::Packet::Disconnect(_)) => Parsed::Packet(In::Disconnect),
                Ok(v5::Packet::Connect(..)) | Err(_) => Parsed::Bad { oversize: false },
                Ok(_) => Parsed::Packet(In::Ignored),
            }
        }
    }
}

/// Whole frame length (fixed header + remaining length) once the fixed header is complete.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for (i, b) in buf.iter().skip(1).take(4).enumerate() {
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(1 + i + 1 + len);
        }
    }
    None
}

/// The CONNECT: protocol level and username.
struct Hello {
    proto: Proto,
    client_id: String,
    username: Option<String>,
}

fn read_connect(buf: &mut BytesMut) -> Parsed<Hello> {
    // rumqttc's v4 codec also accepts level 5, so look at the protocol level first: it follows
    // the fixed header and the 6-byte protocol name ("\0\x04MQTT").
    let Some(total) = frame_len(buf) else {
        return Parsed::NeedMore;
    };
    if total > MAX_PACKET_SIZE {
        return Parsed::Bad { oversize: true };
    }
    if buf.len() < total {
        return Parsed::NeedMore;
    }
    let header = 1
        + buf[1..]
            .iter()
            .take(4)
            .take_while(|b| *b & 0x80 != 0)
            .count()
        + 1;
    match buf.get(header + 6) {
        Some(4) => match v4::Packet::read(buf, MAX_PACKET_SIZE) {
            Ok(v4::Packet::Connect(c)) => Parsed::Packet(Hello {
                proto: Proto::V4,
                client_id: c.client_id,
                username: c.login.map(|l| l.username),
            }),
            _ => Parsed::Bad { oversize: false },
        },
        Some(5) => match v5::Packet::read(buf, Some(MAX_PACKET_SIZE as u32)) {
            Ok(v5::Packet::Connect(c, _, login)) => Parsed::Packet(Hello {
                proto: Proto::V5,
                client_id: c.client_id,
                username: login.map(|l| l.username),
            }),
            _ => Parsed::Bad { oversize: false },
        },
        _ => Parsed::Bad { oversize: false },
    }
}

fn qos4(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        _ => QoS::AtLeastOnce,
    }
}

fn qos5(q: u8) -> QoS5 {
    match q {
        0 => QoS5::AtMostOnce,
        _ => QoS5::AtLeastOnce,
    }
}

fn encode(
    proto: Proto,
    p4: impl FnOnce() -> v4::Packet,
    p5: impl FnOnce() -> v5::Packet,
) -> BytesMut {
    let mut out = BytesMut::new();
    let written = match proto {
        Proto::V4 => p4().write(&mut out, usize::MAX).is_ok(),
        Proto::V5 => p5().write(&mut out, None).is_ok(),
    };
    assert!(written, "emulator failed to encode its own packet");
    out
}

fn puback(proto: Proto, pkid: u16, reason: v5::PubAckReason) -> BytesMut {
    encode(
        proto,
        || v4::Packet::PubAck(v4::PubAck::new(pkid)),
        || {
            v5::Packet::PubAck(v5::PubAck {
                pkid,
                reason,
                properties: None,
            })
        },
    )
}

/// Plain TCP, or the TLS handshake first in TLS mode (a failed one is counted and closes).
async fn accept_one(sock: TcpStream, peer: SocketAddr, inner: Arc<Inner>, run: CancellationToken) {
    let acceptor = inner.tls.lock().expect("emulator lock").clone();
    match acceptor {
        None => serve(sock, peer, false, inner, run).await,
        Some(acceptor) => {
            let handshake = tokio::select! {
                _ = run.cancelled() => return,
                r = acceptor.accept(sock) => r,
            };
            match handshake {
                Ok(tls) => {
                    let x509 = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .is_some_and(|c| !c.is_empty());
                    serve(tls, peer, x509, inner, run).await
                }
                Err(_) => {
                    inner.update(|r| r.tls_handshake_failures += 1);
                }
            }
        }
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut sock: S,
    peer: SocketAddr,
    x509: bool,
    inner: Arc<Inner>,
    run: CancellationToken,
) {
    let mut buf = BytesMut::with_capacity(8192);
    let hello = loop {
        match read_connect(&mut buf) {
            Parsed::Packet(h) => break h,
            Parsed::Bad { .. } => return,
            Parsed::NeedMore => {
                tokio::select! {
                    _ = run.cancelled() => return,
                    n = sock.read_buf(&mut buf) => match n {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                }
            }
        }
    };
    let proto = hello.proto;
    inner.update(|r| {
        r.connect_attempts += 1;
        r.clients.push((hello.client_id.clone(), peer));
    });

    if proto == Proto::V5 && inner.refuse_v5.load(Ordering::SeqCst) {
        inner.update(|r| r.v5_refusals += 1);
        // What a 3.1.1-only server answers: CONNACK "unacceptable protocol version", then close.
        let _ = sock.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
        return;
    }
    // A verified client certificate authenticates the device by itself (X.509 credentials).
    if !x509 && hello.username.as_deref() != Some(inner.token.as_str()) {
        inner.update(|r| r.auth_failures += 1);
        let refused = encode(
            proto,
            || {
                v4::Packet::ConnAck(v4::ConnAck::new(
                    v4::ConnectReturnCode::NotAuthorized,
                    false,
                ))
            },
            || {
                v5::Packet::ConnAck(v5::ConnAck {
                    session_present: false,
                    code: v5::ConnectReturnCode::BadUserNamePassword,
                    properties: None,
                })
            },
        );
        let _ = sock.write_all(&refused).await;
        return;
    }

    // One session per token: the newest wins, the oldest is evicted.
    let id = inner.next_id.fetch_add(1, Ordering::SeqCst);
    let (tx, mut rx) = mpsc::channel::<Cmd>(64);
    let old = inner
        .current
        .lock()
        .expect("emulator session lock")
        .replace(Slot { id, tx });
    if let Some(old) = old {
        let _ = old.tx.try_send(Cmd::Evict);
    }
    let session = inner.update(|r| {
        r.sessions += 1;
        r.x509_sessions += u64::from(x509);
        r.protocol_levels
            .push(if proto == Proto::V5 { 5 } else { 4 });
        r.sessions
    });
    let connack = encode(
        proto,
        || v4::Packet::ConnAck(v4::ConnAck::new(v4::ConnectReturnCode::Success, false)),
        || {
            v5::Packet::ConnAck(v5::ConnAck {
                session_present: false,
                code: v5::ConnectReturnCode::Success,
                properties: None,
            })
        },
    );
    if sock.write_all(&connack).await.is_ok() {
        session_loop(&mut sock, &mut buf, &inner, proto, session, &mut rx, &run).await;
    }
    let mut cur = inner.current.lock().expect("emulator session lock");
    if cur.as_ref().map(|s| s.id) == Some(id) {
        cur.take();
    }
    drop(cur);
    inner.version.send_modify(|v| *v += 1);
}

/// ThingsBoard's answer to a shared-scope gateway attribute request (spec §2.6).
fn attribute_answer(inner: &Inner, payload: &[u8]) -> Option<Value> {
    let m = obj(payload)?;
    let id = m.get("id")?.as_i64()?;
    let device = device_field(&m)?;
    if m.get("client") != Some(&Value::Bool(false)) {
        return None;
    }
    let keys: Vec<String> = match (m.get("key"), m.get("keys")) {
        (Some(Value::String(k)), _) => vec![k.clone()],
        (_, Some(Value::Array(a))) => a
            .iter()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect(),
        _ => return None,
    };
    let shared = inner.shared.lock().expect("emulator lock");
    // Only devices given shared attributes are answered, so tests that answer by hand (with
    // `push`) keep control of the answer.
    let attrs = shared.get(&device)?.clone();
    let found: Map<String, Value> = attrs
        .into_iter()
        .filter(|(k, _)| keys.is_empty() || keys.contains(k))
        .collect();
    Some(match (keys.len(), found.iter().next()) {
        (_, None) => json!({"id": id, "device": device}),
        (1, Some((_, v))) => json!({"id": id, "device": device, "value": v}),
        _ => json!({"id": id, "device": device, "values": found}),
    })
}

/// What ThingsBoard 3.8+ answers with no tenant limits configured.
pub fn default_session_limits() -> Value {
    json!({
        "maxPayloadSize": MAX_PACKET_SIZE,
        "maxInflightMessages": 100,
        "rateLimits": {"messages": null, "telemetryMessages": null, "telemetryDataPoints": null},
        "gatewayRateLimits": {"messages": null, "telemetryMessages": null, "telemetryDataPoints": null},
    })
}

fn encode_publish(proto: Proto, topic: &str, payload: &[u8], pkid: u16) -> BytesMut {
    encode(
        proto,
        || {
            let mut p = v4::Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
            p.pkid = pkid;
            v4::Packet::Publish(p)
        },
        || {
            let mut p = v5::Publish::new(topic, QoS5::AtLeastOnce, payload.to_vec(), None);
            p.pkid = pkid;
            v5::Packet::Publish(p)
        },
    )
}

async fn session_loop<S: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut S,
    buf: &mut BytesMut,
    inner: &Inner,
    proto: Proto,
    session: u64,
    rx: &mut mpsc::Receiver<Cmd>,
    run: &CancellationToken,
) {
    let mut next_pkid: u16 = 0;
    // Accepted gateway publishes in the current rate window.
    let mut recent: std::collections::VecDeque<std::time::Instant> = Default::default();
    loop {
        loop {
            let packet = match read_in(proto, buf) {
                Parsed::Packet(p) => p,
                Parsed::NeedMore => break,
                Parsed::Bad { oversize } => {
                    if oversize {
                        inner.update(|r| r.oversize_packets += 1);
                    }
                    return;
                }
            };
            let reply = match packet {
                In::PingReq => Some(encode(
                    proto,
                    || v4::Packet::PingResp,
                    || v5::Packet::PingResp(v5::PingResp),
                )),
                In::Disconnect => return,
                In::Ignored => None,
                In::Subscribe { pkid, filters } => {
                    let granted: Vec<Option<u8>> = filters
                        .iter()
                        .map(|(f, q)| ALLOWED_FILTERS.contains(&f.as_str()).then(|| (*q).min(1)))
                        .collect();
                    inner.update(|r| {
                        for ((f, _), g) in filters.iter().zip(&granted) {
                            if g.is_some() {
                                r.granted_filters.push(f.clone());
                            } else {
                                r.refused_filters.push(f.clone());
                            }
                        }
                    });
                    Some(encode(
                        proto,
                        || {
                            v4::Packet::SubAck(v4::SubAck::new(
                                pkid,
                                granted
                                    .iter()
                                    .map(|g| match g {
                                        Some(q) => v4::SubscribeReasonCode::Success(qos4(*q)),
                                        None => v4::SubscribeReasonCode::Failure,
                                    })
                                    .collect(),
                            ))
                        },
                        || {
                            v5::Packet::SubAck(v5::SubAck {
                                pkid,
                                return_codes: granted
                                    .iter()
                                    .map(|g| match g {
                                        Some(q) => v5::SubscribeReasonCode::Success(qos5(*q)),
                                        None => v5::SubscribeReasonCode::TopicFilterInvalid,
                                    })
                                    .collect(),
                                properties: None,
                            })
                        },
                    ))
                }
                In::Publish {
                    topic,
                    qos,
                    pkid,
                    payload,
                } => {
                    let limit = *inner.rate_limit.lock().expect("emulator lock");
                    if let Some((capacity, period)) = limit {
                        let now = std::time::Instant::now();
                        while recent
                            .front()
                            .is_some_and(|t| now.duration_since(*t) >= period)
                        {
                            recent.pop_front();
                        }
                        if recent.len() >= capacity {
                            inner.update(|r| r.rate_limit_closes += 1);
                            if proto == Proto::V5 && qos > 0 {
                                let _ = sock
                                    .write_all(&puback(
                                        proto,
                                        pkid,
                                        v5::PubAckReason::QuotaExceeded,
                                    ))
                                    .await;
                            }
                            return;
                        }
                        recent.push_back(now);
                    }
                    if let Some(id) = topic.strip_prefix("v1/devices/me/rpc/request/") {
                        let is_limits = obj(&payload).is_some_and(|m| {
                            m.get("method").and_then(Value::as_str) == Some("getSessionLimits")
                        });
                        let answer = inner.session_limits.lock().expect("emulator lock").clone();
                        if let (true, Some(answer)) = (is_limits, answer) {
                            next_pkid = next_pkid % u16::MAX + 1;
                            let bytes = encode_publish(
                                proto,
                                &format!("v1/devices/me/rpc/response/{id}"),
                                answer.to_string().as_bytes(),
                                next_pkid,
                            );
                            if sock.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                    }
                    if topic == "v1/gateway/attributes/request" {
                        if let Some(answer) = attribute_answer(inner, &payload) {
                            next_pkid = next_pkid % u16::MAX + 1;
                            let bytes = encode_publish(
                                proto,
                                "v1/gateway/attributes/response",
                                answer.to_string().as_bytes(),
                                next_pkid,
                            );
                            if sock.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                    }
                    match inner.accept_publish(session, &topic, &payload) {
                        Ok(()) if qos == 0 => None,
                        Ok(()) => {
                            if inner.withhold.load(Ordering::SeqCst) {
                                inner.update(|r| r.pubacks_withheld += 1);
                                None
                            } else {
                                inner.update(|r| r.pubacks_sent += 1);
                                // QoS 2 gets a PUBACK too: ThingsBoard does not implement QoS 2.
                                Some(puback(proto, pkid, v5::PubAckReason::Success))
                            }
                        }
                        Err(reason) => {
                            inner.update(|r| r.invalid_payloads += 1);
                            if proto == Proto::V4 || qos == 0 {
                                return;
                            }
                            Some(puback(proto, pkid, reason))
                        }
                    }
                }
            };
            if let Some(bytes) = reply {
                if sock.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            _ = run.cancelled() => return,
            cmd = rx.recv() => match cmd {
                None => return,
                Some(Cmd::Evict) => {
                    inner.update(|r| r.evictions += 1);
                    if proto == Proto::V5 {
                        // DISCONNECT, reason 0x8E session taken over, empty properties. Written
                        // by hand: rumqttc 0.25's v5 encoder mis-sizes a reason-only DISCONNECT.
                        let _ = sock.write_all(&[0xE0, 0x02, 0x8E, 0x00]).await;
                    }
                    return;
                }
                Some(Cmd::Push { topic, payload }) => {
                    next_pkid = next_pkid % u16::MAX + 1;
                    let pkid = next_pkid;
                    let bytes = encode(
                        proto,
                        || {
                            let mut p = v4::Publish::new(topic.clone(), QoS::AtLeastOnce, payload.clone());
                            p.pkid = pkid;
                            v4::Packet::Publish(p)
                        },
                        || {
                            let mut p = v5::Publish::new(topic.clone(), QoS5::AtLeastOnce, payload.clone(), None);
                            p.pkid = pkid;
                            v5::Packet::Publish(p)
                        },
                    );
                    if sock.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            },
            n = sock.read_buf(buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}

fn obj(payload: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice(payload) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

fn device_field(m: &Map<String, Value>) -> Option<String> {
    match m.get("device") {
        Some(Value::String(d)) if !d.trim().is_empty() => Some(d.clone()),
        _ => None,
    }
}

/// Validate a gateway publish like ThingsBoard (spec §2) and record it; `Err` is the v5 PUBACK
/// reason for a payload ThingsBoard rejects.
fn accept(
    r: &mut Recorded,
    session: u64,
    topic: &str,
    payload: &[u8],
    rejected_device: Option<&str>,
) -> Result<(), v5::PubAckReason> {
    use v5::PubAckReason::{PayloadFormatInvalid as Invalid, TopicNameInvalid};
    let m = obj(payload).ok_or(Invalid)?;
    let mut evs: Vec<(String, &'static str)> = Vec::new();
    let mut event = |device: &str, kind: &'static str| evs.push((device.to_owned(), kind));
    match topic {
        "v1/gateway/telemetry" => {
            if m.is_empty() {
                return Err(Invalid);
            }
            let mut parsed = Vec::new();
            for (device, value) in &m {
                // Each device's value must be an array of entries (`{"dev": {..}}` is the
                // connection-killing mistake of spec §2.4).
                let entries = value.as_array().ok_or(Invalid)?;
                for e in entries {
                    let e = e.as_object().ok_or(Invalid)?;
                    if e.contains_key("ts")
                        && e.contains_key("values")
                        && (!e["ts"].is_i64() || !e["values"].is_object())
                    {
                        return Err(Invalid);
                    }
                }
                if device.trim().is_empty() || Some(device.as_str()) == rejected_device {
                    return Err(Invalid);
                }
                parsed.push((device.clone(), entries.clone()));
            }
            for (device, _) in &parsed {
                event(device, "telemetry");
            }
            r.telemetry_publishes += 1;
            if parsed.len() > 1 {
                r.multi_device_publishes += 1;
            }
            for (device, entries) in parsed {
                r.telemetry.entry(device).or_default().extend(entries);
            }
        }
        "v1/gateway/attributes" => {
            if m.is_empty() || m.values().any(|v| !v.is_object()) {
                return Err(Invalid);
            }
            for device in m.keys() {
                event(device, "attributes");
            }
            if m.len() > 1 {
                r.multi_device_publishes += 1;
            }
            for (device, v) in m {
                if let Value::Object(kv) = v {
                    r.attributes.entry(device).or_default().extend(kv);
                }
            }
        }
        "v1/gateway/connect" => {
            let device = device_field(&m).ok_or(Invalid)?;
            let ty = match m.get("type") {
                None | Some(Value::Null) => None,
                Some(Value::String(t)) => Some(t.clone()),
                Some(_) => return Err(Invalid),
            };
            event(&device, "connect");
            r.connects.push((device, ty));
        }
        "v1/gateway/disconnect" => {
            let device = device_field(&m).ok_or(Invalid)?;
            event(&device, "disconnect");
            r.disconnects.push(device);
        }
        "v1/gateway/rpc" => {
            let device = device_field(&m).ok_or(Invalid)?;
            if !m.get("id").is_some_and(Value::is_i64) || !m.contains_key("data") {
                return Err(Invalid);
            }
            event(&device, "rpc_reply");
            r.rpc_replies.push(Value::Object(m));
        }
        "v1/gateway/attributes/request" => {
            let device = device_field(&m).ok_or(Invalid)?;
            let keys_ok = match (m.get("key"), m.get("keys")) {
                (Some(Value::String(_)), None) => true,
                (None, Some(Value::Array(k))) => k.iter().all(Value::is_string),
                _ => false,
            };
            if !m.get("id").is_some_and(Value::is_i64)
                || !m.get("client").is_some_and(Value::is_boolean)
                || !keys_ok
            {
                return Err(Invalid);
            }
            event(&device, "attribute_request");
            r.attribute_requests.push(Value::Object(m));
        }
        "v1/devices/me/telemetry" => {
            r.gateway_telemetry.push(Value::Object(m));
        }
        t if t.starts_with("v1/devices/me/rpc/request/") => {
            let id = &t["v1/devices/me/rpc/request/".len()..];
            r.client_rpc_requests
                .push((id.to_owned(), Value::Object(m)));
        }
        t if t.starts_with("v1/devices/me/rpc/response/") => {
            let id = &t["v1/devices/me/rpc/response/".len()..];
            r.gateway_rpc_responses
                .push((id.to_owned(), Value::Object(m)));
        }
        _ => return Err(TopicNameInvalid),
    }
    r.events.extend(evs.into_iter().map(|(device, kind)| Event {
        session,
        device,
        kind,
    }));
    Ok(())
}
