//! The embedded local MQTT broker that replaces Mosquitto on the edge box.
//!
//! Its one job: accept local MQTT 3.1/3.1.1/5 clients on the public port, behave towards them as
//! Mosquitto does, report every PUBLISH they send to the router as a [`SourceEvent::Local`], and
//! give the bridge a [`BrokerHandle`] to publish to and subscribe from local clients.
//!
//! ```text
//!  local clients ──TCP──▶ front (our listener, `front.rs`) ──TCP loopback──▶ rumqttd v4 / v5 listener
//!                           │ every PUBLISH, before forwarding                      ▲
//!                           ▼                                                       │ local link
//!                 events_tx: mpsc<SourceEvent> ─▶ router        BrokerHandle ─▶ link task (this file)
//! ```
//!
//! rumqttd 0.20 does the routing, sessions, retained messages and wills; the front owns the
//! public socket because rumqttd deviates from Mosquitto (keep-alive 0, empty client ids, one
//! bad client breaking the v5 listener, no per-client identity on its local link). rumqttd's
//! listeners sit on private loopback ports. `Broker::start()` blocks forever and cannot be
//! stopped, so rumqttd runs on a dedicated thread that outlives cancellation (see
//! `docs/BROKER.md`).
//!
//! It must not map, convert or store messages (the router does), and it must never feed what the
//! bridge publishes through [`BrokerHandle::publish`] back into `events_tx`.

mod codec;
mod front;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::{ConnectionSettings, Notification, RouterConfig, ServerSettings};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::BrokerConfig;
use crate::sources::SourceEvent;

/// Capacity of the handle → link task command channel; a full channel makes `publish` wait.
const MAX_LINK_COMMANDS: usize = 256;
/// Capacity of each channel returned by [`BrokerHandle::subscribe`]. When a subscriber falls this
/// far behind, further messages for it are dropped and counted (the link task must keep up with
/// rumqttd, and blocking it would also block `publish`).
pub const SUBSCRIPTION_CAPACITY: usize = 1024;
/// How long `start` waits for rumqttd's private listeners to accept connections.
const BACKEND_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between readiness probes of the rumqttd listeners during start.
const BACKEND_PROBE_INTERVAL: Duration = Duration::from_millis(20);
/// Client id of the bridge's own rumqttd local link.
const LINK_CLIENT_ID: &str = "dlms-bridge-local-link";
/// Size of one in-memory commitlog segment in rumqttd, per subscribed filter. rumqttd keeps
/// messages until segments rotate, so memory is about filters × size × (count + 1); a subscriber
/// further behind than that skips messages (1 MiB lost half of a 20 000-message burst).
const SEGMENT_SIZE_BYTES: usize = 4 * 1024 * 1024;
/// Segments kept per topic besides the active one.
const SEGMENT_COUNT: usize = 2;
/// Outgoing packets rumqttd buffers per connection.
const MAX_OUTGOING_PACKETS: u64 = 200;
/// In-flight QoS 1/2 messages rumqttd allows per connection.
const MAX_INFLIGHT: usize = 100;
/// How long rumqttd waits for the CONNECT the front sends right after connecting.
const BACKEND_CONNECT_TIMEOUT_MS: u16 = 5_000;
/// Router connection slots kept beyond `max_connections` for the local link and short-lived
/// overlaps while a client reconnects.
const RESERVED_ROUTER_CONNECTIONS: usize = 16;
/// Slack added to rumqttd's packet limit: the front's CONNECT rewrite can grow a packet.
const BACKEND_PACKET_SLACK_BYTES: usize = 1024;

