//! One client connection, from accept to close, in its own task: read and check the CONNECT,
//! attach to the session, then serve packets in both directions. Every PUBLISH is routed to
//! subscribers at once and reported to the router; a QoS 1/2 publisher gets its PUBACK/PUBREC,
//! in order, only when the router says the message is durable (or produces nothing), without
//! this task stopping reading meanwhile (up to [`MAX_PENDING_ACKS`]).
//!
//! Anything a client does wrong ends this connection only. A panic here unwinds this task alone;
//! the [`Registration`] drop guard still detaches the session and handles the will.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::codec::{self, Ack, Connect, Packet, Refusal, Version};
use super::state::{ConnSignal, ConnSlot, Message, Out, Queued, SubOpts, Will, NEVER_EXPIRES};
use super::topic;
use super::Shared;
use crate::model::now_ms;
use crate::sources::{Durable, LocalPublish, SourceEvent};

/// Initial read and write buffer per connection; kept small for many idle clients.
const INITIAL_BUF_BYTES: usize = 1024;
/// A buffer grown past this by a large packet is replaced by a small one once empty.
const SHRINK_ABOVE_BYTES: usize = 64 * 1024;
/// Inbound QoS 1/2 messages awaiting their durable acknowledgement before this task stops
/// reading the client (backpressure). Above the Receive Maximum we advertise, so a v5 client
/// that exceeds it is caught and told 0x93 first.
pub const MAX_PENDING_ACKS: usize = 1024;

/// MQTT 5 reason codes this task sends in DISCONNECT.
mod reason {
    pub const MALFORMED: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
}

/// How a connection ends.
#[derive(Debug)]
enum End {
    /// DISCONNECT from the client: will only for MQTT 5 reason 0x04; optional expiry update.
    Clean { will: bool, expiry: Option<u32> },
    /// The socket closed or failed: the will is due.
    Lost(&'static str),
    /// The broker closes the client for a protocol violation (v5: DISCONNECT `reason` first).
    Refuse(u8, String),
    /// Kicked by the state (takeover) or broker shutdown.
    Kicked,
}

/// What a connection runs over: the plain TCP socket, or a TLS stream on one (the TLS
/// listener). Writes are flushed, which TLS needs and which costs TCP nothing.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Acknowledge received segments at the TCP level at once (Linux `TCP_QUICKACK`), see the
    /// read in `Conn::run`.
    fn quick_ack(&self);
}

impl Stream for tokio::net::TcpStream {
    fn quick_ack(&self) {
        #[cfg(target_os = "linux")]
        let _ = self.set_quickack(true);
    }
}

impl Stream for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn quick_ack(&self) {
        self.get_ref().0.quick_ack();
    }
}

/// Serve one accepted connection; logs how it ended. The CONNECT must have arrived by
/// `connect_deadline` (counted from the accept, so a TLS handshake spends from the same budget).
pub async fn serve<S: Stream>(
    mut stream: S,
    peer: SocketAddr,
    connect_deadline: Instant,
    shared: Arc<Shared>,
    events_tx: mpsc::Sender<SourceEvent>,
    cancel: CancellationToken,
) {
    let mut buf = BytesMut::with_capacity(INITIAL_BUF_BYTES);
    let connect =
        match read_connect(&mut stream, &mut buf, connect_deadline, &shared, &cancel).await {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(why) => {
                debug!(%peer, error = %why, "Connection closed before a valid CONNECT.");
                return;
            }
        };
    let Some(mut conn) = attach(&mut stream, peer, connect, &shared, events_tx, &cancel).await
    else {
        let _ = stream.shutdown().await;
        return;
    };
    let end = conn.run(&mut stream, buf).await;
    let version = conn.version;
    let client = conn.reg.client_id.clone();
    match &end {
        End::Clean { will, expiry } => {
            conn.reg.will = *will;
            conn.reg.expiry = *expiry;
            debug!(%client, %peer, "Client disconnected.");
        }
        End::Lost(why) => debug!(%client, %peer, why, "Client connection lost."),
        End::Refuse(code, why) if *code == reason::KEEP_ALIVE_TIMEOUT => {
            debug!(%client, %peer, error = %why, "Client silent beyond its keep-alive; closed it.");
            if version == Version::V5 {
                let _ = write_bounded(&mut stream, &codec::v5_disconnect(*code), &conn.signal.kick)
                    .await;
            }
        }
        End::Refuse(code, why) => {
            warn!(%client, %peer, reason = code, error = %why, "Client broke the MQTT protocol; closed it.");
            if version == Version::V5 {
                let _ = write_bounded(&mut stream, &codec::v5_disconnect(*code), &conn.signal.kick)
                    .await;
            }
        }
        End::Kicked => {
            let code = match conn.signal.reason.load(Ordering::Relaxed) {
                0 => reason::SERVER_SHUTTING_DOWN,
                c => c,
            };
            // At shutdown the session is kept and no will is sent; on takeover the state has
            // already dealt with the will.
            conn.reg.will = false;
            debug!(%client, %peer, reason = code, "Client connection closed by the broker.");
            if version == Version::V5 {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    send(&mut stream, &codec::v5_disconnect(code)),
                )
                .await;
            }
        }
    }
    // Detach from the session (and publish the will) before the client sees the close, so a
    // client that reconnects at once finds the session free.
    drop(conn);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
}

