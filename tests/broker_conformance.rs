//! MQTT behaviour of the embedded broker compared with Mosquitto 2.x, one test per behaviour and
//! protocol version, with raw clients (packets from rumqttc's codecs) and rumqttc clients.
//!
//! Each test's doc comment says what Mosquitto 2.0 does; the test asserts exactly that.
//! `BROKER_CONFORMANCE_ADDR=127.0.0.1:PORT` (and `BROKER_CONFORMANCE_AUTH_ADDR` for the
//! credentials tests) runs the same tests against an external broker:
//! `bench/mosquitto_conformance.sh` does so against a Mosquitto it starts. Results per broker:
//! docs/broker-conformance.md.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use common::broker_harness::{
    mqtt31_connect, qos5, uniq, uniq_id, Conn, Opts, Pkt, Target, Will, AUTH_PASSWORD, AUTH_USER,
    QUIET, V, WAIT,
};
use dlms_bridge::config::BrokerConfig;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::time::{sleep, timeout};

/// One `#[tokio::test]` per protocol version around `async fn case(v: V)`.
macro_rules! both {
    ($(#[$doc:meta])* $case:ident => $v311:ident, $v5:ident) => {
        $(#[$doc])*
        #[tokio::test]
        async fn $v311() {
            $case(V::V311).await
        }
        $(#[$doc])*
        #[tokio::test]
        async fn $v5() {
            $case(V::V5).await
        }
    };
}

async fn broker() -> Target {
    Target::start(BrokerConfig::default()).await
}

async fn client(b: &Target, v: V, name: &str) -> Conn {
    Conn::connect(b.addr, v, Opts::new(&uniq_id(name))).await.0
}

fn will(topic: &str, payload: &'static [u8]) -> Will {
    Will {
        topic: topic.to_owned(),
        payload: Bytes::from_static(payload),
        qos: 1,
        retain: false,
        props: None,
    }
}

// ---------- QoS ----------

/// Mosquitto: a message is delivered at min(publish QoS, subscription QoS) — a QoS 0 publish
/// reaches a QoS 2 subscriber as QoS 0, a QoS 2 publish a QoS 1 subscriber as QoS 1.
async fn delivered_qos_is_the_minimum(v: V) {
    let b = broker().await;
    let base = uniq("qos-min");
    let mut sub = client(&b, v, "sub").await;
    for s in 0..3u8 {
        assert_eq!(sub.subscribe(&format!("{base}/{s}"), s).await, s);
    }
    let mut publ = client(&b, v, "pub").await;
    for s in 0..3u8 {
        for p in 0..3u8 {
            publ.publish(&format!("{base}/{s}"), p, &[p], false).await;
        }
    }
    let mut seen = BTreeSet::new();
    for _ in 0..9 {
        let m = sub.next_msg().await;
        let s: u8 = m
            .topic
            .rsplit('/')
            .next()
            .and_then(|x| x.parse().ok())
            .expect("topic");
        let p = m.payload[0];
        assert_eq!(m.qos, s.min(p), "publish QoS {p} to a QoS {s} subscription");
        assert!(seen.insert((s, p)), "duplicate delivery of {m:?}");
    }
}
both!(delivered_qos_is_the_minimum => v311_delivered_qos_is_min_of_publish_and_subscription, v5_delivered_qos_is_min_of_publish_and_subscription);

/// Mosquitto: a QoS 2 PUBLISH resent with DUP before PUBREL is answered with PUBREC again and
/// delivered to subscribers exactly once.
async fn qos2_exactly_once(v: V) {
    let b = broker().await;
    let t = uniq("qos2-once");
    let mut sub = client(&b, v, "sub").await;
    sub.subscribe(&t, 2).await;
    let mut publ = client(&b, v, "pub").await;
    let p = publ.publish_pkt(&t, 2, b"once", false);
    let pkid = match &p {
        Pkt::V4(v4::Packet::Publish(p)) => p.pkid,
        Pkt::V5(v5::Packet::Publish(p)) => p.pkid,
        _ => unreachable!(),
    };
    publ.send(p.clone()).await;
    let pubrec = |p: Option<Pkt>| match p {
        Some(Pkt::V4(v4::Packet::PubRec(r))) => r.pkid,
        Some(Pkt::V5(v5::Packet::PubRec(r))) => r.pkid,
        other => panic!("expected PUBREC, got {other:?}"),
    };
    assert_eq!(pubrec(publ.recv().await), pkid);
    let dup = match p {
        Pkt::V4(v4::Packet::Publish(mut p)) => {
            p.dup = true;
            Pkt::V4(v4::Packet::Publish(p))
        }
        Pkt::V5(v5::Packet::Publish(mut p)) => {
            p.dup = true;
            Pkt::V5(v5::Packet::Publish(p))
        }
        _ => unreachable!(),
    };
    publ.send(dup).await;
    assert_eq!(
        pubrec(publ.recv().await),
        pkid,
        "PUBREC for the resent PUBLISH"
    );
    let rel = match v {
        V::V311 => Pkt::V4(v4::Packet::PubRel(v4::PubRel::new(pkid))),
        V::V5 => Pkt::V5(v5::Packet::PubRel(v5::PubRel::new(pkid, None))),
    };
    publ.send(rel).await;
    match publ.recv().await {
        Some(Pkt::V4(v4::Packet::PubComp(c))) => assert_eq!(c.pkid, pkid),
        Some(Pkt::V5(v5::Packet::PubComp(c))) => assert_eq!(c.pkid, pkid),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    let got = sub.barrier().await;
    let n = got.iter().filter(|m| m.topic == t).count();
    assert_eq!(n, 1, "delivered {n} times: {got:?}");
    assert_eq!(got[0].qos, 2);
}
both!(qos2_exactly_once => v311_qos2_resent_publish_is_delivered_exactly_once, v5_qos2_resent_publish_is_delivered_exactly_once);

/// Mosquitto: a PUBREL for a packet id it does not know is answered with PUBCOMP (v5: reason
/// 0x92 Packet Identifier not found) and the connection stays open.
async fn pubrel_unknown_id(v: V) {
    let b = broker().await;
    let mut c = client(&b, v, "pubrel").await;
    let rel = match v {
        V::V311 => Pkt::V4(v4::Packet::PubRel(v4::PubRel::new(4242))),
        V::V5 => Pkt::V5(v5::Packet::PubRel(v5::PubRel::new(4242, None))),
    };
    c.send(rel).await;
    match c.recv().await {
        Some(Pkt::V4(v4::Packet::PubComp(p))) => assert_eq!(p.pkid, 4242),
        Some(Pkt::V5(v5::Packet::PubComp(p))) => assert_eq!(p.pkid, 4242),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    assert!(c.ping().await, "connection still served");
}
both!(pubrel_unknown_id => v311_pubrel_for_unknown_id_gets_pubcomp, v5_pubrel_for_unknown_id_gets_pubcomp);

// ---------- retained messages ----------

/// Mosquitto: a non-retained PUBLISH with an empty payload is delivered to current subscribers
/// and leaves the retained message of its topic alone.
async fn empty_non_retained_keeps_retained(v: V) {
    let b = broker().await;
    let t = uniq("keep-retained");
    let mut publ = client(&b, v, "pub").await;
    publ.publish(&t, 1, b"kept", true).await;
    publ.publish(&t, 1, b"", false).await;
    let mut sub = client(&b, v, "sub").await;
    sub.subscribe(&t, 1).await;
    let got = sub.barrier().await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(&got[0].payload[..], b"kept");
    assert!(got[0].retain, "a retained message is sent with RETAIN set");
}
both!(empty_non_retained_keeps_retained => v311_non_retained_empty_publish_keeps_retained, v5_non_retained_empty_publish_keeps_retained);

/// Mosquitto: a retained PUBLISH with an empty payload deletes the retained message; a later
/// subscriber gets nothing.
async fn empty_retained_clears(v: V) {
    let b = broker().await;
    let t = uniq("clear-retained");
    let mut publ = client(&b, v, "pub").await;
    publ.publish(&t, 1, b"old", true).await;
    publ.publish(&t, 1, b"", true).await;
    let mut sub = client(&b, v, "sub").await;
    sub.subscribe(&t, 1).await;
    let got = sub.barrier().await;
    assert!(got.is_empty(), "retained message not cleared: {got:?}");
}
both!(empty_retained_clears => v311_retained_empty_publish_clears_retained, v5_retained_empty_publish_clears_retained);

/// Mosquitto: a new subscriber to `base/#` gets every one of 300 retained topics (its queue
/// holds 1000 messages).
async fn all_retained_to_new_subscriber(v: V) {
    let b = broker().await;
    let base = uniq("retained-300");
    let mut publ = client(&b, v, "pub").await;
    for i in 0..300 {
        publ.publish(&format!("{base}/{i}"), 1, format!("r{i}").as_bytes(), true)
            .await;
    }
    let mut sub = client(&b, v, "sub").await;
    sub.subscribe(&format!("{base}/#"), 1).await;
    let got = sub.barrier().await;
    let topics: BTreeSet<_> = got.iter().map(|m| m.topic.clone()).collect();
    assert_eq!(topics.len(), 300, "distinct retained topics delivered");
    assert_eq!(got.len(), 300, "each exactly once");
    assert!(got.iter().all(|m| m.retain));
}
both!(all_retained_to_new_subscriber => v311_new_subscriber_gets_all_300_retained, v5_new_subscriber_gets_all_300_retained);

/// Mosquitto: a retained message keeps its MQTT 5 properties (user properties, content type)
/// and its QoS (bounded by the new subscription's) when it is sent to a later subscriber.
#[tokio::test]
async fn v5_retained_message_keeps_properties_and_qos() {
    let b = broker().await;
    let base = uniq("retained-props");
    let mut publ = client(&b, V::V5, "pub").await;
    for q in 0..3u8 {
        let props = v5::PublishProperties {
            content_type: Some("text/plain".into()),
            user_properties: vec![("a".into(), "2".into()), ("c".into(), "3".into())],
            ..Default::default()
        };
        let mut p = v5_publish(&format!("{base}/{q}"), q, &[q], props);
        if let Pkt::V5(v5::Packet::Publish(p)) = &mut p {
            p.retain = true;
            if q > 0 {
                p.pkid = publ.pkid();
            }
        }
        publ.publish_flow(p).await;
    }
    let mut sub = client(&b, V::V5, "sub").await;
    sub.subscribe(&format!("{base}/+"), 2).await;
    let got = sub.barrier().await;
    assert_eq!(got.len(), 3, "{got:?}");
    for m in &got {
        assert!(m.retain);
        assert_eq!(m.qos, m.payload[0], "stored QoS kept");
        let p = m.props.as_ref().expect("properties kept");
        assert_eq!(p.content_type.as_deref(), Some("text/plain"));
        assert_eq!(
            p.user_properties,
            vec![("a".into(), "2".into()), ("c".into(), "3".into())]
        );
    }
}

// ---------- subscribe / unsubscribe ----------

/// Mosquitto: UNSUBSCRIBE of a filter the client never subscribed is answered with UNSUBACK
/// (v5 reason 0x11 No subscription existed).
async fn unsuback_never_subscribed(v: V) {
    let b = broker().await;
    let mut c = client(&b, v, "unsub").await;
    assert!(
        c.unsubscribe(&uniq("never")).await.is_some(),
        "UNSUBACK expected, connection closed"
    );
    assert!(c.ping().await);
}
both!(unsuback_never_subscribed => v311_unsubscribe_never_subscribed_gets_unsuback, v5_unsubscribe_never_subscribed_gets_unsuback);

/// Mosquitto: after UNSUBSCRIBE of one of two filters, only the other one delivers.
async fn unsubscribe_stops_delivery(v: V) {
    let b = broker().await;
    let base = uniq("unsub-stops");
    let mut sub = client(&b, v, "sub").await;
    sub.subscribe(&format!("{base}/a"), 1).await;
    sub.subscribe(&format!("{base}/b"), 1).await;
    sub.unsubscribe(&format!("{base}/a"))
        .await
        .expect("UNSUBACK");
    let mut publ = client(&b, v, "pub").await;
    publ.publish(&format!("{base}/a"), 1, b"a", false).await;
    publ.publish(&format!("{base}/b"), 1, b"b", false).await;
    let got = sub.until(&format!("{base}/b")).await;
    assert_eq!(got.len(), 1, "message on the unsubscribed topic: {got:?}");
}
both!(unsubscribe_stops_delivery => v311_unsubscribe_stops_delivery, v5_unsubscribe_stops_delivery);

/// Mosquitto: subscribing to `$SYS/#` succeeds (SUBACK, granted QoS) and the connection stays
/// open (Mosquitto then publishes its `$SYS/broker/...` topics).
async fn sys_subscription(v: V) {
    let b = broker().await;
    let mut c = client(&b, v, "sys").await;
    let code = c.subscribe("$SYS/#", 0).await;
    assert!(code == 0 || code >= 0x80, "SUBACK code {code:#x}");
    assert!(
        c.ping().await,
        "connection closed after subscribing to $SYS/#"
    );
}
both!(sys_subscription => v311_sys_subscription_gets_suback_and_stays_open, v5_sys_subscription_gets_suback_and_stays_open);

/// Mosquitto: filters starting with a wildcard (`#`, `+/...`) do not match topics starting with
/// `$`; an explicit `$...` filter does.
async fn wildcards_skip_dollar_topics(v: V) {
    let b = broker().await;
    let name = uniq_id("dollar");
    let dollar = format!("$bt-{name}/x");
    let plain = format!("bt-{name}/x");
    let mut all = client(&b, v, "hash").await;
    all.subscribe("#", 0).await;
    let mut plus = client(&b, v, "plus").await;
    plus.subscribe("+/x", 0).await;
    let mut explicit = client(&b, v, "explicit").await;
    explicit.subscribe(&format!("$bt-{name}/#"), 0).await;
    let mut publ = client(&b, v, "pub").await;
    publ.publish(&dollar, 1, b"dollar", false).await;
    publ.publish(&plain, 1, b"plain", false).await;

    let got = explicit.next_msg().await;
    assert_eq!(got.topic, dollar, "explicit $ filter gets the $ topic");
    for c in [&mut all, &mut plus] {
        let got = c.until(&plain).await;
        let bad: Vec<_> = got.iter().filter(|m| m.topic.starts_with('$')).collect();
        assert!(bad.is_empty(), "wildcard matched $ topics: {bad:?}");
    }
}
both!(wildcards_skip_dollar_topics => v311_wildcards_do_not_match_dollar_topics, v5_wildcards_do_not_match_dollar_topics);

/// Mosquitto: PUBLISH to a topic name containing `+` or `#` is a protocol violation; the client
/// is disconnected (v5: after DISCONNECT 0x82 Protocol Error; 0x90 Topic Name invalid is
/// accepted too) and nothing is delivered.
async fn wildcard_publish_closes(v: V) {
    let b = broker().await;
    let base = uniq("wild-pub");
    let mut sub = client(&b, v, "sub").await;
    sub.subscribe(&format!("{base}/#"), 1).await;
    let mut c = client(&b, v, "pub").await;
    let p = c.publish_pkt(&format!("{base}/+/x"), 1, b"bad", false);
    c.send(p).await;
    if let Some(d) = c.closed().await {
        assert!(
            matches!(
                d.reason_code,
                v5::DisconnectReasonCode::ProtocolError
                    | v5::DisconnectReasonCode::TopicNameInvalid
            ),
            "DISCONNECT reason {:?}",
            d.reason_code
        );
    }
    let got = sub.barrier().await;
    assert!(got.is_empty(), "wildcard topic delivered: {got:?}");
}
both!(wildcard_publish_closes => v311_wildcard_in_publish_topic_closes_client, v5_wildcard_in_publish_topic_closes_client);

/// Mosquitto: with overlapping subscriptions (`t/#` at QoS 2, `t/+` at QoS 1) a QoS 2 message
/// must reach the client at the highest QoS of the matching subscriptions (MQTT-3.3.5-1): one
/// copy at QoS 2, or one copy per subscription (QoS 2 and 1), as Paho's suite accepts.
/// Mosquitto 2.0.11 does the latter for MQTT 5 but FAILS for 3.1.1: it sends one copy at QoS 1.
async fn overlapping_subscriptions(v: V) {
    let b = broker().await;
    let base = uniq("overlap");
    let mut sub = client(&b, v, "sub").await;
    sub.subscribe(&format!("{base}/#"), 2).await;
    sub.subscribe(&format!("{base}/+"), 1).await;
    let mut publ = client(&b, v, "pub").await;
    publ.publish(&format!("{base}/a"), 2, b"o", false).await;
    let got = sub.barrier().await;
    let mut qos: Vec<u8> = got.iter().map(|m| m.qos).collect();
    qos.sort_unstable();
    assert!(
        qos == vec![2] || qos == vec![1, 2],
        "expected one copy at QoS 2 or copies at QoS 1 and 2, got {got:?}"
    );
}
both!(overlapping_subscriptions => v311_overlapping_subscriptions, v5_overlapping_subscriptions);

// ---------- client ids and CONNECT ----------

/// Mosquitto: a client id containing `/` (e.g. `site/dev-1`) is accepted (CONNACK 0) and the
/// client is served.
async fn client_id_with_slash(v: V) {
    let b = broker().await;
    let id = format!("site/{}", uniq_id("dev-1"));
    let (mut c, _) = Conn::connect(b.addr, v, Opts::new(&id)).await;
    let t = uniq("slash");
    c.subscribe(&t, 1).await;
    c.publish(&t, 1, b"x", false).await;
    assert_eq!(c.next_msg().await.topic, t);
}
both!(client_id_with_slash => v311_client_id_with_slash_is_accepted, v5_client_id_with_slash_is_accepted);

/// Mosquitto: any valid UTF-8 client id (non-ASCII letters, CJK, symbols, spaces) is accepted.
async fn utf8_client_id(v: V) {
    let b = broker().await;
    let id = format!("Zähler φ 电表 ✓ {}", uniq_id("u"));
    let (mut c, _) = Conn::connect(b.addr, v, Opts::new(&id)).await;
    assert!(c.ping().await);
}
both!(utf8_client_id => v311_any_utf8_client_id_is_accepted, v5_any_utf8_client_id_is_accepted);

/// Mosquitto: a 3.1.1 CONNECT with an empty client id and clean session is accepted with a
/// generated id (`auto-<uuid>`).
#[tokio::test]
async fn v311_empty_client_id_with_clean_session_is_accepted() {
    let b = broker().await;
    let (mut c, ack) = Conn::connect(b.addr, V::V311, Opts::new("")).await;
    assert!(!ack.session_present);
    assert!(c.ping().await);
}

/// Mosquitto: a 3.1.1 CONNECT with an empty client id and clean_session=0 is refused with
/// CONNACK 0x02 (identifier rejected) and closed.
#[tokio::test]
async fn v311_empty_client_id_with_persistent_session_is_refused() {
    let b = broker().await;
    let mut c = Conn::open(b.addr, V::V311).await;
    let mut o = Opts::new("");
    o.clean = false;
    let ack = c.handshake(&o).await;
    assert_eq!(ack.code, 0x02);
    c.closed().await;
}

/// Mosquitto: an MQTT 5 CONNECT with an empty client id gets CONNACK 0 with an Assigned Client
/// Identifier `auto-<uuid>`.
#[tokio::test]
async fn v5_empty_client_id_gets_assigned_client_identifier() {
    let b = broker().await;
    let (mut c, ack) = Conn::connect(b.addr, V::V5, Opts::new("")).await;
    let id = ack
        .props
        .and_then(|p| p.assigned_client_identifier)
        .expect("Assigned Client Identifier");
    assert!(id.starts_with("auto-"), "assigned id {id:?}");
    assert!(c.ping().await);
}

/// Mosquitto: keep-alive 0 (no keep-alive) is accepted; the idle client stays connected
/// (Mosquitto 2.0 answers a v5 client with Server Keep Alive 65535, its `max_keepalive`).
async fn keep_alive_zero(v: V) {
    let b = broker().await;
    let mut o = Opts::new(&uniq_id("ka0"));
    o.keep_alive = 0;
    let (mut c, _) = Conn::connect(b.addr, v, o).await;
    // Idle for longer than any keep-alive a broker could impose by mistake at 1 s resolution.
    assert!(c.recv_within(Duration::from_secs(2)).await.is_err());
    assert!(c.ping().await);
}
both!(keep_alive_zero => v311_keep_alive_zero_is_accepted, v5_keep_alive_zero_is_accepted);

/// Mosquitto: a client silent for 1.5 × its keep-alive is disconnected, and its will is
/// published.
async fn keep_alive_expiry(v: V) {
    let b = broker().await;
    let t = uniq("ka-will");
    let mut watcher = client(&b, v, "watch").await;
    watcher.subscribe(&t, 1).await;
    let mut o = Opts::new(&uniq_id("ka1")).with_will(will(&t, b"gone"));
    o.keep_alive = 1;
    let (mut c, _) = Conn::connect(b.addr, v, o).await;
    c.closed().await;
    let m = watcher.next_msg().await;
    assert_eq!(&m.payload[..], b"gone");
}
both!(keep_alive_expiry => v311_keep_alive_expiry_closes_and_publishes_will, v5_keep_alive_expiry_closes_and_publishes_will);

/// Mosquitto: a CONNECT with an unknown protocol name (`MQTX`) or level (7) gets no session:
/// the connection is closed, at most after a refusing CONNACK (0x01 unacceptable protocol
/// version / v5 0x84).
#[tokio::test]
async fn unknown_protocol_name_or_level_is_refused() {
    let b = broker().await;
    for bytes in [
        &b"\x10\x0e\x00\x04MQTX\x04\x02\x00\x3c\x00\x02id"[..],
        &b"\x10\x0e\x00\x04MQTT\x07\x02\x00\x3c\x00\x02id"[..],
    ] {
        let mut c = Conn::open(b.addr, V::V311).await;
        c.send_bytes(bytes).await;
        match c.recv().await {
            None => {}
            Some(Pkt::V4(v4::Packet::ConnAck(a))) => {
                assert_ne!(a.code, v4::ConnectReturnCode::Success);
                c.closed().await;
            }
            Some(other) => panic!("expected CONNACK refusal or close, got {other:?}"),
        }
    }
}

/// Mosquitto: an MQTT 3.1 client (protocol name `MQIsdp`, level 3) is accepted and served.
#[tokio::test]
async fn v31_mqisdp_client_is_accepted() {
    let b = broker().await;
    let mut c = Conn::open(b.addr, V::V311).await;
    c.send_bytes(&mqtt31_connect(&uniq_id("v31"), 30)).await;
    let ack = c.connack().await.expect("CONNACK");
    assert_eq!(ack.code, 0);
    let t = uniq("v31");
    c.subscribe(&t, 1).await;
    c.publish(&t, 1, b"31", false).await;
    assert_eq!(&c.next_msg().await.payload[..], b"31");
}

/// Mosquitto: a second CONNECT with the same client id takes the session over; the old
/// connection is closed. MQTT 5 (3.1.4-3) requires a DISCONNECT with reason 0x8E Session taken
/// over to the old v5 client first: Mosquitto 2.0.11 closes without it, so the v5 test FAILS on
/// Mosquitto 2.0.11.
async fn takeover(v: V) {
    let b = broker().await;
    let id = uniq_id("takeover");
    let (mut old, _) = Conn::connect(b.addr, v, Opts::new(&id)).await;
    let (mut new, _) = Conn::connect(b.addr, v, Opts::new(&id)).await;
    let d = old.closed().await;
    if v == V::V5 {
        let d = d.expect("DISCONNECT before close");
        assert_eq!(d.reason_code, v5::DisconnectReasonCode::SessionTakenOver);
    }
    assert!(new.ping().await);
}
both!(takeover => v311_client_id_takeover_closes_old_connection, v5_client_id_takeover_closes_old_connection);

/// Mosquitto: with a password file, the right user/password is accepted, a wrong password and
/// an anonymous client are refused (3.1.1: CONNACK 0x05 not authorised; v5: 0x86 bad user name
/// or password / 0x87 not authorised) and closed.
async fn credentials(v: V) {
    let b = Target::start_auth().await;
    let mut good = Opts::new(&uniq_id("good"));
    good.login = Some((AUTH_USER.into(), AUTH_PASSWORD.into()));
    let (mut c, _) = Conn::connect(b.addr, v, good).await;
    assert!(c.ping().await);

    let mut bad = Opts::new(&uniq_id("bad"));
    bad.login = Some((AUTH_USER.into(), "wrong".into()));
    for o in [bad, Opts::new(&uniq_id("anon"))] {
        let mut c = Conn::open(b.addr, v).await;
        let ack = c.handshake(&o).await;
        let refused = match v {
            V::V311 => [0x04, 0x05].contains(&ack.code),
            V::V5 => [0x86, 0x87].contains(&ack.code),
        };
        assert!(refused, "CONNACK {:#x} for {:?}", ack.code, o.login);
        c.closed().await;
    }
}
both!(credentials => v311_credentials_good_accepted_bad_refused, v5_credentials_good_accepted_bad_refused);

// ---------- sessions ----------

/// Mosquitto: QoS 1 and 2 messages published while a persistent-session client is away are
/// queued and delivered when it reconnects (session present); QoS 0 is not queued by default
/// (`queue_qos0_messages false`).
async fn offline_queueing(v: V) {
    let b = broker().await;
    let id = uniq_id("offline");
    let t = uniq("offline");
    let (mut sub, _) = Conn::connect(b.addr, v, Opts::persistent(&id, 300)).await;
    sub.subscribe(&t, 2).await;
    sub.disconnect(None).await;
    let mut publ = client(&b, v, "pub").await;
    for q in 0..3u8 {
        publ.publish(&t, q, &[q], false).await;
    }
    let (mut sub, ack) = Conn::connect(b.addr, v, Opts::persistent(&id, 300)).await;
    assert!(ack.session_present, "session present");
    let got = sub.barrier().await;
    let qos: Vec<u8> = got.iter().map(|m| m.payload[0]).collect();
    assert!(
        qos == vec![1, 2] || qos == vec![0, 1, 2],
        "queued while offline: {got:?}"
    );
    for m in &got {
        assert_eq!(m.qos, m.payload[0], "delivered at the published QoS");
    }
}
both!(offline_queueing => v311_persistent_session_queues_qos1_qos2_while_offline, v5_persistent_session_queues_qos1_qos2_while_offline);

/// Mosquitto (`max_queued_messages 1000`, the default): of 1,100 QoS 1 messages published while
/// a persistent client is away, the first 1,000 are queued and delivered in order on reconnect
/// and the rest are dropped (Mosquitto may keep up to `max_inflight_messages` (20) more that it
/// counts as in flight).
async fn offline_queue_bound(v: V) {
    let b = broker().await;
    let id = uniq_id("bound");
    let t = uniq("bound");
    let (mut sub, _) = Conn::connect(b.addr, v, Opts::persistent(&id, 300)).await;
    sub.subscribe(&t, 1).await;
    sub.disconnect(None).await;
    let mut publ = client(&b, v, "pub").await;
    for i in 0..1100u32 {
        publ.publish(&t, 1, &i.to_be_bytes(), false).await;
    }
    let (mut sub, ack) = Conn::connect(b.addr, v, Opts::persistent(&id, 300)).await;
    assert!(ack.session_present);
    let mut got = Vec::new();
    while let Ok(Some(m)) = sub.msg_within(QUIET).await {
        got.push(u32::from_be_bytes(
            m.payload[..4].try_into().expect("4 bytes"),
        ));
    }
    assert!(
        (1000..=1020).contains(&got.len()),
        "{} of 1100 delivered",
        got.len()
    );
    let expected: Vec<u32> = (0..got.len() as u32).collect();
    assert_eq!(got, expected, "the oldest messages are kept, in order");
}
both!(offline_queue_bound => v311_offline_queue_is_bounded_by_max_queued_messages, v5_offline_queue_is_bounded_by_max_queued_messages);

/// Mosquitto: a QoS 1 and a QoS 2 message sent to a persistent-session client that closes before
/// acknowledging them are sent again with DUP set on reconnect.
async fn redelivery_with_dup(v: V) {
    let b = broker().await;
    let id = uniq_id("redeliver");
    let t = uniq("redeliver");
    let (mut sub, _) = Conn::connect(b.addr, v, Opts::persistent(&id, 300)).await;
    sub.subscribe(&t, 2).await;
    sub.auto_ack = false;
    let mut publ = client(&b, v, "pub").await;
    publ.publish(&t, 1, b"q1", false).await;
    publ.publish(&t, 2, b"q2", false).await;
    let first = [sub.next_msg().await, sub.next_msg().await];
    assert!(first.iter().all(|m| !m.dup));
    sub.drop_abruptly();
    let (mut sub, ack) = Conn::connect(b.addr, v, Opts::persistent(&id, 300)).await;
    assert!(ack.session_present);
    let again = [sub.next_msg().await, sub.next_msg().await];
    for (a, b) in first.iter().zip(again.iter()) {
        assert_eq!(a.payload, b.payload);
        assert_eq!(a.qos, b.qos);
        assert!(b.dup, "resent with DUP: {b:?}");
    }
}
both!(redelivery_with_dup => v311_unacked_messages_redelivered_with_dup_after_reconnect, v5_unacked_messages_redelivered_with_dup_after_reconnect);

// ---------- wills ----------

/// Mosquitto: the will is published when the connection closes without DISCONNECT.
async fn will_on_abnormal_close(v: V) {
    let b = broker().await;
    let t = uniq("will");
    let mut watcher = client(&b, v, "watch").await;
    watcher.subscribe(&t, 1).await;
    let o = Opts::new(&uniq_id("dies")).with_will(will(&t, b"died"));
    let (c, _) = Conn::connect(b.addr, v, o).await;
    c.drop_abruptly();
    let m = watcher.next_msg().await;
    assert_eq!(m.topic, t);
    assert_eq!(&m.payload[..], b"died");
}
both!(will_on_abnormal_close => v311_will_published_on_abnormal_close, v5_will_published_on_abnormal_close);

/// Mosquitto: no will after a clean DISCONNECT.
async fn no_will_on_disconnect(v: V) {
    let b = broker().await;
    let t = uniq("no-will");
    let mut watcher = client(&b, v, "watch").await;
    watcher.subscribe(&t, 1).await;
    let o = Opts::new(&uniq_id("clean")).with_will(will(&t, b"should-not"));
    let (c, _) = Conn::connect(b.addr, v, o).await;
    c.disconnect(None).await;
    let got = watcher.barrier().await;
    assert!(got.is_empty(), "will after clean DISCONNECT: {got:?}");
}
both!(no_will_on_disconnect => v311_no_will_on_clean_disconnect, v5_no_will_on_clean_disconnect);

/// Mosquitto: an MQTT 5 DISCONNECT with reason 0x04 (Disconnect with Will Message) publishes
/// the will.
#[tokio::test]
async fn v5_disconnect_with_will_message_publishes_will() {
    let b = broker().await;
    let t = uniq("will-04");
    let mut watcher = client(&b, V::V5, "watch").await;
    watcher.subscribe(&t, 1).await;
    let o = Opts::new(&uniq_id("w04")).with_will(will(&t, b"asked"));
    let (mut c, _) = Conn::connect(b.addr, V::V5, o).await;
    let d = v5::Disconnect::new(v5::DisconnectReasonCode::DisconnectWithWillMessage);
    c.send(Pkt::V5(v5::Packet::Disconnect(d))).await;
    let m = watcher.next_msg().await;
    assert_eq!(&m.payload[..], b"asked");
}

/// Mosquitto: will properties (user properties, content type, payload format indicator) are
/// published with the will.
#[tokio::test]
async fn v5_will_properties_are_forwarded() {
    let b = broker().await;
    let t = uniq("will-props");
    let mut watcher = client(&b, V::V5, "watch").await;
    watcher.subscribe(&t, 1).await;
    let mut w = will(&t, b"{\"gone\":true}");
    w.props = Some(v5::LastWillProperties {
        delay_interval: None,
        payload_format_indicator: Some(1),
        message_expiry_interval: None,
        content_type: Some("application/json".into()),
        response_topic: None,
        correlation_data: None,
        user_properties: vec![("site".into(), "north".into())],
    });
    let (c, _) = Conn::connect(b.addr, V::V5, Opts::new(&uniq_id("wp")).with_will(w)).await;
    c.drop_abruptly();
    let m = watcher.next_msg().await;
    let p = m.props.expect("will properties");
    assert_eq!(p.payload_format_indicator, Some(1));
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert_eq!(p.user_properties, vec![("site".into(), "north".into())]);
}

// ---------- shared subscriptions ----------

/// Mosquitto: each message published to a topic with a `$share/g/topic` group is delivered to
/// exactly one member of the group (round robin); a plain subscriber gets all of them.
async fn shared_subscription(v: V) {
    let b = broker().await;
    let t = uniq("shared");
    let group = uniq_id("g");
    let mut members = Vec::new();
    for i in 0..2 {
        let mut m = client(&b, v, &format!("member{i}")).await;
        assert_eq!(m.subscribe(&format!("$share/{group}/{t}"), 1).await, 1);
        members.push(m);
    }
    let mut plain = client(&b, v, "plain").await;
    plain.subscribe(&t, 1).await;
    let mut publ = client(&b, v, "pub").await;
    for i in 0..20u8 {
        publ.publish(&t, 1, &[i], false).await;
    }
    let mut count = BTreeMap::new();
    for m in members.iter_mut() {
        for msg in m.barrier().await {
            *count.entry(msg.payload[0]).or_insert(0) += 1;
        }
    }
    let expected: BTreeMap<u8, i32> = (0..20u8).map(|i| (i, 1)).collect();
    assert_eq!(count, expected, "each message to exactly one member");
    assert_eq!(plain.barrier().await.len(), 20, "plain subscriber gets all");
}
both!(shared_subscription => v311_shared_subscription_delivers_each_message_to_one_member, v5_shared_subscription_delivers_each_message_to_one_member);

// ---------- MQTT 5 only ----------

fn v5_publish(topic: &str, qos: u8, payload: &[u8], props: v5::PublishProperties) -> Pkt {
    let mut p = v5::Publish::new(topic, qos5(qos), payload.to_vec(), Some(props));
    p.pkid = 0;
    Pkt::V5(v5::Packet::Publish(p))
}

/// Mosquitto: user properties (order and duplicates kept), response topic, correlation data,
/// content type and payload format indicator reach v5 subscribers unchanged; a 3.1.1 subscriber
/// gets the payload.
#[tokio::test]
async fn v5_publish_properties_are_forwarded() {
    let b = broker().await;
    let t = uniq("props");
    let mut sub = client(&b, V::V5, "sub5").await;
    sub.subscribe(&t, 1).await;
    let mut sub4 = client(&b, V::V311, "sub4").await;
    sub4.subscribe(&t, 1).await;
    let mut publ = client(&b, V::V5, "pub").await;
    let props = v5::PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("text/plain".into()),
        response_topic: Some("reply/here".into()),
        correlation_data: Some(Bytes::from_static(b"\x00corr\xff")),
        user_properties: vec![
            ("k".into(), "1".into()),
            ("k".into(), "2".into()),
            ("other".into(), "ü".into()),
        ],
        ..Default::default()
    };
    let mut p = v5_publish(&t, 1, b"hello", props.clone());
    if let Pkt::V5(v5::Packet::Publish(p)) = &mut p {
        p.pkid = publ.pkid();
    }
    publ.publish_flow(p).await;
    let m = sub.next_msg().await;
    let got = m.props.expect("properties");
    assert_eq!(got.payload_format_indicator, props.payload_format_indicator);
    assert_eq!(got.content_type, props.content_type);
    assert_eq!(got.response_topic, props.response_topic);
    assert_eq!(got.correlation_data, props.correlation_data);
    assert_eq!(got.user_properties, props.user_properties);
    assert_eq!(&sub4.next_msg().await.payload[..], b"hello");
}

/// Mosquitto: request/response between two MQTT 5 clients (rumqttc): the responder answers on
/// the request's response topic with its correlation data, and the requester gets both back.
#[tokio::test]
async fn v5_request_response_between_two_clients() {
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let b = broker().await;
    let req_topic = uniq("req");
    let resp_topic = uniq("resp");
    let opts = |id: &str| {
        let mut o = MqttOptions::new(uniq_id(id), b.addr.ip().to_string(), b.addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    };
    let (responder, mut rl) = AsyncClient::new(opts("responder"), 16);
    let (requester, mut ql) = AsyncClient::new(opts("requester"), 16);
    responder
        .subscribe(req_topic.clone(), qos5(1))
        .await
        .expect("queued");
    requester
        .subscribe(resp_topic.clone(), qos5(1))
        .await
        .expect("queued");
    // Wait for both SUBACKs.
    for el in [&mut rl, &mut ql] {
        timeout(WAIT, async {
            loop {
                if let Event::Incoming(v5::Packet::SubAck(_)) = el.poll().await.expect("poll") {
                    return;
                }
            }
        })
        .await
        .expect("SUBACK in time");
    }
    let responder_task = tokio::spawn(async move {
        loop {
            if let Event::Incoming(v5::Packet::Publish(p)) = rl.poll().await.expect("poll") {
                let props = p.properties.expect("request properties");
                let reply = v5::PublishProperties {
                    correlation_data: props.correlation_data,
                    ..Default::default()
                };
                let to = props.response_topic.expect("response topic");
                responder
                    .publish_with_properties(to, qos5(1), false, b"pong".to_vec(), reply)
                    .await
                    .expect("queued");
                // Keep polling so the reply goes out.
                loop {
                    rl.poll().await.expect("poll");
                }
            }
        }
    });
    let req = v5::PublishProperties {
        response_topic: Some(resp_topic.clone()),
        correlation_data: Some(Bytes::from_static(b"id-42")),
        ..Default::default()
    };
    requester
        .publish_with_properties(req_topic, qos5(1), false, b"ping".to_vec(), req)
        .await
        .expect("queued");
    let reply = timeout(WAIT, async {
        loop {
            if let Event::Incoming(v5::Packet::Publish(p)) = ql.poll().await.expect("poll") {
                return p;
            }
        }
    })
    .await
    .expect("response in time");
    responder_task.abort();
    assert_eq!(&reply.topic[..], resp_topic.as_bytes());
    assert_eq!(&reply.payload[..], b"pong");
    assert_eq!(
        reply.properties.and_then(|p| p.correlation_data),
        Some(Bytes::from_static(b"id-42"))
    );
}

/// Mosquitto: a queued message whose Message Expiry Interval passes while the subscriber is
/// away is not delivered; one still valid is delivered with the interval reduced by the time it
/// waited.
#[tokio::test]
async fn v5_message_expiry() {
    let b = broker().await;
    let id = uniq_id("expiry");
    let t = uniq("expiry");
    let (mut sub, _) = Conn::connect(b.addr, V::V5, Opts::persistent(&id, 300)).await;
    sub.subscribe(&t, 1).await;
    sub.disconnect(None).await;
    let mut publ = client(&b, V::V5, "pub").await;
    for (payload, expiry) in [(&b"short"[..], 1u32), (&b"long"[..], 60)] {
        let props = v5::PublishProperties {
            message_expiry_interval: Some(expiry),
            ..Default::default()
        };
        let mut p = v5_publish(&t, 1, payload, props);
        if let Pkt::V5(v5::Packet::Publish(p)) = &mut p {
            p.pkid = publ.pkid();
        }
        publ.publish_flow(p).await;
    }
    // The subject of the test is the passage of time: let the 1 s interval run out.
    sleep(Duration::from_millis(2500)).await;
    let (mut sub, ack) = Conn::connect(b.addr, V::V5, Opts::persistent(&id, 300)).await;
    assert!(ack.session_present);
    let got = sub.barrier().await;
    assert_eq!(got.len(), 1, "only the unexpired message: {got:?}");
    assert_eq!(&got[0].payload[..], b"long");
    let left = got[0]
        .props
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
        .expect("remaining expiry interval");
    assert!((1..=58).contains(&left), "remaining interval {left}");
}

/// Mosquitto: a session whose Session Expiry Interval has passed is gone (session present 0, no
/// queued messages); before that, it is resumed with its subscriptions. Expiry 0 ends the
/// session with the connection; the interval sent in DISCONNECT replaces the CONNECT one
/// (raised from 1 s to 60 s: kept; set to 0: ended at once).
#[tokio::test]
async fn v5_session_expiry() {
    let b = broker().await;
    let short_id = uniq_id("sess-short");
    let long_id = uniq_id("sess-long");
    let raised_id = uniq_id("sess-raised");
    let t = uniq("sess");
    // Expiry 0 (and no expiry property, in MQTT 5): the session ends with the connection.
    let zero_id = uniq_id("sess-zero");
    let (mut c, _) = Conn::connect(b.addr, V::V5, Opts::persistent(&zero_id, 0)).await;
    c.subscribe(&t, 1).await;
    c.disconnect(None).await;
    let (c, ack) = Conn::connect(b.addr, V::V5, Opts::persistent(&zero_id, 0)).await;
    assert!(!ack.session_present, "session with expiry 0 kept");
    // DISCONNECT with Session Expiry 0 ends a session that had a longer one.
    c.disconnect(None).await;
    let ended_id = uniq_id("sess-ended");
    let (mut c, _) = Conn::connect(b.addr, V::V5, Opts::persistent(&ended_id, 60)).await;
    c.subscribe(&t, 1).await;
    c.disconnect(Some(0)).await;
    let (c, ack) = Conn::connect(b.addr, V::V5, Opts::persistent(&ended_id, 60)).await;
    assert!(
        !ack.session_present,
        "DISCONNECT with expiry 0 kept the session"
    );
    c.disconnect(Some(0)).await;

    for (id, exp, at_disconnect) in [
        (&short_id, 1, None),
        (&long_id, 60, None),
        (&raised_id, 1, Some(60)),
    ] {
        let (mut c, _) = Conn::connect(b.addr, V::V5, Opts::persistent(id, exp)).await;
        c.subscribe(&t, 1).await;
        c.disconnect(at_disconnect).await;
    }
    // The subject of the test is the passage of time: let the 1 s session expire.
    sleep(Duration::from_millis(2500)).await;
    let mut publ = client(&b, V::V5, "pub").await;
    publ.publish(&t, 1, b"while away", false).await;

    let (mut short, ack) = Conn::connect(b.addr, V::V5, Opts::persistent(&short_id, 1)).await;
    assert!(!ack.session_present, "expired session resumed");
    assert!(short.barrier().await.is_empty());
    for id in [&long_id, &raised_id] {
        let (mut long, ack) = Conn::connect(b.addr, V::V5, Opts::persistent(id, 60)).await;
        assert!(ack.session_present, "unexpired session {id} lost");
        let got = long.barrier().await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(&got[0].payload[..], b"while away");
    }
}

fn delayed_will(topic: &str, delay: u32) -> Will {
    let mut w = will(topic, b"late");
    w.props = Some(v5::LastWillProperties {
        delay_interval: Some(delay),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    });
    w
}

/// Mosquitto: with a Will Delay Interval, a client that reconnects (same id) before the delay
/// ends cancels its will; one that stays away gets its will published after the delay.
#[tokio::test]
async fn v5_will_delay_interval() {
    let b = broker().await;
    let t_back = uniq("will-delay-back");
    let t_gone = uniq("will-delay-gone");
    let mut watcher = client(&b, V::V5, "watch").await;
    watcher.subscribe(&t_back, 1).await;
    watcher.subscribe(&t_gone, 1).await;

    let back_id = uniq_id("back");
    let o = Opts::persistent(&back_id, 30).with_will(delayed_will(&t_back, 2));
    let (c, _) = Conn::connect(b.addr, V::V5, o).await;
    c.drop_abruptly();
    let (back, _) = Conn::connect(b.addr, V::V5, Opts::persistent(&back_id, 30)).await;

    let o = Opts::persistent(&uniq_id("gone"), 30).with_will(delayed_will(&t_gone, 1));
    let (c, _) = Conn::connect(b.addr, V::V5, o).await;
    c.drop_abruptly();
    let m = watcher.next_msg().await;
    assert_eq!(m.topic, t_gone, "the will of the client that stayed away");
    // The subject of the test is the passage of time: outlast the 2 s delay of the other will.
    sleep(Duration::from_millis(3000)).await;
    let got = watcher.barrier().await;
    assert!(got.is_empty(), "will of a client that came back: {got:?}");
    drop(back);
}

/// Toward a client whose CONNECT says Receive Maximum 2, at most 2 QoS 1 messages may be
/// unacknowledged at a time (MQTT-3.3.4-9); the next one follows each PUBACK. Mosquitto 2.0.11
/// holds the first two, but after the first PUBACK it sends two more (3 unacknowledged): it FAILS
/// this test.
#[tokio::test]
async fn v5_receive_maximum_is_respected() {
    let b = broker().await;
    let t = uniq("recv-max");
    let mut o = Opts::new(&uniq_id("rm2"));
    o.props().receive_maximum = Some(2);
    let (mut sub, _) = Conn::connect(b.addr, V::V5, o).await;
    sub.subscribe(&t, 1).await;
    sub.auto_ack = false;
    let mut publ = client(&b, V::V5, "pub").await;
    for i in 0..5u8 {
        publ.publish(&t, 1, &[i], false).await;
    }
    let a = sub.next_msg().await;
    let b2 = sub.next_msg().await;
    assert_eq!((a.payload[0], b2.payload[0]), (0, 1));
    sub.assert_no_msg().await;
    sub.ack(&a).await;
    let c = sub.next_msg().await;
    assert_eq!(c.payload[0], 2);
    sub.assert_no_msg().await;
    sub.ack(&b2).await;
    sub.ack(&c).await;
    let rest = [sub.next_msg().await, sub.next_msg().await];
    assert_eq!((rest[0].payload[0], rest[1].payload[0]), (3, 4));
}

/// Mosquitto: a message larger than the Maximum Packet Size the client set in CONNECT is not sent
/// to that client (dropped for it); smaller ones are.
#[tokio::test]
async fn v5_client_maximum_packet_size_is_respected() {
    let b = broker().await;
    let t = uniq("max-packet");
    let mut o = Opts::new(&uniq_id("small"));
    o.props().max_packet_size = Some(256);
    let (mut sub, _) = Conn::connect(b.addr, V::V5, o).await;
    sub.subscribe(&t, 1).await;
    let mut publ = client(&b, V::V5, "pub").await;
    publ.publish(&t, 1, &[b'x'; 1000], false).await;
    publ.publish(&t, 1, b"small", false).await;
    let got = sub.next_msg().await;
    assert_eq!(
        &got.payload[..],
        b"small",
        "oversized message sent: {got:?}"
    );
}

/// Mosquitto: with No Local a client does not get its own publishes on that subscription.
#[tokio::test]
async fn v5_subscription_option_no_local() {
    let b = broker().await;
    let t = uniq("no-local");
    let mut c = client(&b, V::V5, "self").await;
    let mut f = v5::Filter::new(t.clone(), qos5(1));
    f.nolocal = true;
    c.subscribe_v5(vec![f], None).await;
    c.publish(&t, 1, b"own", false).await;
    let mut other = client(&b, V::V5, "other").await;
    other.publish(&t, 1, b"other", false).await;
    let m = c.next_msg().await;
    assert_eq!(&m.payload[..], b"other", "own message delivered: {m:?}");
}

/// Mosquitto: Retain As Published keeps the RETAIN flag of a live retained publish; without it
/// the flag is cleared on live delivery.
#[tokio::test]
async fn v5_subscription_option_retain_as_published() {
    let b = broker().await;
    let t = uniq("rap");
    let mut rap = client(&b, V::V5, "rap").await;
    let mut f = v5::Filter::new(t.clone(), qos5(1));
    f.preserve_retain = true;
    rap.subscribe_v5(vec![f], None).await;
    let mut plain = client(&b, V::V5, "plain").await;
    plain.subscribe(&t, 1).await;
    let mut publ = client(&b, V::V5, "pub").await;
    publ.publish(&t, 1, b"r", true).await;
    assert!(rap.next_msg().await.retain, "Retain As Published");
    assert!(!plain.next_msg().await.retain, "RETAIN cleared without it");
    publ.publish(&t, 1, b"", true).await;
}

/// Mosquitto: Retain Handling 0 sends retained messages on every SUBSCRIBE, 1 only when the
/// subscription is new, 2 never.
#[tokio::test]
async fn v5_subscription_option_retain_handling() {
    let b = broker().await;
    let t = uniq("rh");
    let mut publ = client(&b, V::V5, "pub").await;
    publ.publish(&t, 1, b"stored", true).await;
    for (rule, first, second) in [
        (v5::RetainForwardRule::OnEverySubscribe, 1, 1),
        (v5::RetainForwardRule::OnNewSubscribe, 1, 0),
        (v5::RetainForwardRule::Never, 0, 0),
    ] {
        let mut c = client(&b, V::V5, "rh").await;
        for want in [first, second] {
            let mut f = v5::Filter::new(t.clone(), qos5(1));
            f.retain_forward_rule = rule.clone();
            c.subscribe_v5(vec![f], None).await;
            let got = c.barrier().await;
            assert_eq!(got.len(), want, "{rule:?}: {got:?}");
        }
    }
}

/// Mosquitto: a message carries the Subscription Identifiers of the subscriptions it matched
/// (one copy per subscription in Mosquitto 2, each with its own identifier).
#[tokio::test]
async fn v5_subscription_identifiers() {
    let b = broker().await;
    let base = uniq("sub-id");
    let mut c = client(&b, V::V5, "ids").await;
    c.subscribe_v5(vec![v5::Filter::new(format!("{base}/+"), qos5(1))], Some(7))
        .await;
    c.subscribe_v5(vec![v5::Filter::new(format!("{base}/a"), qos5(1))], Some(9))
        .await;
    let mut publ = client(&b, V::V5, "pub").await;
    publ.publish(&format!("{base}/a"), 1, b"a", false).await;
    publ.publish(&format!("{base}/b"), 1, b"b", false).await;
    let got = c.barrier().await;
    let ids = |topic: &str| -> BTreeSet<usize> {
        got.iter()
            .filter(|m| m.topic == topic)
            .flat_map(|m| {
                m.props
                    .as_ref()
                    .map(|p| p.subscription_identifiers.clone())
                    .unwrap_or_default()
            })
            .collect()
    };
    assert_eq!(ids(&format!("{base}/a")), BTreeSet::from([7, 9]), "{got:?}");
    assert_eq!(ids(&format!("{base}/b")), BTreeSet::from([7]), "{got:?}");
}

/// Mosquitto (topic alias maximum 10 in CONNACK): a client may set a topic alias and then publish
/// with the alias and an empty topic; an alias above the maximum the broker announced gets
/// DISCONNECT 0x94 Topic Alias invalid.
#[tokio::test]
async fn v5_topic_alias_from_client() {
    let b = broker().await;
    let t = uniq("alias");
    let mut sub = client(&b, V::V5, "sub").await;
    sub.subscribe(&t, 1).await;
    let (mut publ, ack) = Conn::connect(b.addr, V::V5, Opts::new(&uniq_id("aliaser"))).await;
    let max = ack.props.and_then(|p| p.topic_alias_max).unwrap_or(0);
    assert!(max >= 1, "broker announces topic aliases");
    for (topic, payload) in [(t.as_str(), b"first"), ("", b"again")] {
        let props = v5::PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        };
        let mut p = v5_publish(topic, 1, payload, props);
        if let Pkt::V5(v5::Packet::Publish(p)) = &mut p {
            p.pkid = publ.pkid();
        }
        publ.publish_flow(p).await;
    }
    for want in [&b"first"[..], b"again"] {
        let m = sub.next_msg().await;
        assert_eq!(m.topic, t);
        assert_eq!(&m.payload[..], want);
    }
    let props = v5::PublishProperties {
        topic_alias: Some(max.saturating_add(1)),
        ..Default::default()
    };
    publ.send(v5_publish(&t, 0, b"bad", props)).await;
    let d = publ.closed().await.expect("DISCONNECT before close");
    assert_eq!(d.reason_code, v5::DisconnectReasonCode::TopicAliasInvalid);
}
