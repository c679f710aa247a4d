//! The ThingsBoard uplink: the one task that owns the MQTT session to ThingsBoard (a rumqttc
//! `AsyncClient` + `EventLoop`, MQTT 5 with a fallback to 3.1.1), drains the durable store into
//! the gateway API, deletes rows only on a success PUBACK, and turns what ThingsBoard pushes down
//! into [`Downlink`] messages.
//!
//! Session life (STYLE.md §2): `Disconnected` → connect (clean start, token as username; over
//! TLS when configured, see [`tls`]: certificate failures are reported once and retried every
//! `auth_retry`, and SIGHUP re-reads the certificates) →
//! on CONNACK `Live`: subscribe, re-announce every known device, drain the store from the oldest
//! unacked row with a cursor, one device per publish, at most `max_inflight` publishes awaiting
//! PUBACK. Any connection error, or a PUBACK missing for `ack_timeout`, drops the session: the
//! in-flight bookkeeping is forgotten and everything unacked is resent from the store after a
//! jittered backoff. Delivery is at least once.
//!
//! Choices worth knowing:
//! - The rumqttc `EventLoop` runs in a task of its own and forwards events over a bounded
//!   channel: `poll` is not cancel-safe while connecting (a losing `select!` branch opened a
//!   second TCP connection, which ThingsBoard treats as a session takeover).
//! - PUBACK matching is FIFO over `Outgoing::Publish(pkid)` (see [`inflight`]); a PUBACK for
//!   nothing in flight is ignored.
//! - Announcements (`connect`) are not awaited before the device's data: ThingsBoard handles a
//!   session's messages in order and the data reuses the pending device lookup of the `connect`,
//!   so the profile `type` wins. They carry no rows, so a missing PUBACK (ThingsBoard sends none
//!   when device creation fails) only frees the window slot after `ack_timeout`.
//! - `protocol = auto` starts with MQTT 5 and falls back to 3.1.1 for the rest of the process
//!   when the server refuses the v5 CONNECT (v3 CONNACK, or a close before any CONNACK).
//! - On 3.1.1 a takeover has no reason code: three sessions in a row closed by the server
//!   within 5 s of CONNACK are reported as one.
//!
//! It must not: block the event loop (downlink sends are `try_send`, counted when dropped); send
//! anything but QoS 1; put two devices in one publish; delete a row before its PUBACK; log the
//! access token; retry a refused token in a tight loop.

pub mod gateway_rpc;
pub mod inflight;
pub mod limits;
pub mod split;
pub mod thingsboard;
pub mod tls;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{GatewayConfig, MqttProtocol, ThingsboardConfig};
use crate::model::{check_device_name, Downlink, RecordKind, StoredRecord};
use crate::store::devices::{DeviceNames, DeviceRegistry, Route};
use crate::store::StoreHandle;

use gateway_rpc::GatewayInfo;

use inflight::Inflight;
use thingsboard as tb;
use tls::TlsSettings;

/// Rows read from the store at once; a full read means a backlog, read again without lingering.
/// Room for one linger of 100 busy devices (60,000 msg/s × 20 ms = 1,200 rows): a read cut
/// short sends each device twice, in a full and a small publish.
pub const READ_BATCH_ROWS: usize = 2000;
/// The longest linger the uplink grows to on a dense stream (see `Uplink::adapt_linger`).
pub const MAX_ADAPTIVE_LINGER: Duration = Duration::from_millis(25);
/// A read this small never lengthens the linger (a few records say nothing of the rate).
const MIN_ROWS_TO_GROW_LINGER: usize = 16;
/// Records per device a lingering read aims at on a dense stream: ThingsBoard handles a
/// twelfth of the messages, and no record waits longer than it takes to gather them
/// (docs/benchmarks.md: with 8 the emulated ThingsBoard was busier and the tail longer).
const TARGET_ROWS_PER_DEVICE: usize = 12;
/// Rows acked by ThingsBoard wait up to this long to be deleted together: one store call (one
/// wake-up of its thread) per batch instead of one per burst of PUBACKs. Short next to the
/// commit interval, so most records delivered within their commit group are still never
/// written (docs/ARCHITECTURE.md).
const ACK_LINGER: Duration = Duration::from_millis(5);
/// ... unless this many are waiting.
const ACK_FLUSH_IDS: usize = 1024;
/// How long `run` waits for outstanding PUBACKs after cancellation, unless set otherwise.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Period of the housekeeping tick (PUBACK deadline, resend after a failed PUBACK, shutdown).
const TICK: Duration = Duration::from_millis(100);
/// A session that lasted this long resets the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(60);
/// A server-side close this soon after CONNACK, repeatedly, smells of a session takeover (MQTT
/// 3.1.1 has no DISCONNECT reason to say so).
const SHORT_SESSION: Duration = Duration::from_secs(5);
/// Consecutive short sessions before reporting a probable takeover on MQTT 3.1.1.
const SHORT_SESSIONS_FOR_TAKEOVER: u32 = 3;
/// Requests rumqttc may hold beyond our publish window (subscribes, disconnect).
const REQUEST_CHANNEL_SLACK: usize = 16;
/// Events handled per turn before acked rows are deleted in one store call.
const MAX_EVENTS_PER_TURN: usize = 64;
/// Store calls deleting acked rows that may wait for their commit at once; more would only
/// queue in the store's request channel.
const MAX_ACK_CALLS: usize = 64;
/// Events buffered between the event-loop task and the session logic.
const EVENT_CHANNEL_CAPACITY: usize = 256;
/// How long a graceful stop waits for the DISCONNECT to be written.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// MQTT version of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 5 (reason codes on PUBACK and DISCONNECT).
    V5,
    /// MQTT 3.1.1.
    V311,
}

/// What health and stats endpoints show about the uplink. Counters are since process start.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UplinkStatus {
    /// A session is up (CONNACK received and not lost since).
    pub connected: bool,
    /// Protocol of the current (or last) session.
    pub protocol: Option<Protocol>,
    /// Connection attempts and successful connections.
    pub connect_attempts: u64,
    pub connects: u64,
    /// Publishes handed to the MQTT client (announcements included).
    pub published: u64,
    /// Success PUBACKs, and the store rows they deleted.
    pub acked_publishes: u64,
    pub acked_records: u64,
    /// PUBACKs with a failure reason code (MQTT 5).
    pub failed_acks: u64,
    /// Rows deleted unsent because ThingsBoard can never accept them (payload invalid 0x99,
    /// larger than a packet, bad device name).
    pub dropped_records: u64,
    /// Sessions closed because another client used the same access token.
    pub session_takeovers: u64,
    /// Sessions dropped because a PUBACK did not arrive within `ack_timeout`.
    pub dead_links: u64,
    /// Downlink messages forwarded, dropped because the channel was full, and malformed.
    pub downlink_forwarded: u64,
    pub downlink_dropped: u64,
    pub downlink_malformed: u64,
    /// Last connection problem, without secrets.
    pub last_error: Option<String>,
    /// Times a publish waited for room under the rate limits (ThingsBoard's or configured).
    pub rate_limited: u64,
    /// ThingsBoard answered `getSessionLimits` in the current (or last) session.
    pub session_limits_known: bool,
}

/// Failures that end `run` (none today: every session error is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed while the uplink was stopping.
    #[error("store failed")]
    Store(#[source] crate::store::Error),
}

/// The uplink actor; see the module docs.
pub struct Uplink {
    cfg: ThingsboardConfig,
    /// The durable queue: read with a cursor, rows deleted only on a success PUBACK.
    store: StoreHandle,
    /// To the router/downlink. Only `try_send`: a full channel drops and counts, because the
    /// event loop must keep polling.
    downlink_tx: mpsc::Sender<Downlink>,
    /// Published for health/stats; the receivers are handed out by [`Uplink::status`].
    status_tx: Arc<watch::Sender<UplinkStatus>>,
    /// How long a stop waits for outstanding PUBACKs.
    grace: Duration,
    /// Where renames/deletions made in ThingsBoard are persisted (`None`: memory only).
    registry: Option<DeviceRegistry>,
    /// The renames/deletions loaded at start.
    initial_names: DeviceNames,
    /// Counters and device sources lent by the rest of the bridge (gateway RPCs, statistics).
    info: GatewayInfo,
    /// Statistics period, RPC deadline, rate caps.
    gw: GatewayConfig,
    /// TLS settings, replaced on SIGHUP through [`TlsReloader`]; the files are read again then.
    tls_rx: watch::Receiver<TlsSettings>,
    /// The sending side, handed out by [`Uplink::tls_reloader`].
    tls_tx: Arc<watch::Sender<TlsSettings>>,
}

/// Makes a running uplink re-read its certificates (SIGHUP). New certificates are used from the
/// next connection; an uplink waiting after a certificate failure retries at once.
#[derive(Clone)]
pub struct TlsReloader(Arc<watch::Sender<TlsSettings>>);

