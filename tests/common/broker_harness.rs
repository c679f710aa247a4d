//! The embedded broker for black-box tests, and a raw MQTT client that speaks 3.1.1 or 5 with
//! packets serialised by rumqttc's codecs (`rumqttc::mqttbytes::v4`, `rumqttc::v5::mqttbytes::v5`).
//!
//! ```ignore
//! let b = Target::start(BrokerConfig::default()).await; // ours, or $BROKER_CONFORMANCE_ADDR
//! let (mut sub, _) = Conn::connect(b.addr, V::V5, Opts::new(&uniq("sub"))).await;
//! sub.subscribe(&topic, 1).await;
//! ```
//!
//! `BROKER_CONFORMANCE_ADDR=127.0.0.1:PORT` points every test that uses [`Target::start`] at an
//! external broker (Mosquitto, to check the tests' expectations); `BROKER_CONFORMANCE_AUTH_ADDR`
//! at one that requires user `user`, password `secret` (see `bench/mosquitto_conformance.sh`).
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dlms_bridge::broker::{self, BrokerHandle, Tuning};
use dlms_bridge::config::{BrokerConfig, Secret};
use dlms_bridge::sources::SourceEvent;
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS as QoS4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Upper bound for anything that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long a test watches for something that must NOT arrive when it has no later marker
/// message to wait for instead.
pub const QUIET: Duration = Duration::from_millis(700);

/// Credentials of the broker behind `BROKER_CONFORMANCE_AUTH_ADDR` and of the embedded one
/// started by [`Target::start_auth`].
pub const AUTH_USER: &str = "user";
pub const AUTH_PASSWORD: &str = "secret";

// ---------- the broker ----------

/// What the drain task does with each event the broker hands to the router. Kept as one
/// function so that an acknowledgement (e.g. a durability ack on `LocalPublish`) can be fired
/// here in one place.
pub fn complete(ev: SourceEvent) {
    drop(ev);
}

/// Start the embedded broker on an ephemeral loopback port with test tuning; the caller reads
/// the router channel.
pub async fn start_broker_raw(
    cfg: BrokerConfig,
    capacity: usize,
) -> (BrokerHandle, mpsc::Receiver<SourceEvent>, CancellationToken) {
    init_tracing();
    let (events_tx, events_rx) = mpsc::channel(capacity);
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let tuning = Tuning::default();
    let handle = broker::start_with(&cfg, listen, events_tx, &tracker, cancel.clone(), tuning)
        .await
        .expect("broker starts");
    (handle, events_rx, cancel)
}

/// Start the embedded broker with a task that drains the router channel through [`complete`].
pub async fn start_broker(cfg: BrokerConfig) -> (BrokerHandle, CancellationToken) {
    let (handle, mut events_rx, cancel) =
        start_broker_raw(cfg, dlms_bridge::sources::EVENTS_CAPACITY).await;
    tokio::spawn(async move {
        while let Some(ev) = events_rx.recv().await {
            complete(ev);
        }
    });
    (handle, cancel)
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The broker under test: ours (cancelled on drop) or an external one.
pub struct Target {
    pub addr: SocketAddr,
    pub handle: Option<BrokerHandle>,
    cancel: Option<CancellationToken>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(c) = &self.cancel {
            c.cancel();
        }
    }
}

fn env_addr(var: &str) -> Option<SocketAddr> {
    let v = std::env::var(var).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|e| panic!("{var}={v:?} is not an address: {e}")),
    )
}

/// Whether the tests run against an external broker.
pub fn is_external() -> bool {
    env_addr("BROKER_CONFORMANCE_ADDR").is_some()
}

impl Target {
    /// Our broker with `cfg`, or the external one from `BROKER_CONFORMANCE_ADDR` (which must be
    /// configured like Mosquitto's defaults).
    pub async fn start(cfg: BrokerConfig) -> Target {
        if let Some(addr) = env_addr("BROKER_CONFORMANCE_ADDR") {
            return Target {
                addr,
                handle: None,
                cancel: None,
            };
        }
        let (handle, cancel) = start_broker(cfg).await;
        Target {
            addr: handle.local_addr(),
            handle: Some(handle),
            cancel: Some(cancel),
        }
    }

