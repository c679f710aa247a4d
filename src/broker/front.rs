//! The front listener: owns the public broker port and proxies each client connection to one of
//! rumqttd's private loopback listeners, fixing on the way what rumqttd does unlike Mosquitto.
//!
//! Per connection it reads the CONNECT, picks the v4 or v5 backend, checks credentials, gives an
//! empty client id a generated one, rewrites keep-alive 0 (and then keeps the backend session
//! alive with its own PINGREQs), parses every client packet so that garbage or server-only packets
//! close that client only, and reports every PUBLISH to the router before forwarding it.
//!
//! It must not route messages itself or hold state beyond one connection; it never writes to a
//! client anything but the backend's bytes, a refusal CONNACK, or a v5 DISCONNECT.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::codec::{self, Connect, Inbound, Refusal, Session, Version};
use super::Tuning;
use crate::config::Secret;
use crate::model::now_ms;
use crate::sources::{LocalPublish, SourceEvent};

/// Initial read buffer per socket direction.
const READ_BUF_BYTES: usize = 4096;
/// After forwarding a client's DISCONNECT, longest wait for rumqttd to close the session.
const DISCONNECT_LINGER: Duration = Duration::from_secs(2);
/// Longest wait for rumqttd's CONNACK after forwarding a CONNECT.
const BACKEND_CONNACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Why one client connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("client i/o failed")]
    Client(#[source] std::io::Error),
    #[error("rumqttd i/o failed")]
    Backend(#[source] std::io::Error),
    #[error("cannot connect to rumqttd at {addr}")]
    BackendConnect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("rumqttd sent no connack within {0:?}")]
    BackendSilent(Duration),
    #[error("no connect within {0:?}")]
    ConnectTimeout(Duration),
    #[error("protocol violation")]
    Protocol(#[source] codec::Error),
    #[error("router channel closed")]
    EventsClosed,
}

/// What every connection task needs, shared read-only.
#[derive(Debug)]
pub struct Shared {
    /// rumqttd's MQTT 3.1.1 listener (also serves 3.1 clients after the CONNECT header swap).
    pub backend_v4: SocketAddr,
    /// rumqttd's MQTT 5 listener.
    pub backend_v5: SocketAddr,
    /// To the router; awaited per PUBLISH, which is the backpressure on the client's socket.
    pub events_tx: mpsc::Sender<SourceEvent>,
    /// Required username, if configured.
    pub username: Option<String>,
    /// Required password, if configured. Never logged.
    pub password: Option<Secret>,
    /// Largest packet accepted from a client, bytes, fixed header included.
    pub max_packet_size: usize,
    /// Keep-alive rewrite and CONNECT timeout.
    pub tuning: Tuning,
}

/// The accept loop.
pub struct Front {
    /// The public broker port.
    pub listener: TcpListener,
    /// Handed to every connection task.
    pub shared: Arc<Shared>,
    /// One permit per open client connection (`max_connections`).
    pub limit: Arc<Semaphore>,
    /// Every connection task is spawned here so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Stops accepting and closes every client.
    pub cancel: CancellationToken,
}

impl Front {
    pub async fn run(self) {
        loop {
            let accepted = tokio::select! {
                _ = self.cancel.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (socket, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "Accept failed on the broker port.");
                    tokio::select! {
                        _ = self.cancel.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                    }
                }
            };
            let Ok(permit) = self.limit.clone().try_acquire_owned() else {
                // As Mosquitto does at its connection limit: close without a CONNACK.
                warn!(%peer, "Connection limit reached; closing new client connection.");
                continue;
            };
            let shared = self.shared.clone();
            let cancel = self.cancel.clone();
            self.tracker.spawn(async move {
                let _permit = permit;
                serve(socket, peer, shared, cancel).await;
            });
        }
        debug!("Broker front stopped accepting.");
    }
}

/// One client connection from accept to close; logs how it ended.
async fn serve(
    socket: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let _ = socket.set_nodelay(true);
    let mut conn = Connection {
        client: socket,
        shared,
        peer,
        client_id: String::new(),
    };
    match conn.run(&cancel).await {
        Ok(()) => debug!(client = %conn.client_id, %peer, "Client connection closed."),
        Err(Error::Protocol(e)) => {
            warn!(client = %conn.client_id, %peer, error = %e, "Client broke the MQTT protocol; closed it.")
        }
        Err(e @ (Error::BackendConnect { .. } | Error::BackendSilent(_))) => {
            error!(client = %conn.client_id, %peer, error = %e, "Embedded rumqttd unreachable; client refused.")
        }
        Err(e @ Error::EventsClosed) => {
            warn!(client = %conn.client_id, %peer, error = %e, "Router gone; closed client connection.")
        }
        Err(e) => debug!(client = %conn.client_id, %peer, error = %e, "Client connection ended."),
    }
}