impl TlsReloader {
    /// Re-read the files named in `settings` (even when they are the same paths as before).
    /// Whether TLS is on stays as the uplink started: it follows `thingsboard.tls` and `port`,
    /// which need a restart, and TLS switched on against the old plain port would only fail.
    pub fn reload(&self, settings: TlsSettings) {
        self.0.send_modify(|s| {
            let enabled = s.enabled;
            *s = settings;
            s.enabled = enabled;
        });
    }
}

impl Uplink {
    pub fn new(
        cfg: ThingsboardConfig,
        store: StoreHandle,
        downlink_tx: mpsc::Sender<Downlink>,
    ) -> Self {
        let (tls_tx, tls_rx) = watch::channel(TlsSettings::from_config(&cfg));
        Uplink {
            cfg,
            store,
            downlink_tx,
            status_tx: Arc::new(watch::channel(UplinkStatus::default()).0),
            grace: DEFAULT_SHUTDOWN_GRACE,
            registry: None,
            initial_names: DeviceNames::default(),
            info: GatewayInfo::default(),
            gw: GatewayConfig {
                stats_interval: Duration::ZERO,
                request_session_limits: false,
                shared_attributes_on_connect: Vec::new(),
                ..GatewayConfig::default()
            },
            tls_rx,
            tls_tx: Arc::new(tls_tx),
        }
    }

    /// The handle SIGHUP uses to make this uplink re-read its certificates.
    pub fn tls_reloader(&self) -> TlsReloader {
        TlsReloader(Arc::clone(&self.tls_tx))
    }

    /// Persist device renames/deletions in `registry`, starting from `names` (loaded from it).
    pub fn with_device_registry(mut self, registry: DeviceRegistry, names: DeviceNames) -> Self {
        self.registry = Some(registry);
        self.initial_names = names;
        self
    }

    /// Gateway behaviour (statistics period, rate caps) and what the rest of the bridge lends
    /// for gateway RPCs and statistics.
    pub fn with_gateway(mut self, gw: GatewayConfig, info: GatewayInfo) -> Self {
        self.gw = gw;
        self.info = info;
        self
    }

    /// Set how long [`run`](Self::run) waits for outstanding PUBACKs once cancelled.
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn status(&self) -> watch::Receiver<UplinkStatus> {
        self.status_tx.subscribe()
    }

    /// Run sessions until `cancel`; then wait up to the grace period for outstanding PUBACKs and
    /// disconnect. Unacked rows stay in the store for the next start.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), Error> {
        let mut life = Life::new(&self.cfg);
        life.names = self.initial_names.clone();
        // Validated with the configuration; a bad string here means no cap.
        life.cfg_messages =
            limits::parse_rate_limit(&self.gw.messages_rate_limit).unwrap_or_default();
        life.cfg_points =
            limits::parse_rate_limit(&self.gw.data_points_rate_limit).unwrap_or_default();
        info!(
            host = %self.cfg.host,
            port = self.cfg.port,
            protocol = ?self.cfg.protocol,
            "Uplink to ThingsBoard starting."
        );
        let mut tls_rx = self.tls_rx.clone();
        while !cancel.is_cancelled() {
            let delay = match self.load_tls(&mut life, &mut tls_rx) {
                Err(delay) => delay,
                Ok(()) => {
                    let end = self.session(&mut life, &cancel).await;
                    self.status_tx.send_modify(|s| s.connected = false);
                    match end {
                        SessionEnd::Stopped => break,
                        SessionEnd::Failed(f) => self.on_failure(&mut life, f),
                    }
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
                // New certificates (SIGHUP): try them now rather than after the backoff.
                _ = tls_rx.changed() => tls_rx.mark_changed(),
            }
        }
        while life.acks.join_next().await.is_some() {}
        info!("Uplink stopped.");
        Ok(())
    }

    /// (Re)builds the TLS configuration when the settings were sent again (start, SIGHUP).
    /// On failure the previous configuration stays in use; with none to fall back on, `Err`
    /// holds how long to wait (the settings may be fixed and reloaded meanwhile).
    fn load_tls(
        &self,
        life: &mut Life,
        tls_rx: &mut watch::Receiver<TlsSettings>,
    ) -> Result<(), Duration> {
        // Read at start, on every reload, and after each wait while nothing could be read yet.
        if !life.tls_loaded || tls_rx.has_changed().unwrap_or(false) {
            let settings = tls_rx.borrow_and_update().clone();
            match tls::client_config(&settings) {
                Ok(config) => {
                    if life.tls_loaded {
                        info!(tls = settings.enabled, "Re-read the TLS certificates.");
                    }
                    life.tls = config;
                    life.tls_loaded = true;
                    life.tls_reported = false;
                }
                Err(e) => {
                    let text = format!("TLS configuration: {e}");
                    self.status_tx
                        .send_modify(|s| s.last_error = Some(text.clone()));
                    if life.tls_loaded {
                        error!(error = %e, "Cannot load the new TLS certificates; keeping the previous ones.");
                    } else {
                        error!(error = %e, retry_every = ?self.cfg.auth_retry, "Cannot load the TLS certificates; fix them and send SIGHUP.");
                    }
                }
            }
        }
        if life.tls_loaded {
            Ok(())
        } else {
            Err(self.cfg.auth_retry)
        }
    }

    /// Decide how long to wait before the next attempt, and log the failure once at the right
    /// level.
    fn on_failure(&self, life: &mut Life, failure: Failure) -> Duration {
        let cfg = &self.cfg;
        let text = failure.to_string();
        self.status_tx
            .send_modify(|s| s.last_error = Some(text.clone()));
        if matches!(failure, Failure::Connect(_)) {
            // A takeover reconnects at once; a failed connect means something else is going on.
            life.short_sessions = 0;
        }
        match failure {
            Failure::Connect(NetError::AuthRefused(code)) => {
                if !life.auth_reported {
                    life.auth_reported = true;
                    error!(
                        code = %code,
                        retry_every = ?cfg.auth_retry,
                        "ThingsBoard refused the gateway access token. Check thingsboard.access_token \
                         and that the gateway device exists with \"Is gateway\" enabled; retrying slowly."
                    );
                } else {
                    debug!(code = %code, "ThingsBoard still refuses the access token.");
                }
                cfg.auth_retry
            }
            Failure::Connect(NetError::Tls(why)) => {
                if !life.tls_reported {
                    life.tls_reported = true;
                    error!(
                        host = %cfg.host,
                        port = cfg.port,
                        reason = %why,
                        retry_every = ?cfg.auth_retry,
                        "TLS connection to ThingsBoard failed on a certificate; retrying slowly \
                         (send SIGHUP after replacing certificates to retry at once)."
                    );
                } else {
                    debug!(reason = %why, "TLS to ThingsBoard still fails.");
                }
                cfg.auth_retry
            }
            // A 3.1.1-only server refuses a v5 CONNECT with a v3 CONNACK (unreadable as v5) or
            // simply closes the socket before any CONNACK.
            Failure::Connect(NetError::ProtocolRefused(why) | NetError::Closed(why))
                if life.auto && life.protocol == Protocol::V5 =>
            {
                info!(reason = %why, "ThingsBoard does not accept MQTT 5; falling back to MQTT 3.1.1.");
                life.protocol = Protocol::V311;
                Duration::ZERO
            }
            Failure::Connect(e) => {
                if !life.unreachable_reported {
                    life.unreachable_reported = true;
                    warn!(
                        host = %cfg.host,
                        port = cfg.port,
                        error = %e,
                        "ThingsBoard is unreachable; retrying quietly with backoff."
                    );
                } else {
                    debug!(error = %e, "ThingsBoard still unreachable.");
                }
                life.backoff.next()
            }
            Failure::Lost {
                error,
                connected_for,
            } => {
                if connected_for >= STABLE_SESSION {
                    life.backoff.reset();
                    life.short_sessions = 0;
                    life.takeover_reported = false;
                }
                let server_closed = matches!(error, NetError::Closed(_));
                if server_closed && connected_for < SHORT_SESSION {
                    life.short_sessions += 1;
                } else if !matches!(error, NetError::TakenOver) {
                    life.short_sessions = 0;
                }
                if matches!(error, NetError::TakenOver)
                    || life.short_sessions >= SHORT_SESSIONS_FOR_TAKEOVER
                {
                    self.on_takeover(life, &error);
                    // Back off growing, never a reconnect storm against the other client.
                    return life.backoff.next().max(cfg.reconnect_min * 4);
                }
                warn!(error = %error, after = ?connected_for, "Connection to ThingsBoard lost; reconnecting.");
                life.backoff.next()
            }
            Failure::DeadLink { connected_for } => {
                if connected_for >= STABLE_SESSION {
                    life.backoff.reset();
                }
                life.backoff.next()
            }
            Failure::Store(e) => {
                warn!(error = %e, "Reading the store failed; restarting the session.");
                life.backoff.next()
            }
            Failure::Client(e) => {
                warn!(error = %e, "MQTT client bookkeeping failed; restarting the session.");
                life.backoff.next()
            }
        }
    }

