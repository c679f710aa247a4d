//! Pure MQTT helpers for the front listener: framing, CONNECT inspection and rewriting, and the
//! classification of every client → broker packet. Bytes in, values or bytes out; no sockets, no
//! clock. Packet parsing and serialising is rumqttc's `mqttbytes` (v4) and `v5::mqttbytes::v5`;
//! the only hand-written MQTT here is the 3.1 → 3.1.1 CONNECT header swap and the MQTT variable
//! byte integer it needs.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// Largest topic alias a v5 client may use; rumqttd advertises the same value in its CONNACK and
/// disconnects clients that exceed it.
pub const MAX_TOPIC_ALIAS: u16 = 4096;

/// A complete, not yet parsed MQTT packet.
pub type Frame = Bytes;

/// Why a client's bytes were refused. Each one closes that client only.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("packet of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("malformed packet")]
    MalformedV4(#[source] rumqttc::mqttbytes::Error),
    #[error("malformed packet")]
    MalformedV5(#[source] rumqttc::v5::mqttbytes::Error),
    #[error("first packet is not connect")]
    NotConnect,
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol { name: String, level: u8 },
    #[error("a client must not send {0}")]
    ServerOnlyPacket(&'static str),
    #[error("publish topic is not valid utf-8 or contains a wildcard")]
    InvalidTopic,
    #[error("topic alias {0} is out of range or unknown")]
    InvalidTopicAlias(u16),
    #[error("invalid subscription filter {0:?}")]
    InvalidFilter(String),
}

/// Which protocol a connection speaks, chosen from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1 ("MQIsdp", level 3): served by the v4 backend after a CONNECT header swap.
    V31,
    /// MQTT 3.1.1 (level 4): the v4 backend.
    V311,
    /// MQTT 5 (level 5): the v5 backend.
    V5,
}

impl Version {
    /// True for the versions served by rumqttd's v4 listener.
    pub fn is_v4(self) -> bool {
        matches!(self, Version::V31 | Version::V311)
    }
}

/// Take the next complete packet from `buf`, if one is there. Errors when the announced size
/// exceeds `max` (whole packet, header included, as Mosquitto counts it) or the length is bad.
pub fn next_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, Error> {
    match rumqttc::mqttbytes::check(buf.iter(), max) {
        Ok(header) if header.frame_length() > max => Err(Error::TooLarge {
            size: header.frame_length(),
            max,
        }),
        Ok(header) => Ok(Some(buf.split_to(header.frame_length()).freeze())),
        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size)) => {
            Err(Error::TooLarge { size, max })
        }
        Err(e) => Err(Error::MalformedV4(e)),
    }
}

/// Fixed-header packet type of a frame (upper nibble of the first byte).
pub fn packet_type(frame: &[u8]) -> u8 {
    frame.first().map_or(0, |b| b >> 4)
}

/// Packet type number of PINGRESP.
pub const PINGRESP: u8 = 13;
/// Packet type number of CONNACK.
pub const CONNACK: u8 = 2;
/// A PINGREQ on the wire.
pub const PINGREQ_BYTES: [u8; 2] = [0xC0, 0x00];

/// The protocol name and level of a CONNECT frame, read without parsing the rest.
pub fn connect_version(frame: &[u8]) -> Result<Version, Error> {
    if packet_type(frame) != 1 {
        return Err(Error::NotConnect);
    }
    let (name, level, _) = connect_header(frame).ok_or(Error::NotConnect)?;
    match (name, level) {
        ("MQTT", 4) => Ok(Version::V311),
        ("MQTT", 5) => Ok(Version::V5),
        ("MQIsdp", 3) => Ok(Version::V31),
        (name, level) => Err(Error::UnsupportedProtocol {
            name: name.to_owned(),
            level,
        }),
    }
}

