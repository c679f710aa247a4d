//! The embedded local MQTT broker that replaces Mosquitto on the edge box.
//!
//! Its one job: accept local MQTT 3.1/3.1.1/5 clients on the one public port, behave towards
//! them as Mosquitto 2.x does, report every PUBLISH they send to the router as a
//! [`SourceEvent::Local`] (acknowledging QoS 1/2 only once the router made it durable), and give
//! the bridge a [`BrokerHandle`] to publish to, subscribe from, and inspect local clients.
//!
//! ```text
//!  local clients ──TCP──▶ listener ─────┐
//!  LAN clients ──TLS──▶ tls_listen ─────┴spawn─▶ one task per connection (conn.rs)
//!                                              │ route ▼            │ every PUBLISH
//!                    Mutex<State> (state.rs): sessions, subscription tree, retained
//!                                              ▲                    ▼
//!  BrokerHandle (publish, publish_to, subscribe) ─┘     events_tx: mpsc<SourceEvent> ─▶ router
//!  housekeeping task: $SYS, will delays, session expiry, drop WARN, persistence autosave,
//!                     returning freed memory to the system after the broker shrank (memory.rs)
//! ```
//!
//! The optional TLS listener (`tls_listen`, see [`tls`]) serves exactly what the plain one does;
//! both share `max_connections` and the CONNECT timeout, which also bounds the TLS handshake.
//!
//! The wire codec is rumqttc's `mqttbytes` (v4 and v5); sessions, routing and flow control are
//! ours (see `docs/BROKER.md` for why). It must not map, convert or store messages (the router
//! does), and it never feeds what the bridge publishes through [`BrokerHandle`] into `events_tx`.

mod codec;
mod conn;
pub mod memory;
mod persist;
mod state;
pub mod tls;
pub mod topic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::{BrokerConfig, Secret};
use crate::model::TimestampMs;
use crate::sources::SourceEvent;
use state::{Limits, Message, Queued, State};

/// Capacity of each channel returned by [`BrokerHandle::subscribe`]. When a bridge subscriber
/// falls this far behind, further messages for it are dropped and counted (routing never waits
/// for the bridge).
pub const SUBSCRIPTION_CAPACITY: usize = 1024;
/// How long a new connection may take to send CONNECT (as Mosquitto's default).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Inbound QoS 1/2 messages a v5 client may have unacknowledged (our Receive Maximum).
pub const RECEIVE_MAXIMUM: u16 = 100;
/// Highest inbound topic alias a v5 client may use (Mosquitto's default is 10).
pub const TOPIC_ALIAS_MAXIMUM: u16 = 10;
/// How often will delays and session expiry are checked.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);
/// At most one WARN per this period about dropped messages.
const DROP_WARN_EVERY: Duration = Duration::from_secs(60);
/// At shutdown, longest wait for connection tasks to close before the final save.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);
/// Reason code the state sends a connection whose session another connection took over.
pub(crate) const REASON_SESSION_TAKEN_OVER: u8 = 0x8E;

/// Internal knobs. The defaults are what production uses; tests shorten them.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// How long a new connection may take to send CONNECT.
    pub connect_timeout: Duration,
    /// Test hook: a connection task panics when its client publishes to this topic (proves
    /// that a panic closes that connection only). Always `None` in production.
    #[doc(hidden)]
    pub panic_on_topic: Option<String>,
    /// Returns freed memory to the system once the broker has shrunk (see [`memory`]). Default:
    /// the function the binary installed with [`memory::set_release`], if any.
    pub release_memory: Option<memory::Release>,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            panic_on_topic: None,
            release_memory: memory::release_fn(),
        }
    }
}

/// What can fail when starting or using the broker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("broker.tls_listen: {0}")]
    TlsListen(String),
    #[error("cannot set up the broker's TLS listener")]
    Tls(#[from] tls::Error),
    #[error("cannot load the broker persistence file {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: persist::Error,
    },
    #[error("invalid topic {0:?}")]
    InvalidTopic(String),
    #[error("invalid topic filter {0:?}")]
    InvalidFilter(String),
    #[error("no session for client {client_id:?}; publish to {topic:?} not sent")]
    NoSession {
        client_id: String,
        topic: String,
        payload: Bytes,
    },
}

/// One connected local client, for statistics and status pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub client_id: String,
    pub username: Option<String>,
    pub peer: SocketAddr,
    /// "MQTT 3.1", "MQTT 3.1.1" or "MQTT 5.0".
    pub protocol: &'static str,
    /// When this connection was accepted (Unix ms).
    pub connected_since: TimestampMs,
    /// PUBLISH packets received from this connection.
    pub messages_in: u64,
    /// PUBLISH packets sent to this connection.
    pub messages_out: u64,
}