/// Keep-alive the front writes into the backend CONNECT of a client that asked for 0.
pub const DEFAULT_ZERO_KEEP_ALIVE_SECS: u16 = 60;
/// How long the front waits for a client's CONNECT.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Internal knobs of the front listener. The defaults are what production uses; tests shorten
/// them so they need not wait a minute for a keep-alive to expire.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Keep-alive (seconds) sent to rumqttd for a client whose CONNECT says 0; the front then
    /// sends PINGREQs to rumqttd every half of it and swallows the PINGRESPs.
    pub zero_keep_alive_secs: u16,
    /// How long a new connection may take to send CONNECT.
    pub connect_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            zero_keep_alive_secs: DEFAULT_ZERO_KEEP_ALIVE_SECS,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
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
    #[error("cannot reserve a loopback port for rumqttd")]
    ReservePort(#[source] std::io::Error),
    #[error("cannot start the rumqttd thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot open the rumqttd local link")]
    OpenLink(#[source] Box<LinkError>),
    #[error("rumqttd did not accept connections on {addr} within {timeout:?}")]
    BackendNotReady { addr: SocketAddr, timeout: Duration },
    #[error("broker start was interrupted")]
    StartAborted,
    #[error("broker link task has stopped; publish to {topic:?} not sent")]
    LinkClosed { topic: String, payload: Bytes },
    #[error("rumqttd refused the local link request for {topic:?}")]
    Link {
        topic: String,
        payload: Bytes,
        #[source]
        source: Box<LinkError>,
    },
    #[error("invalid topic {0:?}")]
    InvalidTopic(String),
    #[error("invalid topic filter {0:?}")]
    InvalidFilter(String),
}

/// Clonable front of the running broker for the rest of the bridge.
#[derive(Debug, Clone)]
pub struct BrokerHandle {
    /// The bound public address (useful when `listen` had port 0).
    local_addr: SocketAddr,
    /// To the link task, the only owner of the rumqttd local link.
    cmd_tx: mpsc::Sender<LinkCommand>,
}

/// Requests from handles to the link task.
#[derive(Debug)]
enum LinkCommand {
    /// Publish to local subscribers.
    Publish {
        topic: String,
        payload: Bytes,
        retain: bool,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Register one more bridge subscriber.
    Subscribe {
        filter: String,
        tx: mpsc::Sender<(String, Bytes)>,
    },
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

/// Start rumqttd on its own thread, the link task and the front listener on `tracker`. Returns
/// once the public port and both rumqttd listeners accept connections.
pub async fn start_with(
    cfg: &BrokerConfig,
    listen: SocketAddr,
    events_tx: mpsc::Sender<SourceEvent>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
    tuning: Tuning,
) -> Result<BrokerHandle, Error> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Bind {
            addr: listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: listen,
        source,
    })?;

    let v4_addr = reserve_loopback_port()?;
    let v5_addr = reserve_loopback_port()?;
    let rumqttd_config = backend_config(cfg, v4_addr, v5_addr);
    // Broker::new spawns rumqttd's router thread and `link` blocks on the router's reply.
    let (link_tx, link_rx) = tokio::task::spawn_blocking(move || {
        let mut broker = rumqttd::Broker::new(rumqttd_config);
        let link = broker
            .link(LINK_CLIENT_ID)
            .map_err(|e| Error::OpenLink(Box::new(e)))?;
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                // Blocks for the life of the process; it only returns if its listeners die.
                if let Err(e) = broker.start() {
                    error!(error = %e, "Embedded rumqttd stopped; local clients are cut off.");
                }
            })
            .map_err(Error::Thread)?;
        Ok::<_, Error>(link)
    })
    .await
    .map_err(|_| Error::StartAborted)??;

    for addr in [v4_addr, v5_addr] {
        wait_until_accepting(addr).await?;
    }

    let (cmd_tx, cmd_rx) = mpsc::channel(MAX_LINK_COMMANDS);
    let link = LinkTask {
        link_tx,
        link_rx,
        cmd_rx,
        subscribers: Vec::new(),
        dropped: 0,
        cancel: cancel.clone(),
    };
    tracker.spawn(link.run());

    let shared = Arc::new(front::Shared {
        backend_v4: v4_addr,
        backend_v5: v5_addr,
        events_tx,
        username: cfg.username.clone(),
        password: cfg.password.clone(),
        max_packet_size: cfg.max_packet_size,
        tuning,
    });
    let front = front::Front {
        listener,
        shared,
        limit: Arc::new(Semaphore::new(cfg.max_connections)),
        tracker: tracker.clone(),
        cancel,
    };
    tracker.spawn(front.run());
    info!(listen = %local_addr, rumqttd_v4 = %v4_addr, rumqttd_v5 = %v5_addr, "Local MQTT broker listening.");

    Ok(BrokerHandle { local_addr, cmd_tx })
}