    /// A broker that requires [`AUTH_USER`] / [`AUTH_PASSWORD`].
    pub async fn start_auth() -> Target {
        if is_external() {
            let addr = env_addr("BROKER_CONFORMANCE_AUTH_ADDR")
                .expect("BROKER_CONFORMANCE_AUTH_ADDR must be set with BROKER_CONFORMANCE_ADDR");
            return Target {
                addr,
                handle: None,
                cancel: None,
            };
        }
        let cfg = BrokerConfig {
            username: Some(AUTH_USER.into()),
            password: Some(Secret::new(AUTH_PASSWORD)),
            ..BrokerConfig::default()
        };
        Target::start(cfg).await
    }
}

/// A name no other test (or earlier run against a long-lived external broker) uses.
pub fn uniq(name: &str) -> String {
    static RUN: OnceLock<u32> = OnceLock::new();
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let run = *RUN.get_or_init(rand::random);
    format!("bt{run:08x}/{name}/{}", SEQ.fetch_add(1, Ordering::Relaxed))
}

/// A client id derived from [`uniq`] (no `/`: that is tested separately).
pub fn uniq_id(name: &str) -> String {
    uniq(name).replace('/', "-")
}

// ---------- the raw client ----------

/// Protocol version of a raw connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V {
    V311,
    V5,
}

/// A packet of either version (test code: the size difference between the variants is fine).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Pkt {
    V4(v4::Packet),
    V5(v5::Packet),
}

/// A last will.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub props: Option<v5::LastWillProperties>,
}

/// What goes into CONNECT.
#[derive(Debug, Clone)]
pub struct Opts {
    pub id: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub will: Option<Will>,
    pub login: Option<(String, String)>,
    /// MQTT 5 only.
    pub props: Option<v5::ConnectProperties>,
}

impl Opts {
    pub fn new(id: &str) -> Opts {
        Opts {
            id: id.to_owned(),
            clean: true,
            keep_alive: 60,
            will: None,
            login: None,
            props: None,
        }
    }

    /// A persistent session: 3.1.1 clean_session=0; 5 clean_start=0 and session expiry
    /// `expiry` seconds.
    pub fn persistent(id: &str, expiry: u32) -> Opts {
        let mut o = Opts::new(id);
        o.clean = false;
        o.props = Some(v5::ConnectProperties {
            session_expiry_interval: Some(expiry),
            ..v5::ConnectProperties::new()
        });
        o
    }

    pub fn with_will(mut self, will: Will) -> Opts {
        self.will = Some(will);
        self
    }

    pub fn props(&mut self) -> &mut v5::ConnectProperties {
        self.props.get_or_insert_with(v5::ConnectProperties::new)
    }
}

/// A CONNACK of either version; `code` is the wire byte.
#[derive(Debug, Clone)]
pub struct Ack {
    pub code: u8,
    pub session_present: bool,
    pub props: Option<v5::ConnAckProperties>,
}

/// A PUBLISH received (either version).
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
    pub props: Option<v5::PublishProperties>,
}

pub fn qos4(q: u8) -> QoS4 {
    match q {
        0 => QoS4::AtMostOnce,
        1 => QoS4::AtLeastOnce,
        _ => QoS4::ExactlyOnce,
    }
}

pub fn qos5(q: u8) -> QoS5 {
    match q {
        0 => QoS5::AtMostOnce,
        1 => QoS5::AtLeastOnce,
        _ => QoS5::ExactlyOnce,
    }
}

fn connack_code_v4(c: v4::ConnectReturnCode) -> u8 {
    c as u8
}