/// What every connection task and handle shares.
pub(crate) struct Shared {
    /// Sessions, subscriptions, retained messages. Never held across an `.await`.
    state: Mutex<State>,
    /// Required username, if configured.
    username: Option<String>,
    /// Required password, if configured. Never logged.
    password: Option<Secret>,
    /// Largest packet accepted from a client, bytes, fixed header included.
    max_packet_size: usize,
    /// Outbound QoS 1/2 in flight per client.
    max_inflight: usize,
    /// Advertised to v5 clients in CONNACK.
    server_limits: codec::ServerLimits,
    tuning: Tuning,
    /// Connection ids, so a taken-over connection cannot touch its successor's session.
    next_conn: AtomicU64,
}

impl Shared {
    fn authorised(&self, user: Option<&str>, pass: Option<&str>) -> bool {
        let user_ok = self.username.as_deref().is_none_or(|want| {
            conn::constant_time_eq(want.as_bytes(), user.unwrap_or("").as_bytes())
        });
        let pass_ok = self.password.as_ref().is_none_or(|want| {
            conn::constant_time_eq(want.expose().as_bytes(), pass.unwrap_or("").as_bytes())
        });
        user_ok && pass_ok
    }
}

/// Clonable front of the running broker for the rest of the bridge.
#[derive(Clone)]
pub struct BrokerHandle {
    /// The bound public address (useful when `listen` had port 0).
    local_addr: SocketAddr,
    /// The TLS listener's bound address and acceptor, when `tls_listen` is set.
    tls: Option<(SocketAddr, Arc<tls::TlsState>)>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for BrokerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerHandle")
            .field("local_addr", &self.local_addr)
            .field("tls_local_addr", &self.tls_local_addr())
            .finish_non_exhaustive()
    }
}

/// Start the broker on `listen` with production tuning. See [`start_with`].
pub async fn start(
    cfg: &BrokerConfig,
    listen: SocketAddr,
    events_tx: mpsc::Sender<SourceEvent>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<BrokerHandle, Error> {
    start_with(cfg, listen, events_tx, tracker, cancel, Tuning::default()).await
}

/// Bind a listening socket (SO_REUSEADDR, so a restart rebinds at once).
fn bind(listen: SocketAddr) -> Result<TcpListener, Error> {
    let bind_err = |source| Error::Bind {
        addr: listen,
        source,
    };
    let socket = if listen.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(bind_err)?;
    socket.set_reuseaddr(true).map_err(bind_err)?;
    socket.bind(listen).map_err(bind_err)?;
    socket.listen(1024).map_err(bind_err)
}

/// Bind the listener on `listen` (and the TLS listener on `cfg.tls_listen` when set, after
/// reading its certificate and key), load persisted state when enabled, and spawn the accept
/// loops and the housekeeping task on `tracker`. Returns once the ports accept connections.
pub async fn start_with(
    cfg: &BrokerConfig,
    listen: SocketAddr,
    events_tx: mpsc::Sender<SourceEvent>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
    tuning: Tuning,
) -> Result<BrokerHandle, Error> {
    let tls_state = match (&cfg.tls_listen, tls::TlsSettings::from_config(cfg)) {
        (None, _) => None,
        (Some(addr), Some(settings)) => {
            let addr = crate::config::parse_listen(addr).map_err(Error::TlsListen)?;
            Some((addr, Arc::new(tls::TlsState::new(settings)?)))
        }
        (Some(_), None) => {
            return Err(Error::TlsListen(
                "needs broker.tls_cert_file and broker.tls_key_file".into(),
            ))
        }
    };
    let listener = bind(listen)?;
    let local_addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: listen,
        source,
    })?;
    let tls_listener = match tls_state {
        Some((addr, state)) => {
            let l = bind(addr)?;
            let bound = l
                .local_addr()
                .map_err(|source| Error::Bind { addr, source })?;
            Some((l, bound, state))
        }
        None => None,
    };

    let mut state = State::new(Limits {
        max_queued: cfg.max_queued_messages,
    });
    let persist_path = cfg.persistence.then(|| cfg.persistence_file.clone());
    if let Some(path) = &persist_path {
        let p = path.clone();
        let snapshot = tokio::task::spawn_blocking(move || persist::load(&p))
            .await
            .map_err(|e| Error::Load {
                path: path.clone(),
                source: persist::Error::Worker(e.to_string()),
            })?
            .map_err(|source| Error::Load {
                path: path.clone(),
                source,
            })?;
        let (sessions, retained) = persist::restore(&mut state, snapshot, Instant::now());
        info!(path = %path.display(), sessions, retained, "Broker state restored.");
    }

    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        username: cfg.username.clone(),
        password: cfg.password.clone(),
        max_packet_size: cfg.max_packet_size,
        max_inflight: usize::from(cfg.max_inflight_messages),
        server_limits: codec::ServerLimits {
            receive_maximum: RECEIVE_MAXIMUM,
            max_packet_size: u32::try_from(cfg.max_packet_size).unwrap_or(u32::MAX),
            topic_alias_maximum: TOPIC_ALIAS_MAXIMUM,
        },
        tuning,
        next_conn: AtomicU64::new(1),
    });
    let conns = TaskTracker::new();
    // One limit for both listeners: `max_connections` counts every local client.
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let mut tls = None;
    if let Some((l, bound, state)) = tls_listener {
        tracker.spawn(accept_loop(
            l,
            Some(state.clone()),
            shared.clone(),
            events_tx.clone(),
            limit.clone(),
            conns.clone(),
            cancel.clone(),
        ));
        tls = Some((bound, state));
    }
    tracker.spawn(accept_loop(
        listener,
        None,
        shared.clone(),
        events_tx,
        limit,
        conns.clone(),
        cancel.clone(),
    ));
    tracker.spawn(housekeeping(
        shared.clone(),
        conns,
        persist_path,
        cfg.autosave_interval,
        cfg.sys_interval,
        cancel,
    ));
    info!(listen = %local_addr, "Local MQTT broker listening.");
    if let Some((bound, state)) = &tls {
        let s = state.settings();
        info!(
            tls_listen = %bound,
            cert = %s.cert_file.display(),
            client_certs = if s.require_client_cert {
                "required"
            } else if s.ca_file.is_some() {
                "verified when presented"
            } else {
                "not requested"
            },
            "Local MQTT broker listening for TLS."
        );
    }
    Ok(BrokerHandle {
        local_addr,
        tls,
        shared,
    })
}