    fn on_takeover(&self, life: &mut Life, error: &NetError) {
        self.status_tx.send_modify(|s| s.session_takeovers += 1);
        if !life.takeover_reported {
            life.takeover_reported = true;
            error!(
                error = %error,
                "ThingsBoard closed our session because another client connected with the same \
                 access token (session taken over; the \"code 7\" disconnects). A second dlms-bridge \
                 or a leftover tb-gateway is using this token: stop it. Backing off."
            );
        } else {
            debug!(error = %error, "Session taken over again.");
        }
    }

    /// One connection attempt and, if it connects, the live session until it ends.
    async fn session(&self, life: &mut Life, cancel: &CancellationToken) -> SessionEnd {
        let (client, conn) = Conn::new(&self.cfg, life.protocol, life.tls.clone());
        // The event loop gets a task of its own: `EventLoop::poll` is not cancel-safe while it
        // connects or flushes, so it must never be a losing `select!` branch, and store I/O here
        // must not stall it. Dropping the guard aborts it, which closes the socket.
        let (ev_tx, mut ev_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let _poller = AbortOnDrop(tokio::spawn(conn.drive(ev_tx)));
        self.status_tx.send_modify(|s| s.connect_attempts += 1);
        let mut s = Session::default();
        let mut store_rx = self.store.subscribe_ready();
        let mut store_open = true;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stats_every = self.gw.stats_interval;
        let mut stats_tick = tokio::time::interval(stats_every.max(Duration::from_secs(1)));
        stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let end = 'session: loop {
            if s.connected_at.is_some() && s.stopping.is_none() {
                if let Err(f) = self.pump(&client, life, &mut s).await {
                    break 'session SessionEnd::Failed(f);
                }
            }
            if let Some(deadline) = s.stopping {
                let tracked = s.inflight.has_tracked();
                if !tracked || Instant::now() >= deadline {
                    if tracked {
                        warn!(
                            unacked = s.inflight.len(),
                            "Shutdown grace elapsed with publishes unacknowledged; their rows stay in the store."
                        );
                    }
                    client.disconnect();
                    let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
                        while let Some(Ok(ev)) = ev_rx.recv().await {
                            if matches!(ev, NetEvent::SentDisconnect) {
                                break;
                            }
                        }
                    })
                    .await;
                    break 'session SessionEnd::Stopped;
                }
            }
            let live = s.connected_at.is_some() && s.stopping.is_none();
            let read_at = s.read_at;
            tokio::select! {
                ev = ev_rx.recv() => {
                    // Handle what is already queued too, then delete all acked rows at once.
                    let mut next = Some(ev.unwrap_or_else(|| {
                        Err(NetError::Other("event loop task ended".into()))
                    }));
                    let mut handled = 0;
                    let mut failure = None;
                    while let Some(ev) = next.take() {
                        match ev {
                            Ok(ev) => {
                                if let Err(f) = self.on_event(ev, &client, life, &mut s).await {
                                    failure = Some(f);
                                    break;
                                }
                            }
                            Err(e) => {
                                failure = Some(match s.connected_at {
                                    None => Failure::Connect(e),
                                    Some(at) => Failure::Lost { error: e, connected_for: at.elapsed() },
                                });
                                break;
                            }
                        }
                        handled += 1;
                        if handled < MAX_EVENTS_PER_TURN {
                            next = ev_rx.try_recv().ok();
                        }
                    }
                    // Deletes go to the store in batches: at once when many are waiting, else
                    // after ACK_LINGER (each store call wakes its thread).
                    if s.acked.len() >= ACK_FLUSH_IDS {
                        self.flush_acks(life, &mut s).await;
                    } else if s.acks_due.is_none() && (!s.acked.is_empty() || s.acked_publishes > 0) {
                        s.acks_due = Some(Instant::now() + ACK_LINGER);
                    }
                    if let Some(f) = failure {
                        break 'session SessionEnd::Failed(f);
                    }
                }
                // Not polled while a read is already due: new records then wake no one (at
                // 1,000 msg/s that is most of them), and the next poll still sees the change.
                changed = store_rx.changed(),
                    if live && store_open && s.read_at.is_none() && !s.need_read =>
                {
                    if changed.is_err() {
                        store_open = false;
                    } else {
                        // Linger briefly so one publish carries more entries per device.
                        s.read_at = Some(Instant::now() + s.linger.max(self.cfg.batch_linger));
                    }
                }
                _ = sleep_until_opt(s.acks_due), if s.acks_due.is_some() => {
                    self.flush_acks(life, &mut s).await;
                }
                _ = sleep_until_opt(read_at), if read_at.is_some() => {
                    s.read_at = None;
                    s.need_read = true;
                }
                _ = sleep_until_opt(s.rate_wait), if s.rate_wait.is_some() => {
                    s.rate_wait = None;
                }
                _ = sleep_until_opt(s.limits_wait), if s.limits_wait.is_some() => {
                    s.limits_wait = None;
                    debug!("No getSessionLimits answer (ThingsBoard older than 3.8?); configured caps apply.");
                }
                _ = tick.tick() => {
                    if let Err(f) = self.housekeeping(&mut s) {
                        break 'session SessionEnd::Failed(f);
                    }
                }
                _ = stats_tick.tick(), if live && !stats_every.is_zero() => {
                    self.send_stats(life, &mut s).await;
                }
                _ = cancel.cancelled(), if s.stopping.is_none() => {
                    if s.connected_at.is_none() {
                        break 'session SessionEnd::Stopped;
                    }
                    s.stopping = Some(Instant::now() + self.grace);
                    s.pending.clear();
                }
            }
        };
        // Acks not yet handed to the store go now (the next session re-reads after them).
        self.flush_acks(life, &mut s).await;
        end
    }

    /// PUBACK deadline, announcement expiry, resend after a failed PUBACK.
    fn housekeeping(&self, s: &mut Session) -> Result<(), Failure> {
        let now = Instant::now();
        if s.connected_at.is_none() {
            return Ok(());
        }
        if s.inflight.overdue(now.into_std(), self.cfg.ack_timeout) {
            warn!(
                ack_timeout = ?self.cfg.ack_timeout,
                unacked = s.inflight.len(),
                "No PUBACK from ThingsBoard in time; declaring the link dead and reconnecting."
            );
            self.status_tx.send_modify(|st| st.dead_links += 1);
            let connected_for = s.connected_at.map(|at| at.elapsed()).unwrap_or_default();
            return Err(Failure::DeadLink { connected_for });
        }
        for tag in s
            .inflight
            .expire_untracked(now.into_std(), self.cfg.ack_timeout)
        {
            debug!(device = %tag.device, "No PUBACK for an announcement; ThingsBoard may have failed to create the device.");
        }
        if let Some(at) = s.resend_at {
            if now >= at && s.inflight.is_empty() && s.pending.is_empty() {
                s.resend_at = None;
                s.cursor = 0;
                s.need_read = true;
            }
        }
        Ok(())
    }

    /// Fill the window: send pending publishes, read and plan more rows when they run out.
    async fn pump(&self, client: &Client, life: &mut Life, s: &mut Session) -> Result<(), Failure> {
        let window = usize::from(life.max_inflight(&self.cfg));
        if s.limits_wait.is_some() {
            // Nothing goes out before ThingsBoard said its limits (or did not in time).
            return Ok(());
        }
        loop {
            while s.inflight.len() < window {
                let Some(out) = s.pending.pop_front() else {
                    break;
                };
                // Stay under ThingsBoard's rate limits: the publish waits, its rows stay queued.
                let now = std::time::Instant::now();
                let telemetry = out.topic == tb::TOPIC_TELEMETRY;
                let points = if telemetry && !life.limiter.is_unlimited() {
                    limits::data_points(&out.payload)
                } else {
                    0
                };
                let ready = life.limiter.ready_at(now, telemetry, points);
                if ready > now {
                    s.pending.push_front(out);
                    s.rate_wait = Some(Instant::from_std(ready));
                    self.status_tx.send_modify(|st| st.rate_limited += 1);
                    return Ok(());
                }
                life.limiter.take(now, telemetry, points);
                if let Err(e) = client.publish(&out.topic, out.payload.clone()) {
                    return Err(Failure::Client(e));
                }
                let tracked = !out.ids.is_empty();
                s.inflight.push_request(
                    Tag {
                        ids: out.ids,
                        device: out.device,
                    },
                    Instant::now().into_std(),
                    tracked,
                );
                self.status_tx.send_modify(|st| st.published += 1);
            }
            if !s.pending.is_empty() || !s.need_read || s.inflight.len() >= window {
                return Ok(());
            }
            if s.cursor == 0 {
                // Re-reading from the oldest row: let outstanding deletes land first.
                self.flush_acks(life, s).await;
                while life.acks.join_next().await.is_some() {}
            }
            let rows = self
                .store
                .next_batch(s.cursor, READ_BATCH_ROWS)
                .await
                .map_err(|e| Failure::Store(e.to_string()))?;
            s.need_read = rows.len() == READ_BATCH_ROWS;
            let Some(last) = rows.last() else {
                return Ok(());
            };
            s.cursor = last.id;
            self.plan(rows, life, s).await;
        }
    }

    /// Lingers longer while the stream is dense: when a read found at least two records per
    /// device on average, the next linger moves towards the one that gathers
    /// [`TARGET_ROWS_PER_DEVICE`] (up to [`MAX_ADAPTIVE_LINGER`]), so each publish carries
    /// several entries and ThingsBoard handles fewer messages; below 1.5 per device
    /// it halves back towards `batch_linger`. A sparse stream (many devices at a few messages a
    /// second each, the usual meter load) keeps the configured linger and its latency.
    /// `batch_linger = "0s"` turns lingering off altogether.
    fn adapt_linger(&self, s: &mut Session, rows: usize, devices: usize) {
        s.linger = next_linger(s.linger, self.cfg.batch_linger, rows, devices);
    }

    /// Turn rows into publishes: per device in order, `connect` first if not yet announced in
    /// this session, consecutive telemetry/attribute rows coalesced, split to fit a packet.
    /// The rows and devices it finds also set the next linger ([`Uplink::adapt_linger`]).
    async fn plan(&self, rows: Vec<StoredRecord>, life: &mut Life, s: &mut Session) {
        let read = rows.len();
        let max = life.max_packet_size(&self.cfg);
        let mut order: Vec<String> = Vec::new();
        let mut per: HashMap<String, Vec<StoredRecord>> = HashMap::new();
        // Renamed devices are sent under their ThingsBoard name, rows of deleted ones dropped.
        let mut forgotten = Vec::new();
        let mut recreated = Vec::new();
        for mut row in rows {
            match life.names.route(&row.record.device, row.id) {
                (Route::Drop, _) => {
                    forgotten.push(row.id);
                    continue;
                }
                (Route::Send(name), again) => {
                    if again {
                        info!(device = %name, "A device deleted in ThingsBoard sends new data; it is created again.");
                        recreated.push(row.record.device.clone());
                    }
                    row.record.device = name;
                }
            }
            match per.get_mut(&row.record.device) {
                Some(rows) => rows.push(row),
                None => {
                    order.push(row.record.device.clone());
                    per.insert(row.record.device.clone(), vec![row]);
                }
            }
        }
        self.adapt_linger(s, read - forgotten.len(), order.len());
        if !recreated.is_empty() {
            self.persist_names(life, recreated).await;
        }
        if !forgotten.is_empty() {
            debug!(
                rows = forgotten.len(),
                "Dropping rows of devices deleted in ThingsBoard."
            );
            if let Err(e) = self.store.ack(forgotten).await {
                warn!(error = %e, "Deleting rows of deleted devices failed; they will be read again.");
            }
        }
        let mut rejected: Vec<(String, i64, String)> = Vec::new();
        for device in order {
            let rows = per.remove(&device).unwrap_or_default();
            if let Err(why) = check_device_name(&device) {
                rejected.extend(rows.iter().map(|r| (device.clone(), r.id, why.to_owned())));
                continue;
            }
            let mut i = 0;
            while i < rows.len() {
                let kind = rows[i].record.kind;
                let mut j = i + 1;
                if matches!(kind, RecordKind::Telemetry | RecordKind::Attributes) {
                    while j < rows.len() && rows[j].record.kind == kind {
                        j += 1;
                    }
                }
                let run = &rows[i..j];
                let first = &run[0].record;
                // A `connect` row announced the device in this session.
                let mut fresh = false;
                if kind == RecordKind::Disconnect {
                    s.announced.remove(&device);
                    life.known.remove(&device);
                } else {
                    // Types are sticky: only data sources set one (replies never do).
                    let ty = life.sticky_type(&device, kind, &first.device_type);
                    if kind != RecordKind::Connect {
                        if let Some(ty) = ty.filter(|_| !s.announced.contains(&device)) {
                            s.announced.insert(device.clone());
                            s.pending.push_back(announcement(&device, &ty));
                            if let Some(out) = self.sync_request(life, &device) {
                                s.pending.push_back(out);
                            }
                        }
                    }
                }
                let single = |topic: &'static str, payload: Result<Vec<u8>, tb::Error>| {
                    payload.map(|p| Out {
                        topic: Cow::Borrowed(topic),
                        payload: Bytes::from(p),
                        ids: vec![run[0].id],
                        device: device.clone(),
                    })
                };
                let built: Vec<Result<Out, (i64, tb::Error)>> = match kind {
                    RecordKind::Telemetry | RecordKind::Attributes => {
                        let refs: Vec<(i64, &Value)> =
                            run.iter().map(|r| (r.id, &r.record.payload)).collect();
                        let (batches, rej) = if kind == RecordKind::Telemetry {
                            let texts: Vec<(i64, &Value, Option<&str>)> = run
                                .iter()
                                .map(|r| (r.id, &r.record.payload, r.text.as_deref()))
                                .collect();
                            tb::telemetry_batches_of_texts(&device, &texts, max)
                        } else {
                            tb::attribute_batches(&device, &refs, max)
                        };
                        batches
                            .into_iter()
                            .map(|b| {
                                Ok(Out {
                                    topic: Cow::Borrowed(b.topic),
                                    payload: Bytes::from(b.payload),
                                    ids: b.ids,
                                    device: device.clone(),
                                })
                            })
                            .chain(rej.into_iter().map(Err))
                            .collect()
                    }
                    RecordKind::Connect => {
                        fresh = s.announced.insert(device.clone());
                        let ty = life.known.get(&device).cloned().unwrap_or_default();
                        vec![
                            single(tb::TOPIC_CONNECT, Ok(tb::connect_payload(&device, &ty)))
                                .map_err(|e| (run[0].id, e)),
                        ]
                    }
                    RecordKind::Disconnect => {
                        vec![
                            single(tb::TOPIC_DISCONNECT, Ok(tb::disconnect_payload(&device)))
                                .map_err(|e| (run[0].id, e)),
                        ]
                    }
                    RecordKind::RpcReply => vec![single(
                        tb::TOPIC_RPC,
                        tb::rpc_reply_payload(&device, &first.payload),
                    )
                    .map_err(|e| (run[0].id, e))],
                    RecordKind::AttributeRequest => vec![single(
                        tb::TOPIC_ATTRIBUTES_REQUEST,
                        tb::attribute_request_payload(&device, &first.payload),
                    )
                    .map_err(|e| (run[0].id, e))],
                };
                for b in built {
                    match b {
                        Ok(out) => s.pending.push_back(out),
                        Err((id, e)) => rejected.push((device.clone(), id, e.to_string())),
                    }
                }
                if fresh {
                    if let Some(out) = self.sync_request(life, &device) {
                        s.pending.push_back(out);
                    }
                }
                i = j;
            }
        }
        if !rejected.is_empty() {
            let ids: Vec<i64> = rejected.iter().map(|(_, id, _)| *id).collect();
            for (device, id, why) in &rejected {
                self.report_dropped(life, device, *id, why);
            }
            self.drop_rows(ids).await;
        }
    }

    /// Delete the rows of every success PUBACK handled since the last flush, in one store call.
    ///
    /// The call runs in a task of its own: the store answers it only after its next group
    /// commit (up to `store.commit_interval`), and the session must go on reading PUBACKs
    /// meanwhile. At most [`MAX_ACK_CALLS`] run at once; before the session re-reads from the
    /// oldest row they are all awaited (see `pump`), so acked rows are not sent again.
    async fn flush_acks(&self, life: &mut Life, s: &mut Session) {
        s.acks_due = None;
        if s.acked.is_empty() && s.acked_publishes == 0 {
            return;
        }
        let ids = std::mem::take(&mut s.acked);
        let publishes = std::mem::take(&mut s.acked_publishes);
        let n = ids.len() as u64;
        if n == 0 {
            self.status_tx
                .send_modify(|st| st.acked_publishes += publishes);
            return;
        }
        while life.acks.try_join_next().is_some() {}
        if life.acks.len() >= MAX_ACK_CALLS {
            life.acks.join_next().await;
        }
        let store = self.store.clone();
        let status_tx = Arc::clone(&self.status_tx);
        life.acks.spawn(async move {
            if let Err(e) = store.ack(ids).await {
                warn!(error = %e, "Deleting acknowledged rows failed; they will be sent again.");
                return;
            }
            // Counted once deleted, so a reader of the status never sees rows it cannot find
            // gone.
            status_tx.send_modify(|st| {
                st.acked_publishes += publishes;
                st.acked_records += n;
            });
        });
    }

    /// ERROR once per device for rows ThingsBoard can never accept (data loss, operator action).
    fn report_dropped(&self, life: &mut Life, device: &str, id: i64, why: &str) {
        if life.invalid_reported.insert(device.to_owned()) {
            error!(device, row = id, reason = why, "Dropping a record ThingsBoard cannot accept; further drops for this device are logged at DEBUG.");
        } else {
            debug!(
                device,
                row = id,
                reason = why,
                "Dropping a record ThingsBoard cannot accept."
            );
        }
    }

    async fn drop_rows(&self, ids: Vec<i64>) {
        let n = ids.len() as u64;
        if let Err(e) = self.store.ack(ids).await {
            warn!(error = %e, "Deleting undeliverable rows failed; they will be retried.");
            return;
        }
        self.status_tx.send_modify(|st| st.dropped_records += n);
    }

    async fn on_event(
        &self,
        ev: NetEvent,
        client: &Client,
        life: &mut Life,
        s: &mut Session,
    ) -> Result<(), Failure> {
        match ev {
            NetEvent::ConnAck => {
                s.connected_at = Some(Instant::now());
                for filter in tb::SUBSCRIPTIONS {
                    client.subscribe(filter).map_err(Failure::Client)?;
                }
                life.limiter = limits::RateLimiter::new(&life.cfg_messages, &life.cfg_points, None);
                life.session_limits = None;
                self.status_tx
                    .send_modify(|st| st.session_limits_known = false);
                if self.gw.request_session_limits {
                    self.request_session_limits(client, life, &mut *s)?;
                }
                // ThingsBoard forgot every sub-device with the old session (spec §2.3).
                let mut known: Vec<(&String, &String)> = life.known.iter().collect();
                known.sort();
                for (device, device_type) in &known {
                    s.announced.insert((*device).clone());
                    s.pending.push_back(announcement(device, device_type));
                }
                // ThingsBoard pushes only changes: ask for the current values again.
                // After each announcement, never before it: any publish naming an unknown
                // device creates it with the profile `default` (spec §2.2).
                let devices: Vec<String> = known.iter().map(|(d, _)| (*d).clone()).collect();
                for device in devices {
                    if let Some(out) = self.sync_request(life, &device) {
                        s.pending.push_back(out);
                    }
                }
                s.cursor = 0;
                s.need_read = true;
                let depth = self.store.stats().await.map(|st| st.depth).ok();
                info!(
                    protocol = ?life.protocol,
                    store_depth = ?depth,
                    devices = life.known.len(),
                    "Connected to ThingsBoard."
                );
                life.unreachable_reported = false;
                life.auth_reported = false;
                life.tls_reported = false;
                let protocol = life.protocol;
                self.status_tx.send_modify(|st| {
                    st.connected = true;
                    st.protocol = Some(protocol);
                    st.connects += 1;
                });
            }
            NetEvent::OutgoingPublish(pkid) => {
                s.inflight
                    .on_outgoing(pkid)
                    .map_err(|e| Failure::Client(e.to_string()))?;
            }
            NetEvent::PubAck { pkid, reason } => {
                let Some(tag) = s.inflight.on_puback(pkid) else {
                    // Duplicate PUBACKs from ThingsBoard < 4.2.1, or an announcement given up on.
                    debug!(pkid, "Ignoring a PUBACK for nothing in flight.");
                    return Ok(());
                };
                match reason {
                    0x00 | 0x10 => {
                        s.acked.extend(tag.ids);
                        s.acked_publishes += 1;
                    }
                    0x99 => {
                        self.status_tx.send_modify(|st| st.failed_acks += 1);
                        for id in &tag.ids {
                            self.report_dropped(
                                life,
                                &tag.device,
                                *id,
                                "ThingsBoard answered PUBACK 0x99 payload format invalid",
                            );
                        }
                        if !tag.ids.is_empty() {
                            self.drop_rows(tag.ids).await;
                        }
                    }
                    code => {
                        self.status_tx.send_modify(|st| st.failed_acks += 1);
                        warn!(
                            device = %tag.device,
                            reason = %format!("{code:#04x}"),
                            rows = tag.ids.len(),
                            "ThingsBoard refused a publish; its rows stay queued for resend."
                        );
                        if !tag.ids.is_empty() {
                            s.resend_at = Some(Instant::now() + self.cfg.reconnect_min);
                        }
                    }
                }
            }
            NetEvent::Publish { topic, payload } => {
                if topic.starts_with(tb::TOPIC_ME_RPC_RESPONSE_PREFIX) {
                    self.on_rpc_response(&payload, life, s);
                } else if let Some(id) = gateway_rpc::request_id(&topic) {
                    // The reply is fire-and-forget like an announcement: no rows.
                    debug!(topic = %topic, "Answering an RPC to the gateway device itself.");
                    self.gateway_rpc(id, &payload, life, s).await;
                } else {
                    self.on_downlink(&topic, &payload, &life.names);
                }
            }
            NetEvent::SentDisconnect | NetEvent::Other => {}
        }
        Ok(())
    }

    fn on_downlink(&self, topic: &str, payload: &[u8], names: &DeviceNames) {
        let parsed = tb::parse_downlink(topic, payload).map(|m| {
            m.and_then(|m| sync_answer_as_update(m, &self.gw.shared_attributes_on_connect))
        });
        match parsed {
            Ok(Some(msg)) => match self.downlink_tx.try_send(to_source_names(msg, names)) {
                Ok(()) => self.status_tx.send_modify(|st| st.downlink_forwarded += 1),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.status_tx.send_modify(|st| st.downlink_dropped += 1);
                    warn!(
                        topic,
                        "Downlink channel full; dropping a message from ThingsBoard."
                    );
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.status_tx.send_modify(|st| st.downlink_dropped += 1);
                    debug!(
                        topic,
                        "Downlink receiver gone; dropping a message from ThingsBoard."
                    );
                }
            },
            Ok(None) => {
                debug!(
                    topic,
                    "Ignoring a message for the gateway device itself (not handled yet)."
                )
            }
            Err(e) => {
                self.status_tx.send_modify(|st| st.downlink_malformed += 1);
                warn!(topic, error = %e, "Dropping a malformed message from ThingsBoard.");
            }
        }
    }
}