/// Protocol name, level, and the offset just after the level byte.
fn connect_header(frame: &[u8]) -> Option<(&str, u8, usize)> {
    let mut i = 1;
    // Skip the remaining-length variable byte integer (at most 4 bytes).
    loop {
        let b = *frame.get(i)?;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return None;
        }
    }
    let len = u16::from_be_bytes([*frame.get(i)?, *frame.get(i + 1)?]) as usize;
    let name = std::str::from_utf8(frame.get(i + 2..i + 2 + len)?).ok()?;
    let level = *frame.get(i + 2 + len)?;
    Some((name, level, i + 3 + len))
}

/// Rewrite an MQTT 3.1 CONNECT ("MQIsdp", level 3) as the 3.1.1 CONNECT with the same flags,
/// keep-alive and payload ("MQTT", level 4); the two differ only in that header.
fn mqisdp_to_mqtt311(frame: &[u8]) -> Result<BytesMut, Error> {
    let (_, _, rest_at) = connect_header(frame).ok_or(Error::NotConnect)?;
    let rest = &frame[rest_at..];
    let body_len = 2 + 4 + 1 + rest.len();
    let mut out = BytesMut::with_capacity(body_len + 5);
    out.put_u8(0x10);
    put_remaining_length(&mut out, body_len);
    out.put_u16(4);
    out.put_slice(b"MQTT");
    out.put_u8(4);
    out.put_slice(rest);
    Ok(out)
}

/// MQTT variable byte integer (the fixed header's remaining length).
fn put_remaining_length(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

/// A parsed CONNECT, in the codec of the backend that will serve it. One lives briefly per
/// connection attempt, so the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Connect {
    /// MQTT 3.1 or 3.1.1, as a 3.1.1 CONNECT.
    V4(v4::Connect),
    /// MQTT 5.
    V5(v5::Connect, Option<v5::LastWill>, Option<v5::Login>),
}

impl Connect {
    /// Parse a CONNECT frame of the given version.
    pub fn parse(version: Version, frame: &[u8]) -> Result<Connect, Error> {
        match version {
            Version::V31 => {
                let mut buf = mqisdp_to_mqtt311(frame)?;
                read_v4_connect(&mut buf)
            }
            Version::V311 => read_v4_connect(&mut BytesMut::from(frame)),
            Version::V5 => {
                match v5::Packet::read(&mut BytesMut::from(frame), None)
                    .map_err(Error::MalformedV5)?
                {
                    v5::Packet::Connect(c, will, login) => Ok(Connect::V5(c, will, login)),
                    _ => Err(Error::NotConnect),
                }
            }
        }
    }

    pub fn client_id(&self) -> &str {
        match self {
            Connect::V4(c) => &c.client_id,
            Connect::V5(c, ..) => &c.client_id,
        }
    }

    pub fn set_client_id(&mut self, id: String) {
        match self {
            Connect::V4(c) => c.client_id = id,
            Connect::V5(c, ..) => c.client_id = id,
        }
    }

    pub fn clean(&self) -> bool {
        match self {
            Connect::V4(c) => c.clean_session,
            Connect::V5(c, ..) => c.clean_start,
        }
    }

    pub fn keep_alive(&self) -> u16 {
        match self {
            Connect::V4(c) => c.keep_alive,
            Connect::V5(c, ..) => c.keep_alive,
        }
    }

    pub fn set_keep_alive(&mut self, secs: u16) {
        match self {
            Connect::V4(c) => c.keep_alive = secs,
            Connect::V5(c, ..) => c.keep_alive = secs,
        }
    }

    /// Username and password, empty strings when absent.
    pub fn credentials(&self) -> (&str, &str) {
        match self {
            Connect::V4(c) => c
                .login
                .as_ref()
                .map_or(("", ""), |l| (&l.username, &l.password)),
            Connect::V5(_, _, login) => login
                .as_ref()
                .map_or(("", ""), |l| (&l.username, &l.password)),
        }
    }