struct Connection {
    /// The local client's socket; closed when this connection ends.
    client: TcpStream,
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// Effective client id (generated for an empty one); empty until CONNECT is read.
    client_id: String,
}

/// How the pump ended.
enum End {
    /// Socket closed or DISCONNECT passed through.
    Closed,
    /// Close the client, telling a v5 client why first.
    Refuse(DisconnectReasonCode),
}

impl Connection {
    async fn run(&mut self, cancel: &CancellationToken) -> Result<(), Error> {
        let mut buf = BytesMut::with_capacity(READ_BUF_BYTES);
        let timeout = self.shared.tuning.connect_timeout;
        let frame = tokio::select! {
            r = tokio::time::timeout(timeout, self.read_frame(&mut buf)) => {
                r.map_err(|_| Error::ConnectTimeout(timeout))??
            }
            _ = cancel.cancelled() => return Ok(()),
        };
        let Some(frame) = frame else { return Ok(()) };

        let version = match codec::connect_version(&frame) {
            Ok(v) => v,
            Err(e @ codec::Error::UnsupportedProtocol { .. }) => {
                // Mosquitto answers an unknown protocol level with a 3.1.1 CONNACK 0x01.
                let ack = codec::connack_refused(Version::V311, Refusal::ProtocolVersion);
                let _ = self.client.write_all(&ack).await;
                return Err(Error::Protocol(e));
            }
            Err(e) => return Err(Error::Protocol(e)),
        };
        let mut connect = Connect::parse(version, &frame).map_err(Error::Protocol)?;
        self.client_id = connect.client_id().to_owned();

        if !self.authorised(&connect) {
            info!(client = %self.client_id, peer = %self.peer, "Wrong or missing credentials; connection refused.");
            self.refuse(version, Refusal::NotAuthorized).await;
            return Ok(());
        }

        let mut assigned_id = None;
        if self.client_id.is_empty() {
            // Mosquitto: 3.1 never allows an empty id, 3.1.1 only with a clean session, 5 always
            // (and tells the client the id it assigned).
            let allowed = match version {
                Version::V31 => false,
                Version::V311 => connect.clean(),
                Version::V5 => true,
            };
            if !allowed {
                self.refuse(version, Refusal::ClientId).await;
                return Ok(());
            }
            let id = generated_client_id();
            connect.set_client_id(id.clone());
            self.client_id = id.clone();
            assigned_id = Some(id);
        }

        let username = match connect.credentials().0 {
            "" => None,
            u => Some(u.to_owned()),
        };
        let inject_pings = connect.keep_alive() == 0;
        if inject_pings {
            connect.set_keep_alive(self.shared.tuning.zero_keep_alive_secs.max(1));
        }
        connect.strip_password();
        connect.strip_will_properties();
        connect.disable_broker_topic_aliases();
        let connect_bytes = connect.to_bytes().map_err(Error::Protocol)?;

        let addr = if version.is_v4() {
            self.shared.backend_v4
        } else {
            self.shared.backend_v5
        };
        let mut backend = match TcpStream::connect(addr).await {
            Ok(b) => b,
            Err(source) => {
                self.refuse(version, Refusal::ServerUnavailable).await;
                return Err(Error::BackendConnect { addr, source });
            }
        };
        let _ = backend.set_nodelay(true);
        backend
            .write_all(&connect_bytes)
            .await
            .map_err(Error::Backend)?;
        debug!(client = %self.client_id, peer = %self.peer, ?version, "Client connected.");

        let (backend_rd, mut backend_wr) = backend.into_split();
        let (client_rd, mut client_wr) = self.client.split();
        let pings_to_swallow = AtomicU32::new(0);
        let ping_every = inject_pings.then(|| {
            let period =
                Duration::from_secs(u64::from(self.shared.tuning.zero_keep_alive_secs.max(1))) / 2;
            let mut i = tokio::time::interval_at(Instant::now() + period, period);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        });

        let mut up = Upstream {
            shared: &self.shared,
            version,
            client_id: &self.client_id,
            username,
            session: Session::default(),
            qos2_seen: Default::default(),
            pings_to_swallow: &pings_to_swallow,
            ping_every,
        };
        let down = Downstream {
            version,
            assigned_id: assigned_id.as_deref(),
            max_packet_size: self.shared.max_packet_size,
            pings_to_swallow: &pings_to_swallow,
        };
        let end = tokio::select! {
            r = up.run(client_rd, buf, &mut backend_wr) => r,
            r = down.run(backend_rd, &mut client_wr) => r,
            _ = cancel.cancelled() => Ok(End::Refuse(DisconnectReasonCode::ServerShuttingDown)),
        };
        let (end, result) = match end {
            Ok(end) => (end, Ok(())),
            Err(Error::Protocol(e)) => {
                let code = match e {
                    codec::Error::TooLarge { .. } => DisconnectReasonCode::PacketTooLarge,
                    codec::Error::MalformedV4(_) | codec::Error::MalformedV5(_) => {
                        DisconnectReasonCode::MalformedPacket
                    }
                    codec::Error::InvalidTopicAlias(_) => DisconnectReasonCode::TopicAliasInvalid,
                    codec::Error::InvalidTopic => DisconnectReasonCode::TopicNameInvalid,
                    _ => DisconnectReasonCode::ProtocolError,
                };
                (End::Refuse(code), Err(Error::Protocol(e)))
            }
            Err(e @ Error::BackendSilent(_)) => {
                let ack = codec::connack_refused(version, Refusal::ServerUnavailable);
                let _ = client_wr.write_all(&ack).await;
                (End::Closed, Err(e))
            }
            Err(e) => (End::Closed, Err(e)),
        };
        if let (End::Refuse(code), Version::V5) = (end, version) {
            let _ = client_wr.write_all(&codec::v5_disconnect(code)).await;
        }
        let _ = client_wr.shutdown().await;
        result
    }