impl BrokerHandle {
    /// The bound public address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Publish to local clients (QoS 0 from the broker's side; `retain` stores it for later
    /// subscribers). Never reported on `events_tx`. On failure the payload is handed back in the
    /// error.
    pub async fn publish(&self, topic: &str, payload: Bytes, retain: bool) -> Result<(), Error> {
        if topic.is_empty() || !rumqttc::mqttbytes::valid_topic(topic) {
            return Err(Error::InvalidTopic(topic.to_owned()));
        }
        let (reply, reply_rx) = oneshot::channel();
        let cmd = LinkCommand::Publish {
            topic: topic.to_owned(),
            payload,
            retain,
            reply,
        };
        if let Err(mpsc::error::SendError(cmd)) = self.cmd_tx.send(cmd).await {
            return Err(match cmd {
                LinkCommand::Publish { topic, payload, .. } => Error::LinkClosed { topic, payload },
                LinkCommand::Subscribe { filter, .. } => Error::LinkClosed {
                    topic: filter,
                    payload: Bytes::new(),
                },
            });
        }
        reply_rx.await.unwrap_or_else(|_| {
            Err(Error::LinkClosed {
                topic: topic.to_owned(),
                payload: Bytes::new(),
            })
        })
    }

    /// Receive every local message whose topic matches `filter` as `(topic, payload)`, QoS 0.
    /// Dropping the receiver ends the subscription.
    pub async fn subscribe(&self, filter: &str) -> Result<mpsc::Receiver<(String, Bytes)>, Error> {
        if !rumqttc::mqttbytes::valid_filter(filter) {
            return Err(Error::InvalidFilter(filter.to_owned()));
        }
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_CAPACITY);
        self.cmd_tx
            .send(LinkCommand::Subscribe {
                filter: filter.to_owned(),
                tx,
            })
            .await
            .map_err(|_| Error::LinkClosed {
                topic: filter.to_owned(),
                payload: Bytes::new(),
            })?;
        Ok(rx)
    }
}

/// rumqttd configuration: one v4 and one v5 listener on private loopback ports, no auth (the
/// front checks credentials), dynamic filters on (a publish to a topic with no subscriber must
/// never be an error).
fn backend_config(cfg: &BrokerConfig, v4: SocketAddr, v5: SocketAddr) -> rumqttd::Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: BACKEND_CONNECT_TIMEOUT_MS,
        max_payload_size: cfg
            .max_packet_size
            .saturating_add(BACKEND_PACKET_SLACK_BYTES),
        max_inflight_count: MAX_INFLIGHT,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = |name: &str, listen| ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    rumqttd::Config {
        id: 0,
        router: RouterConfig {
            max_connections: cfg
                .max_connections
                .saturating_add(RESERVED_ROUTER_CONNECTIONS),
            max_outgoing_packet_count: MAX_OUTGOING_PACKETS,
            max_segment_size: SEGMENT_SIZE_BYTES.max(cfg.max_packet_size),
            max_segment_count: SEGMENT_COUNT,
            ..Default::default()
        },
        v4: Some(HashMap::from([("v4".to_owned(), server("v4", v4))])),
        v5: Some(HashMap::from([("v5".to_owned(), server("v5", v5))])),
        ..Default::default()
    }
}

/// Pick a free loopback port for a rumqttd listener. rumqttd binds the port itself and cannot
/// report an ephemeral one, so the port is released before rumqttd binds it; the readiness probe
/// catches the rare case where someone else took it meanwhile.
fn reserve_loopback_port() -> Result<SocketAddr, Error> {
    let probe =
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(Error::ReservePort)?;
    probe.local_addr().map_err(Error::ReservePort)
}