impl Uplink {
    /// A request for the shared attributes in `gateway.shared_attributes_on_connect`; its answer
    /// is applied like an update (see [`sync_answer_as_update`]).
    fn sync_request(&self, life: &mut Life, device: &str) -> Option<Out> {
        let keys = &self.gw.shared_attributes_on_connect;
        if keys.is_empty() {
            return None;
        }
        life.sync_request_id += 1;
        let id = SYNC_ATTRIBUTE_ID_BASE + life.sync_request_id;
        let req = serde_json::json!({"id": id, "client": false, "keys": keys});
        let p = tb::attribute_request_payload(device, &req).ok()?;
        Some(Out {
            topic: Cow::Borrowed(tb::TOPIC_ATTRIBUTES_REQUEST),
            payload: Bytes::from(p),
            ids: Vec::new(),
            device: device.to_owned(),
        })
    }

    /// Ask ThingsBoard for its session limits (spec §3.2); data waits for the answer.
    fn request_session_limits(
        &self,
        client: &Client,
        life: &mut Life,
        s: &mut Session,
    ) -> Result<(), Failure> {
        client
            .subscribe(limits::TOPIC_ME_RPC_RESPONSE_FILTER)
            .map_err(Failure::Client)?;
        life.limits_request_id += 1;
        let topic = format!(
            "{}{}",
            tb::TOPIC_ME_RPC_REQUEST_PREFIX,
            life.limits_request_id
        );
        let body = serde_json::json!({
            "method": limits::SESSION_LIMITS_METHOD,
            "params": {"timeout": limits::SESSION_LIMITS_TIMEOUT.as_millis() as u64},
        });
        client
            .publish(&topic, Bytes::from(body.to_string()))
            .map_err(Failure::Client)?;
        let now = Instant::now();
        s.inflight.push_request(
            Tag {
                ids: Vec::new(),
                device: String::new(),
            },
            now.into_std(),
            false,
        );
        s.limits_wait = Some(now + limits::SESSION_LIMITS_TIMEOUT);
        Ok(())
    }