    /// Drop the will's v5 properties: rumqttd 0.20 would publish them to v3.1.1 subscribers,
    /// which crashes their connections (see [`Session::inbound`]).
    pub fn strip_will_properties(&mut self) {
        if let Connect::V5(_, Some(will), _) = self {
            will.properties = None;
        }
    }

    /// Hide the client's Topic Alias Maximum from rumqttd: rumqttd 0.20 keys its outgoing aliases
    /// by subscription filter, not topic, so with a wildcard subscription a second topic would
    /// be delivered under the first topic's alias, i.e. with the wrong topic.
    pub fn disable_broker_topic_aliases(&mut self) {
        if let Connect::V5(c, ..) = self {
            if let Some(props) = c.properties.as_mut() {
                props.topic_alias_max = None;
            }
        }
    }

    /// Drop the password so the backend (which does no auth) never holds it.
    pub fn strip_password(&mut self) {
        match self {
            Connect::V4(c) => {
                c.login = c
                    .login
                    .take()
                    .and_then(|l| (!l.username.is_empty()).then(|| v4::Login::new(l.username, "")))
            }
            Connect::V5(_, _, login) => {
                *login = login
                    .take()
                    .and_then(|l| (!l.username.is_empty()).then(|| v5::Login::new(l.username, "")))
            }
        }
    }

    /// Serialise for the backend.
    pub fn to_bytes(&self) -> Result<Bytes, Error> {
        let mut out = BytesMut::new();
        match self {
            Connect::V4(c) => {
                c.write(&mut out).map_err(Error::MalformedV4)?;
            }
            Connect::V5(c, will, login) => {
                c.write(will, login, &mut out).map_err(Error::MalformedV5)?;
            }
        }
        Ok(out.freeze())
    }
}

fn read_v4_connect(buf: &mut BytesMut) -> Result<Connect, Error> {
    match v4::Packet::read(buf, usize::MAX).map_err(Error::MalformedV4)? {
        v4::Packet::Connect(c) => Ok(Connect::V4(c)),
        _ => Err(Error::NotConnect),
    }
}

/// A refusal CONNACK in the client's protocol.
pub fn connack_refused(version: Version, reason: Refusal) -> Bytes {
    let mut out = BytesMut::new();
    // Writing a two- or three-byte CONNACK into a growable buffer cannot fail.
    match version {
        Version::V31 | Version::V311 => {
            let code = match reason {
                Refusal::ProtocolVersion => v4::ConnectReturnCode::RefusedProtocolVersion,
                Refusal::ClientId => v4::ConnectReturnCode::BadClientId,
                Refusal::NotAuthorized => v4::ConnectReturnCode::NotAuthorized,
                Refusal::ServerUnavailable => v4::ConnectReturnCode::ServiceUnavailable,
            };
            let _ = v4::ConnAck::new(code, false).write(&mut out);
        }
        Version::V5 => {
            let code = match reason {
                Refusal::ProtocolVersion => v5::ConnectReturnCode::UnsupportedProtocolVersion,
                Refusal::ClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                Refusal::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
                Refusal::ServerUnavailable => v5::ConnectReturnCode::ServerUnavailable,
            };
            let ack = v5::ConnAck {
                session_present: false,
                code,
                properties: None,
            };
            let _ = ack.write(&mut out);
        }
    }
    out.freeze()
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Protocol name or level we do not serve.
    ProtocolVersion,
    /// Empty client id where the protocol does not allow one.
    ClientId,
    /// Wrong or missing username/password.
    NotAuthorized,
    /// rumqttd cannot be reached.
    ServerUnavailable,
}

/// A v5 DISCONNECT with the given reason and an empty property list, sent before the front
/// closes a v5 client. Built by hand: rumqttc 0.25's `Disconnect::write` appends a property
/// length its remaining length does not count, and its reader rejects the shorter valid form
/// without a property length, so this is the form every client parses.
pub fn v5_disconnect(reason: v5::DisconnectReasonCode) -> Bytes {
    Bytes::from(vec![0xE0, 0x02, reason as u8, 0x00])
}

