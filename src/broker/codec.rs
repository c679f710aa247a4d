//! Pure MQTT wire helpers for the broker: framing with the size limit checked before anything is
//! allocated, CONNECT inspection (3.1, 3.1.1, 5), one normalised view of every client → broker
//! packet, and the encoders for every broker → client packet. Bytes in, values or bytes out; no
//! sockets, no clock. Packet parsing and serialising is rumqttc's `mqttbytes::v4` and
//! `v5::mqttbytes::v5`; hand-written MQTT here is limited to the 3.1 → 3.1.1 CONNECT header swap,
//! the bare v5 DISCONNECT, and the MQTT variable byte integer they need.

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS as QoS4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as QoS5;

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
}

/// Which protocol a connection speaks, chosen from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1 ("MQIsdp", level 3): the 3.1.1 codec after a CONNECT header swap.
    V31,
    /// MQTT 3.1.1 (level 4).
    V311,
    /// MQTT 5 (level 5).
    V5,
}

impl Version {
    /// True for the versions spoken with the 3.1.1 codec.
    pub fn is_v4(self) -> bool {
        matches!(self, Version::V31 | Version::V311)
    }

    /// Name for status pages and logs.
    pub fn name(self) -> &'static str {
        match self {
            Version::V31 => "MQTT 3.1",
            Version::V311 => "MQTT 3.1.1",
            Version::V5 => "MQTT 5.0",
        }
    }
}

/// Take the next complete packet from `buf`, if one is there. Errors when the announced size
/// exceeds `max` (whole packet, header included, as Mosquitto counts it) or the length is bad.
pub fn next_frame(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, Error> {
    match rumqttc::mqttbytes::check(buf.iter(), max) {
        Ok(header) if header.frame_length() > max => Err(Error::TooLarge {
            size: header.frame_length(),
            max,
        }),
        Ok(header) => Ok(Some(buf.split_to(header.frame_length()))),
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

/// A will as the CONNECT carried it.
#[derive(Debug, Clone)]
pub struct WillSpec {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 will properties (delay interval and the properties forwarded with the message).
    pub props: Option<v5::LastWillProperties>,
}

/// A parsed CONNECT, the same for every protocol version.
#[derive(Debug, Clone)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub will: Option<WillSpec>,
    /// MQTT 5 CONNECT properties.
    pub props: Option<v5::ConnectProperties>,
}

impl Connect {
    /// Parse a CONNECT frame of the given version.
    pub fn parse(version: Version, frame: &[u8]) -> Result<Connect, Error> {
        match version {
            Version::V31 => {
                let mut buf = mqisdp_to_mqtt311(frame)?;
                read_v4_connect(version, &mut buf)
            }
            Version::V311 => read_v4_connect(version, &mut BytesMut::from(frame)),
            Version::V5 => match v5::Packet::read(&mut BytesMut::from(frame), None)
                .map_err(Error::MalformedV5)?
            {
                v5::Packet::Connect(c, will, login) => {
                    let will = match will {
                        Some(w) => Some(WillSpec {
                            topic: String::from_utf8(w.topic.to_vec()).map_err(|_| {
                                Error::MalformedV5(rumqttc::v5::mqttbytes::Error::TopicNotUtf8)
                            })?,
                            payload: w.message,
                            qos: w.qos as u8,
                            retain: w.retain,
                            props: w.properties,
                        }),
                        None => None,
                    };
                    let (username, password) = match login {
                        Some(l) => (Some(l.username), Some(l.password)),
                        None => (None, None),
                    };
                    Ok(Connect {
                        version,
                        client_id: c.client_id,
                        clean: c.clean_start,
                        keep_alive: c.keep_alive,
                        username: username.filter(|u| !u.is_empty()),
                        password,
                        will,
                        props: c.properties,
                    })
                }
                _ => Err(Error::NotConnect),
            },
        }
    }
}

fn read_v4_connect(version: Version, buf: &mut BytesMut) -> Result<Connect, Error> {
    match v4::Packet::read(buf, usize::MAX).map_err(Error::MalformedV4)? {
        v4::Packet::Connect(c) => {
            let (username, password) = match c.login {
                Some(l) => (Some(l.username), Some(l.password)),
                None => (None, None),
            };
            Ok(Connect {
                version,
                client_id: c.client_id,
                clean: c.clean_session,
                keep_alive: c.keep_alive,
                username: username.filter(|u| !u.is_empty()),
                password,
                will: c.last_will.map(|w| WillSpec {
                    topic: w.topic,
                    payload: w.message,
                    qos: w.qos as u8,
                    retain: w.retain,
                    props: None,
                }),
                props: None,
            })
        }
        _ => Err(Error::NotConnect),
    }
}

/// One requested subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterReq {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
}

/// A client → broker packet, the same for every protocol version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Publish {
        /// As sent: may be empty when a v5 topic alias stands for it.
        topic: Bytes,
        payload: Bytes,
        qos: u8,
        retain: bool,
        dup: bool,
        pkid: u16,
        props: Option<v5::PublishProperties>,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<FilterReq>,
        /// MQTT 5 subscription identifier.
        sub_id: Option<usize>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        /// MQTT 5 reason code (0 for 3.1.1).
        reason: u8,
        /// MQTT 5 session expiry interval update.
        expiry: Option<u32>,
    },
    /// MQTT 5 AUTH (extended authentication is not offered).
    Auth,
    /// A packet only a server may send, or a second CONNECT.
    ServerOnly(&'static str),
}