fn connack_code_v5(c: v5::ConnectReturnCode) -> u8 {
    use v5::ConnectReturnCode as C;
    match c {
        C::Success => 0x00,
        C::RefusedProtocolVersion => 0x01,
        C::BadClientId => 0x02,
        C::ServiceUnavailable => 0x03,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::ImplementationSpecificError => 0x83,
        C::UnsupportedProtocolVersion => 0x84,
        C::ClientIdentifierNotValid => 0x85,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::ServerUnavailable => 0x88,
        C::ServerBusy => 0x89,
        C::Banned => 0x8A,
        C::BadAuthenticationMethod => 0x8C,
        C::TopicNameInvalid => 0x90,
        C::PacketTooLarge => 0x95,
        C::QuotaExceeded => 0x97,
        C::PayloadFormatInvalid => 0x99,
        C::RetainNotSupported => 0x9A,
        C::QoSNotSupported => 0x9B,
        C::UseAnotherServer => 0x9C,
        C::ServerMoved => 0x9D,
        C::ConnectionRateExceeded => 0x9F,
    }
}

/// SUBACK return code byte (v4 and v5).
pub fn suback_code_v5(c: &v5::SubscribeReasonCode) -> u8 {
    use v5::SubscribeReasonCode as S;
    match c {
        S::Success(q) => *q as u8,
        S::Failure | S::Unspecified => 0x80,
        S::ImplementationSpecific => 0x83,
        S::NotAuthorized => 0x87,
        S::TopicFilterInvalid => 0x8F,
        S::PkidInUse => 0x91,
        S::QuotaExceeded => 0x97,
        S::SharedSubscriptionsNotSupported => 0x9E,
        S::SubscriptionIdNotSupported => 0xA1,
        S::WildcardSubscriptionsNotSupported => 0xA2,
    }
}

/// One raw TCP connection.
pub struct Conn {
    pub v: V,
    stream: TcpStream,
    buf: BytesMut,
    next_pkid: u16,
    /// PUBLISHes that arrived while waiting for something else.
    pending: VecDeque<Msg>,
    /// Answer incoming QoS 1/2 automatically (PUBACK; PUBREC then PUBCOMP on PUBREL).
    pub auto_ack: bool,
}

impl Conn {
    pub async fn open(addr: SocketAddr, v: V) -> Conn {
        let stream = timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("tcp connect in time")
            .expect("tcp connect");
        let _ = stream.set_nodelay(true);
        Conn {
            v,
            stream,
            buf: BytesMut::new(),
            next_pkid: 0,
            pending: VecDeque::new(),
            auto_ack: true,
        }
    }

    /// Connect and expect CONNACK success.
    pub async fn connect(addr: SocketAddr, v: V, opts: Opts) -> (Conn, Ack) {
        let mut c = Conn::open(addr, v).await;
        let ack = c.handshake(&opts).await;
        assert_eq!(ack.code, 0, "CONNACK refused for {:?}: {ack:?}", opts.id);
        (c, ack)
    }

    /// Send CONNECT and return the CONNACK (panics if the connection closes first).
    pub async fn handshake(&mut self, opts: &Opts) -> Ack {
        self.send_connect(opts).await;
        self.connack().await.expect("CONNACK before close")
    }

    pub async fn send_connect(&mut self, o: &Opts) {
        let p = self.connect_pkt(o);
        self.send(p).await;
    }

    /// The CONNECT packet for `o` in this connection's version.
    pub fn connect_pkt(&self, o: &Opts) -> Pkt {
        match self.v {
            V::V311 => {
                let mut c = v4::Connect::new(o.id.clone());
                c.keep_alive = o.keep_alive;
                c.clean_session = o.clean;
                c.last_will = o.will.as_ref().map(|w| {
                    let mut lw =
                        v4::LastWill::new(w.topic.clone(), w.payload.to_vec(), qos4(w.qos), false);
                    lw.retain = w.retain;
                    lw
                });
                if let Some((u, p)) = &o.login {
                    c.set_login(u.clone(), p.clone());
                }
                Pkt::V4(v4::Packet::Connect(c))
            }
            V::V5 => {
                let c = v5::Connect {
                    keep_alive: o.keep_alive,
                    client_id: o.id.clone(),
                    clean_start: o.clean,
                    properties: o.props.clone(),
                };
                let will = o.will.as_ref().map(|w| {
                    v5::LastWill::new(
                        w.topic.clone(),
                        w.payload.to_vec(),
                        qos5(w.qos),
                        w.retain,
                        w.props.clone(),
                    )
                });
                let login = o
                    .login
                    .as_ref()
                    .map(|(u, p)| v5::Login::new(u.clone(), p.clone()));
                Pkt::V5(v5::Packet::Connect(c, will, login))
            }
        }
    }