/// Rewrite rumqttd's v5 CONNACK: add the client id the front assigned (rumqttd never saw an empty
/// one) and advertise the front's packet size limit. Returns the frame unchanged if it does not
/// parse as a v5 CONNACK.
pub fn rewrite_v5_connack(
    frame: Frame,
    assigned_id: Option<&str>,
    max_packet_size: usize,
) -> Frame {
    let Ok(v5::Packet::ConnAck(mut ack)) = v5::Packet::read(&mut BytesMut::from(&frame[..]), None)
    else {
        return frame;
    };
    let props = ack.properties.get_or_insert_with(|| v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    });
    if let Some(id) = assigned_id {
        props.assigned_client_identifier = Some(id.to_owned());
    }
    props.max_packet_size = Some(u32::try_from(max_packet_size).unwrap_or(u32::MAX));
    let mut out = BytesMut::new();
    match ack.write(&mut out) {
        Ok(_) => out.freeze(),
        Err(_) => frame,
    }
}

/// What the front needs to know about one client → broker packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A PUBLISH, topic already resolved through the connection's aliases.
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        pkid: u16,
        /// What to forward instead of the client's frame (v5: alias resolved, properties
        /// dropped, see [`Session::inbound`]).
        rewritten: Option<Bytes>,
    },
    /// PUBREL: ends a QoS 2 exchange.
    PubRel(u16),
    /// DISCONNECT: the client leaves cleanly (no will).
    Disconnect,
    /// Any other packet a client may send; forwarded as is.
    Other,
}

/// Per-connection protocol state the front keeps: v5 topic aliases.
#[derive(Debug, Default)]
pub struct Session {
    aliases: HashMap<u16, String>,
}

impl Session {
    /// Parse and check one client → broker frame.
    pub fn inbound(&mut self, version: Version, frame: &[u8]) -> Result<Inbound, Error> {
        if version.is_v4() {
            inbound_v4(frame)
        } else {
            self.inbound_v5(frame)
        }
    }

    fn inbound_v5(&mut self, frame: &[u8]) -> Result<Inbound, Error> {
        use v5::Packet as P;
        let packet =
            v5::Packet::read(&mut BytesMut::from(frame), None).map_err(Error::MalformedV5)?;
        Ok(match packet {
            P::Publish(p) => {
                let topic = String::from_utf8(p.topic.to_vec()).map_err(|_| Error::InvalidTopic)?;
                let alias = p.properties.as_ref().and_then(|pr| pr.topic_alias);
                let topic = match alias {
                    None if topic.is_empty() => return Err(Error::InvalidTopic),
                    None => topic,
                    Some(a) if a == 0 || a > MAX_TOPIC_ALIAS => {
                        return Err(Error::InvalidTopicAlias(a))
                    }
                    Some(a) if topic.is_empty() => self
                        .aliases
                        .get(&a)
                        .cloned()
                        .ok_or(Error::InvalidTopicAlias(a))?,
                    Some(a) => {
                        self.aliases.insert(a, topic.clone());
                        topic
                    }
                };
                if !rumqttc::mqttbytes::valid_topic(&topic) {
                    return Err(Error::InvalidTopic);
                }
                // rumqttd 0.20 panics writing a PUBLISH that carries v5 properties to a v3.1.1
                // subscriber (killing that subscriber's connection), so the front forwards v5
                // publishes without properties, with the alias already resolved.
                let plain = v5::Publish {
                    dup: p.dup,
                    qos: p.qos,
                    retain: p.retain,
                    topic: Bytes::from(topic.clone()),
                    pkid: p.pkid,
                    payload: p.payload.clone(),
                    properties: None,
                };
                let mut out = BytesMut::with_capacity(frame.len() + topic.len());
                plain.write(&mut out).map_err(Error::MalformedV5)?;
                Inbound::Publish {
                    topic,
                    payload: p.payload,
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    rewritten: Some(out.freeze()),
                }
            }
            P::PubRel(r) => Inbound::PubRel(r.pkid),
            P::Disconnect(_) => Inbound::Disconnect,
            P::Subscribe(s) => {
                check_filters(s.filters.iter().map(|f| f.path.as_str()))?;
                Inbound::Other
            }
            P::PubAck(_) | P::PubRec(_) | P::PubComp(_) | P::Unsubscribe(_) | P::PingReq(_) => {
                Inbound::Other
            }
            P::Connect(..) => return Err(Error::ServerOnlyPacket("a second connect")),
            P::ConnAck(_) => return Err(Error::ServerOnlyPacket("connack")),
            P::SubAck(_) => return Err(Error::ServerOnlyPacket("suback")),
            P::UnsubAck(_) => return Err(Error::ServerOnlyPacket("unsuback")),
            P::PingResp(_) => return Err(Error::ServerOnlyPacket("pingresp")),
            P::Auth(_) => {
                return Err(Error::ServerOnlyPacket(
                    "auth (extended auth is not supported)",
                ))
            }
        })
    }
}