/// Parse one client frame.
pub fn parse(version: Version, mut frame: BytesMut) -> Result<Packet, Error> {
    if version.is_v4() {
        use v4::Packet as P;
        return Ok(
            match v4::Packet::read(&mut frame, usize::MAX).map_err(Error::MalformedV4)? {
                P::Publish(p) => Packet::Publish {
                    topic: Bytes::from(p.topic.into_bytes()),
                    payload: p.payload,
                    qos: p.qos as u8,
                    retain: p.retain,
                    dup: p.dup,
                    pkid: p.pkid,
                    props: None,
                },
                P::PubAck(a) => Packet::PubAck(a.pkid),
                P::PubRec(a) => Packet::PubRec(a.pkid),
                P::PubRel(a) => Packet::PubRel(a.pkid),
                P::PubComp(a) => Packet::PubComp(a.pkid),
                P::Subscribe(s) => Packet::Subscribe {
                    pkid: s.pkid,
                    filters: s
                        .filters
                        .into_iter()
                        .map(|f| FilterReq {
                            filter: f.path,
                            qos: f.qos as u8,
                            no_local: false,
                            retain_as_published: false,
                            retain_handling: 0,
                        })
                        .collect(),
                    sub_id: None,
                },
                P::Unsubscribe(u) => Packet::Unsubscribe {
                    pkid: u.pkid,
                    filters: u.topics,
                },
                P::PingReq => Packet::PingReq,
                P::Disconnect => Packet::Disconnect {
                    reason: 0,
                    expiry: None,
                },
                P::Connect(_) => Packet::ServerOnly("a second connect"),
                P::ConnAck(_) => Packet::ServerOnly("connack"),
                P::SubAck(_) => Packet::ServerOnly("suback"),
                P::UnsubAck(_) => Packet::ServerOnly("unsuback"),
                P::PingResp => Packet::ServerOnly("pingresp"),
            },
        );
    }
    // rumqttc's v5 reader refuses the two-byte DISCONNECT (reason 0x00 implied, MQTT 5 §3.14.2.1).
    if frame[..] == [0xE0, 0x00] {
        return Ok(Packet::Disconnect {
            reason: 0,
            expiry: None,
        });
    }
    use v5::Packet as P;
    Ok(
        match v5::Packet::read(&mut frame, None).map_err(Error::MalformedV5)? {
            P::Publish(p) => Packet::Publish {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos as u8,
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
                props: p.properties,
            },
            P::PubAck(a) => Packet::PubAck(a.pkid),
            P::PubRec(a) => Packet::PubRec(a.pkid),
            P::PubRel(a) => Packet::PubRel(a.pkid),
            P::PubComp(a) => Packet::PubComp(a.pkid),
            P::Subscribe(s) => Packet::Subscribe {
                pkid: s.pkid,
                sub_id: s.properties.and_then(|p| p.id),
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| FilterReq {
                        filter: f.path,
                        qos: f.qos as u8,
                        no_local: f.nolocal,
                        retain_as_published: f.preserve_retain,
                        retain_handling: match f.retain_forward_rule {
                            v5::RetainForwardRule::OnEverySubscribe => 0,
                            v5::RetainForwardRule::OnNewSubscribe => 1,
                            v5::RetainForwardRule::Never => 2,
                        },
                    })
                    .collect(),
            },
            P::Unsubscribe(u) => Packet::Unsubscribe {
                pkid: u.pkid,
                filters: u.filters,
            },
            P::PingReq(_) => Packet::PingReq,
            P::Disconnect(d) => Packet::Disconnect {
                reason: d.reason_code as u8,
                expiry: d.properties.and_then(|p| p.session_expiry_interval),
            },
            P::Auth(_) => Packet::Auth,
            P::Connect(..) => Packet::ServerOnly("a second connect"),
            P::ConnAck(_) => Packet::ServerOnly("connack"),
            P::SubAck(_) => Packet::ServerOnly("suback"),
            P::UnsubAck(_) => Packet::ServerOnly("unsuback"),
            P::PingResp(_) => Packet::ServerOnly("pingresp"),
        },
    )
}