    /// An answer to one of our own client-side RPCs: today only `getSessionLimits`.
    fn on_rpc_response(&self, payload: &[u8], life: &mut Life, s: &mut Session) {
        let Some(l) = limits::parse_session_limits(payload) else {
            debug!("Ignoring an RPC response that is not a session limits answer.");
            return;
        };
        info!(
            max_payload_size = ?l.max_payload_size,
            max_inflight = ?l.max_inflight,
            message_windows = l.messages.len(),
            data_point_windows = l.data_points.len(),
            "ThingsBoard session limits received; staying under them."
        );
        life.limiter = limits::RateLimiter::new(&life.cfg_messages, &life.cfg_points, Some(&l));
        life.session_limits = Some(l);
        s.limits_wait = None;
        self.status_tx
            .send_modify(|st| st.session_limits_known = true);
    }
}

/// Ids of the attribute requests sent after a connect start above this (mappings and device-API
/// clients use ids far below).
const SYNC_ATTRIBUTE_ID_BASE: i64 = 1 << 50;

/// The answer to a post-connect attribute request becomes a shared attribute update, so the
/// router applies it like one.
fn sync_answer_as_update(msg: Downlink, keys: &[String]) -> Option<Downlink> {
    match msg {
        Downlink::AttributeResponse { device, id, values } if id > SYNC_ATTRIBUTE_ID_BASE => {
            let data = match values {
                Value::Object(m) => m,
                Value::Null => return None,
                v if keys.len() == 1 => {
                    let mut m = serde_json::Map::new();
                    m.insert(keys[0].clone(), v);
                    m
                }
                _ => return None,
            };
            (!data.is_empty()).then_some(Downlink::Attributes(crate::model::AttributeUpdate {
                device,
                data,
            }))
        }
        other => Some(other),
    }
}

