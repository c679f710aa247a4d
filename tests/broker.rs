//! The embedded broker against real clients: rumqttc v4 and v5 async clients, and raw TCP
//! clients sending hand-made packets (serialised with rumqttc's codecs). Every wait is on an
//! event with a timeout. Black-box conformance and hostile-client suites live in
//! `broker_conformance.rs` and `broker_hostile.rs`; this file covers the bridge-facing side
//! (identity, backpressure, durable acknowledgements, the handle API, persistence).

#[path = "common/v4_client.rs"]
mod v4_client;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dlms_bridge::broker::{self, BrokerHandle, Tuning};
use dlms_bridge::config::{BrokerConfig, Secret};
use dlms_bridge::sources::{LocalPublish, SourceEvent};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use v4_client::{v4_options, V4Client};

/// Upper bound for anything that should happen promptly.
const WAIT: Duration = Duration::from_secs(10);

struct TestBroker {
    handle: BrokerHandle,
    events_rx: mpsc::Receiver<SourceEvent>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl TestBroker {
    async fn start(cfg: BrokerConfig) -> TestBroker {
        Self::start_tuned(cfg, Tuning::default()).await
    }

    /// Events pass through a stand-in router that commits instantly: it releases each QoS 1/2
    /// message's durable acknowledgement as the event arrives, then hands the event to the test.
    async fn start_tuned(cfg: BrokerConfig, tuning: Tuning) -> TestBroker {
        let mut b = Self::start_with_capacity(cfg, tuning, 64).await;
        let mut raw_rx = std::mem::replace(&mut b.events_rx, mpsc::channel(1).1);
        let (tx, rx) = mpsc::channel(65_536);
        tokio::spawn(async move {
            while let Some(mut ev) = raw_rx.recv().await {
                if let SourceEvent::Local(p) = &mut ev {
                    drop(p.ack.take());
                }
                if tx.send(ev).await.is_err() {
                    break;
                }
            }
        });
        b.events_rx = rx;
        b
    }

    /// The broker's own channel of `capacity`, read by the test itself: a QoS 1/2 publisher is
    /// acknowledged only once the test has taken (and dropped) its event.
    async fn start_with_capacity(cfg: BrokerConfig, tuning: Tuning, capacity: usize) -> TestBroker {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let (events_tx, events_rx) = mpsc::channel(capacity);
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        let handle = broker::start_with(&cfg, listen, events_tx, &tracker, cancel.clone(), tuning)
            .await
            .expect("broker starts");
        TestBroker {
            handle,
            events_rx,
            cancel,
            tracker,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    async fn next_local(&mut self) -> LocalPublish {
        match timeout(WAIT, self.events_rx.recv()).await {
            Ok(Some(SourceEvent::Local(p))) => p,
            Ok(other) => panic!("expected a local publish, got {other:?}"),
            Err(_) => panic!("no local publish within {WAIT:?}"),
        }
    }

    /// Assert nothing more is queued for the router (after the broker proved it delivered a
    /// later message, so anything earlier would already be there).
    fn assert_no_event(&mut self) {
        if let Ok(e) = self.events_rx.try_recv() {
            panic!("unexpected event {e:?}");
        }
    }
}

fn config() -> BrokerConfig {
    BrokerConfig::default()
}

// ---------- rumqttc clients ----------

fn v5_options(addr: SocketAddr, id: &str) -> rumqttc::v5::MqttOptions {
    let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

struct V5Client {
    client: rumqttc::v5::AsyncClient,
    events: mpsc::UnboundedReceiver<Result<rumqttc::v5::Event, String>>,
}

impl V5Client {
    async fn connect(opts: rumqttc::v5::MqttOptions) -> V5Client {
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 32);
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let r = eventloop.poll().await.map_err(|e| e.to_string());
                let stop = r.is_err();
                if tx.send(r).is_err() || stop {
                    break;
                }
            }
        });
        let mut c = V5Client { client, events };
        c.wait(|e| matches!(e, rumqttc::v5::Event::Incoming(v5::Packet::ConnAck(_))))
            .await;
        c
    }

    async fn wait(&mut self, want: impl Fn(&rumqttc::v5::Event) -> bool) -> rumqttc::v5::Event {
        let found = timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(e)) if want(&e) => return e,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => panic!("v5 client failed: {e}"),
                    None => panic!("v5 client event loop ended"),
                }
            }
        })
        .await;
        found.expect("v5 client event in time")
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS5) {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("subscribe queued");
        self.wait(|e| matches!(e, rumqttc::v5::Event::Incoming(v5::Packet::SubAck(_))))
            .await;
    }

    async fn next_publish(&mut self) -> v5::Publish {
        match self
            .wait(|e| matches!(e, rumqttc::v5::Event::Incoming(v5::Packet::Publish(_))))
            .await
        {
            rumqttc::v5::Event::Incoming(v5::Packet::Publish(p)) => p,
            _ => unreachable!("filtered above"),
        }
    }
}

// ---------- raw clients ----------

struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.expect("tcp connect"),
            buf: BytesMut::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("raw write");
    }

    async fn send_v4(&mut self, p: v4::Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).expect("serialise v4");
        self.send(&b).await;
    }

    async fn send_v5(&mut self, p: v5::Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, None).expect("serialise v5");
        self.send(&b).await;
    }

    /// Next v4 packet, `None` on close.
    async fn recv_v4(&mut self) -> Option<v4::Packet> {
        timeout(WAIT, async {
            loop {
                match v4::Packet::read(&mut self.buf, usize::MAX) {
                    Ok(p) => return Some(p),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("bad packet from broker: {e}"),
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("packet or close in time")
    }

    /// Next v5 packet, `None` on close.
    async fn recv_v5(&mut self) -> Option<v5::Packet> {
        timeout(WAIT, async {
            loop {
                match v5::Packet::read(&mut self.buf, None) {
                    Ok(p) => return Some(p),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("bad packet from broker: {e}"),
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("packet or close in time")
    }

    /// Wait for the broker to close the socket, ignoring what it sends first.
    async fn closed(&mut self) {
        timeout(WAIT, async {
            let mut scratch = [0u8; 256];
            loop {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("broker closes the connection in time");
    }
}

fn v4_connect(id: &str, keep_alive: u16, clean: bool) -> v4::Packet {
    let mut c = v4::Connect::new(id);
    c.keep_alive = keep_alive;
    c.clean_session = clean;
    v4::Packet::Connect(c)
}

fn v5_connect(id: &str) -> v5::Packet {
    v5::Packet::Connect(
        v5::Connect {
            keep_alive: 30,
            client_id: id.to_owned(),
            clean_start: true,
            properties: None,
        },
        None,
        None,
    )
}

async fn raw_v4_connected(addr: SocketAddr, connect: v4::Packet) -> Raw {
    let mut raw = Raw::connect(addr).await;
    raw.send_v4(connect).await;
    match raw.recv_v4().await {
        Some(v4::Packet::ConnAck(ack)) => assert_eq!(ack.code, v4::ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    raw
}

fn publish_v4(topic: &str, qos: QoS, pkid: u16, payload: &'static [u8]) -> v4::Packet {
    let mut p = v4::Publish::new(topic, qos, payload);
    p.pkid = pkid;
    v4::Packet::Publish(p)
}

// ---------- tests ----------

#[tokio::test]
async fn v311_publish_reaches_router_and_subscribers_at_every_qos() {
    let mut b = TestBroker::start(config()).await;
    let mut sub = V4Client::connect(v4_options(b.addr(), "sub-v4", None)).await;
    sub.subscribe("meters/#", QoS::ExactlyOnce).await;

    let mut opts = v4_options(b.addr(), "pub-v4", None);
    opts.set_credentials("alice", "");
    let publisher = V4Client::connect(opts).await;

    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        let topic = format!("meters/{i}");
        let payload = format!("{{\"v\":{i}}}");
        publisher
            .client
            .publish(&topic, qos, false, payload.clone())
            .await
            .expect("publish queued");

        let ev = b.next_local().await;
        assert_eq!(ev.client_id, "pub-v4");
        assert_eq!(ev.username.as_deref(), Some("alice"));
        assert_eq!(ev.topic, topic);
        assert_eq!(ev.payload, Bytes::from(payload.clone()));
        assert!(ev.received_ms > 0);

        let got = sub.next_publish().await;
        assert_eq!(
            (got.topic.as_str(), &got.payload[..]),
            (topic.as_str(), payload.as_bytes())
        );
        // rumqttd delivers at the subscription's QoS, not min(publish, subscription) as
        // Mosquitto does (docs/BROKER.md), so the delivered QoS is not asserted.
    }
    b.assert_no_event();
    b.cancel.cancel();
    b.tracker.close();
    timeout(WAIT, b.tracker.wait())
        .await
        .expect("front stops on cancel");
}

#[tokio::test]
async fn qos2_resend_is_reported_once() {
    let mut b = TestBroker::start(config()).await;
    let mut raw = raw_v4_connected(b.addr(), v4_connect("q2", 30, true)).await;
    raw.send_v4(publish_v4("q/2", QoS::ExactlyOnce, 7, b"once"))
        .await;
    let mut dup = v4::Publish::new("q/2", QoS::ExactlyOnce, &b"once"[..]);
    dup.pkid = 7;
    dup.dup = true;
    raw.send_v4(v4::Packet::Publish(dup)).await;
    assert_eq!(b.next_local().await.payload, Bytes::from_static(b"once"));
    // PUBREL releases the id; the same id may then carry a new message.
    raw.send_v4(v4::Packet::PubRel(v4::PubRel::new(7))).await;
    raw.send_v4(publish_v4("q/2", QoS::ExactlyOnce, 7, b"twice"))
        .await;
    assert_eq!(b.next_local().await.payload, Bytes::from_static(b"twice"));
    b.assert_no_event();
}

#[tokio::test]
async fn v5_publisher_with_topic_alias_talks_to_v311_subscriber() {
    let mut b = TestBroker::start(config()).await;
    let mut sub = V4Client::connect(v4_options(b.addr(), "sub-v4", None)).await;
    sub.subscribe("a/#", QoS::AtLeastOnce).await;

    let mut raw = Raw::connect(b.addr()).await;
    raw.send_v5(v5_connect("pub-v5")).await;
    match raw.recv_v5().await {
        Some(v5::Packet::ConnAck(ack)) => assert_eq!(ack.code, v5::ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let alias = Some(v5::PublishProperties {
        topic_alias: Some(1),
        ..Default::default()
    });
    let mut first = v5::Publish::new("a/b", QoS5::AtLeastOnce, "one", alias.clone());
    first.pkid = 1;
    let mut second = v5::Publish::new("", QoS5::AtLeastOnce, "two", alias);
    second.pkid = 2;
    raw.send_v5(v5::Packet::Publish(first)).await;
    raw.send_v5(v5::Packet::Publish(second)).await;

    for payload in ["one", "two"] {
        let ev = b.next_local().await;
        assert_eq!(
            (ev.client_id.as_str(), ev.topic.as_str()),
            ("pub-v5", "a/b")
        );
        assert_eq!(ev.payload, Bytes::from(payload));
        let got = sub.next_publish().await;
        assert_eq!(
            (got.topic.as_str(), &got.payload[..]),
            ("a/b", payload.as_bytes())
        );
    }

    // And the other way: a v3.1.1 publisher reaches a v5 subscriber on the same port.
    let mut sub5 = V5Client::connect(v5_options(b.addr(), "sub-v5")).await;
    sub5.subscribe("back/+", QoS5::AtLeastOnce).await;
    sub.client
        .publish("back/1", QoS::AtLeastOnce, false, "hi")
        .await
        .expect("publish queued");
    let got = sub5.next_publish().await;
    assert_eq!(
        (&got.topic[..], &got.payload[..]),
        (&b"back/1"[..], &b"hi"[..])
    );
    assert_eq!(b.next_local().await.client_id, "sub-v4");
}

#[tokio::test]
async fn keep_alive_zero_client_stays_connected_while_idle() {
    // Keep-alive 0 means no timeout at all (MQTT 3.1.1 §3.1.2.10): a silent client stays
    // connected, and the broker sends it nothing unasked.
    let mut b = TestBroker::start(config()).await;
    let mut sub = V4Client::connect(v4_options(b.addr(), "watcher", None)).await;
    sub.subscribe("ka0/#", QoS::AtMostOnce).await;

    let mut raw = raw_v4_connected(b.addr(), v4_connect("telegraf", 0, true)).await;
    let mut scratch = [0u8; 16];
    match timeout(Duration::from_secs(3), raw.stream.read(&mut scratch)).await {
        Err(_) => {} // silence, connection open
        Ok(r) => panic!("idle keep-alive 0 client got {r:?} from the broker"),
    }
    // Other traffic flows meanwhile.
    sub.client
        .publish("ka0/other", QoS::AtMostOnce, false, "x")
        .await
        .expect("publish queued");
    assert_eq!(sub.next_publish().await.topic, "ka0/other");
    assert_eq!(b.next_local().await.client_id, "watcher");

    raw.send_v4(publish_v4("ka0/t", QoS::AtLeastOnce, 1, b"still here"))
        .await;
    match raw.recv_v4().await {
        Some(v4::Packet::PubAck(ack)) => assert_eq!(ack.pkid, 1),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let ev = b.next_local().await;
    assert_eq!(
        (ev.client_id.as_str(), &ev.payload[..]),
        ("telegraf", &b"still here"[..])
    );
    assert_eq!(
        sub.next_publish().await.payload,
        Bytes::from_static(b"still here")
    );

    // The client's own pings still get their answers.
    raw.send(&[0xC0, 0x00]).await;
    assert_eq!(raw.recv_v4().await, Some(v4::Packet::PingResp));
}

#[tokio::test]
async fn empty_client_id_gets_a_generated_one() {
    let mut b = TestBroker::start(config()).await;
    let mut raw = raw_v4_connected(b.addr(), v4_connect("", 30, true)).await;
    raw.send_v4(publish_v4("anon/t", QoS::AtMostOnce, 0, b"1"))
        .await;
    let first = b.next_local().await.client_id;
    assert!(first.starts_with("auto-"), "{first}");

    let mut raw2 = raw_v4_connected(b.addr(), v4_connect("", 30, true)).await;
    raw2.send_v4(publish_v4("anon/t", QoS::AtMostOnce, 0, b"2"))
        .await;
    let second = b.next_local().await.client_id;
    assert!(second.starts_with("auto-") && second != first, "{second}");
    // Both sessions are alive at once (no takeover between them).
    raw.send_v4(publish_v4("anon/t", QoS::AtLeastOnce, 3, b"3"))
        .await;
    assert!(matches!(raw.recv_v4().await, Some(v4::Packet::PubAck(_))));

    // 3.1.1 with a persistent session and no id: identifier rejected, as Mosquitto does.
    let mut bad = Raw::connect(b.addr()).await;
    bad.send_v4(v4_connect("", 30, false)).await;
    match bad.recv_v4().await {
        Some(v4::Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, v4::ConnectReturnCode::BadClientId)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }

    // MQTT 5: accepted and told its id.
    let mut v5raw = Raw::connect(b.addr()).await;
    v5raw.send_v5(v5_connect("")).await;
    match v5raw.recv_v5().await {
        Some(v5::Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, v5::ConnectReturnCode::Success);
            let id = ack.properties.and_then(|p| p.assigned_client_identifier);
            assert!(id.is_some_and(|id| id.starts_with("auto-")));
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn mqtt31_client_is_served() {
    let mut b = TestBroker::start(config()).await;
    let mut raw = Raw::connect(b.addr()).await;
    // CONNECT "MQIsdp" level 3, clean session, keep-alive 30, client id "old".
    raw.send(&[
        0x10, 17, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 30, 0, 3, b'o', b'l', b'd',
    ])
    .await;
    match raw.recv_v4().await {
        Some(v4::Packet::ConnAck(ack)) => assert_eq!(ack.code, v4::ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    raw.send_v4(publish_v4("old/t", QoS::AtLeastOnce, 1, b"31"))
        .await;
    assert!(matches!(raw.recv_v4().await, Some(v4::Packet::PubAck(_))));
    assert_eq!(b.next_local().await.client_id, "old");
}

#[tokio::test]
async fn misbehaving_clients_are_closed_and_others_keep_working() {
    let mut b = TestBroker::start(config()).await;
    // Connected before the trouble, must survive it.
    let mut early = V5Client::connect(v5_options(b.addr(), "early-v5")).await;
    early.subscribe("ok/#", QoS5::AtLeastOnce).await;

    // A v5 client that sends a CONNACK (this breaks rumqttd 0.20's v5 listener for everyone).
    let mut bad5 = Raw::connect(b.addr()).await;
    bad5.send_v5(v5_connect("bad-v5")).await;
    assert!(matches!(bad5.recv_v5().await, Some(v5::Packet::ConnAck(_))));
    bad5.send_v5(v5::Packet::ConnAck(v5::ConnAck {
        session_present: false,
        code: v5::ConnectReturnCode::Success,
        properties: None,
    }))
    .await;
    match bad5.recv_v5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::ProtocolError)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    bad5.closed().await;
    // Straight to rumqttd, that CONNACK panics the connection task, and the same client id
    // reconnecting then poisons the v5 listener for every later client. Through the front it
    // reconnects normally.
    let mut again = Raw::connect(b.addr()).await;
    again.send_v5(v5_connect("bad-v5")).await;
    match again.recv_v5().await {
        Some(v5::Packet::ConnAck(ack)) => assert_eq!(ack.code, v5::ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }

    // CONNACK instead of CONNECT, on both protocol versions' framing.
    let mut bad_first = Raw::connect(b.addr()).await;
    bad_first.send(&[0x20, 0x02, 0x00, 0x00]).await;
    bad_first.closed().await;

    // Garbage after a good v3.1.1 CONNECT, and a SUBACK.
    let mut garbage = raw_v4_connected(b.addr(), v4_connect("garbage", 30, true)).await;
    garbage.send(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).await;
    garbage.closed().await;
    let mut suback = raw_v4_connected(b.addr(), v4_connect("suback", 30, true)).await;
    suback.send(&[0x90, 0x03, 0x00, 0x01, 0x00]).await;
    suback.closed().await;

    // Fresh v5 and v4 clients work, and talk to the early one.
    let mut v5c = V5Client::connect(v5_options(b.addr(), "after-v5")).await;
    v5c.subscribe("ok/#", QoS5::AtLeastOnce).await;
    let v4c = V4Client::connect(v4_options(b.addr(), "after-v4", None)).await;
    v4c.client
        .publish("ok/1", QoS::AtLeastOnce, false, "fine")
        .await
        .expect("publish queued");
    assert_eq!(&v5c.next_publish().await.payload[..], b"fine");
    assert_eq!(&early.next_publish().await.payload[..], b"fine");
    let ev = b.next_local().await;
    assert_eq!(
        (ev.client_id.as_str(), ev.topic.as_str()),
        ("after-v4", "ok/1")
    );
    b.assert_no_event();
}

#[tokio::test]
async fn credentials_are_checked_by_the_front() {
    let cfg = BrokerConfig {
        username: Some("meter".into()),
        password: Some(Secret::new("s3cret")),
        ..config()
    };
    let mut b = TestBroker::start(cfg).await;

    let mut wrong = v4_options(b.addr(), "wrong", None);
    wrong.set_credentials("meter", "nope");
    let err = V4Client::start(wrong).error().await;
    assert!(err.contains("NotAuthorized"), "{err}");

    let mut anon = V4Client::start(v4_options(b.addr(), "anon", None));
    assert!(anon.error().await.contains("NotAuthorized"));

    let mut raw5 = Raw::connect(b.addr()).await;
    raw5.send_v5(v5_connect("anon-v5")).await;
    match raw5.recv_v5().await {
        Some(v5::Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, v5::ConnectReturnCode::NotAuthorized)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }

    let mut right = v4_options(b.addr(), "right", None);
    right.set_credentials("meter", "s3cret");
    let ok = V4Client::connect(right).await;
    ok.client
        .publish("auth/t", QoS::AtLeastOnce, false, "in")
        .await
        .expect("publish queued");
    let ev = b.next_local().await;
    assert_eq!(
        (ev.client_id.as_str(), ev.username.as_deref()),
        ("right", Some("meter"))
    );
}

#[tokio::test]
async fn retained_message_reaches_later_subscriber() {
    let mut b = TestBroker::start(config()).await;
    let publisher = V4Client::connect(v4_options(b.addr(), "retainer", None)).await;
    publisher
        .client
        .publish("state/door", QoS::AtLeastOnce, true, "open")
        .await
        .expect("publish queued");
    assert_eq!(b.next_local().await.topic, "state/door");

    let mut late = V5Client::connect(v5_options(b.addr(), "late")).await;
    late.subscribe("state/#", QoS5::AtLeastOnce).await;
    let got = late.next_publish().await;
    assert_eq!(
        (&got.topic[..], &got.payload[..]),
        (&b"state/door"[..], &b"open"[..])
    );
    assert!(got.retain, "delivered as retained");
}

#[tokio::test]
async fn last_will_is_published_on_abrupt_close() {
    let b = TestBroker::start(config()).await;
    let mut sub = V4Client::connect(v4_options(b.addr(), "will-watcher", None)).await;
    sub.subscribe("wills/#", QoS::AtLeastOnce).await;

    let mut c = v4::Connect::new("dies");
    c.keep_alive = 30;
    c.last_will = Some(v4::LastWill::new(
        "wills/dies",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let raw = raw_v4_connected(b.addr(), v4::Packet::Connect(c)).await;
    drop(raw);

    let got = sub.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("wills/dies", &b"gone"[..])
    );
}

#[tokio::test]
async fn handle_publish_reaches_local_client_but_not_the_router() {
    let mut b = TestBroker::start(config()).await;
    let mut sub = V4Client::connect(v4_options(b.addr(), "rpc-device", None)).await;
    sub.subscribe("v1/devices/me/rpc/request/+", QoS::AtLeastOnce)
        .await;

    b.handle
        .publish(
            "v1/devices/me/rpc/request/1",
            Bytes::from_static(b"{\"method\":\"x\"}"),
            false,
        )
        .await
        .expect("bridge publish");
    let got = sub.next_publish().await;
    assert_eq!(got.topic, "v1/devices/me/rpc/request/1");
    assert_eq!(&got.payload[..], b"{\"method\":\"x\"}");

    // A local publish after it is the next router event: the bridge's own was never reported.
    sub.client
        .publish("marker", QoS::AtLeastOnce, false, "m")
        .await
        .expect("publish queued");
    assert_eq!(b.next_local().await.topic, "marker");
    b.assert_no_event();

    // Retained bridge publishes reach later subscribers.
    b.handle
        .publish("attrs/shared", Bytes::from_static(b"{\"a\":1}"), true)
        .await
        .expect("bridge publish");
    let mut late = V4Client::connect(v4_options(b.addr(), "late", None)).await;
    late.subscribe("attrs/#", QoS::AtMostOnce).await;
    assert_eq!(late.next_publish().await.topic, "attrs/shared");
}

#[tokio::test]
async fn handle_subscribe_receives_local_publishes() {
    let mut b = TestBroker::start(config()).await;
    let mut responses = b
        .handle
        .subscribe("v1/devices/me/rpc/response/+")
        .await
        .expect("bridge subscribe");
    let mut everything = b.handle.subscribe("v1/#").await.expect("bridge subscribe");

    let device = V5Client::connect(v5_options(b.addr(), "device")).await;
    device
        .client
        .publish(
            "v1/devices/me/rpc/response/7",
            QoS5::AtLeastOnce,
            false,
            "{\"ok\":true}",
        )
        .await
        .expect("publish queued");
    let got = timeout(WAIT, responses.recv()).await.expect("in time");
    assert_eq!(
        got,
        Some((
            "v1/devices/me/rpc/response/7".to_owned(),
            Bytes::from_static(b"{\"ok\":true}")
        ))
    );
    // Overlapping filters: each subscriber gets the message exactly once.
    let got = timeout(WAIT, everything.recv()).await.expect("in time");
    assert_eq!(
        got.map(|(t, _)| t).as_deref(),
        Some("v1/devices/me/rpc/response/7")
    );
    assert!(everything.try_recv().is_err());
    // The router saw it too.
    assert_eq!(b.next_local().await.client_id, "device");

    device
        .client
        .publish("other/topic", QoS5::AtLeastOnce, false, "no")
        .await
        .expect("publish queued");
    assert_eq!(b.next_local().await.topic, "other/topic");
    assert!(responses.try_recv().is_err());
}

#[tokio::test]
async fn packet_size_and_connection_limits_are_enforced() {
    let cfg = BrokerConfig {
        max_packet_size: 128,
        max_connections: 2,
        ..config()
    };
    let b = TestBroker::start(cfg.clone()).await;
    let _one = raw_v4_connected(b.addr(), v4_connect("one", 30, true)).await;
    let _two = raw_v4_connected(b.addr(), v4_connect("two", 30, true)).await;
    let mut three = Raw::connect(b.addr()).await;
    three.send_v4(v4_connect("three", 30, true)).await;
    assert_eq!(
        three.recv_v4().await,
        None,
        "closed at the connection limit"
    );

    let mut b = TestBroker::start(cfg).await;
    let mut small = raw_v4_connected(b.addr(), v4_connect("small", 30, true)).await;
    small
        .send_v4(publish_v4("s", QoS::AtMostOnce, 0, &[b'x'; 200]))
        .await;
    small.closed().await;
    b.assert_no_event();
}

#[tokio::test]
async fn full_router_channel_stops_reading_the_publisher() {
    let mut b = TestBroker::start_with_capacity(config(), Tuning::default(), 1).await;
    let mut raw = raw_v4_connected(b.addr(), v4_connect("busy", 30, true)).await;
    // The channel holds message 1 (unacknowledged until the "router" takes it); message 2 waits
    // in the connection task, which stops reading the socket meanwhile.
    raw.send_v4(publish_v4("bp/t", QoS::AtLeastOnce, 1, b"1"))
        .await;
    raw.send_v4(publish_v4("bp/t", QoS::AtLeastOnce, 2, b"2"))
        .await;
    let mut scratch = [0u8; 8];
    let early = timeout(Duration::from_millis(300), raw.stream.read(&mut scratch)).await;
    assert!(
        early.is_err(),
        "a message was acked while the router had not taken it"
    );

    assert_eq!(b.next_local().await.payload, Bytes::from_static(b"1"));
    assert_eq!(
        raw.recv_v4().await,
        Some(v4::Packet::PubAck(v4::PubAck::new(1)))
    );
    assert_eq!(b.next_local().await.payload, Bytes::from_static(b"2"));
    assert_eq!(
        raw.recv_v4().await,
        Some(v4::Packet::PubAck(v4::PubAck::new(2)))
    );
}

#[tokio::test]
async fn cancel_closes_clients_and_stops_accepting() {
    let b = TestBroker::start(config()).await;
    let mut v5raw = Raw::connect(b.addr()).await;
    v5raw.send_v5(v5_connect("bye-v5")).await;
    assert!(matches!(
        v5raw.recv_v5().await,
        Some(v5::Packet::ConnAck(_))
    ));
    let mut v4raw = raw_v4_connected(b.addr(), v4_connect("bye-v4", 30, true)).await;
    let addr = b.addr();

    b.cancel.cancel();
    match v5raw.recv_v5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::ServerShuttingDown)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    v5raw.closed().await;
    v4raw.closed().await;
    b.tracker.close();
    timeout(WAIT, b.tracker.wait())
        .await
        .expect("all broker tasks end");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "public port closed"
    );
}

#[tokio::test]
async fn clean_disconnect_does_not_publish_the_will() {
    let mut b = TestBroker::start(config()).await;
    let mut sub = V4Client::connect(v4_options(b.addr(), "will-watcher", None)).await;
    sub.subscribe("wills/#", QoS::AtLeastOnce).await;

    let mut c = v4::Connect::new("polite");
    c.keep_alive = 30;
    c.last_will = Some(v4::LastWill::new(
        "wills/polite",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let mut raw = raw_v4_connected(b.addr(), v4::Packet::Connect(c)).await;
    raw.send_v4(v4::Packet::Disconnect).await;
    raw.closed().await;

    // A later message arrives first and alone: no will was published in between.
    let marker = V4Client::connect(v4_options(b.addr(), "marker", None)).await;
    marker
        .client
        .publish("wills/marker", QoS::AtLeastOnce, false, "m")
        .await
        .expect("publish queued");
    assert_eq!(sub.next_publish().await.topic, "wills/marker");
    assert_eq!(b.next_local().await.client_id, "marker");
    // rumqttd handles the closed session asynchronously; give a late will a moment to show.
    let late = timeout(Duration::from_millis(300), async {
        loop {
            match sub.events.recv().await {
                Some(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => return p,
                Some(_) => {}
                None => std::future::pending::<()>().await,
            }
        }
    })
    .await;
    assert!(
        late.is_err(),
        "will published after a clean DISCONNECT: {late:?}"
    );
}

#[tokio::test]
async fn same_client_id_takes_over_the_session() {
    let b = TestBroker::start(config()).await;
    let mut first = raw_v4_connected(b.addr(), v4_connect("dup", 30, true)).await;
    let mut second = raw_v4_connected(b.addr(), v4_connect("dup", 30, true)).await;
    first.closed().await;
    second
        .send_v4(publish_v4("dup/t", QoS::AtLeastOnce, 1, b"x"))
        .await;
    assert!(matches!(
        second.recv_v4().await,
        Some(v4::Packet::PubAck(_))
    ));
}

#[tokio::test]
async fn v5_subscriber_with_topic_alias_maximum_gets_right_topics() {
    let b = TestBroker::start(config()).await;
    let mut sub = Raw::connect(b.addr()).await;
    sub.send_v5(v5::Packet::Connect(
        v5::Connect {
            keep_alive: 30,
            client_id: "alias-sub".into(),
            clean_start: true,
            properties: Some(v5::ConnectProperties {
                topic_alias_max: Some(10),
                ..v5::ConnectProperties::new()
            }),
        },
        None,
        None,
    ))
    .await;
    assert!(matches!(sub.recv_v5().await, Some(v5::Packet::ConnAck(_))));
    sub.send_v5(v5::Packet::Subscribe(v5::Subscribe::new(
        v5::Filter::new("w/#", QoS5::AtMostOnce),
        None,
    )))
    .await;
    assert!(matches!(sub.recv_v5().await, Some(v5::Packet::SubAck(_))));

    let publisher = V4Client::connect(v4_options(b.addr(), "alias-pub", None)).await;
    let mut aliases = std::collections::HashMap::new();
    for topic in ["w/1", "w/2", "w/1"] {
        publisher
            .client
            .publish(topic, QoS::AtMostOnce, false, topic)
            .await
            .expect("publish queued");
        let Some(v5::Packet::Publish(p)) = sub.recv_v5().await else {
            panic!("expected PUBLISH");
        };
        // Resolve as a client would.
        let alias = p.properties.as_ref().and_then(|pr| pr.topic_alias);
        let seen = match (alias, p.topic.is_empty()) {
            (Some(a), true) => aliases.get(&a).cloned().expect("known alias"),
            (Some(a), false) => {
                aliases.insert(a, p.topic.clone());
                p.topic.clone()
            }
            (None, _) => p.topic.clone(),
        };
        assert_eq!(&seen[..], topic.as_bytes());
        assert_eq!(&p.payload[..], topic.as_bytes());
    }
}

#[tokio::test]
async fn persistent_session_gets_messages_sent_while_offline() {
    let b = TestBroker::start(config()).await;
    let mut sub = raw_v4_connected(b.addr(), v4_connect("durable", 30, false)).await;
    sub.send_v4(v4::Packet::Subscribe(v4::Subscribe::new(
        "p/#",
        QoS::AtLeastOnce,
    )))
    .await;
    assert!(matches!(sub.recv_v4().await, Some(v4::Packet::SubAck(_))));
    sub.send_v4(v4::Packet::Disconnect).await;
    sub.closed().await;

    let mut publisher = raw_v4_connected(b.addr(), v4_connect("p-pub", 30, true)).await;
    publisher
        .send_v4(publish_v4("p/1", QoS::AtLeastOnce, 1, b"queued"))
        .await;
    assert!(matches!(
        publisher.recv_v4().await,
        Some(v4::Packet::PubAck(_))
    ));

    let mut back = Raw::connect(b.addr()).await;
    back.send_v4(v4_connect("durable", 30, false)).await;
    match back.recv_v4().await {
        Some(v4::Packet::ConnAck(ack)) => assert!(ack.session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    match back.recv_v4().await {
        Some(v4::Packet::Publish(p)) => assert_eq!(&p.payload[..], b"queued"),
        other => panic!("expected the queued PUBLISH, got {other:?}"),
    }
}

/// Rough numbers only (run with `--ignored --nocapture`); benchmarks belong in `bench/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn measure_front_throughput_and_qos1_round_trip() {
    const N: usize = 20_000;
    let mut b = TestBroker::start_with_capacity(config(), Tuning::default(), 4096).await;
    let mut sub = raw_v4_connected(b.addr(), v4_connect("m-sub", 30, true)).await;
    sub.send_v4(v4::Packet::Subscribe(v4::Subscribe::new(
        "m/#",
        QoS::AtMostOnce,
    )))
    .await;
    assert!(matches!(sub.recv_v4().await, Some(v4::Packet::SubAck(_))));
    let mut publisher = raw_v4_connected(b.addr(), v4_connect("m-pub", 30, true)).await;

    let mut batch = BytesMut::new();
    for _ in 0..N {
        v4::Packet::Publish(v4::Publish::new("m/t", QoS::AtMostOnce, vec![b'x'; 100]))
            .write(&mut batch, usize::MAX)
            .expect("serialise");
    }
    let start = std::time::Instant::now();
    let (_, events, delivered) = tokio::join!(
        publisher.send(&batch),
        async {
            for _ in 0..N {
                b.next_local().await;
            }
            start.elapsed()
        },
        async {
            let mut got = 0;
            let mut scratch = BytesMut::new();
            let _ = timeout(Duration::from_secs(20), async {
                while got < N {
                    match v4::Packet::read(&mut sub.buf, usize::MAX) {
                        Ok(_) => got += 1,
                        Err(_) => {
                            scratch.clear();
                            if sub.stream.read_buf(&mut sub.buf).await.unwrap_or(0) == 0 {
                                return;
                            }
                        }
                    }
                }
            })
            .await;
            (got, start.elapsed())
        }
    );
    eprintln!(
        "QoS0 x{N} (100 B): router got all in {events:?} ({:.0}/s); subscriber got {} in {:?}",
        N as f64 / events.as_secs_f64(),
        delivered.0,
        delivered.1
    );

    let mut total = Duration::ZERO;
    const M: u16 = 500;
    for pkid in 1..=M {
        let t = std::time::Instant::now();
        publisher
            .send_v4(publish_v4("m/q1", QoS::AtLeastOnce, pkid, b"x"))
            .await;
        assert!(matches!(
            publisher.recv_v4().await,
            Some(v4::Packet::PubAck(_))
        ));
        total += t.elapsed();
        b.next_local().await;
    }
    eprintln!("QoS1 publish→PUBACK mean {:?}", total / u32::from(M));
}

#[tokio::test]
async fn large_payload_passes_intact() {
    let mut b = TestBroker::start(config()).await;
    let mut sub_opts = v5_options(b.addr(), "big-sub");
    sub_opts.set_max_packet_size(Some(1024 * 1024));
    let mut sub = V5Client::connect(sub_opts).await;
    sub.subscribe("big", QoS5::AtLeastOnce).await;
    let mut opts = v4_options(b.addr(), "big-pub", None);
    opts.set_max_packet_size(1024 * 1024, 1024 * 1024);
    let publisher = V4Client::connect(opts).await;
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    publisher
        .client
        .publish("big", QoS::AtLeastOnce, false, payload.clone())
        .await
        .expect("publish queued");
    assert_eq!(&b.next_local().await.payload[..], &payload[..]);
    assert_eq!(&sub.next_publish().await.payload[..], &payload[..]);
}

#[tokio::test]
async fn v5_will_with_properties_reaches_v311_subscriber() {
    let b = TestBroker::start(config()).await;
    let mut sub = V4Client::connect(v4_options(b.addr(), "v4-watcher", None)).await;
    sub.subscribe("wills/#", QoS::AtLeastOnce).await;

    let will = v5::LastWill::new(
        "wills/v5",
        "gone",
        QoS5::AtLeastOnce,
        false,
        Some(v5::LastWillProperties {
            delay_interval: None,
            payload_format_indicator: Some(1),
            message_expiry_interval: None,
            content_type: Some("text/plain".into()),
            response_topic: None,
            correlation_data: None,
            user_properties: vec![("k".into(), "v".into())],
        }),
    );
    let mut raw = Raw::connect(b.addr()).await;
    raw.send_v5(v5::Packet::Connect(
        v5::Connect {
            keep_alive: 30,
            client_id: "v5-dies".into(),
            clean_start: true,
            properties: None,
        },
        Some(will),
        None,
    ))
    .await;
    assert!(matches!(raw.recv_v5().await, Some(v5::Packet::ConnAck(_))));
    drop(raw);

    let got = sub.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("wills/v5", &b"gone"[..])
    );
}

#[tokio::test]
async fn silent_connection_is_closed_after_connect_timeout() {
    let tuning = Tuning {
        connect_timeout: Duration::from_millis(200),
        ..Tuning::default()
    };
    let b = TestBroker::start_tuned(config(), tuning).await;
    let mut idle = Raw::connect(b.addr()).await;
    idle.closed().await;
    // Unknown protocol level: CONNACK 0x01, then closed.
    let mut odd = Raw::connect(b.addr()).await;
    odd.send(&[0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', 6, 0x02, 0, 30, 0, 0])
        .await;
    match odd.recv_v4().await {
        Some(v4::Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, v4::ConnectReturnCode::RefusedProtocolVersion)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert_eq!(odd.recv_v4().await, None);
}

// ---------- bridge-facing API ----------

#[tokio::test]
async fn publish_to_reaches_one_session_only() {
    let b = TestBroker::start(config()).await;
    let mut a = raw_v4_connected(b.addr(), v4_connect("dev-a", 30, true)).await;
    let mut c = raw_v4_connected(b.addr(), v4_connect("dev-c", 30, true)).await;
    for raw in [&mut a, &mut c] {
        raw.send_v4(v4::Packet::Subscribe(v4::Subscribe::new(
            "rpc/request/+",
            QoS::AtLeastOnce,
        )))
        .await;
        assert!(matches!(raw.recv_v4().await, Some(v4::Packet::SubAck(_))));
    }
    b.handle
        .publish_to("dev-a", "rpc/request/1", Bytes::from_static(b"for a"))
        .await
        .expect("session exists");
    match a.recv_v4().await {
        Some(v4::Packet::Publish(p)) => {
            assert_eq!(
                (p.topic.as_str(), &p.payload[..]),
                ("rpc/request/1", &b"for a"[..])
            );
            assert_eq!(p.qos, QoS::AtLeastOnce, "min(1, subscription QoS)");
            a.send_v4(v4::Packet::PubAck(v4::PubAck::new(p.pkid))).await;
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    // The other subscriber's next packet is a later broadcast, not the targeted message.
    b.handle
        .publish("rpc/request/2", Bytes::from_static(b"for all"), false)
        .await
        .expect("publish");
    match c.recv_v4().await {
        Some(v4::Packet::Publish(p)) => assert_eq!(&p.payload[..], b"for all"),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    let err = b
        .handle
        .publish_to("nobody", "rpc/request/3", Bytes::from_static(b"x"))
        .await
        .expect_err("no such session");
    assert!(matches!(err, broker::Error::NoSession { .. }), "{err}");
}

#[tokio::test]
async fn clients_lists_connected_clients_with_their_identity_and_counts() {
    let mut b = TestBroker::start(config()).await;
    let mut opts = v4_options(b.addr(), "stat-v4", None);
    opts.set_credentials("alice", "");
    let v4c = V4Client::connect(opts).await;
    let mut v5raw = Raw::connect(b.addr()).await;
    v5raw.send_v5(v5_connect("stat-v5")).await;
    assert!(matches!(
        v5raw.recv_v5().await,
        Some(v5::Packet::ConnAck(_))
    ));
    v4c.client
        .publish("stat/t", QoS::AtLeastOnce, false, "1")
        .await
        .expect("publish queued");
    assert_eq!(b.next_local().await.client_id, "stat-v4");

    assert_eq!(b.handle.client_count(), 2);
    let clients = b.handle.clients();
    assert_eq!(clients.len(), 2);
    let c4 = &clients[0];
    assert_eq!(c4.client_id, "stat-v4");
    assert_eq!(c4.username.as_deref(), Some("alice"));
    assert_eq!(c4.protocol, "MQTT 3.1.1");
    assert_eq!(c4.messages_in, 1);
    assert!(c4.peer.ip().is_loopback());
    assert!(c4.connected_since > 0);
    assert_eq!(clients[1].protocol, "MQTT 5.0");

    // A clean DISCONNECT detaches the session before the broker closes the socket.
    v5raw.send(&[0xE0, 0x00]).await;
    v5raw.closed().await;
    assert_eq!(b.handle.client_count(), 1);
    assert_eq!(b.handle.clients()[0].client_id, "stat-v4");
}

#[tokio::test]
async fn handle_subscribe_gets_matching_retained_messages_first() {
    let b = TestBroker::start(config()).await;
    b.handle
        .publish("cfg/a", Bytes::from_static(b"1"), true)
        .await
        .expect("publish");
    b.handle
        .publish("other/b", Bytes::from_static(b"2"), true)
        .await
        .expect("publish");
    let mut rx = b.handle.subscribe("cfg/#").await.expect("subscribe");
    let got = timeout(WAIT, rx.recv()).await.expect("in time");
    assert_eq!(got, Some(("cfg/a".to_owned(), Bytes::from_static(b"1"))));
    assert!(rx.try_recv().is_err(), "only matching retained messages");
}

/// A panic while serving one connection (the test-only hook in `Tuning`) ends that connection
/// alone: its will is published (the session guard ran), other clients keep their round trip,
/// and the same client id can connect again.
#[tokio::test]
async fn panic_in_one_connection_closes_only_that_connection() {
    let tuning = Tuning {
        panic_on_topic: Some("boom".into()),
        ..Tuning::default()
    };
    let mut b = TestBroker::start_tuned(config(), tuning).await;
    let mut healthy = V4Client::connect(v4_options(b.addr(), "healthy", None)).await;
    healthy.subscribe("rt/#", QoS::AtLeastOnce).await;
    healthy.subscribe("wills/#", QoS::AtLeastOnce).await;

    let mut c = v4::Connect::new("doomed");
    c.keep_alive = 30;
    c.last_will = Some(v4::LastWill::new(
        "wills/doomed",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let mut doomed = raw_v4_connected(b.addr(), v4::Packet::Connect(c)).await;
    doomed
        .send_v4(publish_v4("boom", QoS::AtMostOnce, 0, b"x"))
        .await;
    doomed.closed().await;
    let will = healthy.next_publish().await;
    assert_eq!(
        (will.topic.as_str(), &will.payload[..]),
        ("wills/doomed", &b"gone"[..])
    );

    healthy
        .client
        .publish("rt/1", QoS::AtLeastOnce, false, "still served")
        .await
        .expect("publish queued");
    assert_eq!(&healthy.next_publish().await.payload[..], b"still served");
    assert_eq!(b.next_local().await.client_id, "healthy");
    let _again = raw_v4_connected(b.addr(), v4_connect("doomed", 30, true)).await;
}

static RELEASES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static RELEASED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Stands in for glibc's `malloc_trim` (installed by the binary): counts the calls.
fn count_release() -> bool {
    RELEASES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    RELEASED.notify_one();
    true
}

/// Once clients have come, published and gone, the broker's housekeeping asks the allocator to
/// return freed memory (`Tuning::release_memory`; the binary installs glibc's `malloc_trim`).
/// When exactly is the pure policy's (unit tests in `src/broker/memory.rs`); here: the broker
/// calls it once the activity has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freed_memory_is_released_after_the_clients_leave() {
    let tuning = Tuning {
        release_memory: Some(count_release),
        ..Tuning::default()
    };
    let mut b = TestBroker::start_tuned(config(), tuning).await;
    let mut subscribers = Vec::new();
    for i in 0..20 {
        let mut s = raw_v4_connected(b.addr(), v4_connect(&format!("mem-sub-{i}"), 30, true)).await;
        s.send_v4(v4::Packet::Subscribe(v4::Subscribe::new(
            "mem/#",
            QoS::AtLeastOnce,
        )))
        .await;
        assert!(matches!(s.recv_v4().await, Some(v4::Packet::SubAck(_))));
        subscribers.push(s);
    }
    let mut publisher = raw_v4_connected(b.addr(), v4_connect("mem-pub", 30, true)).await;
    for _ in 0..200 {
        publisher
            .send_v4(publish_v4("mem/t", QoS::AtMostOnce, 0, &[0u8; 1024]))
            .await;
    }
    assert_eq!(b.next_local().await.client_id, "mem-pub");
    drop(subscribers);
    drop(publisher);
    // Activity followed by quiet: a release follows within the policy's minimum interval plus
    // a tick or two, whenever the last one was.
    timeout(broker::memory::MIN_INTERVAL + WAIT, async {
        while RELEASES.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            RELEASED.notified().await;
        }
    })
    .await
    .expect("memory released after the clients left");
}

#[tokio::test]
async fn persistence_keeps_retained_messages_and_sessions_across_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = BrokerConfig {
        persistence: true,
        persistence_file: dir.path().join("broker.db"),
        ..config()
    };
    let b = TestBroker::start(cfg.clone()).await;
    let mut sub = raw_v4_connected(b.addr(), v4_connect("keeper", 30, false)).await;
    sub.send_v4(v4::Packet::Subscribe(v4::Subscribe::new(
        "keep/#",
        QoS::AtLeastOnce,
    )))
    .await;
    assert!(matches!(sub.recv_v4().await, Some(v4::Packet::SubAck(_))));
    sub.send_v4(v4::Packet::Disconnect).await;
    sub.closed().await;
    let mut publisher = raw_v4_connected(b.addr(), v4_connect("keep-pub", 30, true)).await;
    publisher
        .send_v4(publish_v4("keep/offline", QoS::AtLeastOnce, 1, b"queued"))
        .await;
    assert!(matches!(
        publisher.recv_v4().await,
        Some(v4::Packet::PubAck(_))
    ));
    let mut retained = v4::Publish::new("keep/state", QoS::AtLeastOnce, &b"on"[..]);
    retained.pkid = 2;
    retained.retain = true;
    publisher.send_v4(v4::Packet::Publish(retained)).await;
    assert!(matches!(
        publisher.recv_v4().await,
        Some(v4::Packet::PubAck(_))
    ));
    b.cancel.cancel();
    b.tracker.close();
    timeout(WAIT, b.tracker.wait())
        .await
        .expect("broker stops and saves");

    let b2 = TestBroker::start(cfg).await;
    let mut back = Raw::connect(b2.addr()).await;
    back.send_v4(v4_connect("keeper", 30, false)).await;
    match back.recv_v4().await {
        Some(v4::Packet::ConnAck(ack)) => assert!(ack.session_present, "session restored"),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let mut got = Vec::new();
    while got.len() < 2 {
        match back.recv_v4().await {
            Some(v4::Packet::Publish(p)) => {
                back.send_v4(v4::Packet::PubAck(v4::PubAck::new(p.pkid)))
                    .await;
                got.push((p.topic, p.retain));
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    got.sort();
    // The queued message, and the retained one (which matched the stored subscription when it
    // was published, so it was queued too).
    assert_eq!(
        got,
        [
            ("keep/offline".to_owned(), false),
            ("keep/state".to_owned(), false)
        ]
    );
    let mut fresh = V4Client::connect(v4_options(b2.addr(), "fresh", None)).await;
    fresh.subscribe("keep/#", QoS::AtLeastOnce).await;
    let p = fresh.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.retain),
        ("keep/state", &b"on"[..], true)
    );
}

// ---------- PUBACK after durable, with the real router and SQLite store ----------

struct Pipeline {
    broker: BrokerHandle,
    store: dlms_bridge::store::StoreHandle,
    db_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn pipeline() -> Pipeline {
    pipeline_with(dlms_bridge::config::DEFAULT_COMMIT_INTERVAL).await
}

async fn pipeline_with(commit_interval: Duration) -> Pipeline {
    use dlms_bridge::config::{LocalConfig, StoreConfig};
    use dlms_bridge::router::mapping::MappingSet;
    use dlms_bridge::router::{Router, RouterInputs};
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("queue.db");
    let store = dlms_bridge::store::open(&StoreConfig {
        path: db_path.clone(),
        commit_interval,
        ..StoreConfig::default()
    })
    .expect("store opens");
    let (events_tx, events_rx) = mpsc::channel(64);
    let (_downlink_tx, downlink_rx) = mpsc::channel(1);
    let (_reload_tx, reload_rx) = mpsc::channel(1);
    let tracker = TaskTracker::new();
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let broker = broker::start(
        &config(),
        listen,
        events_tx,
        &tracker,
        CancellationToken::new(),
    )
    .await
    .expect("broker starts");
    let local = LocalConfig::default();
    let mappings = MappingSet::from_config(&[], &local.device_type).expect("empty mapping set");
    let router = Router::new(
        RouterInputs {
            events_rx,
            downlink_rx,
            reload_rx,
        },
        store.clone(),
        mappings,
        local,
        Some(broker.clone()),
        Default::default(),
    );
    tokio::spawn(async move {
        let _keep = (_downlink_tx, _reload_tx);
        router.run().await
    });
    Pipeline {
        broker,
        store,
        db_path,
        _dir: dir,
    }
}

/// Another SQLite connection holding the write lock: the store's commit waits for it.
fn hold_write_lock(path: &std::path::Path) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(path).expect("second connection");
    db.execute_batch("BEGIN IMMEDIATE")
        .expect("write lock taken");
    db
}

const TELEMETRY: &[u8] = br#"{"deviceName":"Meter A","voltage_l1":230.1}"#;

#[tokio::test]
async fn puback_waits_until_the_router_has_committed_the_record() {
    let p = pipeline().await;
    let mut raw =
        raw_v4_connected(p.broker.local_addr(), v4_connect("durable-pub", 30, true)).await;
    let lock = hold_write_lock(&p.db_path);
    raw.send_v4(publish_v4(
        "v1/devices/me/telemetry",
        QoS::AtLeastOnce,
        1,
        TELEMETRY,
    ))
    .await;
    let mut scratch = [0u8; 8];
    let early = timeout(Duration::from_millis(500), raw.stream.read(&mut scratch)).await;
    assert!(
        early.is_err(),
        "PUBACK sent before the record was committed"
    );
    // (Counted through the lock holder: the store's worker is busy waiting for the lock.)
    let rows: i64 = lock
        .query_row("SELECT count(*) FROM queue", [], |r| r.get(0))
        .expect("count");
    assert_eq!(rows, 0, "nothing committed yet");

    lock.execute_batch("COMMIT").expect("release the lock");
    match raw.recv_v4().await {
        Some(v4::Packet::PubAck(ack)) => assert_eq!(ack.pkid, 1),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    // Acknowledged means durable: the row is in the database now.
    assert_eq!(p.store.stats().await.expect("stats").depth, 1);

    // A message no rule handles produces no record and is acknowledged without a commit.
    raw.send_v4(publish_v4("not/handled", QoS::ExactlyOnce, 2, b"x"))
        .await;
    assert_eq!(
        raw.recv_v4().await,
        Some(v4::Packet::PubRec(v4::PubRec::new(2)))
    );
}

/// One publisher with many QoS 1 messages in flight, and a store whose commit window is an
/// hour: only a group that reaches `COMMIT_EARLY_BYTES` commits. The router must keep handing
/// what arrives to the store's open group while earlier records wait for their commit; had it
/// waited for each commit before passing on the next batch (it did, and one publisher with a
/// window of 1,000 was capped near 27,000 msg/s), no group would ever fill and no PUBACK come.
#[tokio::test]
async fn router_keeps_feeding_the_open_commit_group_while_a_commit_is_pending() {
    const N: u16 = 800;
    let p = pipeline_with(Duration::from_secs(3600)).await;
    let mut raw = raw_v4_connected(p.broker.local_addr(), v4_connect("burst", 30, true)).await;
    // ~250 bytes queued per message: 800 of them hold more than twice COMMIT_EARLY_BYTES.
    let payload: &'static [u8] =
        format!(r#"{{"deviceName":"Meter A","note":"{}"}}"#, "x".repeat(200))
            .into_bytes()
            .leak();
    assert!(usize::from(N) * 200 > 2 * dlms_bridge::store::COMMIT_EARLY_BYTES);
    for pkid in 1..=N {
        raw.send_v4(publish_v4(
            "v1/devices/me/telemetry",
            QoS::AtLeastOnce,
            pkid,
            payload,
        ))
        .await;
    }
    // The first full group commits early: its PUBACKs come, in order.
    let mut acked = 0u16;
    while acked < 100 {
        match timeout(Duration::from_secs(20), raw.recv_v4()).await {
            Ok(Some(v4::Packet::PubAck(ack))) => {
                acked += 1;
                assert_eq!(ack.pkid, acked, "PUBACKs in publish order");
            }
            Ok(other) => panic!("expected PUBACK, got {other:?}"),
            Err(_) => panic!("no commit group filled: {acked} PUBACKs within 20 s"),
        }
    }
    // Acknowledged means durable; and one group held many enqueues (far more than 64 records,
    // the most the router can take from its 64-slot input channel in one go).
    let depth = p.store.stats().await.expect("stats").depth;
    assert!(
        depth >= u64::from(acked),
        "{depth} rows for {acked} PUBACKs"
    );
    assert!(
        depth > 64,
        "one commit group gathered several enqueues: {depth}"
    );
}

#[tokio::test]
async fn publisher_is_disconnected_unacknowledged_when_the_commit_fails() {
    let p = pipeline().await;
    let mut raw = raw_v4_connected(p.broker.local_addr(), v4_connect("unlucky", 30, true)).await;
    // Held past the store's busy timeout (5 s): the commit fails.
    let lock = hold_write_lock(&p.db_path);
    raw.send_v4(publish_v4(
        "v1/devices/me/telemetry",
        QoS::AtLeastOnce,
        1,
        TELEMETRY,
    ))
    .await;
    let mut scratch = [0u8; 64];
    match timeout(Duration::from_secs(20), raw.stream.read(&mut scratch)).await {
        Ok(Ok(0) | Err(_)) => {}
        Ok(Ok(n)) => panic!("broker sent {:?} instead of closing", &scratch[..n]),
        Err(_) => panic!("publisher not disconnected"),
    }
    drop(lock);
    // The client resends after reconnecting; now it commits and is acknowledged.
    let mut again = raw_v4_connected(p.broker.local_addr(), v4_connect("unlucky", 30, true)).await;
    let mut resend = v4::Publish::new("v1/devices/me/telemetry", QoS::AtLeastOnce, TELEMETRY);
    resend.pkid = 1;
    resend.dup = true;
    again.send_v4(v4::Packet::Publish(resend)).await;
    assert!(matches!(again.recv_v4().await, Some(v4::Packet::PubAck(_))));
    assert_eq!(p.store.stats().await.expect("stats").depth, 1);
}

/// MQTT 5 request/response between two v5 clients: the properties the requester set reach the
/// responder (with the subscription identifier and the remaining expiry added by the broker).
#[tokio::test]
async fn v5_publish_properties_reach_a_v5_subscriber() {
    let b = TestBroker::start(config()).await;
    let mut responder = Raw::connect(b.addr()).await;
    responder.send_v5(v5_connect("responder")).await;
    assert!(matches!(
        responder.recv_v5().await,
        Some(v5::Packet::ConnAck(_))
    ));
    let mut s = v5::Subscribe::new(
        v5::Filter::new("req/+", QoS5::AtLeastOnce),
        Some(v5::SubscribeProperties {
            id: Some(42),
            user_properties: Vec::new(),
        }),
    );
    s.pkid = 1;
    responder.send_v5(v5::Packet::Subscribe(s)).await;
    assert!(matches!(
        responder.recv_v5().await,
        Some(v5::Packet::SubAck(_))
    ));

    let mut requester = Raw::connect(b.addr()).await;
    requester.send_v5(v5_connect("requester")).await;
    assert!(matches!(
        requester.recv_v5().await,
        Some(v5::Packet::ConnAck(_))
    ));
    let props = v5::PublishProperties {
        response_topic: Some("resp/requester".into()),
        correlation_data: Some(Bytes::from_static(b"corr-1")),
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("application/json".into()),
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        ..Default::default()
    };
    let mut p = v5::Publish::new("req/1", QoS5::AtMostOnce, "{}", Some(props));
    p.pkid = 0;
    requester.send_v5(v5::Packet::Publish(p)).await;
    match responder.recv_v5().await {
        Some(v5::Packet::Publish(p)) => {
            assert_eq!(p.qos, QoS5::AtMostOnce, "min(publish 0, subscription 1)");
            let pr = p.properties.expect("properties forwarded");
            assert_eq!(pr.response_topic.as_deref(), Some("resp/requester"));
            assert_eq!(pr.correlation_data.as_deref(), Some(&b"corr-1"[..]));
            assert_eq!(pr.user_properties, [("k".to_owned(), "v".to_owned())]);
            assert_eq!(pr.content_type.as_deref(), Some("application/json"));
            assert_eq!(pr.payload_format_indicator, Some(1));
            assert_eq!(pr.subscription_identifiers, [42]);
            assert!(pr
                .message_expiry_interval
                .is_some_and(|s| s <= 3600 && s > 3000));
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}
