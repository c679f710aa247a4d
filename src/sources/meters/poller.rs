//! The meter actor: one tokio task per meter that owns the meter's TCP connection and DLMS
//! association, polls its registers on a fixed-rate schedule, serves queued commands (RPC
//! get/set/action) between polls on the same association, and reconnects with jittered
//! exponential backoff when the meter fails.
//!
//! It never shares its connection, never blocks the runtime and never lets an error escape the
//! task: failures become health telemetry (`poll_ok`, `consecutive_failures`, `last_error`,
//! and the link's `link_retries` / `link_retries_total`, `poll_overruns_total`,
//! `reassociations_total`) and logs. A dead association is opened again at once within the same
//! poll; only a meter that fails again goes into backoff. It does not map or store records; it hands them to the router channel.

use std::time::Duration;

use rand::Rng;
use serde_json::{Map, Number, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, instrument, warn};

use super::client::{self, ClientSettings, DlmsClient, ReadingValue, Register, Security};
use super::counter::{self, InvocationCounter, SharedCounter};
use super::link::{self, ClientLink, LinkAddress, LinkParams};
use super::profile::{self, ProfileReader};
use crate::config::{DlmsAuth, DlmsTransport, MeterConfig};
use crate::dlms::apdu::{AttrRef, Data, DataAccessResult, MethodRef};
use crate::dlms::obis::ObisCode;
use crate::model::{now_ms, Record, RecordKind};
use crate::sources::SourceEvent;

/// Device profile used when the meter config names none.
pub const DEFAULT_DEVICE_TYPE: &str = "DLMS Energy Meter";

/// Default of `disconnect_after`: consecutive failed polls after which the meter is reported
/// down (`Disconnect`) and goes silent until it answers again. A single dropped connection that
/// reconnects at once is not an outage.
pub const DOWN_AFTER_FAILURES: u32 = 3;

/// First backoff step after the immediate retry.
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);

/// Longest wait between attempts on a failing meter (the open circuit's probe interval).
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Bound on releasing the association at shutdown, so one dead meter cannot hold shutdown.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// The five registers the original system read, under the keys dashboards already use.
pub const DEFAULT_REGISTERS: [(&str, ObisCode); 5] = [
    ("voltage_l1", ObisCode::new(1, 0, 32, 7, 0, 255)),
    ("current_l1", ObisCode::new(1, 0, 31, 7, 0, 255)),
    ("frequency", ObisCode::new(1, 0, 14, 7, 0, 255)),
    ("active_power", ObisCode::new(1, 0, 1, 7, 0, 255)),
    ("active_energy", ObisCode::new(1, 0, 1, 8, 0, 255)),
];

/// The meter's Clock object (class 8), attribute 2 = its current time.
pub const CLOCK: AttrRef = AttrRef::new(8, ObisCode::new(0, 0, 1, 0, 0, 255), 2);

/// One configured profile of the meter and where its reading stands.
#[derive(Debug)]
struct ProfileState {
    reader: ProfileReader,
    /// How often new entries are fetched.
    interval: Duration,
    /// Not read again before this instant (a failed read is retried at the next poll).
    next_due: Instant,
    /// Time of the last entry delivered (Unix ms); loaded from `path` on first use.
    position: Option<i64>,
    /// Where the position is persisted; `None` = memory only.
    path: Option<std::path::PathBuf>,
}