/// ThingsBoard names a renamed device by its new name; meters and local routes know the source.
fn to_source_names(msg: Downlink, names: &DeviceNames) -> Downlink {
    let src = |d: String| names.source_name(&d).to_owned();
    match msg {
        Downlink::Rpc(mut r) => {
            r.device = src(r.device);
            Downlink::Rpc(r)
        }
        Downlink::Attributes(mut a) => {
            a.device = src(a.device);
            Downlink::Attributes(a)
        }
        Downlink::AttributeResponse { device, id, values } => Downlink::AttributeResponse {
            device: src(device),
            id,
            values,
        },
        Downlink::DeviceDisconnected { device, reason } => Downlink::DeviceDisconnected {
            device: src(device),
            reason,
        },
    }
}

fn announcement(device: &str, device_type: &str) -> Out {
    Out {
        topic: Cow::Borrowed(tb::TOPIC_CONNECT),
        payload: Bytes::from(tb::connect_payload(device, device_type)),
        ids: Vec::new(),
        device: device.to_owned(),
    }
}

/// The linger after a read of `rows` records of `devices` devices (see `Uplink::adapt_linger`);
/// `floor` is `batch_linger`. On a dense stream the records a read finds per device grow with
/// the linger, so the linger moves halfway towards the one that would have found
/// [`TARGET_ROWS_PER_DEVICE`]: at 60,000 msg/s from 100 devices that settles near 20 ms, at
/// 90,000 near 13 ms. A linger no longer than the rate needs keeps latency down.
fn next_linger(current: Duration, floor: Duration, rows: usize, devices: usize) -> Duration {
    if floor.is_zero() {
        return Duration::ZERO;
    }
    let cap = floor.max(MAX_ADAPTIVE_LINGER);
    let current = current.max(floor);
    let devices = devices.max(1);
    if rows >= 2 * devices && rows >= MIN_ROWS_TO_GROW_LINGER {
        let want = current.mul_f64((TARGET_ROWS_PER_DEVICE * devices) as f64 / rows as f64);
        ((current + want) / 2).clamp(floor, cap)
    } else if 2 * rows < 3 * devices {
        (current / 2).max(floor)
    } else {
        current
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// State that outlives one session.
struct Life {
    protocol: Protocol,
    /// `protocol = auto`: fall back to 3.1.1 when ThingsBoard refuses 5.
    auto: bool,
    /// Device → profile of every device seen this process; re-announced after each connect.
    known: HashMap<String, String>,
    backoff: Backoff,
    unreachable_reported: bool,
    auth_reported: bool,
    takeover_reported: bool,
    short_sessions: u32,
    /// Devices whose undeliverable rows were already logged at ERROR.
    invalid_reported: HashSet<String>,
    /// Store calls deleting acked rows, still waiting for their commit (see `flush_acks`).
    acks: JoinSet<()>,
    /// The rustls configuration of every connection (`None`: plain TCP).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The TLS settings were read successfully at least once.
    tls_loaded: bool,
    /// A certificate failure was logged at ERROR; later ones go to DEBUG until a connect works.
    tls_reported: bool,
    /// Renames and deletions made in ThingsBoard (persisted by the registry).
    names: DeviceNames,
    /// For `uptime_s`.
    started: Instant,
    /// For `cpu_percent`.
    cpu: gateway_rpc::CpuSampler,
    /// Configured caps (`gateway.messages_rate_limit`, `data_points_rate_limit`).
    cfg_messages: Vec<limits::Window>,
    cfg_points: Vec<limits::Window>,
    /// What ThingsBoard said in this session, and the limiter built from it and the caps.
    session_limits: Option<limits::SessionLimits>,
    limiter: limits::RateLimiter,
    /// Ids of our `getSessionLimits` requests.
    limits_request_id: u64,
    /// Ids of the post-connect shared attribute requests (above `SYNC_ATTRIBUTE_ID_BASE`).
    sync_request_id: i64,
}

impl Life {
    /// Packet limit: configured, lowered to what ThingsBoard reported.
    fn max_packet_size(&self, cfg: &ThingsboardConfig) -> usize {
        let learned = self
            .session_limits
            .as_ref()
            .and_then(|l| l.max_payload_size);
        learned.map_or(cfg.max_packet_size, |m| m.min(cfg.max_packet_size))
    }

    /// Publish window: configured, lowered to 80 % of what ThingsBoard reported.
    fn max_inflight(&self, cfg: &ThingsboardConfig) -> u16 {
        let learned = self.session_limits.as_ref().and_then(|l| l.max_inflight);
        learned
            .map_or(cfg.max_inflight, |m| m.min(cfg.max_inflight))
            .max(1)
    }

    /// The profile to announce `device` with. Data (telemetry, attributes, a local `connect`)
    /// with a type sets it; a reply never changes a known type (a meter's reply carries its
    /// profile, used only while the device is unknown). `None`: nothing is known about the
    /// device's type, so it is not announced.
    fn sticky_type(&mut self, device: &str, kind: RecordKind, ty: &str) -> Option<String> {
        let sets_type = matches!(
            kind,
            RecordKind::Telemetry | RecordKind::Attributes | RecordKind::Connect
        );
        if !ty.is_empty() && (sets_type || !self.known.contains_key(device)) {
            self.known.insert(device.to_owned(), ty.to_owned());
        }
        self.known.get(device).cloned()
    }

    fn new(cfg: &ThingsboardConfig) -> Life {
        Life {
            protocol: match cfg.protocol {
                MqttProtocol::Auto | MqttProtocol::V5 => Protocol::V5,
                MqttProtocol::V311 => Protocol::V311,
            },
            auto: cfg.protocol == MqttProtocol::Auto,
            known: HashMap::new(),
            backoff: Backoff::new(cfg.reconnect_min, cfg.reconnect_max),
            unreachable_reported: false,
            auth_reported: false,
            takeover_reported: false,
            short_sessions: 0,
            invalid_reported: HashSet::new(),
            acks: JoinSet::new(),
            tls: None,
            tls_loaded: false,
            tls_reported: false,
            names: DeviceNames::default(),
            started: Instant::now(),
            cpu: gateway_rpc::CpuSampler::default(),
            cfg_messages: Vec::new(),
            cfg_points: Vec::new(),
            session_limits: None,
            limiter: limits::RateLimiter::default(),
            limits_request_id: 0,
            sync_request_id: 0,
        }
    }
}

/// Jittered exponential backoff between `min` and `max`.
struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// The next delay: the current step with ±25 % jitter; the step doubles up to `max`.
    fn next(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = rand::rng().random_range(0.75..=1.25);
        base.mul_f64(jitter).min(self.max)
    }

    fn reset(&mut self) {
        self.current = self.min;
    }
}

/// One live session's bookkeeping; dropped (and the rows resent) when the session ends.
#[derive(Default)]
struct Session {
    connected_at: Option<Instant>,
    /// Highest row id read in this session; reset to 0 (oldest unacked) on every connect.
    cursor: i64,
    /// More rows may be waiting: read without lingering.
    need_read: bool,
    /// A lingering read is scheduled for then.
    read_at: Option<Instant>,
    /// The current linger (see [`Uplink::adapt_linger`]); never below `batch_linger`.
    linger: Duration,
    /// Publishes built but not yet handed to the client (the window was full).
    pending: VecDeque<Out>,
    inflight: Inflight<Tag>,
    /// Devices announced (`connect`) in this session.
    announced: HashSet<String>,
    /// A PUBACK failed: re-read from the oldest row once the window drains.
    resend_at: Option<Instant>,
    /// Cancelled: stop sending, wait for PUBACKs until then.
    stopping: Option<Instant>,
    /// Waiting for the `getSessionLimits` answer until then; nothing else is sent meanwhile.
    limits_wait: Option<Instant>,
    /// A publish waits for room under the rate limits until then.
    rate_wait: Option<Instant>,
    /// Rows whose publish got a success PUBACK, not yet deleted (see `flush_acks`), and how
    /// many publishes those PUBACKs were.
    acked: Vec<i64>,
    acked_publishes: u64,
    /// `acked` goes to the store then (see `ACK_LINGER`).
    acks_due: Option<Instant>,
}

/// A publish ready to go.
struct Out {
    topic: Cow<'static, str>,
    payload: Bytes,
    ids: Vec<i64>,
    device: String,
}

/// What an in-flight publish carries.
#[derive(Debug)]
struct Tag {
    ids: Vec<i64>,
    device: String,
}

enum SessionEnd {
    Stopped,
    Failed(Failure),
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("connecting: {0}")]
    Connect(NetError),
    #[error("connection lost: {error}")]
    Lost {
        error: NetError,
        connected_for: Duration,
    },
    #[error("no PUBACK within ack_timeout (dead link)")]
    DeadLink { connected_for: Duration },
    #[error("store: {0}")]
    Store(String),
    #[error("client: {0}")]
    Client(String),
}