/// Accepts until cancelled; with `tls`, each connection's task does the TLS handshake first
/// (within the CONNECT timeout, so a silent client cannot hold a slot). The accept loops and the
/// connection tasks hold the only `events_tx` clones (not [`Shared`], which the router's own
/// [`BrokerHandle`] keeps alive), so the router's input closes once the broker has stopped.
async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<tls::TlsState>>,
    shared: Arc<Shared>,
    events_tx: mpsc::Sender<SourceEvent>,
    limit: Arc<Semaphore>,
    conns: TaskTracker,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "Accept failed on the broker port.");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                }
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            // As Mosquitto does at its connection limit: close without a CONNACK.
            warn!(%peer, "Connection limit reached; closing new client connection.");
            continue;
        };
        let connect_deadline = tokio::time::Instant::now() + shared.tuning.connect_timeout;
        let shared = shared.clone();
        let events_tx = events_tx.clone();
        let cancel = cancel.clone();
        // A panic in the task unwinds it alone (tokio catches it); the registration guard in
        // `conn` detaches the session on the way out. Two task bodies, so a plain connection's
        // task does not carry the (larger) TLS state.
        match &tls {
            None => {
                conns.spawn(async move {
                    let _permit = permit;
                    let _ = socket.set_nodelay(true);
                    conn::serve(socket, peer, connect_deadline, shared, events_tx, cancel).await;
                });
            }
            Some(tls) => {
                let tls = tls.clone();
                conns.spawn(async move {
                    let _permit = permit;
                    let _ = socket.set_nodelay(true);
                    serve_tls(
                        tls,
                        socket,
                        peer,
                        connect_deadline,
                        shared,
                        events_tx,
                        cancel,
                    )
                    .await;
                });
            }
        }
    }
    debug!("Broker stopped accepting.");
}

/// A TLS listener's connection: the handshake (by the CONNECT deadline, abandoned at shutdown),
/// then the same service as a plain connection.
async fn serve_tls(
    tls: Arc<tls::TlsState>,
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    connect_deadline: tokio::time::Instant,
    shared: Arc<Shared>,
    events_tx: mpsc::Sender<SourceEvent>,
    cancel: CancellationToken,
) {
    let handshake = tokio::select! {
        r = tokio::time::timeout_at(connect_deadline, tls.acceptor().accept(socket)) => r,
        _ = cancel.cancelled() => return,
    };
    match handshake {
        Ok(Ok(stream)) => {
            conn::serve(stream, peer, connect_deadline, shared, events_tx, cancel).await
        }
        Ok(Err(e)) => tls.handshake_failed(peer, &e.to_string()),
        Err(_) => debug!(
            %peer,
            timeout = ?shared.tuning.connect_timeout,
            "TLS handshake not finished within the CONNECT timeout; connection closed."
        ),
    }
}