/// Why connecting to or polling a meter failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TCP connect failed.
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// TCP connect did not finish in time.
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    /// The link could not be set up (bad address size).
    #[error("cannot set up the link")]
    Link(#[source] link::Error),
    /// Association, request or response failed.
    #[error("dlms request failed")]
    Client(#[source] client::Error),
    /// The meter's configuration cannot work (e.g. HLS without keys).
    #[error("meter configuration: {0}")]
    Config(String),
    /// The meter registry database could not be read.
    #[error("cannot read meter registry {path}")]
    Registry {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
}

impl Error {
    /// Retrying will not help (credentials refused): back off at the slowest rate.
    fn is_permanent(&self) -> bool {
        matches!(self, Error::Client(e) if e.is_permanent())
            || matches!(self, Error::Link(_) | Error::Config(_))
    }
}

/// Display an error with its whole source chain, `a: b: c`, for logs and `last_error`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

/// Why a command sent through a `MeterHandle` failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommandError {
    /// The meter actor has stopped (shutdown).
    #[error("meter actor has stopped")]
    Stopped,
    /// The meter is down and in backoff; the command was not attempted.
    #[error("meter is unavailable: {0}")]
    Unavailable(String),
    /// The request failed on the wire.
    #[error("meter request failed: {0}")]
    Failed(String),
    /// The RPC would change the meter and `rpc_write` is off for it.
    #[error("writes are not enabled for this meter (rpc_write = false)")]
    WritesDisabled,
    /// The meter refused the attribute or method.
    #[error("meter refused: {0}")]
    Refused(DataAccessResult),
}

/// A request queued to a meter actor, answered through its oneshot.
#[derive(Debug)]
pub enum Command {
    /// Read one attribute.
    Get {
        attr: AttrRef,
        reply: oneshot::Sender<Result<Data, CommandError>>,
    },
    /// Write one attribute.
    Set {
        attr: AttrRef,
        value: Data,
        reply: oneshot::Sender<Result<(), CommandError>>,
    },
    /// Invoke one method; returns its return parameters, if any.
    Action {
        method: MethodRef,
        params: Option<Data>,
        reply: oneshot::Sender<Result<Option<Data>, CommandError>>,
    },
    /// Poll now (the readings also go out as telemetry); replies with the telemetry values.
    PollNow {
        reply: oneshot::Sender<Result<serde_json::Value, CommandError>>,
    },
    /// Poll every `period` from now on (shared attribute `poll_interval`).
    SetInterval {
        period: Duration,
        reply: oneshot::Sender<Result<(), CommandError>>,
    },
    /// Set the meter clock to our time (keeping its deviation); returns the drift (s) before.
    SyncClock {
        reply: oneshot::Sender<Result<f64, CommandError>>,
    },
}

/// The registers a meter config asks for: explicit `registers`, else the default profile.
/// Unparseable OBIS codes (validation rejects them first) are skipped with an error log.
pub fn registers_of(cfg: &MeterConfig) -> Vec<Register> {
    if cfg.registers.is_empty() {
        return DEFAULT_REGISTERS
            .iter()
            .map(|(key, obis)| Register {
                key: (*key).to_string(),
                attr: AttrRef::new(3, *obis, 2),
            })
            .collect();
    }
    cfg.registers
        .iter()
        .filter_map(|r| match r.obis.parse::<ObisCode>() {
            Ok(obis) => Some(Register {
                key: r.key.clone(),
                attr: AttrRef::new(r.class_id, obis, r.attribute),
            }),
            Err(e) => {
                error!(meter = %cfg.name, key = %r.key, error = %e, "Register skipped.");
                None
            }
        })
        .collect()
}

/// Connect, open the link and associate, bounded by the meter's timeout at each step. An
/// HLS-GMAC meter's invocation counter is opened from its file in `state_dir` (or starts at 1
/// in memory): use [`connect_with`] to keep one counter across connections.
pub async fn connect(
    cfg: &MeterConfig,
    max_receive_pdu: u16,
) -> Result<DlmsClient<ClientLink<TcpStream>>, Error> {
    let security = match cfg.auth {
        DlmsAuth::HlsGmac => Some(open_counter(cfg, 1).await?),
        _ => None,
    };
    connect_with(cfg, max_receive_pdu, security).await
}

/// The invocation counter of an HLS meter: its file beside the queue (`state_dir`), or memory
/// only (starting at `start`) when there is no state directory.
pub async fn open_counter(cfg: &MeterConfig, start: u32) -> Result<SharedCounter, Error> {
    let path = cfg
        .state_dir
        .as_deref()
        .map(|d| counter::counter_path(d, &cfg.name));
    InvocationCounter::shared(path, start)
        .await
        .map_err(|e| Error::Client(client::Error::Counter(e)))
}

/// [`connect`] with the meter's HLS invocation counter (`None` unless `auth = "hls-gmac"`).
pub async fn connect_with(
    cfg: &MeterConfig,
    max_receive_pdu: u16,
    counter: Option<SharedCounter>,
) -> Result<DlmsClient<ClientLink<TcpStream>>, Error> {
    let security = match (cfg.auth, &cfg.hls, counter) {
        (DlmsAuth::HlsGmac, Some(k), Some(counter)) => Some(Security {
            keys: k.keys.clone(),
            system_title: k.system_title,
            counter,
            dedicated_key: cfg.dedicated_key,
        }),
        (DlmsAuth::HlsGmac, None, _) => {
            return Err(Error::Config(
                "auth = \"hls-gmac\" without keys (the configuration was not validated)".into(),
            ))
        }
        (DlmsAuth::HlsGmac, _, None) => {
            return Err(Error::Config(
                "auth = \"hls-gmac\" without an invocation counter".into(),
            ))
        }
        _ => None,
    };
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let stream = match tokio::time::timeout(cfg.timeout, TcpStream::connect(&addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(Error::Connect { addr, source }),
        Err(_) => return Err(Error::ConnectTimeout(addr)),
    };
    // Small request/response exchanges: do not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let address = LinkAddress {
        client: cfg.client_address,
        logical: cfg.logical_address,
        physical: cfg.physical_address,
        address_size: cfg.address_size,
    };
    let link = match cfg.transport {
        DlmsTransport::Hdlc => {
            ClientLink::hdlc(stream, address, LinkParams::default()).map_err(Error::Link)?
        }
        DlmsTransport::Wrapper => ClientLink::wrapper(stream, address),
    };
    let password = match (cfg.auth, &cfg.password) {
        (DlmsAuth::Lls, Some(p)) => Some(p.expose().as_bytes().to_vec()),
        (DlmsAuth::Lls, None) => Some(Vec::new()),
        (DlmsAuth::None | DlmsAuth::HlsGmac, _) => None,
    };
    let mut c = DlmsClient::new(
        link,
        ClientSettings {
            password,
            security,
            max_receive_pdu,
            timeout: cfg.timeout,
            retries: cfg.retries,
        },
    );
    c.associate().await.map_err(Error::Client)?;
    Ok(c)
}

/// A DLMS value as JSON: numbers as numbers, booleans as booleans, everything else as text.
pub fn data_to_json(d: &Data) -> Value {
    match d {
        Data::Bool(b) => Value::Bool(*b),
        Data::Null => Value::Null,
        Data::Array(v) | Data::Structure(v) => Value::Array(v.iter().map(data_to_json).collect()),
        Data::Enum(_) | Data::Bcd(_) => d.to_string().into(),
        other => match other.as_f64() {
            Some(f) => number(f),
            None => Value::String(other.to_string()),
        },
    }
}

/// A reading as a JSON number. Always a float, so ThingsBoard keeps one type per key even when
/// a scaled value happens to be whole (`230.0`).
fn number(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// Failure bookkeeping: jittered exponential backoff with an immediate first retry, and the
/// open/closed state of the circuit.
#[derive(Debug, Default)]
struct Backoff {
    /// Failed attempts in a row (reset by a good poll).
    failures: u32,
    /// No attempt before this instant (the open circuit).
    retry_at: Option<Instant>,
}

impl Backoff {
    /// Record a failure and schedule the next attempt.
    fn fail(&mut self, now: Instant, permanent: bool) {
        self.failures = self.failures.saturating_add(1);
        let delay = if permanent {
            MAX_BACKOFF
        } else if self.failures <= 1 {
            Duration::ZERO
        } else {
            let exp = (self.failures - 2).min(16);
            MIN_BACKOFF.saturating_mul(1 << exp).min(MAX_BACKOFF)
        };
        // Full jitter on the upper half so a fleet that failed together does not retry together.
        let jittered = delay.mul_f64(rand::rng().random_range(0.5..=1.0));
        self.retry_at = (delay > Duration::ZERO).then(|| now + jittered);
    }

    fn succeed(&mut self) {
        self.failures = 0;
        self.retry_at = None;
    }

    fn may_try(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|t| now >= t)
    }
}

/// The meter actor. Built by `spawn_meter`; runs until cancelled or every handle and the
/// events receiver are gone.
pub struct Meter {
    cfg: MeterConfig,
    registers: Vec<Register>,
    device_type: String,
    /// Router input; sending awaits when it is full (backpressure delays the next poll).
    events_tx: mpsc::Sender<SourceEvent>,
    /// Commands from `MeterHandle`s, served between polls on the same association.
    cmd_rx: mpsc::Receiver<Command>,
    /// Stops the actor: it finishes the current request, releases the association and exits.
    cancel: CancellationToken,
    /// max-receive-pdu-size proposed in the AARQ.
    max_receive_pdu: u16,
    /// The open association, if any.
    client: Option<DlmsClient<ClientLink<TcpStream>>>,
    /// Units already published for the current association.
    units_sent: bool,
    /// Failure count and the earliest next attempt: the circuit breaker. While it is open,
    /// ticks are skipped and commands fail fast with `CommandError::Unavailable`.
    backoff: Backoff,
    /// Whether ThingsBoard currently sees the meter as connected (Connect sent, no Disconnect).
    announced: bool,
    /// The last poll's telemetry values, or why it failed (answers `poll_now`).
    last_poll: Option<Result<Map<String, serde_json::Value>, String>>,
    /// Polls skipped because the previous one overran the interval (health telemetry).
    overruns: u64,
    /// Link recovery attempts (RR polls, re-sent requests) on every association so far (health
    /// telemetry `link_retries_total`).
    link_retries: u64,
    /// The part of the current association's recovery count already added to `link_retries`.
    link_retries_counted: u64,
    /// Associations opened again at once after the previous one died (health telemetry).
    reassociations: u64,
    /// Configured Profile generic objects.
    profiles: Vec<ProfileState>,
    /// Meter clock minus our clock (s), read on association; sent with the next telemetry.
    clock_drift_s: Option<f64>,
    /// HLS-GMAC: our invocation counter, opened on the first association and kept across
    /// reconnects (its file keeps it across restarts).
    counter: Option<SharedCounter>,
}

impl Meter {
    pub fn new(
        cfg: MeterConfig,
        events_tx: mpsc::Sender<SourceEvent>,
        cmd_rx: mpsc::Receiver<Command>,
        cancel: CancellationToken,
    ) -> Self {
        let registers = registers_of(&cfg);
        let profiles = cfg
            .profiles
            .iter()
            .filter_map(|p| {
                let obis = p.obis.parse::<ObisCode>().ok()?;
                let columns = p.columns.iter().filter_map(|c| c.parse().ok()).collect();
                Some(ProfileState {
                    reader: ProfileReader::new(obis, columns),
                    interval: p.interval,
                    next_due: Instant::now(),
                    position: None,
                    path: cfg
                        .state_dir
                        .as_deref()
                        .map(|d| profile::position_path(d, &cfg.name, obis)),
                })
            })
            .collect();
        let device_type = cfg
            .device_type
            .clone()
            .unwrap_or_else(|| DEFAULT_DEVICE_TYPE.to_string());
        Meter {
            cfg,
            registers,
            device_type,
            events_tx,
            cmd_rx,
            cancel,
            max_receive_pdu: client::DEFAULT_MAX_RECEIVE_PDU,
            client: None,
            units_sent: false,
            backoff: Backoff::default(),
            announced: false,
            last_poll: None,
            overruns: 0,
            link_retries: 0,
            link_retries_counted: 0,
            reassociations: 0,
            profiles,
            clock_drift_s: None,
            counter: None,
        }
    }

    /// Propose a different max-receive-pdu-size (small values force block transfer).
    pub fn with_max_receive_pdu(mut self, pdu: u16) -> Self {
        self.max_receive_pdu = pdu;
        self
    }

    /// Run the actor loop.
    #[instrument(skip_all, fields(meter = %self.cfg.name))]
    pub async fn run(mut self) {
        let mut period = self.cfg.interval.max(Duration::from_millis(1));
        // Start at a random point of the first period so a fleet spreads its polls evenly.
        let offset = period.mul_f64(rand::rng().random_range(0.0..1.0));
        let mut ticker = tokio::time::interval_at(Instant::now() + offset, period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut commands_open = true;
        info!(host = %self.cfg.host, port = self.cfg.port, registers = self.registers.len(), "Meter poller started.");
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                cmd = self.cmd_rx.recv(), if commands_open => match cmd {
                    Some(Command::SetInterval { period: p, reply }) => {
                        period = p.max(Duration::from_millis(1));
                        ticker = tokio::time::interval_at(Instant::now() + period, period);
                        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
                        info!(interval = ?period, "Poll interval changed.");
                        let _ = reply.send(Ok(()));
                    }
                    Some(Command::PollNow { reply }) => {
                        let alive = self.poll().await;
                        let r = match self.last_poll.clone() {
                            Some(Ok(v)) => Ok(serde_json::Value::Object(v)),
                            Some(Err(e)) => Err(CommandError::Failed(e)),
                            None => Err(CommandError::Unavailable("in backoff".into())),
                        };
                        let _ = reply.send(r);
                        if !alive {
                            break;
                        }
                    }
                    Some(cmd) => self.serve(cmd).await,
                    None => commands_open = false,
                },
                scheduled = ticker.tick() => {
                    let late = Instant::now().saturating_duration_since(scheduled);
                    if late >= period {
                        let missed = (late.as_nanos() / period.as_nanos()) as u64;
                        self.overruns += missed;
                        metrics::counter!("dlms_bridge_meter_poll_overruns_total", "meter" => self.cfg.name.clone()).increment(missed);
                        debug!(missed, total = self.overruns, "Poll overran its interval.");
                    }
                    if !self.poll().await {
                        break;
                    }
                }
            }
        }
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(mut c) = self.client.take() {
            match tokio::time::timeout(RELEASE_TIMEOUT, c.release()).await {
                Ok(Ok(())) => debug!("Association released."),
                Ok(Err(e)) => debug!(error = %error_chain(&e), "Release failed; closing anyway."),
                Err(_) => debug!("Release timed out; closing anyway."),
            }
        }
        info!(overruns = self.overruns, "Meter poller stopped.");
    }

    /// Make sure an association is open, connecting if needed (and allowed by the backoff).
    async fn ensure_client(&mut self) -> Result<bool, Error> {
        if self
            .client
            .as_ref()
            .is_some_and(|c| c.association().is_some())
        {
            return Ok(false);
        }
        self.drop_client();
        let counter = match (self.cfg.auth, &self.counter) {
            (DlmsAuth::HlsGmac, None) => {
                let c = self.cancellable(open_counter(&self.cfg, 1)).await?;
                self.counter = Some(c.clone());
                Some(c)
            }
            (_, c) => c.clone(),
        };
        let c = self
            .cancellable(connect_with(&self.cfg, self.max_receive_pdu, counter))
            .await?;
        debug!("Associated.");
        self.client = Some(c);
        self.link_retries_counted = 0;
        self.units_sent = false;
        self.read_clock().await;
        Ok(true)
    }

    /// Read the meter clock (for its deviation and the drift), then write our time to it.
    async fn sync_clock(&mut self) -> Result<f64, CommandError> {
        if !self.backoff.may_try(Instant::now()) {
            return Err(CommandError::Unavailable("in backoff".into()));
        }
        self.ensure_client()
            .await
            .map_err(|e| CommandError::Unavailable(error_chain(&e)))?;
        let Some(c) = self.client.as_mut() else {
            return Err(CommandError::Stopped);
        };
        let failed = |e: &client::Error| CommandError::Failed(error_chain(e));
        let before = now_ms();
        let current = match c.get_one(&CLOCK).await {
            Ok(Ok(Data::OctetString(b))) => crate::dlms::clock::decode(&b).ok(),
            Ok(Ok(Data::DateTime(b))) => crate::dlms::clock::decode(&b).ok(),
            Ok(Ok(_)) => None,
            Ok(Err(dar)) => return Err(CommandError::Refused(dar)),
            Err(e) => {
                let out = failed(&e);
                if e.needs_reconnect() {
                    self.drop_client();
                }
                return Err(out);
            }
        };
        let drift = current.map_or(0.0, |t| (t.unix_ms - before) as f64 / 1000.0);
        let deviation = current.map_or(0, |t| t.deviation_min);
        let value = Data::OctetString(crate::dlms::clock::encode(now_ms(), deviation).to_vec());
        match c.set(&CLOCK, &value).await {
            Ok(DataAccessResult::Success) => {
                info!(drift_s = drift, "Meter clock set.");
                Ok(drift)
            }
            Ok(dar) => Err(CommandError::Refused(dar)),
            Err(e) => {
                let out = failed(&e);
                if e.needs_reconnect() {
                    self.drop_client();
                }
                Err(out)
            }
        }
    }

    /// Read the meter's clock once per association for `clock_drift_s`. A meter without a
    /// clock (or refusing it) is fine; a request failure is left to the poll that follows.
    async fn read_clock(&mut self) {
        let Some(c) = self.client.as_mut() else {
            return;
        };
        let before = now_ms();
        let r = c.get_one(&CLOCK).await;
        let mid = before + (now_ms() - before) / 2;
        self.clock_drift_s = match r {
            Ok(Ok(Data::OctetString(b))) => crate::dlms::clock::decode(&b).ok(),
            Ok(Ok(Data::DateTime(b))) => crate::dlms::clock::decode(&b).ok(),
            _ => None,
        }
        .map(|t| (t.unix_ms - mid) as f64 / 1000.0);
        if let Some(drift) = self.clock_drift_s {
            if drift.abs() >= 10.0 {
                warn!(drift_s = drift, "Meter clock is off.");
            } else {
                debug!(drift_s = drift, "Meter clock read.");
            }
        }
    }

    /// Add the current association's new recovery attempts to the running total.
    fn count_retries(&mut self) {
        if let Some(c) = &self.client {
            let r = c.recoveries();
            self.link_retries += r.saturating_sub(self.link_retries_counted);
            self.link_retries_counted = r;
        }
    }

    /// Forget the association (its connection closes on drop), keeping its retry count.
    fn drop_client(&mut self) {
        self.count_retries();
        self.client = None;
    }

    /// The health counters every telemetry record of the meter carries.
    fn health(&self, values: &mut Map<String, Value>) {
        values.insert("link_retries_total".into(), self.link_retries.into());
        values.insert("poll_overruns_total".into(), self.overruns.into());
        values.insert("reassociations_total".into(), self.reassociations.into());
    }

    /// Await a connection attempt, but give it up on cancellation (there is no association to
    /// release yet) by reporting a timeout-like error; the caller then exits through the cancel
    /// branch.
    async fn cancellable<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::select! {
            r = fut => r,
            _ = self.cancel.cancelled() => Err(Error::Client(client::Error::Timeout(Duration::ZERO))),
        }
    }

    /// One poll. Returns false when the router is gone and the actor should stop.
    async fn poll(&mut self) -> bool {
        let now = Instant::now();
        if !self.backoff.may_try(now) {
            return true;
        }
        let ts = now_ms();
        self.last_poll = None;
        let retries_before = self.link_retries;
        let mut result = self.read_once().await;
        // A reused association died (the link's recovery gave up, or the meter dropped the
        // connection): associate again at once so the poll is not lost.
        if let Err((error, reused)) = &result {
            if *reused && !self.cancel.is_cancelled() {
                debug!(error = %error_chain(error), "Association lost; associating again.");
                self.reassociations += 1;
                result = self.read_once().await;
            }
        }
        self.count_retries();
        let poll_retries = self.link_retries - retries_before;
        if poll_retries > 0 {
            metrics::counter!("dlms_bridge_meter_poll_retries_total", "meter" => self.cfg.name.clone()).increment(poll_retries);
        }
        metrics::histogram!("dlms_bridge_meter_poll_duration_seconds", "meter" => self.cfg.name.clone()).record(now.elapsed().as_secs_f64());
        let mut records = Vec::new();
        let mut positions = Vec::new();
        match result {
            Ok(readings) => {
                self.backoff.succeed();
                if !self.announced {
                    info!("Meter is answering.");
                    records.push(self.record(RecordKind::Connect));
                    self.announced = true;
                }
                let mut values = Map::new();
                let mut units = Map::new();
                for r in readings {
                    match r {
                        Ok(reading) => {
                            if let Some(u) = reading.unit {
                                units.insert(format!("unit_{}", reading.key), u.into());
                            }
                            let v = match reading.value {
                                ReadingValue::Number(f) => number(f),
                                ReadingValue::Raw(d) => data_to_json(&d),
                            };
                            values.insert(reading.key, v);
                        }
                        Err(error) => debug!(%error, "Register not readable."),
                    }
                }
                if !self.units_sent && !units.is_empty() {
                    records.push(Record::attributes(&self.cfg.name, &self.device_type, units));
                    self.units_sent = true;
                }
                values.insert("poll_ok".into(), true.into());
                values.insert("consecutive_failures".into(), 0.into());
                values.insert("link_retries".into(), poll_retries.into());
                if let Some(d) = self.clock_drift_s.take() {
                    values.insert("clock_drift_s".into(), number(d));
                }
                let (profile_records, error) = self.read_profiles(&mut positions).await;
                if let Some(e) = error {
                    values.insert("profile_error".into(), e.into());
                }
                self.health(&mut values);
                self.last_poll = Some(Ok(values.clone()));
                records.push(Record::telemetry(
                    &self.cfg.name,
                    &self.device_type,
                    ts,
                    values,
                ));
                records.extend(profile_records);
            }
            Err((error, _)) => {
                if self.cancel.is_cancelled() {
                    return true;
                }
                self.drop_client();
                metrics::counter!("dlms_bridge_meter_poll_failures_total", "meter" => self.cfg.name.clone()).increment(1);
                let permanent = error.is_permanent();
                self.backoff.fail(Instant::now(), permanent);
                let failures = self.backoff.failures;
                let text = error_chain(&error);
                self.last_poll = Some(Err(text.clone()));
                if permanent {
                    error!(error = %text, "Meter refused the association; check address and credentials (password or HLS keys). Retrying slowly.");
                } else if failures == self.cfg.disconnect_after.max(1) {
                    warn!(error = %text, failures, "Meter is down; backing off.");
                } else {
                    debug!(error = %text, failures, "Poll failed.");
                }
                // Health goes up while the meter is failing but not yet down. Once down, the
                // meter stays silent until it answers again: any record would make the uplink
                // announce the device as connected again, undoing the Disconnect.
                let down_after = self.cfg.disconnect_after.max(1);
                if failures <= down_after {
                    if !self.announced {
                        records.push(self.record(RecordKind::Connect));
                        self.announced = true;
                    }
                    let mut values = Map::new();
                    values.insert("poll_ok".into(), false.into());
                    values.insert("consecutive_failures".into(), failures.into());
                    values.insert("last_error".into(), text.into());
                    values.insert("link_retries".into(), poll_retries.into());
                    self.health(&mut values);
                    records.push(Record::telemetry(
                        &self.cfg.name,
                        &self.device_type,
                        ts,
                        values,
                    ));
                    if failures == down_after {
                        if let Some(v) = records
                            .last_mut()
                            .and_then(|r| r.payload["values"].as_object_mut())
                        {
                            v.insert(
                                "disconnect_reason".into(),
                                format!("{failures} consecutive failed polls; reported disconnected until it answers").into(),
                            );
                        }
                        records.push(self.record(RecordKind::Disconnect));
                        self.announced = false;
                    }
                }
            }
        }
        if !self.emit(records).await {
            return false;
        }
        // The entries are handed on: only now does the position move past them.
        for (i, ts) in positions {
            let p = &mut self.profiles[i];
            p.position = Some(ts);
            if let Some(path) = &p.path {
                if let Err(e) = profile::store_position(path, ts).await {
                    error!(error = %error_chain(&e), "Profile position not stored; entries may be sent again after a restart.");
                }
            }
        }
        true
    }

    /// Read every due profile on the current association. Returns the entries as telemetry
    /// records (the meter's timestamps), the new positions to store once they are handed on,
    /// and the last error, if any.
    async fn read_profiles(
        &mut self,
        positions: &mut Vec<(usize, i64)>,
    ) -> (Vec<Record>, Option<String>) {
        let mut records = Vec::new();
        let mut last_error = None;
        let now = Instant::now();
        for i in 0..self.profiles.len() {
            if self.profiles[i].next_due > now || self.cancel.is_cancelled() {
                continue;
            }
            let wall = now_ms();
            let after = match self.profiles[i].position {
                Some(p) => p,
                None => {
                    let stored = match &self.profiles[i].path {
                        Some(path) => profile::load_position(path).await,
                        None => None,
                    };
                    let p = stored.unwrap_or(wall - profile::DEFAULT_BACKFILL.as_millis() as i64);
                    self.profiles[i].position = Some(p);
                    p
                }
            };
            let Some(client) = self.client.as_mut() else {
                break;
            };
            let obis = self.profiles[i].reader.obis();
            match self.profiles[i]
                .reader
                .read_since(client, after, wall)
                .await
            {
                Ok(entries) => {
                    let st = &mut self.profiles[i];
                    st.next_due = now + st.interval;
                    debug!(profile = %obis, entries = entries.len(), "Profile read.");
                    if let Some(last) = entries.last() {
                        positions.push((i, last.ts_ms));
                    }
                    records.extend(entries.into_iter().map(|e| {
                        Record::telemetry(&self.cfg.name, &self.device_type, e.ts_ms, e.values)
                    }));
                }
                Err(e) => {
                    let text = error_chain(&e);
                    warn!(profile = %obis, error = %text, "Profile read failed; retrying at the next poll.");
                    last_error = Some(format!("{obis}: {text}"));
                    if e.needs_reconnect() {
                        self.drop_client();
                        break;
                    }
                }
            }
        }
        (records, last_error)
    }

    /// Read the registers on the current association, associating first if needed. The flag
    /// says whether the association was reused from an earlier poll.
    async fn read_once(&mut self) -> Result<Vec<ReadResult>, (Error, bool)> {
        let fresh = self.ensure_client().await.map_err(|e| (e, false))?;
        let client = self
            .client
            .as_mut()
            .ok_or((Error::Client(client::Error::NotAssociated), false))?;
        // Not raced against cancellation: a request in flight is finished (it is bounded by the
        // request timeout) so the association can be released cleanly afterwards.
        match client.read_registers(&self.registers).await {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.needs_reconnect() {
                    self.drop_client();
                }
                Err((Error::Client(e), !fresh))
            }
        }
    }

    async fn emit(&mut self, records: Vec<Record>) -> bool {
        if records.is_empty() {
            return true;
        }
        tokio::select! {
            r = self.events_tx.send(SourceEvent::Records(records)) => r.is_ok(),
            // Shutting down: the router may already be draining; give up on this batch.
            _ = self.cancel.cancelled() => true,
        }
    }

    /// A Connect or Disconnect record (the uplink builds their payloads from device and type).
    fn record(&self, kind: RecordKind) -> Record {
        Record {
            device: self.cfg.name.clone(),
            device_type: self.device_type.clone(),
            kind,
            payload: Value::Null,
        }
    }

    /// Serve one command on the association, connecting if the backoff allows it.
    async fn serve(&mut self, cmd: Command) {
        if let Command::SyncClock { reply } = cmd {
            let r = if self.cfg.rpc_write.allows(&CLOCK.obis) {
                self.sync_clock().await
            } else {
                Err(CommandError::WritesDisabled)
            };
            let _ = reply.send(r);
            return;
        }
        let ready = if self.backoff.may_try(Instant::now()) {
            match self.ensure_client().await {
                Ok(_) => Ok(()),
                Err(e) => Err(CommandError::Unavailable(error_chain(&e))),
            }
        } else {
            Err(CommandError::Unavailable(format!(
                "{} consecutive failures; in backoff",
                self.backoff.failures
            )))
        };
        let Some(client) = self.client.as_mut().filter(|_| ready.is_ok()) else {
            let e = ready.err().unwrap_or(CommandError::Stopped);
            match cmd {
                Command::Get { reply, .. } => drop(reply.send(Err(e))),
                Command::Set { reply, .. } => drop(reply.send(Err(e))),
                Command::Action { reply, .. } => drop(reply.send(Err(e))),
                Command::PollNow { reply } => drop(reply.send(Err(e))),
                Command::SetInterval { reply, .. } => drop(reply.send(Err(e))),
                Command::SyncClock { reply } => drop(reply.send(Err(e))),
            }
            return;
        };
        let failed = |e: &client::Error| CommandError::Failed(error_chain(e));
        let mut lost = None;
        match cmd {
            Command::Get { attr, reply } => {
                let r = match client.get_one(&attr).await {
                    Ok(Ok(d)) => Ok(d),
                    Ok(Err(dar)) => Err(CommandError::Refused(dar)),
                    Err(e) => {
                        let out = Err(failed(&e));
                        lost = Some(e);
                        out
                    }
                };
                let _ = reply.send(r);
            }
            Command::Set { attr, value, reply } => {
                let r = match client.set(&attr, &value).await {
                    Ok(DataAccessResult::Success) => Ok(()),
                    Ok(dar) => Err(CommandError::Refused(dar)),
                    Err(e) => {
                        let out = Err(failed(&e));
                        lost = Some(e);
                        out
                    }
                };
                let _ = reply.send(r);
            }
            Command::Action {
                method,
                params,
                reply,
            } => {
                let r = match client.action(&method, params.as_ref()).await {
                    Ok(resp) if resp.result == DataAccessResult::Success => match resp.returned {
                        Some(Ok(d)) => Ok(Some(d)),
                        Some(Err(dar)) => Err(CommandError::Refused(dar)),
                        None => Ok(None),
                    },
                    Ok(resp) => Err(CommandError::Refused(resp.result)),
                    Err(e) => {
                        let out = Err(failed(&e));
                        lost = Some(e);
                        out
                    }
                };
                let _ = reply.send(r);
            }
            // Handled by `run` before `serve`.
            Command::PollNow { reply } => drop(reply.send(Err(CommandError::Stopped))),
            Command::SetInterval { reply, .. } => drop(reply.send(Err(CommandError::Stopped))),
            Command::SyncClock { reply } => {
                // Served above; unreachable here, but answer rather than drop.
                let _ = reply.send(Err(CommandError::Stopped));
            }
        }
        if let Some(e) = lost {
            if e.needs_reconnect() {
                debug!(error = %error_chain(&e), "Command broke the association; next poll reconnects.");
                self.drop_client();
            }
        }
    }
}