fn qos4(q: u8) -> QoS4 {
    match q {
        0 => QoS4::AtMostOnce,
        1 => QoS4::AtLeastOnce,
        _ => QoS4::ExactlyOnce,
    }
}

fn qos5(q: u8) -> QoS5 {
    match q {
        0 => QoS5::AtMostOnce,
        1 => QoS5::AtLeastOnce,
        _ => QoS5::ExactlyOnce,
    }
}

/// An outbound PUBLISH. v3.1/3.1.1 clients get no properties. Writing into a growable buffer
/// cannot fail for values we built, so the few `Result`s of rumqttc's writers are dropped.
#[allow(clippy::too_many_arguments)]
pub fn write_publish(
    out: &mut BytesMut,
    version: Version,
    topic: &str,
    payload: &Bytes,
    qos: u8,
    retain: bool,
    dup: bool,
    pkid: u16,
    props: Option<v5::PublishProperties>,
) {
    if version.is_v4() {
        let p = v4::Publish {
            dup,
            qos: qos4(qos),
            retain,
            topic: topic.to_owned(),
            pkid,
            payload: payload.clone(),
        };
        let _ = p.write(out);
    } else {
        let p = v5::Publish {
            dup,
            qos: qos5(qos),
            retain,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            pkid,
            payload: payload.clone(),
            properties: props,
        };
        let _ = p.write(out);
    }
}

/// The four QoS acknowledgements (all success) and PINGRESP share one shape: type, 2, id.
pub fn write_ack(out: &mut BytesMut, kind: Ack, pkid: u16) {
    let byte1 = match kind {
        Ack::Puback => 0x40,
        Ack::Pubrec => 0x50,
        Ack::Pubrel => 0x62,
        Ack::Pubcomp => 0x70,
    };
    out.put_u8(byte1);
    out.put_u8(2);
    out.put_u16(pkid);
}

/// Which acknowledgement [`write_ack`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// QoS 1 acknowledgement.
    Puback,
    /// QoS 2, step 1.
    Pubrec,
    /// QoS 2, step 2.
    Pubrel,
    /// QoS 2, step 3.
    Pubcomp,
}

/// PINGRESP.
pub fn write_pingresp(out: &mut BytesMut) {
    out.put_slice(&[0xD0, 0x00]);
}

/// SUBACK: `codes` are granted QoS (0..=2) or MQTT 5 failure reason codes (≥ 0x80; 3.1.1 clients
/// get 0x80 for every failure).
pub fn write_suback(out: &mut BytesMut, version: Version, pkid: u16, codes: &[u8]) {
    if version.is_v4() {
        let codes = codes
            .iter()
            .map(|&c| match c {
                0..=2 => v4::SubscribeReasonCode::Success(qos4(c)),
                _ => v4::SubscribeReasonCode::Failure,
            })
            .collect();
        let _ = v4::SubAck::new(pkid, codes).write(out);
    } else {
        use v5::SubscribeReasonCode as R;
        let codes = codes
            .iter()
            .map(|&c| match c {
                0..=2 => R::Success(qos5(c)),
                0x8F => R::TopicFilterInvalid,
                0x9E => R::SharedSubscriptionsNotSupported,
                0xA1 => R::SubscriptionIdNotSupported,
                0x83 => R::ImplementationSpecific,
                0x97 => R::QuotaExceeded,
                _ => R::Unspecified,
            })
            .collect();
        let ack = v5::SubAck {
            pkid,
            return_codes: codes,
            properties: None,
        };
        let _ = ack.write(out);
    }
}