/// Periodic work: will delays and session expiry (every second), `$SYS` topics, the drop WARN,
/// persistence autosave, returning freed memory (see [`memory`]); at shutdown waits briefly for
/// connections to close, then saves.
async fn housekeeping(
    shared: Arc<Shared>,
    conns: TaskTracker,
    persist_path: Option<PathBuf>,
    autosave: Duration,
    sys_interval: Duration,
    cancel: CancellationToken,
) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut next_sys = Instant::now();
    let mut next_save = Instant::now() + autosave;
    let mut next_warn = Instant::now() + DROP_WARN_EVERY;
    let mut warned = (0u64, 0u64);
    let mut trim = memory::Policy::new(Instant::now(), shared.state.lock().activity());
    let mut releasing: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let activity = {
            let mut st = shared.state.lock();
            st.housekeep(now);
            st.activity()
        };
        if trim.tick(now, activity) {
            if let Some(release) = shared.tuning.release_memory {
                // It walks every arena (milliseconds on a large heap): not on a runtime worker,
                // and never two at once.
                if releasing.as_ref().is_none_or(|h| h.is_finished()) {
                    releasing = Some(tokio::task::spawn_blocking(move || {
                        let started = Instant::now();
                        let released = release();
                        debug!(released, took = ?started.elapsed(), "Returned freed memory to the system.");
                    }));
                }
            }
        }
        if !sys_interval.is_zero() && now >= next_sys {
            next_sys = now + sys_interval;
            publish_sys(&shared, started, now);
        }
        if now >= next_warn {
            next_warn = now + DROP_WARN_EVERY;
            let (q, b) = {
                let st = shared.state.lock();
                (st.counters.dropped_queue_full, st.counters.dropped_bridge)
            };
            if (q, b) != warned {
                warn!(
                    queue_full = q - warned.0,
                    bridge_full = b - warned.1,
                    queue_full_total = q,
                    "Messages dropped for clients whose queues were full (max_queued_messages) in the last minute."
                );
                warned = (q, b);
            }
        }
        if let Some(path) = &persist_path {
            if now >= next_save {
                next_save = now + autosave;
                save(&shared, path).await;
            }
        }
    }
    conns.close();
    if tokio::time::timeout(SHUTDOWN_DRAIN, conns.wait())
        .await
        .is_err()
    {
        debug!("Some broker connections were still closing at shutdown.");
    }
    if let Some(path) = &persist_path {
        save(&shared, path).await;
    }
    debug!("Broker housekeeping stopped.");
}

async fn save(shared: &Arc<Shared>, path: &std::path::Path) {
    let snapshot = persist::snapshot(&shared.state.lock(), Instant::now());
    let p = path.to_path_buf();
    match tokio::task::spawn_blocking(move || persist::save(&p, &snapshot)).await {
        Ok(Ok(())) => debug!(path = %path.display(), "Broker state saved."),
        Ok(Err(e)) => {
            error!(path = %path.display(), error = %e, "Saving the broker state failed; retained messages and sessions may not survive a restart.")
        }
        Err(e) => error!(error = %e, "Broker state save task failed."),
    }
}

/// Mosquitto-style `$SYS/broker/...` topics, retained.
fn publish_sys(shared: &Shared, started: Instant, now: Instant) {
    let mut st = shared.state.lock();
    let values = [
        (
            "$SYS/broker/version",
            format!("dlms-bridge {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", now.duration_since(started).as_secs()),
        ),
        ("$SYS/broker/clients/connected", st.connected.to_string()),
        ("$SYS/broker/clients/total", st.sessions.len().to_string()),
        (
            "$SYS/broker/messages/received",
            st.counters.received.to_string(),
        ),
        ("$SYS/broker/messages/sent", st.counters.sent.to_string()),
        (
            "$SYS/broker/messages/dropped",
            (st.counters.dropped_queue_full + st.counters.dropped_bridge).to_string(),
        ),
        (
            "$SYS/broker/retained messages/count",
            st.retained.len().to_string(),
        ),
        ("$SYS/broker/subscriptions/count", st.tree.len().to_string()),
        (
            "$SYS/broker/store/messages/count",
            st.queued_total().to_string(),
        ),
    ];
    for (topic, value) in values {
        let msg = Message {
            topic: topic.to_owned(),
            payload: Bytes::from(value),
            qos: 0,
            retain: true,
            props: None,
            expires: None,
            origin: None,
        };
        st.publish(Arc::new(msg), now);
    }
}