/// Wait until rumqttd accepts TCP on `addr`.
async fn wait_until_accepting(addr: SocketAddr) -> Result<(), Error> {
    let probe = async {
        loop {
            if TcpStream::connect(addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(BACKEND_PROBE_INTERVAL).await;
        }
    };
    tokio::time::timeout(BACKEND_READY_TIMEOUT, probe)
        .await
        .map_err(|_| Error::BackendNotReady {
            addr,
            timeout: BACKEND_READY_TIMEOUT,
        })
}

/// The only owner of the rumqttd local link: publishes for handles and fans messages out to
/// bridge subscribers.
struct LinkTask {
    link_tx: LinkTx,
    link_rx: LinkRx,
    /// From every [`BrokerHandle`].
    cmd_rx: mpsc::Receiver<LinkCommand>,
    /// Bridge subscribers: (filter, their channel).
    subscribers: Vec<(String, mpsc::Sender<(String, Bytes)>)>,
    /// Messages dropped because a subscriber's channel was full.
    dropped: u64,
    /// Stops the task at shutdown.
    cancel: CancellationToken,
}

impl LinkTask {
    async fn run(mut self) {
        // One wildcard subscription on the link, fanned out here: every local message reaches
        // this task exactly once however the bridge's filters overlap (rumqttd delivers one copy
        // per matching filter of a connection).
        if let Err(e) = self.link_tx.subscribe("#") {
            error!(error = %e, "Cannot subscribe the broker link; bridge subscriptions will stay silent.");
        }
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => break,
                },
                note = self.link_rx.next() => match note {
                    Ok(Some(note)) => self.notification(note).await,
                    Ok(None) => {}
                    Err(e) => {
                        error!(error = %e, "Broker link to rumqttd failed; bridge publish/subscribe stopped.");
                        break;
                    }
                },
            }
        }
        debug!(dropped = self.dropped, "Broker link task stopped.");
    }

    async fn command(&mut self, cmd: LinkCommand) {
        match cmd {
            LinkCommand::Publish {
                topic,
                payload,
                retain,
                reply,
            } => {
                let publish = rumqttd::protocol::Publish::new(
                    Bytes::copy_from_slice(topic.as_bytes()),
                    payload.clone(),
                    retain,
                );
                // A local link is QoS 0; `send` appends to rumqttd's buffer and notifies its
                // router, it does not wait for subscribers.
                let packet = rumqttd::protocol::Packet::Publish(publish, None);
                let result = self
                    .link_tx
                    .send(packet)
                    .await
                    .map(|_| ())
                    .map_err(|source| Error::Link {
                        topic,
                        payload,
                        source: Box::new(source),
                    });
                let _ = reply.send(result);
            }
            LinkCommand::Subscribe { filter, tx } => self.subscribers.push((filter, tx)),
        }
    }

    async fn notification(&mut self, note: Notification) {
        match note {
            Notification::Forward(forward) => {
                let Ok(topic) = std::str::from_utf8(&forward.publish.topic) else {
                    return;
                };
                let payload = forward.publish.payload;
                self.subscribers.retain(|(_, tx)| !tx.is_closed());
                for (filter, tx) in &self.subscribers {
                    if !rumqttc::mqttbytes::matches(topic, filter) {
                        continue;
                    }
                    if tx.try_send((topic.to_owned(), payload.clone())).is_err() {
                        self.dropped += 1;
                        warn!(%filter, topic, dropped = self.dropped, "Bridge subscriber is full; message dropped.");
                    }
                }
            }
            Notification::Unschedule => {
                if let Err(e) = self.link_rx.wake().await {
                    warn!(error = %e, "Cannot reschedule the broker link.");
                }
            }
            Notification::Disconnect(..) => {
                error!("rumqttd disconnected the broker link; bridge publish/subscribe stopped.");
            }
            _ => {}
        }
    }
}