/// UNSUBACK: per filter, whether a subscription existed (MQTT 5 reason 0x00 or 0x11).
pub fn write_unsuback(out: &mut BytesMut, version: Version, pkid: u16, existed: &[bool]) {
    if version.is_v4() {
        let _ = v4::UnsubAck::new(pkid).write(out);
    } else {
        let ack = v5::UnsubAck {
            pkid,
            reasons: existed
                .iter()
                .map(|&e| {
                    if e {
                        v5::UnsubAckReason::Success
                    } else {
                        v5::UnsubAckReason::NoSubscriptionExisted
                    }
                })
                .collect(),
            properties: None,
        };
        let _ = ack.write(out);
    }
}

/// What a successful CONNACK tells a v5 client about this broker.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Inbound QoS 1/2 messages a client may have unacknowledged.
    pub receive_maximum: u16,
    /// Largest packet the broker accepts.
    pub max_packet_size: u32,
    /// Highest topic alias a client may use.
    pub topic_alias_maximum: u16,
}

/// A successful CONNACK.
pub fn write_connack(
    out: &mut BytesMut,
    version: Version,
    session_present: bool,
    assigned_id: Option<&str>,
    limits: &ServerLimits,
) {
    if version.is_v4() {
        let _ = v4::ConnAck::new(v4::ConnectReturnCode::Success, session_present).write(out);
        return;
    }
    let props = v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: Some(limits.receive_maximum),
        max_qos: None,
        retain_available: None,
        max_packet_size: Some(limits.max_packet_size),
        assigned_client_identifier: assigned_id.map(str::to_owned),
        topic_alias_max: Some(limits.topic_alias_maximum),
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
    };
    let ack = v5::ConnAck {
        session_present,
        code: v5::ConnectReturnCode::Success,
        properties: Some(props),
    };
    let _ = ack.write(out);
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
                Refusal::NotAuthorized | Refusal::BadAuthMethod => {
                    v4::ConnectReturnCode::NotAuthorized
                }
            };
            let _ = v4::ConnAck::new(code, false).write(&mut out);
        }
        Version::V5 => {
            let code = match reason {
                Refusal::ProtocolVersion => v5::ConnectReturnCode::UnsupportedProtocolVersion,
                Refusal::ClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                Refusal::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
                Refusal::BadAuthMethod => v5::ConnectReturnCode::BadAuthenticationMethod,
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
    /// MQTT 5 extended authentication was requested (not offered).
    BadAuthMethod,
}

/// A v5 CONNACK refusing with `code` and no properties.
pub fn connack_v5_code(code: u8) -> Bytes {
    Bytes::from(vec![0x20, 0x03, 0x00, code, 0x00])
}

/// A v5 DISCONNECT with the given reason and an empty property list, sent before the broker
/// closes a v5 client. Built by hand: rumqttc 0.25's `Disconnect::write` appends a property
/// length its remaining length does not count, and its reader rejects the shorter valid form
/// without a property length, so this is the form every client parses.
pub fn v5_disconnect(reason: u8) -> Bytes {
    Bytes::from(vec![0xE0, 0x02, reason, 0x00])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_bytes(p: v4::Packet) -> BytesMut {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).expect("test packet serialises");
        b
    }

    fn v5_bytes(p: v5::Packet) -> BytesMut {
        let mut b = BytesMut::new();
        p.write(&mut b, None).expect("test packet serialises");
        b
    }

    #[test]
    fn frames_split_and_size_limit_counts_whole_packet() {
        let mut buf = v4_bytes(v4::Packet::Publish(v4::Publish::new(
            "a/b",
            QoS4::AtMostOnce,
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
    fn huge_remaining_length_is_refused_from_the_header_alone() {
        // PUBLISH announcing 256 MiB - 1 (the largest MQTT length): refused with 5 bytes read.
        let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F][..]);
        assert!(matches!(
            next_frame(&mut buf, 1024 * 1024),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn mqtt31_connect_is_read_with_the_311_codec() {
        // CONNECT "MQIsdp" level 3, clean session, keep-alive 30, client id "c1".
        let frame = [
            0x10, 16, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 30, 0, 2, b'c', b'1',
        ];
        assert_eq!(connect_version(&frame).unwrap(), Version::V31);
        let c = Connect::parse(Version::V31, &frame).unwrap();
        assert_eq!(
            (c.client_id.as_str(), c.keep_alive, c.clean),
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
    fn server_only_packets_are_recognised() {
        let ack = v4_bytes(v4::Packet::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::Success,
            false,
        )));
        assert_eq!(
            parse(Version::V311, ack).unwrap(),
            Packet::ServerOnly("connack")
        );
        let ack5 = v5_bytes(v5::Packet::ConnAck(v5::ConnAck {
            session_present: false,
            code: v5::ConnectReturnCode::Success,
            properties: None,
        }));
        assert_eq!(
            parse(Version::V5, ack5).unwrap(),
            Packet::ServerOnly("connack")
        );
        assert_eq!(
            parse(Version::V311, BytesMut::from(&[0xD0, 0x00][..])).unwrap(),
            Packet::ServerOnly("pingresp")
        );
    }

    #[test]
    fn short_v5_disconnect_and_reason_codes_parse() {
        assert_eq!(
            parse(Version::V5, BytesMut::from(&[0xE0, 0x00][..])).unwrap(),
            Packet::Disconnect {
                reason: 0,
                expiry: None
            }
        );
        assert_eq!(
            parse(Version::V5, BytesMut::from(&v5_disconnect(0x04)[..])).unwrap(),
            Packet::Disconnect {
                reason: 4,
                expiry: None
            }
        );
    }

    #[test]
    fn v5_subscription_options_are_kept() {
        let mut f = v5::Filter::new("a/+", QoS5::AtLeastOnce);
        f.nolocal = true;
        f.preserve_retain = true;
        f.retain_forward_rule = v5::RetainForwardRule::Never;
        let mut s = v5::Subscribe::new(
            f,
            Some(v5::SubscribeProperties {
                id: Some(7),
                user_properties: Vec::new(),
            }),
        );
        s.pkid = 3;
        let frame = v5_bytes(v5::Packet::Subscribe(s));
        assert_eq!(
            parse(Version::V5, frame).unwrap(),
            Packet::Subscribe {
                pkid: 3,
                sub_id: Some(7),
                filters: vec![FilterReq {
                    filter: "a/+".into(),
                    qos: 1,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 2,
                }],
            }
        );
    }

    #[test]
    fn encoders_round_trip_through_rumqttc() {
        let limits = ServerLimits {
            receive_maximum: 20,
            max_packet_size: 1 << 20,
            topic_alias_maximum: 10,
        };
        let mut out = BytesMut::new();
        write_connack(&mut out, Version::V5, true, Some("auto-x"), &limits);
        match v5::Packet::read(&mut out, None).unwrap() {
            v5::Packet::ConnAck(a) => {
                assert!(a.session_present);
                let p = a.properties.expect("properties");
                assert_eq!(p.assigned_client_identifier.as_deref(), Some("auto-x"));
                assert_eq!(p.receive_max, Some(20));
                assert_eq!(p.topic_alias_max, Some(10));
            }
            other => panic!("connack expected, got {other:?}"),
        }
        write_unsuback(&mut out, Version::V5, 9, &[true, false]);
        match v5::Packet::read(&mut out, None).unwrap() {
            v5::Packet::UnsubAck(a) => assert_eq!(
                a.reasons,
                [
                    v5::UnsubAckReason::Success,
                    v5::UnsubAckReason::NoSubscriptionExisted
                ]
            ),
            other => panic!("unsuback expected, got {other:?}"),
        }
        write_suback(&mut out, Version::V311, 4, &[1, 0x8F]);
        match v4::Packet::read(&mut out, usize::MAX).unwrap() {
            v4::Packet::SubAck(a) => assert_eq!(
                a.return_codes,
                [
                    v4::SubscribeReasonCode::Success(QoS4::AtLeastOnce),
                    v4::SubscribeReasonCode::Failure
                ]
            ),
            other => panic!("suback expected, got {other:?}"),
        }
        for (kind, want) in [(Ack::Puback, 4u8), (Ack::Pubrel, 6), (Ack::Pubcomp, 7)] {
            write_ack(&mut out, kind, 300);
            assert_eq!(out[0] >> 4, want);
            let _ = v4::Packet::read(&mut out, usize::MAX).expect("valid ack");
        }
    }
}