/// Write unless the connection is kicked meanwhile (a client that stops reading must not pin
/// this task after a takeover or shutdown).
async fn write_bounded<S: Stream>(
    stream: &mut S,
    bytes: &[u8],
    kick: &CancellationToken,
) -> Result<(), ()> {
    tokio::select! {
        r = send(stream, bytes) => r.map_err(|_| ()),
        _ = kick.cancelled() => Err(()),
    }
}

/// Write all of `bytes` and flush them out of any TLS buffer.
async fn send<S: Stream>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Read the first packet (by `deadline`: the CONNECT timeout) and refuse what cannot be served.
async fn read_connect<S: Stream>(
    stream: &mut S,
    buf: &mut BytesMut,
    deadline: Instant,
    shared: &Shared,
    cancel: &CancellationToken,
) -> Result<Option<Connect>, String> {
    let timeout = shared.tuning.connect_timeout;
    let read = async {
        loop {
            if let Some(frame) =
                codec::next_frame(buf, shared.max_packet_size).map_err(|e| e.to_string())?
            {
                return Ok::<_, String>(Some(frame));
            }
            match stream.read_buf(buf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    let frame = tokio::select! {
        r = tokio::time::timeout_at(deadline, read) => match r {
            Ok(r) => r?,
            Err(_) => return Err(format!("no connect within {timeout:?}")),
        },
        _ = cancel.cancelled() => return Ok(None),
    };
    let Some(frame) = frame else { return Ok(None) };
    let version = match codec::connect_version(&frame) {
        Ok(v) => v,
        Err(e @ codec::Error::UnsupportedProtocol { .. }) => {
            // Mosquitto answers an unknown protocol level with a 3.1.1 CONNACK 0x01.
            let ack = codec::connack_refused(Version::V311, Refusal::ProtocolVersion);
            let _ = send(stream, &ack).await;
            return Err(e.to_string());
        }
        Err(e) => return Err(e.to_string()),
    };
    Connect::parse(version, &frame)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Deregisters the connection from its session when the task ends, however it ends (a panic
/// included): the will is published unless the client left cleanly.
struct Registration {
    shared: Arc<Shared>,
    client_id: String,
    conn_id: u64,
    /// Publish the will (abnormal end) when dropped.
    will: bool,
    /// MQTT 5 DISCONNECT's session expiry update.
    expiry: Option<u32>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let now = std::time::Instant::now();
        self.shared.state.lock().disconnected(
            &self.client_id,
            self.conn_id,
            self.will,
            self.expiry,
            now,
        );
    }
}

/// A connection attached to its session.
struct Conn {
    shared: Arc<Shared>,
    /// To the router; awaited per PUBLISH, which is the backpressure on the client's socket.
    events_tx: mpsc::Sender<SourceEvent>,
    version: Version,
    reg: Registration,
    signal: Arc<ConnSignal>,
    keep_alive: Duration,
    /// Session expiry the CONNECT asked for (a DISCONNECT may not raise 0 to non-zero).
    connect_expiry: u32,
    username: Option<String>,
    /// Largest packet the client accepts (MQTT 5 Maximum Packet Size).
    client_max_packet: usize,
    /// MQTT 5 inbound topic aliases.
    aliases: std::collections::HashMap<u16, String>,
    /// Acknowledgements owed to the client, in arrival order.
    pending: std::collections::VecDeque<PendingAck>,
    /// QoS 1 entries in `pending` (counted against our Receive Maximum with open QoS 2 ids).
    pending_qos1: usize,
    out: BytesMut,
}

/// One acknowledgement owed to the publisher.
struct PendingAck {
    kind: Ack,
    pkid: u16,
    /// Fires when the router has made the message durable (or decided it produces nothing);
    /// `None` for a QoS 2 resend, which is acknowledged in turn.
    durable: Option<oneshot::Receiver<()>>,
}

/// Check credentials and the client id, attach to the session and send CONNACK plus anything to
/// resend. `None` when the client was refused.
async fn attach<S: Stream>(
    stream: &mut S,
    peer: SocketAddr,
    mut c: Connect,
    shared: &Arc<Shared>,
    events_tx: mpsc::Sender<SourceEvent>,
    cancel: &CancellationToken,
) -> Option<Conn> {
    let version = c.version;
    let refuse = |why| codec::connack_refused(version, why);
    if c.props
        .as_ref()
        .is_some_and(|p| p.authentication_method.is_some())
    {
        let _ = send(stream, &refuse(Refusal::BadAuthMethod)).await;
        return None;
    }
    if !shared.authorised(c.username.as_deref(), c.password.as_deref()) {
        info!(client = %c.client_id, %peer, "Wrong or missing credentials; connection refused.");
        let _ = send(stream, &refuse(Refusal::NotAuthorized)).await;
        return None;
    }
    let mut assigned = None;
    if c.client_id.is_empty() {
        // Mosquitto: 3.1 never allows an empty id, 3.1.1 only with a clean session, 5 always
        // (and tells the client the id it assigned).
        let allowed = match version {
            Version::V31 => false,
            Version::V311 => c.clean,
            Version::V5 => true,
        };
        if !allowed {
            let _ = send(stream, &refuse(Refusal::ClientId)).await;
            return None;
        }
        c.client_id = generated_client_id();
        assigned = Some(c.client_id.clone());
    }
    let will = match c.will.take() {
        Some(w) if !topic::valid_topic(&w.topic) => {
            debug!(client = %c.client_id, %peer, "Will topic invalid; connection refused.");
            if version == Version::V5 {
                let _ = send(stream, &codec::connack_v5_code(0x90)).await;
            }
            return None;
        }
        Some(w) => {
            let delay = w.props.as_ref().and_then(|p| p.delay_interval).unwrap_or(0);
            let props = w.props.map(|p| PublishProperties {
                payload_format_indicator: p.payload_format_indicator,
                message_expiry_interval: p.message_expiry_interval,
                topic_alias: None,
                response_topic: p.response_topic,
                correlation_data: p.correlation_data,
                user_properties: p.user_properties,
                subscription_identifiers: Vec::new(),
                content_type: p.content_type,
            });
            Some(Will {
                msg: Arc::new(message(
                    w.topic,
                    w.payload,
                    w.qos,
                    w.retain,
                    props,
                    Some(Arc::from(c.client_id.as_str())),
                )),
                delay,
            })
        }
        None => None,
    };
    let props = c.props.take();
    let expiry = match version {
        Version::V5 => props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0),
        _ if c.clean => 0,
        _ => NEVER_EXPIRES,
    };
    let client_receive_max = props
        .as_ref()
        .and_then(|p| p.receive_maximum)
        .filter(|&r| r > 0)
        .unwrap_or(u16::MAX);
    let client_max_packet = props
        .as_ref()
        .and_then(|p| p.max_packet_size)
        .map_or(usize::MAX, |m| m as usize);

    let signal = Arc::new(ConnSignal {
        notify: tokio::sync::Notify::new(),
        kick: cancel.child_token(),
        reason: Default::default(),
        messages_in: Default::default(),
        messages_out: Default::default(),
    });
    let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let slot = ConnSlot {
        id: conn_id,
        signal: signal.clone(),
        window: usize::from(client_receive_max).min(shared.max_inflight),
        will,
        username: c.username.clone(),
        peer,
        connected_since: now_ms(),
    };
    let connected = shared.state.lock().connect(
        &c.client_id,
        version,
        c.clean,
        expiry,
        slot,
        std::time::Instant::now(),
    );
    let mut conn = Conn {
        shared: shared.clone(),
        events_tx,
        version,
        reg: Registration {
            shared: shared.clone(),
            client_id: c.client_id.clone(),
            conn_id,
            will: true,
            expiry: None,
        },
        signal,
        keep_alive: Duration::from_millis(u64::from(c.keep_alive) * 1500),
        connect_expiry: expiry,
        username: c.username,
        client_max_packet,
        aliases: Default::default(),
        pending: Default::default(),
        pending_qos1: 0,
        out: BytesMut::with_capacity(INITIAL_BUF_BYTES),
    };
    debug!(client = %c.client_id, %peer, ?version, "Client connected.");
    codec::write_connack(
        &mut conn.out,
        version,
        connected.session_present,
        assigned.as_deref(),
        &shared.server_limits,
    );
    for o in connected.resend {
        conn.encode(o);
    }
    Some(conn)
}

/// A message as the state stores it (expiry interval turned into a deadline).
fn message(
    topic: String,
    payload: Bytes,
    qos: u8,
    retain: bool,
    props: Option<PublishProperties>,
    origin: Option<Arc<str>>,
) -> Message {
    let expires = props
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
        .map(|s| std::time::Instant::now() + Duration::from_secs(u64::from(s)));
    Message {
        topic,
        payload,
        qos,
        retain,
        props,
        expires,
        origin,
    }
}

impl Conn {
    async fn run<S: Stream>(&mut self, stream: &mut S, mut buf: BytesMut) -> End {
        let mut deadline = Instant::now() + self.keep_alive;
        let signal = self.signal.clone();
        // Data was read since the last quick-ACK decision.
        let mut fresh_data = false;
        loop {
            // Serve what is buffered (up to the pending-ack bound), then deliver and flush.
            while self.pending.len() < MAX_PENDING_ACKS {
                let frame = match codec::next_frame(&mut buf, self.shared.max_packet_size) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e @ codec::Error::TooLarge { .. }) => {
                        return End::Refuse(reason::PACKET_TOO_LARGE, e.to_string())
                    }
                    Err(e) => return End::Refuse(reason::MALFORMED, e.to_string()),
                };
                if let Some(end) = self.packet(frame).await {
                    if !self.out.is_empty() {
                        let _ = write_bounded(stream, &self.out, &signal.kick).await;
                    }
                    return end;
                }
            }
            if fresh_data && !self.pending.is_empty() {
                // Our PUBACKs wait for the commit, and Linux delays its TCP ACK to piggyback it
                // on them: a client with Nagle on (rumqttc's and Paho's default) then holds its
                // next publishes until our PUBACKs go out, up to a whole commit interval. Send
                // the ACK for what was just read at once (setting TCP_QUICKACK flushes a
                // scheduled delayed ACK).
                stream.quick_ack();
            }
            fresh_data = false;
            if buf.is_empty() && buf.capacity() > SHRINK_ABOVE_BYTES {
                buf = BytesMut::with_capacity(INITIAL_BUF_BYTES);
            }
            match self.deliver() {
                None => return End::Kicked,
                // A full batch: more may be waiting; come back after this batch is written.
                Some(full) if full => signal.notify.notify_one(),
                Some(_) => {}
            }
            if !self.out.is_empty() {
                if write_bounded(stream, &self.out, &signal.kick)
                    .await
                    .is_err()
                {
                    return if signal.kick.is_cancelled() {
                        End::Kicked
                    } else {
                        End::Lost("write failed")
                    };
                }
                self.out.clear();
                if self.out.capacity() > SHRINK_ABOVE_BYTES {
                    self.out = BytesMut::with_capacity(INITIAL_BUF_BYTES);
                }
            }
            let can_read = self.pending.len() < MAX_PENDING_ACKS;
            let keep_alive = !self.keep_alive.is_zero();
            tokio::select! {
                biased;
                _ = signal.kick.cancelled() => return End::Kicked,
                r = front_ack(&mut self.pending), if !self.pending.is_empty() => {
                    if r.is_err() {
                        // The router could not store what the message produced: no PUBACK,
                        // so the client resends it after reconnecting.
                        return End::Refuse(0x80, "message could not be made durable".into());
                    }
                    self.ack_ready();
                }
                r = stream.read_buf(&mut buf), if can_read => match r {
                    Ok(0) => return End::Lost("closed by client"),
                    Ok(_) => {
                        deadline = Instant::now() + self.keep_alive;
                        fresh_data = true;
                    }
                    Err(_) => return End::Lost("read failed"),
                },
                _ = signal.notify.notified() => {}
                _ = tokio::time::sleep_until(deadline), if keep_alive => {
                    return End::Refuse(reason::KEEP_ALIVE_TIMEOUT, "keep-alive expired".into());
                }
            }
        }
    }

    /// Write every acknowledgement at the head of the queue whose message is durable.
    fn ack_ready(&mut self) {
        // The head has fired (front_ack returned Ok); write it and any already-fired followers.
        let mut first = true;
        while let Some(head) = self.pending.front_mut() {
            let ready = first
                || match &mut head.durable {
                    None => true,
                    Some(rx) => match rx.try_recv() {
                        Ok(()) => true,
                        Err(oneshot::error::TryRecvError::Empty) => false,
                        // Failure is handled when it reaches `front_ack`.
                        Err(oneshot::error::TryRecvError::Closed) => false,
                    },
                };
            if !ready {
                break;
            }
            first = false;
            let head = self.pending.pop_front().expect("front exists");
            if head.kind == Ack::Puback {
                self.pending_qos1 -= 1;
            }
            codec::write_ack(&mut self.out, head.kind, head.pkid);
        }
    }

    /// Take what the session may send now and encode it. `None` when the session was taken
    /// over; `Some(true)` when a full batch was taken (more may be queued).
    fn deliver(&mut self) -> Option<bool> {
        let items = self.shared.state.lock().take_deliverable(
            &self.reg.client_id,
            self.reg.conn_id,
            std::time::Instant::now(),
        )?;
        let full = items.len() >= super::state::MAX_BATCH;
        for o in items {
            self.encode(o);
        }
        Some(full)
    }

    /// Encode one outbound packet; a PUBLISH larger than the client's Maximum Packet Size is
    /// dropped for this client (MQTT 5 §3.1.2.11.4).
    fn encode(&mut self, o: Out) {
        match o {
            Out::PubRel(pkid) => codec::write_ack(&mut self.out, Ack::Pubrel, pkid),
            Out::Publish { pkid, q, dup } => {
                let at = self.out.len();
                let props = self.outbound_props(&q);
                codec::write_publish(
                    &mut self.out,
                    self.version,
                    &q.msg.topic,
                    &q.msg.payload,
                    q.qos,
                    q.retain,
                    dup,
                    pkid,
                    props,
                );
                if self.out.len() - at > self.client_max_packet {
                    self.out.truncate(at);
                    if q.qos > 0 {
                        self.shared
                            .state
                            .lock()
                            .forget_inflight(&self.reg.client_id, pkid);
                    }
                    debug!(client = %self.reg.client_id, topic = %q.msg.topic, "Message larger than the client's maximum packet size; not sent to it.");
                    return;
                }
                self.signal.messages_out.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn outbound_props(&self, q: &Queued) -> Option<PublishProperties> {
        if self.version != Version::V5 {
            return None;
        }
        let remaining = q.msg.expires.map(|e| {
            let left = e.saturating_duration_since(std::time::Instant::now());
            u32::try_from(left.as_secs().max(1)).unwrap_or(u32::MAX)
        });
        if q.msg.props.is_none() && q.sub_ids.is_empty() && remaining.is_none() {
            return None;
        }
        let mut p = q.msg.props.clone().unwrap_or_default();
        p.subscription_identifiers = q.sub_ids.clone();
        p.message_expiry_interval = remaining;
        p.topic_alias = None;
        Some(p)
    }

    /// Serve one client packet. `Some(end)` closes the connection.
    async fn packet(&mut self, frame: BytesMut) -> Option<End> {
        let packet = match codec::parse(self.version, frame) {
            Ok(p) => p,
            Err(e) => return Some(End::Refuse(reason::MALFORMED, e.to_string())),
        };
        let id = self.reg.client_id.clone();
        match packet {
            Packet::Publish {
                topic,
                payload,
                qos,
                retain,
                dup: _,
                pkid,
                props,
            } => return self.publish(topic, payload, qos, retain, pkid, props).await,
            Packet::PubAck(pkid) | Packet::PubComp(pkid) => {
                self.shared.state.lock().acked(&id, pkid);
            }
            Packet::PubRec(pkid) => {
                self.shared.state.lock().received(&id, pkid);
                codec::write_ack(&mut self.out, Ack::Pubrel, pkid);
            }
            Packet::PubRel(pkid) => {
                // Mosquitto answers PUBCOMP even for an unknown id (a PUBREL repeated after a
                // reconnect).
                self.shared.state.lock().qos2_release(&id, pkid);
                codec::write_ack(&mut self.out, Ack::Pubcomp, pkid);
            }
            Packet::Subscribe {
                pkid,
                filters,
                sub_id,
            } => {
                let mut codes = Vec::with_capacity(filters.len());
                let mut st = self.shared.state.lock();
                for f in filters {
                    let Some(spec) = topic::parse_filter(&f.filter) else {
                        codes.push(0x8F);
                        continue;
                    };
                    if spec.group.is_some() && f.no_local {
                        // MQTT 5 §3.8.3.1: No Local on a shared subscription is an error.
                        codes.push(0x8F);
                        continue;
                    }
                    let opts = SubOpts {
                        qos: f.qos.min(2),
                        no_local: f.no_local,
                        retain_as_published: f.retain_as_published,
                        retain_handling: f.retain_handling,
                        sub_id,
                    };
                    st.subscribe(&id, &f.filter, &spec, opts);
                    codes.push(f.qos.min(2));
                }
                drop(st);
                codec::write_suback(&mut self.out, self.version, pkid, &codes);
            }
            Packet::Unsubscribe { pkid, filters } => {
                let existed: Vec<bool> = {
                    let mut st = self.shared.state.lock();
                    filters.iter().map(|f| st.unsubscribe(&id, f)).collect()
                };
                codec::write_unsuback(&mut self.out, self.version, pkid, &existed);
            }
            Packet::PingReq => codec::write_pingresp(&mut self.out),
            Packet::Disconnect { reason: r, expiry } => {
                if self.connect_expiry == 0 && expiry.is_some_and(|e| e > 0) {
                    return Some(End::Refuse(
                        reason::PROTOCOL_ERROR,
                        "disconnect raised a zero session expiry".into(),
                    ));
                }
                return Some(End::Clean {
                    will: r == reason::DISCONNECT_WITH_WILL,
                    expiry,
                });
            }
            Packet::Auth => {
                return Some(End::Refuse(
                    reason::PROTOCOL_ERROR,
                    "auth without an authentication method".into(),
                ))
            }
            Packet::ServerOnly(what) => {
                return Some(End::Refuse(
                    reason::PROTOCOL_ERROR,
                    format!("a client must not send {what}"),
                ))
            }
        }
        None
    }

    async fn publish(
        &mut self,
        topic: Bytes,
        payload: Bytes,
        qos: u8,
        retain: bool,
        pkid: u16,
        props: Option<PublishProperties>,
    ) -> Option<End> {
        let Ok(mut topic) = String::from_utf8(topic.to_vec()) else {
            return Some(End::Refuse(
                reason::TOPIC_NAME_INVALID,
                "topic is not utf-8".into(),
            ));
        };
        let mut props = props;
        if let Some(alias) = props.as_mut().and_then(|p| p.topic_alias.take()) {
            if alias == 0 || alias > self.shared.server_limits.topic_alias_maximum {
                return Some(End::Refuse(
                    reason::TOPIC_ALIAS_INVALID,
                    format!("topic alias {alias} out of range"),
                ));
            }
            if topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => topic = t.clone(),
                    None => {
                        return Some(End::Refuse(
                            reason::TOPIC_ALIAS_INVALID,
                            format!("topic alias {alias} unknown"),
                        ))
                    }
                }
            } else {
                self.aliases.insert(alias, topic.clone());
            }
        }
        if !topic::valid_topic(&topic) {
            return Some(End::Refuse(
                reason::TOPIC_NAME_INVALID,
                format!("invalid publish topic {topic:?}"),
            ));
        }
        if let Some(p) = props.as_mut() {
            p.subscription_identifiers.clear();
        }
        if let Some(hook) = &self.shared.tuning.panic_on_topic {
            if *hook == topic {
                panic!("test hook: publish to {topic}");
            }
        }
        let id = self.reg.client_id.clone();
        if qos > 0 && self.version == Version::V5 {
            let open = self.pending_qos1 + self.shared.state.lock().qos2_open(&id);
            if open >= usize::from(self.shared.server_limits.receive_maximum) {
                return Some(End::Refuse(
                    reason::RECEIVE_MAXIMUM_EXCEEDED,
                    "more unacknowledged publishes than our receive maximum".into(),
                ));
            }
        }
        if qos == 2 && !self.shared.state.lock().qos2_first(&id, pkid) {
            // A resend of a QoS 2 message already routed: acknowledge it, deliver nothing.
            self.pending.push_back(PendingAck {
                kind: Ack::Pubrec,
                pkid,
                durable: None,
            });
            return None;
        }
        self.signal.messages_in.fetch_add(1, Ordering::Relaxed);
        // An exact-size copy: a message queued for slow or offline subscribers must not pin the
        // publisher's whole read buffer, and the read buffer can then be reused in place.
        let payload = Bytes::copy_from_slice(&payload);
        let origin: Arc<str> = Arc::from(id.as_str());
        let msg = Arc::new(message(
            topic.clone(),
            payload.clone(),
            qos,
            retain,
            props,
            Some(origin),
        ));
        {
            let mut st = self.shared.state.lock();
            st.counters.received += 1;
            st.publish(msg, std::time::Instant::now());
        }
        let (ack, durable) = if qos > 0 {
            let (d, rx) = Durable::new();
            (Some(d), Some(rx))
        } else {
            (None, None)
        };
        let event = SourceEvent::Local(LocalPublish {
            client_id: id,
            username: self.username.clone(),
            topic,
            payload,
            received_ms: now_ms(),
            ack,
        });
        // Awaited: a full router channel slows this publisher down and drops nothing.
        if let Err(tokio::sync::mpsc::error::SendError(ev)) = self.events_tx.send(event).await {
            if let SourceEvent::Local(p) = ev {
                if let Some(a) = p.ack {
                    a.fail();
                }
            }
            return Some(End::Refuse(0x80, "router channel closed".into()));
        }
        if let Some(rx) = durable {
            let kind = if qos == 1 { Ack::Puback } else { Ack::Pubrec };
            if qos == 1 {
                self.pending_qos1 += 1;
            }
            self.pending.push_back(PendingAck {
                kind,
                pkid,
                durable: Some(rx),
            });
        }
        None
    }
}

/// Wait for the head of the pending queue: `Ok` when durable (or nothing to wait for), `Err`
/// when the router dropped it without success.
async fn front_ack(pending: &mut std::collections::VecDeque<PendingAck>) -> Result<(), ()> {
    match pending.front_mut().and_then(|p| p.durable.as_mut()) {
        Some(rx) => rx.await.map_err(|_| ()),
        None => Ok(()),
    }
}

/// A client id for a client that sent an empty one, shaped like Mosquitto's `auto-<uuid>`.
pub fn generated_client_id() -> String {
    let n: u128 = rand::random();
    let h = format!("{n:032x}");
    format!(
        "auto-{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Compare credentials without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_unique_and_mosquitto_shaped() {
        let a = generated_client_id();
        assert!(a.starts_with("auto-") && a.len() == 41, "{a}");
        assert_ne!(a, generated_client_id());
    }

    #[test]
    fn credential_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }
}