    /// The next packet, which must be CONNACK; `None` if the connection closed.
    pub async fn connack(&mut self) -> Option<Ack> {
        match self.recv().await? {
            Pkt::V4(v4::Packet::ConnAck(a)) => Some(Ack {
                code: connack_code_v4(a.code),
                session_present: a.session_present,
                props: None,
            }),
            Pkt::V5(v5::Packet::ConnAck(a)) => Some(Ack {
                code: connack_code_v5(a.code),
                session_present: a.session_present,
                props: a.properties,
            }),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // The broker may have closed the socket already; tests check that separately.
        let _ = self.stream.write_all(bytes).await;
    }

    pub fn encode(p: &Pkt) -> BytesMut {
        let mut b = BytesMut::new();
        match p {
            Pkt::V4(p) => {
                p.write(&mut b, usize::MAX).expect("serialise v4");
            }
            Pkt::V5(p) => {
                p.write(&mut b, None).expect("serialise v5");
            }
        }
        b
    }

    pub async fn send(&mut self, p: Pkt) {
        let b = Self::encode(&p);
        self.send_bytes(&b).await;
    }

    pub fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid % 65535 + 1;
        self.next_pkid
    }

    /// Next packet within `d`: `Err(())` on timeout, `Ok(None)` on close.
    pub async fn recv_within(&mut self, d: Duration) -> Result<Option<Pkt>, ()> {
        let v = self.v;
        let buf = &mut self.buf;
        let stream = &mut self.stream;
        timeout(d, async move {
            loop {
                if !buf.is_empty() {
                    match v {
                        V::V311 => match v4::Packet::read(buf, usize::MAX) {
                            Ok(p) => return Some(Pkt::V4(p)),
                            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                            Err(e) => panic!("bad packet from broker: {e}"),
                        },
                        V::V5 => match read_v5(buf) {
                            Ok(p) => return Some(Pkt::V5(p)),
                            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                            Err(e) => panic!("bad packet from broker: {e}"),
                        },
                    }
                }
                match stream.read_buf(buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .map_err(|_| ())
    }

    /// Next packet, `None` on close; panics after [`WAIT`].
    pub async fn recv(&mut self) -> Option<Pkt> {
        self.recv_within(WAIT)
            .await
            .unwrap_or_else(|_| panic!("no packet from the broker within {WAIT:?}"))
    }

    /// Wait for the broker to close the connection; returns the DISCONNECT it sent (v5).
    pub async fn closed(&mut self) -> Option<v5::Disconnect> {
        let mut last = None;
        loop {
            match self.recv_within(WAIT).await {
                Err(()) => panic!("the broker did not close the connection within {WAIT:?}"),
                Ok(None) => return last,
                Ok(Some(Pkt::V5(v5::Packet::Disconnect(d)))) => last = Some(d),
                Ok(Some(_)) => {}
            }
        }
    }

    /// Whether the connection is still open and served: PINGREQ gets PINGRESP. PUBLISHes
    /// that arrive meanwhile are kept for `next_msg`.
    pub async fn ping(&mut self) -> bool {
        let p = match self.v {
            V::V311 => Pkt::V4(v4::Packet::PingReq),
            V::V5 => Pkt::V5(v5::Packet::PingReq(v5::PingReq)),
        };
        self.send(p).await;
        loop {
            match self.recv_within(WAIT).await {
                Err(()) | Ok(None) => return false,
                Ok(Some(Pkt::V4(v4::Packet::PingResp))) => return true,
                Ok(Some(Pkt::V5(v5::Packet::PingResp(_)))) => return true,
                Ok(Some(p)) => {
                    if !self.absorb(p).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Handle a packet that is not the one awaited: keep PUBLISHes, answer PUBREL. Returns
    /// false on DISCONNECT.
    async fn absorb(&mut self, p: Pkt) -> bool {
        match p {
            Pkt::V4(v4::Packet::Publish(_)) | Pkt::V5(v5::Packet::Publish(_)) => {
                let m = self.on_publish(p).await;
                self.pending.push_back(m);
                true
            }
            Pkt::V4(v4::Packet::PubRel(r)) => {
                self.send(Pkt::V4(v4::Packet::PubComp(v4::PubComp::new(r.pkid))))
                    .await;
                true
            }
            Pkt::V5(v5::Packet::PubRel(r)) => {
                self.send(Pkt::V5(v5::Packet::PubComp(v5::PubComp::new(r.pkid, None))))
                    .await;
                true
            }
            Pkt::V5(v5::Packet::Disconnect(_)) => false,
            _ => true,
        }
    }

    /// Convert (and with `auto_ack`, acknowledge) an incoming PUBLISH.
    async fn on_publish(&mut self, p: Pkt) -> Msg {
        let m = match p {
            Pkt::V4(v4::Packet::Publish(p)) => Msg {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos as u8,
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
                props: None,
            },
            Pkt::V5(v5::Packet::Publish(p)) => Msg {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload,
                qos: p.qos as u8,
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
                props: p.properties,
            },
            other => panic!("not a PUBLISH: {other:?}"),
        };
        if self.auto_ack {
            self.ack(&m).await;
        }
        m
    }

    /// PUBACK (QoS 1) or PUBREC (QoS 2) for `m`.
    pub async fn ack(&mut self, m: &Msg) {
        let p = match (self.v, m.qos) {
            (_, 0) => return,
            (V::V311, 1) => Pkt::V4(v4::Packet::PubAck(v4::PubAck::new(m.pkid))),
            (V::V311, _) => Pkt::V4(v4::Packet::PubRec(v4::PubRec::new(m.pkid))),
            (V::V5, 1) => Pkt::V5(v5::Packet::PubAck(v5::PubAck::new(m.pkid, None))),
            (V::V5, _) => Pkt::V5(v5::Packet::PubRec(v5::PubRec::new(m.pkid, None))),
        };
        self.send(p).await;
    }

    /// The next PUBLISH within `d`: `Err(())` on timeout, `Ok(None)` on close.
    pub async fn msg_within(&mut self, d: Duration) -> Result<Option<Msg>, ()> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(Some(m));
        }
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left).await? {
                None => return Ok(None),
                Some(p @ (Pkt::V4(v4::Packet::Publish(_)) | Pkt::V5(v5::Packet::Publish(_)))) => {
                    return Ok(Some(self.on_publish(p).await));
                }
                Some(p) => {
                    if !self.absorb(p).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// The next PUBLISH; panics on close or after [`WAIT`].
    pub async fn next_msg(&mut self) -> Msg {
        match self.msg_within(WAIT).await {
            Ok(Some(m)) => m,
            Ok(None) => panic!("connection closed while waiting for a PUBLISH"),
            Err(()) => panic!("no PUBLISH within {WAIT:?}"),
        }
    }

    /// Every PUBLISH up to and including the first one on `topic`.
    pub async fn until(&mut self, topic: &str) -> Vec<Msg> {
        let mut got = Vec::new();
        loop {
            let m = self.next_msg().await;
            let done = m.topic == topic;
            got.push(m);
            if done {
                return got;
            }
        }
    }

    /// Subscribe to a fresh topic, publish to it, and return every PUBLISH that came before
    /// that one: whatever the broker had queued for this client until now.
    pub async fn barrier(&mut self) -> Vec<Msg> {
        let t = uniq("barrier");
        assert_eq!(self.subscribe(&t, 1).await, 1, "barrier SUBACK");
        self.publish(&t, 1, b"barrier", false).await;
        let mut got = self.until(&t).await;
        got.pop();
        got
    }

    /// Assert that no PUBLISH arrives within [`QUIET`].
    pub async fn assert_no_msg(&mut self) {
        if let Ok(Some(m)) = self.msg_within(QUIET).await {
            panic!("unexpected PUBLISH {m:?}");
        }
    }

    /// SUBSCRIBE one filter; returns the SUBACK code.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> u8 {
        match self.v {
            V::V311 => {
                let pkid = self.pkid();
                let mut s = v4::Subscribe::new(filter, qos4(qos));
                s.pkid = pkid;
                self.send(Pkt::V4(v4::Packet::Subscribe(s))).await;
                self.suback(pkid).await[0]
            }
            V::V5 => {
                let f = v5::Filter::new(filter, qos5(qos));
                self.subscribe_v5(vec![f], None).await[0]
            }
        }
    }

    /// MQTT 5 SUBSCRIBE with options and an optional subscription identifier.
    pub async fn subscribe_v5(&mut self, filters: Vec<v5::Filter>, id: Option<usize>) -> Vec<u8> {
        let pkid = self.pkid();
        let props = id.map(|id| v5::SubscribeProperties {
            id: Some(id),
            user_properties: Vec::new(),
        });
        let s = v5::Subscribe {
            pkid,
            filters,
            properties: props,
        };
        self.send(Pkt::V5(v5::Packet::Subscribe(s))).await;
        self.suback(pkid).await
    }

    async fn suback(&mut self, pkid: u16) -> Vec<u8> {
        loop {
            match self.recv().await {
                Some(Pkt::V4(v4::Packet::SubAck(a))) => {
                    assert_eq!(a.pkid, pkid, "SUBACK packet id");
                    return a
                        .return_codes
                        .iter()
                        .map(|c| match c {
                            v4::SubscribeReasonCode::Success(q) => *q as u8,
                            v4::SubscribeReasonCode::Failure => 0x80,
                        })
                        .collect();
                }
                Some(Pkt::V5(v5::Packet::SubAck(a))) => {
                    assert_eq!(a.pkid, pkid, "SUBACK packet id");
                    return a.return_codes.iter().map(suback_code_v5).collect();
                }
                Some(p) => {
                    if !self.absorb(p).await {
                        panic!("DISCONNECT while waiting for SUBACK");
                    }
                }
                None => panic!("connection closed while waiting for SUBACK"),
            }
        }
    }

    /// UNSUBSCRIBE one filter and wait for the UNSUBACK; `None` if the connection closed.
    pub async fn unsubscribe(&mut self, filter: &str) -> Option<()> {
        let pkid = self.pkid();
        let p = match self.v {
            V::V311 => {
                let mut u = v4::Unsubscribe::new(filter);
                u.pkid = pkid;
                Pkt::V4(v4::Packet::Unsubscribe(u))
            }
            V::V5 => Pkt::V5(v5::Packet::Unsubscribe(v5::Unsubscribe {
                pkid,
                filters: vec![filter.to_owned()],
                properties: None,
            })),
        };
        self.send(p).await;
        loop {
            match self.recv().await? {
                Pkt::V4(v4::Packet::UnsubAck(a)) => {
                    assert_eq!(a.pkid, pkid);
                    return Some(());
                }
                Pkt::V5(v5::Packet::UnsubAck(a)) => {
                    assert_eq!(a.pkid, pkid);
                    return Some(());
                }
                p => {
                    if !self.absorb(p).await {
                        return None;
                    }
                }
            }
        }
    }

    /// A PUBLISH packet of this connection's version (packet id assigned for QoS > 0).
    pub fn publish_pkt(&mut self, topic: &str, qos: u8, payload: &[u8], retain: bool) -> Pkt {
        let pkid = if qos > 0 { self.pkid() } else { 0 };
        match self.v {
            V::V311 => {
                let mut p = v4::Publish::new(topic, qos4(qos), payload.to_vec());
                p.pkid = pkid;
                p.retain = retain;
                Pkt::V4(v4::Packet::Publish(p))
            }
            V::V5 => {
                let mut p = v5::Publish::new(topic, qos5(qos), payload.to_vec(), None);
                p.pkid = pkid;
                p.retain = retain;
                Pkt::V5(v5::Packet::Publish(p))
            }
        }
    }

    /// PUBLISH and complete its QoS flow (PUBACK, or PUBREC/PUBREL/PUBCOMP).
    pub async fn publish(&mut self, topic: &str, qos: u8, payload: &[u8], retain: bool) {
        let p = self.publish_pkt(topic, qos, payload, retain);
        self.publish_flow(p).await;
    }

    /// Send a prepared PUBLISH and complete its QoS flow.
    pub async fn publish_flow(&mut self, p: Pkt) {
        let (qos, pkid) = match &p {
            Pkt::V4(v4::Packet::Publish(p)) => (p.qos as u8, p.pkid),
            Pkt::V5(v5::Packet::Publish(p)) => (p.qos as u8, p.pkid),
            other => panic!("not a PUBLISH: {other:?}"),
        };
        self.send(p).await;
        if qos == 0 {
            return;
        }
        loop {
            match self.recv().await {
                Some(Pkt::V4(v4::Packet::PubAck(a))) if qos == 1 && a.pkid == pkid => return,
                Some(Pkt::V5(v5::Packet::PubAck(a))) if qos == 1 && a.pkid == pkid => return,
                Some(Pkt::V4(v4::Packet::PubRec(a))) if qos == 2 && a.pkid == pkid => {
                    self.send(Pkt::V4(v4::Packet::PubRel(v4::PubRel::new(pkid))))
                        .await;
                }
                Some(Pkt::V5(v5::Packet::PubRec(a))) if qos == 2 && a.pkid == pkid => {
                    self.send(Pkt::V5(v5::Packet::PubRel(v5::PubRel::new(pkid, None))))
                        .await;
                }
                Some(Pkt::V4(v4::Packet::PubComp(a))) if qos == 2 && a.pkid == pkid => return,
                Some(Pkt::V5(v5::Packet::PubComp(a))) if qos == 2 && a.pkid == pkid => return,
                Some(p) => {
                    if !self.absorb(p).await {
                        panic!("DISCONNECT while publishing");
                    }
                }
                None => panic!("connection closed while publishing"),
            }
        }
    }

    /// Clean DISCONNECT (v5: reason 0, optionally a new session expiry), then close.
    pub async fn disconnect(mut self, session_expiry: Option<u32>) {
        let p = match self.v {
            V::V311 => Pkt::V4(v4::Packet::Disconnect),
            V::V5 => {
                let mut d = v5::Disconnect::new(v5::DisconnectReasonCode::NormalDisconnection);
                if let Some(e) = session_expiry {
                    d.properties = Some(v5::DisconnectProperties {
                        session_expiry_interval: Some(e),
                        reason_string: None,
                        user_properties: Vec::new(),
                        server_reference: None,
                    });
                }
                Pkt::V5(v5::Packet::Disconnect(d))
            }
        };
        self.send(p).await;
        let _ = self.stream.shutdown().await;
        // Wait for the broker to close its side so that the disconnect is processed.
        let _ = timeout(WAIT, async {
            let mut scratch = [0u8; 256];
            loop {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }

    /// Close the TCP connection without DISCONNECT (an abnormal close for the broker).
    pub fn drop_abruptly(self) {
        drop(self);
    }
}

/// `v5::Packet::read`, except for a DISCONNECT of remaining length 1 (reason code, no property
/// length), which rumqttc 0.25 cannot parse (it waits for more bytes) and Mosquitto sends.
fn read_v5(buf: &mut BytesMut) -> Result<v5::Packet, rumqttc::v5::mqttbytes::Error> {
    if buf.len() >= 3 && buf[0] == 0xE0 && buf[1] == 1 {
        let code = buf[2];
        let _ = buf.split_to(3);
        let reason = v5::DisconnectReasonCode::try_from(code)?;
        return Ok(v5::Packet::Disconnect(v5::Disconnect::new(reason)));
    }
    v5::Packet::read(buf, None)
}

/// Raw CONNECT bytes for MQTT 3.1 (protocol name "MQIsdp", level 3), clean session.
pub fn mqtt31_connect(id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&[0x00, 0x06]);
    body.extend_from_slice(b"MQIsdp");
    body.push(0x03);
    body.push(0x02);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    let id_len = u16::try_from(id.len()).expect("short id");
    body.extend_from_slice(&id_len.to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut out = vec![0x10];
    encode_remaining_length(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// MQTT variable-length remaining-length encoding.
pub fn encode_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            return;
        }
    }
}