fn inbound_v4(frame: &[u8]) -> Result<Inbound, Error> {
    use v4::Packet as P;
    let packet =
        v4::Packet::read(&mut BytesMut::from(frame), usize::MAX).map_err(Error::MalformedV4)?;
    Ok(match packet {
        P::Publish(p) => {
            if p.topic.is_empty() || !rumqttc::mqttbytes::valid_topic(&p.topic) {
                return Err(Error::InvalidTopic);
            }
            Inbound::Publish {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos as u8,
                pkid: p.pkid,
                rewritten: None,
            }
        }
        P::PubRel(r) => Inbound::PubRel(r.pkid),
        P::Disconnect => Inbound::Disconnect,
        P::Subscribe(s) => {
            check_filters(s.filters.iter().map(|f| f.path.as_str()))?;
            Inbound::Other
        }
        P::PubAck(_) | P::PubRec(_) | P::PubComp(_) | P::Unsubscribe(_) | P::PingReq => {
            Inbound::Other
        }
        P::Connect(_) => return Err(Error::ServerOnlyPacket("a second connect")),
        P::ConnAck(_) => return Err(Error::ServerOnlyPacket("connack")),
        P::SubAck(_) => return Err(Error::ServerOnlyPacket("suback")),
        P::UnsubAck(_) => return Err(Error::ServerOnlyPacket("unsuback")),
        P::PingResp => return Err(Error::ServerOnlyPacket("pingresp")),
    })
}