/// A connection error, in the terms the session logic cares about.
#[derive(Debug, thiserror::Error)]
enum NetError {
    #[error("access token refused (CONNACK {0})")]
    AuthRefused(String),
    /// A certificate problem in the TLS handshake (ours or the server's).
    #[error("{0}")]
    Tls(String),
    #[error("protocol refused ({0})")]
    ProtocolRefused(String),
    #[error("connection refused (CONNACK {0})")]
    Refused(String),
    #[error("session taken over (DISCONNECT 0x8E)")]
    TakenOver,
    #[error("server disconnected us ({0})")]
    ServerDisconnect(String),
    #[error("connection closed by the server ({0})")]
    Closed(String),
    #[error("{0}")]
    Other(String),
}

/// A normalised rumqttc event.
enum NetEvent {
    ConnAck,
    OutgoingPublish(u16),
    /// `reason` is the MQTT 5 reason code; always 0 on 3.1.1.
    PubAck {
        pkid: u16,
        reason: u8,
    },
    Publish {
        topic: String,
        payload: Bytes,
    },
    SentDisconnect,
    Other,
}

/// The request side of the session's MQTT client.
enum Client {
    V5(rumqttc::v5::AsyncClient),
    V4(rumqttc::AsyncClient),
}

/// The event loop of the session's MQTT client; only `session` polls it.
enum Conn {
    V5(Box<rumqttc::v5::EventLoop>),
    V4(Box<rumqttc::EventLoop>),
}

impl Client {
    fn publish(&self, topic: &str, payload: Bytes) -> Result<(), String> {
        match self {
            Client::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .map_err(|e| e.to_string()),
            Client::V4(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, false, Vec::from(payload))
                .map_err(|e| e.to_string()),
        }
    }

    fn subscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Client::V5(c) => c
                .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
            Client::V4(c) => c
                .try_subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
        }
    }

    fn disconnect(&self) {
        let _ = match self {
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

impl Conn {
    fn new(
        cfg: &ThingsboardConfig,
        protocol: Protocol,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> (Client, Conn) {
        let transport =
            tls.map(|c| rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(c)));
        // With X.509 credentials ThingsBoard authenticates the certificate; no username then.
        let token = cfg.access_token.expose();
        let keep_alive = if cfg.keep_alive.is_zero() {
            Duration::ZERO
        } else {
            cfg.keep_alive.max(Duration::from_secs(1))
        };
        let window = cfg.max_inflight.max(1);
        // Headroom over our own window so rumqttc's pkid wrap rarely collides (subscribes take
        // pkids too).
        let rumqtt_inflight = window.saturating_add(REQUEST_CHANNEL_SLACK as u16);
        let cap = usize::from(window) + REQUEST_CHANNEL_SLACK;
        let max = cfg.max_packet_size;
        match protocol {
            Protocol::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
                o.set_keep_alive(keep_alive)
                    .set_clean_start(true)
                    .set_max_packet_size(Some(u32::try_from(max).unwrap_or(u32::MAX)))
                    .set_outgoing_inflight_upper_limit(rumqtt_inflight);
                if !token.is_empty() {
                    o.set_credentials(token, "");
                }
                if let Some(t) = transport {
                    o.set_transport(t);
                }
                let (c, el) = rumqttc::v5::AsyncClient::new(o, cap);
                (Client::V5(c), Conn::V5(Box::new(el)))
            }
            Protocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
                o.set_keep_alive(keep_alive)
                    .set_clean_session(true)
                    .set_max_packet_size(max, max)
                    .set_inflight(rumqtt_inflight);
                if !token.is_empty() {
                    o.set_credentials(token, "");
                }
                if let Some(t) = transport {
                    o.set_transport(t);
                }
                let (c, el) = rumqttc::AsyncClient::new(o, cap);
                (Client::V4(c), Conn::V4(Box::new(el)))
            }
        }
    }

    async fn poll(&mut self) -> Result<NetEvent, NetError> {
        match self {
            Conn::V5(el) => el.poll().await.map(v5_event).map_err(v5_error),
            Conn::V4(el) => el.poll().await.map(v4_event).map_err(v4_error),
        }
    }

    /// Poll until the first error (rumqttc would reconnect on the next poll; the session logic
    /// decides that instead), forwarding every event. Ends when the receiver is gone.
    async fn drive(mut self, ev_tx: mpsc::Sender<Result<NetEvent, NetError>>) {
        loop {
            let ev = self.poll().await;
            let failed = ev.is_err();
            if ev_tx.send(ev).await.is_err() || failed {
                return;
            }
        }
    }
}

/// Aborts the event-loop task when the session ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn v5_event(ev: rumqttc::v5::Event) -> NetEvent {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    use rumqttc::v5::Event;
    match ev {
        Event::Incoming(Packet::ConnAck(_)) => NetEvent::ConnAck,
        Event::Incoming(Packet::PubAck(ack)) => NetEvent::PubAck {
            pkid: ack.pkid,
            reason: match ack.reason {
                PubAckReason::Success => 0x00,
                PubAckReason::NoMatchingSubscribers => 0x10,
                PubAckReason::UnspecifiedError => 0x80,
                PubAckReason::ImplementationSpecificError => 0x83,
                PubAckReason::NotAuthorized => 0x87,
                PubAckReason::TopicNameInvalid => 0x90,
                PubAckReason::PacketIdentifierInUse => 0x91,
                PubAckReason::QuotaExceeded => 0x97,
                PubAckReason::PayloadFormatInvalid => 0x99,
            },
        },
        Event::Incoming(Packet::Publish(p)) => NetEvent::Publish {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
        },
        Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => NetEvent::OutgoingPublish(pkid),
        Event::Outgoing(rumqttc::Outgoing::Disconnect) => NetEvent::SentDisconnect,
        _ => NetEvent::Other,
    }
}

fn v4_event(ev: rumqttc::Event) -> NetEvent {
    use rumqttc::{Event, Packet};
    match ev {
        Event::Incoming(Packet::ConnAck(_)) => NetEvent::ConnAck,
        Event::Incoming(Packet::PubAck(ack)) => NetEvent::PubAck {
            pkid: ack.pkid,
            reason: 0,
        },
        Event::Incoming(Packet::Publish(p)) => NetEvent::Publish {
            topic: p.topic,
            payload: p.payload,
        },
        Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => NetEvent::OutgoingPublish(pkid),
        Event::Outgoing(rumqttc::Outgoing::Disconnect) => NetEvent::SentDisconnect,
        _ => NetEvent::Other,
    }
}