impl BrokerHandle {
    /// The bound public address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The TLS listener's bound address, when `tls_listen` is set.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|(a, _)| *a)
    }

    /// SIGHUP: re-read the TLS listener's certificate, key and client CA (from `settings`, the
    /// new configuration's files); new connections get them, connections already up keep
    /// theirs. On failure the previous ones stay and an ERROR says why. `Ok(false)` when there
    /// is no TLS listener (or the new configuration has none: adding or removing the listener
    /// needs a restart).
    pub fn reload_tls(&self, settings: Option<tls::TlsSettings>) -> Result<bool, tls::Error> {
        let (Some((addr, state)), Some(settings)) = (&self.tls, settings) else {
            return Ok(false);
        };
        match state.reload(settings) {
            Ok(()) => {
                info!(tls_listen = %addr, "Re-read the broker's TLS certificate and key.");
                Ok(true)
            }
            Err(e) => {
                error!(
                    tls_listen = %addr,
                    error = %e,
                    "Cannot re-read the broker's TLS certificate or key; keeping the previous ones."
                );
                Err(e)
            }
        }
    }

    /// Publish to local subscribers (QoS 0 from the broker's side; `retain` stores it for later
    /// subscribers, an empty retained payload clears it). Never reported on `events_tx`.
    pub async fn publish(&self, topic: &str, payload: Bytes, retain: bool) -> Result<(), Error> {
        if !topic::valid_topic(topic) {
            return Err(Error::InvalidTopic(topic.to_owned()));
        }
        let msg = Message {
            topic: topic.to_owned(),
            payload,
            qos: 0,
            retain,
            props: None,
            expires: None,
            origin: None,
        };
        self.shared
            .state
            .lock()
            .publish(Arc::new(msg), Instant::now());
        Ok(())
    }

    /// Deliver to one client session only (e.g. a device-API client's RPC), whatever else is
    /// subscribed. Sent at QoS 1 when the session has a matching QoS ≥ 1 subscription (so it is
    /// queued while the client is offline with a persistent session), otherwise QoS 0.
    /// `Error::NoSession` when no session has that client id.
    pub async fn publish_to(
        &self,
        client_id: &str,
        topic: &str,
        payload: Bytes,
    ) -> Result<(), Error> {
        if !topic::valid_topic(topic) {
            return Err(Error::InvalidTopic(topic.to_owned()));
        }
        let mut st = self.shared.state.lock();
        let sub_qos = st.sessions.get(client_id).map(|s| {
            s.subs
                .iter()
                .filter_map(|(raw, o)| {
                    let spec = topic::parse_filter(raw)?;
                    topic::matches(spec.filter, topic).then_some(o.qos)
                })
                .max()
                .unwrap_or(0)
        });
        let Some(sub_qos) = sub_qos else {
            return Err(Error::NoSession {
                client_id: client_id.to_owned(),
                topic: topic.to_owned(),
                payload,
            });
        };
        let qos = sub_qos.min(1);
        let msg = Arc::new(Message {
            topic: topic.to_owned(),
            payload,
            qos,
            retain: false,
            props: None,
            expires: None,
            origin: None,
        });
        st.enqueue(
            client_id,
            Queued {
                msg,
                qos,
                retain: false,
                sub_ids: Vec::new(),
            },
        );
        Ok(())
    }

    /// Receive every local message whose topic matches `filter` as `(topic, payload)`, starting
    /// with the retained messages that match. Dropping the receiver ends the subscription.
    pub async fn subscribe(&self, filter: &str) -> Result<mpsc::Receiver<(String, Bytes)>, Error> {
        if !topic::valid_filter(filter) {
            return Err(Error::InvalidFilter(filter.to_owned()));
        }
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_CAPACITY);
        let mut st = self.shared.state.lock();
        let mut retained: Vec<(String, Bytes)> = st
            .retained
            .values()
            .filter(|m| topic::matches(filter, &m.topic))
            .map(|m| (m.topic.clone(), m.payload.clone()))
            .collect();
        retained.sort_by(|a, b| a.0.cmp(&b.0));
        for r in retained {
            if tx.try_send(r).is_err() {
                st.counters.dropped_bridge += 1;
            }
        }
        st.bridge_subs.push(state::BridgeSub {
            filter: filter.to_owned(),
            tx,
        });
        Ok(rx)
    }

    /// Connected local clients.
    pub fn clients(&self) -> Vec<ClientInfo> {
        self.shared.state.lock().clients()
    }

    /// Number of connected local clients.
    pub fn client_count(&self) -> usize {
        self.shared.state.lock().connected
    }
}