    /// Read until one complete frame is buffered; `None` when the client closes first.
    async fn read_frame(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, Error> {
        loop {
            if let Some(frame) =
                codec::next_frame(buf, self.shared.max_packet_size).map_err(Error::Protocol)?
            {
                return Ok(Some(frame));
            }
            if self.client.read_buf(buf).await.map_err(Error::Client)? == 0 {
                return Ok(None);
            }
        }
    }

    fn authorised(&self, connect: &Connect) -> bool {
        let (user, pass) = connect.credentials();
        let user_ok = self
            .shared
            .username
            .as_deref()
            .is_none_or(|want| constant_time_eq(want.as_bytes(), user.as_bytes()));
        let pass_ok = self
            .shared
            .password
            .as_ref()
            .is_none_or(|want| constant_time_eq(want.expose().as_bytes(), pass.as_bytes()));
        user_ok && pass_ok
    }

    async fn refuse(&mut self, version: Version, why: Refusal) {
        let _ = self
            .client
            .write_all(&codec::connack_refused(version, why))
            .await;
        let _ = self.client.shutdown().await;
    }
}

/// Client → rumqttd direction.
struct Upstream<'a> {
    shared: &'a Shared,
    version: Version,
    client_id: &'a str,
    username: Option<String>,
    session: Session,
    /// QoS 2 packet ids received and not yet released: a resent QoS 2 PUBLISH is reported once.
    qos2_seen: std::collections::HashSet<u16>,
    /// PINGRESPs the downstream must swallow (answers to our injected PINGREQs).
    pings_to_swallow: &'a AtomicU32,
    /// Present when the client asked for keep-alive 0.
    ping_every: Option<Interval>,
}