fn v5_error(e: rumqttc::v5::ConnectionError) -> NetError {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as C, DisconnectReasonCode as D};
    use rumqttc::v5::{ConnectionError as E, StateError as S};
    if let Some(t) = tls::rustls_cause(&e) {
        return tls_error(t);
    }
    match e {
        E::ConnectionRefused(C::BadUserNamePassword) => {
            NetError::AuthRefused("0x86 bad user name or password".into())
        }
        E::ConnectionRefused(C::NotAuthorized) => {
            NetError::AuthRefused("0x87 not authorized".into())
        }
        E::ConnectionRefused(c @ (C::UnsupportedProtocolVersion | C::RefusedProtocolVersion)) => {
            NetError::ProtocolRefused(format!("{c:?}"))
        }
        E::ConnectionRefused(c) => NetError::Refused(format!("{c:?}")),
        // rumqttc's v5 codec error type is private: a socket error inside it is only known by
        // its text. A TLS alert read after the handshake (TLS 1.3: the server checks our client
        // certificate after we think the handshake is done) arrives this way.
        E::MqttState(S::Deserialization(d)) if d.to_string().contains("received fatal alert") => {
            NetError::Tls(format!(
                "ThingsBoard refused our client certificate ({d}); check \
                 thingsboard.cert_file/key_file and the device's X.509 credentials"
            ))
        }
        E::MqttState(S::Deserialization(d)) if d.to_string().starts_with("IO:") => {
            NetError::Closed(d.to_string())
        }
        // A 3.1.1-only server answers a v5 CONNECT with a v3 CONNACK the v5 codec cannot read.
        E::MqttState(S::Deserialization(d)) => NetError::ProtocolRefused(d.to_string()),
        E::NotConnAck(p) => NetError::ProtocolRefused(format!("expected CONNACK, got {p:?}")),
        E::MqttState(S::ServerDisconnect {
            reason_code: D::SessionTakenOver,
            ..
        }) => NetError::TakenOver,
        E::MqttState(S::ServerDisconnect {
            reason_code,
            reason_string,
        }) => NetError::ServerDisconnect(format!(
            "{reason_code:?}{}",
            reason_string.map(|s| format!(": {s}")).unwrap_or_default()
        )),
        E::MqttState(S::ConnectionAborted) => NetError::Closed("connection aborted".into()),
        E::MqttState(S::Io(io)) | E::Io(io) => io_error(io),
        other => NetError::Other(other.to_string()),
    }
}

fn v4_error(e: rumqttc::ConnectionError) -> NetError {
    use rumqttc::{ConnectReturnCode as C, ConnectionError as E, StateError as S};
    if let Some(t) = tls::rustls_cause(&e) {
        return tls_error(t);
    }
    match e {
        E::ConnectionRefused(C::BadUserNamePassword) => {
            NetError::AuthRefused("4 bad user name or password".into())
        }
        E::ConnectionRefused(C::NotAuthorized) => NetError::AuthRefused("5 not authorized".into()),
        E::ConnectionRefused(C::RefusedProtocolVersion) => {
            NetError::ProtocolRefused("1 unacceptable protocol version".into())
        }
        E::ConnectionRefused(c) => NetError::Refused(format!("{c:?}")),
        E::MqttState(S::ConnectionAborted) => NetError::Closed("connection aborted".into()),
        E::MqttState(S::Io(io))
        | E::Io(io)
        | E::MqttState(S::Deserialization(rumqttc::mqttbytes::Error::Io(io))) => io_error(io),
        other => NetError::Other(other.to_string()),
    }
}

/// Certificate problems are permanent until someone replaces a certificate: reported once,
/// retried slowly. Other TLS failures (a reset mid-handshake) are ordinary connection errors.
fn tls_error(e: &rustls::Error) -> NetError {
    match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::AlertReceived(_)
        | rustls::Error::NoCertificatesPresented => NetError::Tls(tls::describe(e)),
        other => NetError::Other(format!("TLS: {other}")),
    }
}

fn io_error(io: std::io::Error) -> NetError {
    use std::io::ErrorKind as K;
    match io.kind() {
        K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => {
            NetError::Closed(io.to_string())
        }
        _ => NetError::Other(io.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connack_and_disconnect_codes_are_classified() {
        use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as C5, DisconnectReasonCode as D};
        use rumqttc::ConnectReturnCode as C4;
        let v4 = |c| v4_error(rumqttc::ConnectionError::ConnectionRefused(c));
        assert!(matches!(v4(C4::NotAuthorized), NetError::AuthRefused(_)));
        assert!(matches!(
            v4(C4::BadUserNamePassword),
            NetError::AuthRefused(_)
        ));
        assert!(matches!(
            v4(C4::RefusedProtocolVersion),
            NetError::ProtocolRefused(_)
        ));
        assert!(matches!(v4(C4::ServiceUnavailable), NetError::Refused(_)));
        let v5 = |c| v5_error(rumqttc::v5::ConnectionError::ConnectionRefused(c));
        assert!(matches!(
            v5(C5::BadUserNamePassword),
            NetError::AuthRefused(_)
        ));
        assert!(matches!(v5(C5::NotAuthorized), NetError::AuthRefused(_)));
        assert!(matches!(
            v5(C5::UnsupportedProtocolVersion),
            NetError::ProtocolRefused(_)
        ));
        assert!(matches!(v5(C5::ServerUnavailable), NetError::Refused(_)));
        let disconnect = |reason_code| {
            v5_error(rumqttc::v5::ConnectionError::MqttState(
                rumqttc::v5::StateError::ServerDisconnect {
                    reason_code,
                    reason_string: None,
                },
            ))
        };
        assert!(matches!(
            disconnect(D::SessionTakenOver),
            NetError::TakenOver
        ));
        assert!(matches!(
            disconnect(D::MessageRateTooHigh),
            NetError::ServerDisconnect(_)
        ));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(matches!(
            v4_error(rumqttc::ConnectionError::Io(reset)),
            NetError::Closed(_)
        ));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(matches!(
            v4_error(rumqttc::ConnectionError::Io(refused)),
            NetError::Other(_)
        ));
    }

    #[test]
    fn a_reload_changes_the_certificate_files_but_not_whether_tls_is_on() {
        let started = TlsSettings {
            enabled: false,
            ca_file: None,
            cert_file: None,
            key_file: None,
        };
        let (tx, rx) = watch::channel(started);
        let reloader = TlsReloader(Arc::new(tx));
        // The file now says port 8883 (TLS on) and names certificates.
        reloader.reload(TlsSettings {
            enabled: true,
            ca_file: Some("/etc/dlms-bridge/ca.pem".into()),
            cert_file: Some("/etc/dlms-bridge/gw.pem".into()),
            key_file: Some("/etc/dlms-bridge/gw.key".into()),
        });
        assert!(rx.has_changed().expect("open"), "the uplink is woken");
        let now = rx.borrow();
        assert!(!now.enabled, "TLS on/off waits for the restart");
        assert_eq!(
            now.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/dlms-bridge/ca.pem"))
        );
        assert_eq!(
            now.cert_file.as_deref(),
            Some(std::path::Path::new("/etc/dlms-bridge/gw.pem"))
        );
        assert_eq!(
            now.key_file.as_deref(),
            Some(std::path::Path::new("/etc/dlms-bridge/gw.key"))
        );
    }

    #[test]
    fn the_linger_grows_on_a_dense_stream_and_shrinks_back_on_a_sparse_one() {
        let ms = Duration::from_millis;
        let floor = ms(5);
        // 100 devices at a few messages a second each: one record per device, no change.
        assert_eq!(next_linger(floor, floor, 100, 100), floor);
        // A steady dense stream: the records a read finds per device grow with the linger,
        // which settles where that is the target, below the cap.
        let settle = |per_device_per_ms: f64| {
            let mut l = floor;
            for _ in 0..30 {
                let rows = (per_device_per_ms * l.as_secs_f64() * 1000.0 * 100.0) as usize;
                l = next_linger(l, floor, rows.min(READ_BATCH_ROWS), 100);
            }
            l
        };
        // 600 msg/s per device (60,000 from 100): 12 records in 20 ms.
        let l = settle(0.6);
        assert!(l > ms(19) && l < ms(21), "{l:?}");
        // 900 msg/s per device: 13.3 ms.
        let l = settle(0.9);
        assert!(l > ms(12) && l < ms(15), "{l:?}");
        // 400 msg/s per device: 12 records would take 30 ms, so the cap.
        assert_eq!(settle(0.4), MAX_ADAPTIVE_LINGER);
        // 3,000 msg/s per device: 4 ms would do, but never below the configured linger.
        assert_eq!(settle(3.0), floor);
        // 200 msg/s per device once grown: stays at the cap.
        let rows = |l: Duration| (0.2 * l.as_secs_f64() * 1000.0 * 100.0) as usize;
        let mut l = ms(10);
        for _ in 0..10 {
            l = next_linger(l, floor, rows(l), 100);
        }
        assert_eq!(l, MAX_ADAPTIVE_LINGER);
        // A few records say nothing: no growth.
        assert_eq!(next_linger(floor, floor, 10, 1), floor);
        // Sparse again: halves back, never below the configured linger.
        assert_eq!(next_linger(ms(20), floor, 100, 100), ms(10));
        assert_eq!(next_linger(ms(6), floor, 1, 1), floor);
        // "0s" turns lingering off; a configured linger above the cap is kept.
        assert_eq!(next_linger(ms(20), Duration::ZERO, 300, 10), Duration::ZERO);
        assert_eq!(next_linger(ms(100), ms(100), 300, 10), ms(100));
    }

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let mut b = Backoff::new(min, max);
        let first = b.next();
        assert!(first >= min.mul_f64(0.75) && first <= min.mul_f64(1.25));
        for _ in 0..10 {
            assert!(b.next() <= max);
        }
        assert_eq!(b.current, max);
        b.reset();
        assert_eq!(b.current, min);
    }
}