/// One register's result as the client returns it.
type ReadResult = Result<client::Reading, client::ReadError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_profile_is_the_five_registers() {
        let regs = registers_of(&MeterConfig::default());
        let keys: Vec<&str> = regs.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "voltage_l1",
                "current_l1",
                "frequency",
                "active_power",
                "active_energy"
            ]
        );
        assert!(regs
            .iter()
            .all(|r| r.attr.class_id == 3 && r.attr.attribute == 2));
        assert_eq!(regs[0].attr.obis.to_string(), "1.0.32.7.0.255");
    }

    #[test]
    fn backoff_retries_at_once_then_grows_and_caps() {
        let now = Instant::now();
        let mut b = Backoff::default();
        b.fail(now, false);
        assert!(b.may_try(now), "first retry is immediate");
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            b.fail(now, false);
            let wait = b.retry_at.expect("scheduled") - now;
            assert!(wait <= MAX_BACKOFF);
            assert!(
                wait >= last / 2,
                "roughly non-decreasing: {wait:?} after {last:?}"
            );
            last = wait;
        }
        assert!(last >= MAX_BACKOFF / 2);
        b.succeed();
        assert!(b.may_try(now));
        b.fail(now, true);
        assert!(b.retry_at.expect("permanent") - now >= MAX_BACKOFF / 2);
    }

    #[test]
    fn json_of_values() {
        assert_eq!(number(230.12), serde_json::json!(230.12));
        assert_eq!(number(5.0), serde_json::json!(5.0));
        assert_eq!(number(f64::NAN), Value::Null);
        assert_eq!(data_to_json(&Data::Bool(true)), serde_json::json!(true));
        assert_eq!(
            data_to_json(&Data::OctetString(b"MSE1".to_vec())),
            serde_json::json!("MSE1")
        );
        assert_eq!(data_to_json(&Data::U16(7)), serde_json::json!(7.0));
    }
}