impl Upstream<'_> {
    async fn run(
        &mut self,
        mut client_rd: tokio::net::tcp::ReadHalf<'_>,
        mut buf: BytesMut,
        backend_wr: &mut OwnedWriteHalf,
    ) -> Result<End, Error> {
        let mut out = BytesMut::with_capacity(READ_BUF_BYTES);
        loop {
            // Everything complete in the buffer: report each PUBLISH, then forward the batch.
            let mut disconnect = false;
            while let Some(frame) =
                codec::next_frame(&mut buf, self.shared.max_packet_size).map_err(Error::Protocol)?
            {
                let packet = self
                    .session
                    .inbound(self.version, &frame)
                    .map_err(Error::Protocol)?;
                match packet {
                    Inbound::Publish {
                        topic,
                        payload,
                        qos,
                        pkid,
                        rewritten,
                    } => {
                        let first_delivery = qos != 2 || self.qos2_seen.insert(pkid);
                        if first_delivery {
                            self.report(topic, payload).await?;
                        }
                        out.extend_from_slice(rewritten.as_deref().unwrap_or(&frame));
                        continue;
                    }
                    Inbound::PubRel(pkid) => {
                        self.qos2_seen.remove(&pkid);
                    }
                    Inbound::Disconnect => disconnect = true,
                    Inbound::Other => {}
                }
                out.extend_from_slice(&frame);
                if disconnect {
                    break;
                }
            }
            if !out.is_empty() {
                backend_wr.write_all(&out).await.map_err(Error::Backend)?;
                out.clear();
            }
            if disconnect {
                // Let rumqttd close first: if the backend socket closes right behind the
                // DISCONNECT, rumqttd sometimes treats it as an abrupt loss and publishes the
                // will. The downstream half ends this connection when rumqttd closes.
                tokio::time::sleep(DISCONNECT_LINGER).await;
                return Ok(End::Closed);
            }
            tokio::select! {
                n = client_rd.read_buf(&mut buf) => {
                    if n.map_err(Error::Client)? == 0 {
                        return Ok(End::Closed);
                    }
                }
                _ = tick(&mut self.ping_every) => {
                    self.pings_to_swallow.fetch_add(1, Ordering::SeqCst);
                    backend_wr.write_all(&codec::PINGREQ_BYTES).await.map_err(Error::Backend)?;
                }
            }
        }
    }

    async fn report(&self, topic: String, payload: Bytes) -> Result<(), Error> {
        let event = SourceEvent::Local(LocalPublish {
            client_id: self.client_id.to_owned(),
            username: self.username.clone(),
            topic,
            payload,
            received_ms: now_ms(),
        });
        self.shared
            .events_tx
            .send(event)
            .await
            .map_err(|_| Error::EventsClosed)
    }
}

/// rumqttd → client direction.
struct Downstream<'a> {
    version: Version,
    /// Client id the front generated, announced to a v5 client in the CONNACK.
    assigned_id: Option<&'a str>,
    max_packet_size: usize,
    pings_to_swallow: &'a AtomicU32,
}

impl Downstream<'_> {
    async fn run(
        &self,
        mut backend_rd: OwnedReadHalf,
        client_wr: &mut tokio::net::tcp::WriteHalf<'_>,
    ) -> Result<End, Error> {
        let mut buf = BytesMut::with_capacity(READ_BUF_BYTES);
        let mut out = BytesMut::with_capacity(READ_BUF_BYTES);
        let mut first = true;
        loop {
            let read = backend_rd.read_buf(&mut buf);
            let n = if first {
                // A rumqttd whose router thread died accepts TCP but never answers.
                tokio::time::timeout(BACKEND_CONNACK_TIMEOUT, read)
                    .await
                    .map_err(|_| Error::BackendSilent(BACKEND_CONNACK_TIMEOUT))?
            } else {
                read.await
            };
            if n.map_err(Error::Backend)? == 0 {
                return Ok(End::Closed);
            }
            // rumqttd's packets are not size-limited here: the client chose to subscribe.
            while let Some(frame) =
                codec::next_frame(&mut buf, usize::MAX).map_err(Error::Protocol)?
            {
                let kind = codec::packet_type(&frame);
                if kind == codec::PINGRESP
                    && self
                        .pings_to_swallow
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                {
                    continue;
                }
                if first && kind == codec::CONNACK && self.version == Version::V5 {
                    let frame =
                        codec::rewrite_v5_connack(frame, self.assigned_id, self.max_packet_size);
                    out.extend_from_slice(&frame);
                } else {
                    out.extend_from_slice(&frame);
                }
                first = false;
            }
            if !out.is_empty() {
                client_wr.write_all(&out).await.map_err(Error::Client)?;
                out.clear();
            }
        }
    }
}

/// Next injected-ping tick, or never when the client has its own keep-alive.
async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// A client id for a client that sent an empty one, shaped like Mosquitto's `auto-<uuid>`.
fn generated_client_id() -> String {
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
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
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