fn check_filters<'a>(mut filters: impl Iterator<Item = &'a str>) -> Result<(), Error> {
    match filters.find(|f| !rumqttc::mqttbytes::valid_filter(f)) {
        Some(bad) => Err(Error::InvalidFilter(bad.to_owned())),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_bytes(p: v4::Packet) -> BytesMut {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).expect("test packet serialises");
        b
    }

    fn v5_bytes(p: v5::Packet) -> Vec<u8> {
        let mut b = BytesMut::new();
        p.write(&mut b, None).expect("test packet serialises");
        b.to_vec()
    }

    #[test]
    fn frames_split_and_size_limit_counts_whole_packet() {
        let mut buf = v4_bytes(v4::Packet::Publish(v4::Publish::new(
            "a/b",
            rumqttc::mqttbytes::QoS::AtMostOnce,
            vec![1u8; 10],
        )));
        let whole = buf.len();
        buf.extend_from_slice(&[0xC0]); // half a PINGREQ
        let mut b2 = buf.clone();
        assert_eq!(
            next_frame(&mut buf, 1000).unwrap().map(|f| f.len()),
            Some(whole)
        );
        assert_eq!(next_frame(&mut buf, 1000).unwrap(), None);
        assert!(matches!(
            next_frame(&mut b2, whole - 1),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn mqtt31_connect_maps_to_311() {
        // CONNECT "MQIsdp" level 3, clean session, keep-alive 30, client id "c1".
        let frame = [
            0x10, 16, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 30, 0, 2, b'c', b'1',
        ];
        assert_eq!(connect_version(&frame).unwrap(), Version::V31);
        let Connect::V4(c) = Connect::parse(Version::V31, &frame).unwrap() else {
            panic!("v4 expected")
        };
        assert_eq!(
            (c.client_id.as_str(), c.keep_alive, c.clean_session),
            ("c1", 30, true)
        );
    }

    #[test]
    fn unknown_protocol_level_is_refused() {
        let frame = [0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', 6, 0x02, 0, 30, 0, 0];
        assert!(matches!(
            connect_version(&frame),
            Err(Error::UnsupportedProtocol { level: 6, .. })
        ));
    }

    #[test]
    fn server_only_packets_are_refused() {
        let ack = v4_bytes(v4::Packet::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::Success,
            false,
        )));
        assert!(matches!(
            Session::default().inbound(Version::V311, &ack),
            Err(Error::ServerOnlyPacket("connack"))
        ));
        let ack5 = v5_bytes(v5::Packet::ConnAck(v5::ConnAck {
            session_present: false,
            code: v5::ConnectReturnCode::Success,
            properties: None,
        }));
        assert!(matches!(
            Session::default().inbound(Version::V5, &ack5),
            Err(Error::ServerOnlyPacket("connack"))
        ));
        assert!(Session::default()
            .inbound(Version::V311, &[0xD0, 0x00])
            .is_err());
    }

    #[test]
    fn v5_topic_alias_is_resolved_per_session() {
        let mut p = v5::Publish::new("t/1", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, "x", None);
        p.pkid = 1;
        p.properties = Some(v5::PublishProperties {
            topic_alias: Some(3),
            ..Default::default()
        });
        let first = v5_bytes(v5::Packet::Publish(p.clone()));
        p.topic = Bytes::new();
        let second = v5_bytes(v5::Packet::Publish(p));
        let mut s = Session::default();
        for frame in [&first, &second] {
            match s.inbound(Version::V5, frame).unwrap() {
                Inbound::Publish { topic, .. } => assert_eq!(topic, "t/1"),
                other => panic!("publish expected, got {other:?}"),
            }
        }
        assert!(matches!(
            Session::default().inbound(Version::V5, &second),
            Err(Error::InvalidTopicAlias(3))
        ));
    }

    #[test]
    fn wildcard_publish_topic_is_refused() {
        let b = v4_bytes(v4::Packet::Publish(v4::Publish::new(
            "a/+",
            rumqttc::mqttbytes::QoS::AtMostOnce,
            "x",
        )));
        assert!(matches!(
            Session::default().inbound(Version::V311, &b),
            Err(Error::InvalidTopic)
        ));
    }

    #[test]
    fn connect_rewrite_keeps_will_and_drops_password() {
        let mut c = v4::Connect::new("");
        c.keep_alive = 0;
        c.set_login("u", "secret");
        c.last_will = Some(v4::LastWill::new(
            "w",
            "bye",
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            true,
        ));
        let frame = v4_bytes(v4::Packet::Connect(c));
        let mut parsed = Connect::parse(Version::V311, &frame).unwrap();
        assert_eq!(parsed.credentials(), ("u", "secret"));
        parsed.set_client_id("auto-1".into());
        parsed.set_keep_alive(60);
        parsed.strip_password();
        let out = parsed.to_bytes().unwrap();
        let Connect::V4(back) = Connect::parse(Version::V311, &out).unwrap() else {
            panic!("v4 expected")
        };
        assert_eq!(back.client_id, "auto-1");
        assert_eq!(back.keep_alive, 60);
        assert_eq!(back.login, Some(v4::Login::new("u", "")));
        assert_eq!(back.last_will.map(|w| w.topic), Some("w".to_owned()));
    }
}
