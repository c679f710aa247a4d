//! Configuration: the serde `RawConfig` tree and its figment loading (built-in defaults < TOML
//! file < `DLMS_BRIDGE_*` env, `__` for nesting). Validation into typed values lives in
//! `validate.rs`; this module must not open sockets or files other than the config file itself.

pub mod diff;
mod load;
pub mod preflight;
pub mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::Env;
use serde::{Deserialize, Serialize};

pub use validate::{validate, Config};

/// Default location of the config file (a conffile of the .deb).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/dlms-bridge/config.toml";
/// The configuration file the .deb installs (a conffile), byte for byte: `import tb-gateway`
/// replaces it without `--force` only while it is unchanged.
pub const PACKAGED_DEFAULT: &str = include_str!("../../config/dlms-bridge.toml");
/// Prefix of environment overrides: `DLMS_BRIDGE_THINGSBOARD__ACCESS_TOKEN=...`.
pub const ENV_PREFIX: &str = "DLMS_BRIDGE_";

/// A secret (token, password): `Debug`/`Display` print `***` so it never reaches a log line.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

/// Serialising masks the value too, so `print-config` can never print a secret.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself: only for putting it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "" } else { "***" })
    }
}

/// One configuration problem, named by its key path (`thingsboard.port`, `meters[2].obis`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Errors from loading (not validating) the configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config file {path} does not exist (give another with --config PATH)")]
    Missing { path: PathBuf },
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigError>),
}

/// The whole configuration file as written by a user. Every table denies unknown keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    pub log: LogConfig,
    pub broker: BrokerConfig,
    pub thingsboard: ThingsboardConfig,
    pub store: StoreConfig,
    pub local: LocalConfig,
    pub shutdown: ShutdownConfig,
    /// The embedded HTTP server: health, metrics, JSON API, status page.
    pub http: HttpConfig,
    /// Built-in simulated meters started inside the bridge (demo and benchmarks).
    pub simulator: SimulatorConfig,
    /// DLMS meters to poll.
    pub meters: Vec<MeterConfig>,
    /// Mapping rules for local MQTT messages (tb-gateway MQTT connector semantics).
    pub mappings: Vec<MappingConfig>,
    /// The gateway device itself: statistics, RPC deadline, rate limits.
    pub gateway: GatewayConfig,
}

/// How the bridge behaves as a ThingsBoard gateway device (docs/GATEWAY.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Period of the gateway's statistics telemetry; 0 = never sent.
    #[serde(with = "humantime_serde")]
    pub stats_interval: Duration,
    /// Every RPC from ThingsBoard is answered within this (ThingsBoard gives up after 10 s).
    #[serde(with = "humantime_serde")]
    pub rpc_timeout: Duration,
    /// Ask ThingsBoard for its limits (`getSessionLimits`) after every connect.
    pub request_session_limits: bool,
    /// Own cap on publishes, ThingsBoard's format `capacity:seconds[,..]`, e.g. `"20:1,600:60"`;
    /// empty = only what ThingsBoard reports.
    pub messages_rate_limit: String,
    /// Own cap on telemetry data points (key/value pairs), same format.
    pub data_points_rate_limit: String,
    /// Shared attributes requested for every known device after every (re)connect and applied
    /// like updates (ThingsBoard pushes only changes, spec §2.7).
    pub shared_attributes_on_connect: Vec<String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            stats_interval: Duration::from_secs(60),
            rpc_timeout: Duration::from_secs(8),
            request_session_limits: true,
            messages_rate_limit: String::new(),
            data_points_rate_limit: String::new(),
            shared_attributes_on_connect: vec!["poll_interval".into()],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `RUST_LOG`-style filter, e.g. `info` or `info,dlms_bridge::uplink=debug`.
    pub level: String,
    /// `text` or `json` lines on stdout; under systemd the journal gets native entries either way.
    pub format: crate::logging::LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: crate::logging::LogFormat::Text,
        }
    }
}

/// The embedded local MQTT broker that replaces Mosquitto.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    pub enabled: bool,
    /// Where local publishers connect (MQTT 3.1.1 and 5 on the same port).
    pub listen: String,
    /// Optional credentials; when set, anonymous clients are refused.
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Largest MQTT packet accepted from a local client, bytes.
    pub max_packet_size: usize,
    /// Most simultaneous local client connections.
    pub max_connections: usize,
    /// Per-client bound on queued messages (offline QoS 1/2, and online backlog); beyond it
    /// messages for that client are dropped and counted (Mosquitto's `max_queued_messages`).
    pub max_queued_messages: usize,
    /// Outbound QoS 1/2 messages in flight to one client (Mosquitto's `max_inflight_messages`);
    /// an MQTT 5 client's smaller Receive Maximum wins.
    pub max_inflight_messages: u16,
    /// Keep retained messages and persistent sessions across restarts (in `broker.db` beside
    /// the queue database), as Mosquitto's `persistence true`.
    pub persistence: bool,
    /// How often persisted state is written while running (also written at shutdown).
    #[serde(with = "humantime_serde")]
    pub autosave_interval: Duration,
    /// How often `$SYS/broker/...` topics are published; `0s` turns them off.
    #[serde(with = "humantime_serde")]
    pub sys_interval: Duration,
    /// Optional TLS listener for LAN publishers (e.g. `0.0.0.0:8884`); unset = off. Serves
    /// exactly what `listen` serves; the two share `max_connections`.
    pub tls_listen: Option<String>,
    /// PEM certificate chain (leaf first) of the TLS listener; required with `tls_listen`.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`; must not be readable by group or others.
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA file to verify client certificates with (Mosquitto's `cafile`).
    pub tls_ca_file: Option<PathBuf>,
    /// Refuse TLS clients without a certificate signed by `tls_ca_file` (Mosquitto's
    /// `require_certificate`).
    pub tls_require_client_cert: bool,
    /// Where persisted broker state lives: `<store.path directory>/broker.db`, resolved during
    /// validation (not a configuration key).
    #[serde(skip)]
    pub persistence_file: PathBuf,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            enabled: true,
            listen: "127.0.0.1:1884".into(),
            username: None,
            password: None,
            max_packet_size: 1024 * 1024,
            max_connections: 10_000,
            max_queued_messages: 1000,
            max_inflight_messages: 20,
            persistence: false,
            autosave_interval: Duration::from_secs(1800),
            sys_interval: Duration::from_secs(10),
            tls_listen: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            tls_require_client_cert: false,
            persistence_file: PathBuf::from("/var/lib/dlms-bridge/broker.db"),
        }
    }
}

/// Which MQTT version the uplink speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttProtocol {
    /// MQTT 5, falling back to 3.1.1 when the server refuses 5.
    Auto,
    V5,
    V311,
}

/// The single ThingsBoard gateway uplink.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThingsboardConfig {
    pub host: String,
    pub port: u16,
    /// The gateway device's access token (MQTT username). Never logged.
    pub access_token: Secret,
    /// MQTT client id; ThingsBoard ignores it, but some proxies log it.
    pub client_id: String,
    pub protocol: MqttProtocol,
    /// Keep-alive: short, so a dead link is noticed well within a minute.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Largest packet sent or accepted; ThingsBoard's default `NETTY_MAX_PAYLOAD_SIZE`.
    pub max_packet_size: usize,
    /// Publishes awaiting PUBACK at once (ThingsBoard reports 100; stay at 80 %).
    pub max_inflight: u16,
    /// How long a batch may wait to collect more records of the same device.
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    /// A publish with no PUBACK after this long means the link is dead: reconnect and resend.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Retry period after ThingsBoard refused the credentials or the TLS handshake failed on a
    /// certificate (permanent errors).
    #[serde(with = "humantime_serde")]
    pub auth_retry: Duration,
    /// TLS (rustls) to ThingsBoard. Unset: on when `port` is 8883. Resolved by validation.
    pub tls: Option<bool>,
    /// PEM file of the CA(s) to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for ThingsBoard X.509 device credentials (with `key_file`);
    /// `access_token` may then be empty.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`; must not be readable by group or others.
    pub key_file: Option<PathBuf>,
}

impl ThingsboardConfig {
    /// Whether the uplink uses TLS: `tls`, or port 8883 when it is unset.
    pub fn tls_enabled(&self) -> bool {
        self.tls.unwrap_or(self.port == TLS_PORT)
    }
}

/// ThingsBoard's MQTT-over-TLS port: `tls` defaults to on there.
pub const TLS_PORT: u16 = 8883;

impl Default for ThingsboardConfig {
    fn default() -> Self {
        ThingsboardConfig {
            host: "127.0.0.1".into(),
            port: 1883,
            access_token: Secret::default(),
            client_id: "dlms-bridge".into(),
            protocol: MqttProtocol::Auto,
            keep_alive: Duration::from_secs(20),
            max_packet_size: 65_536,
            max_inflight: 80,
            batch_linger: Duration::from_millis(5),
            ack_timeout: Duration::from_secs(20),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(60),
            auth_retry: Duration::from_secs(300),
            tls: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

/// What to do when the queue reaches its size cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Delete the oldest records (counted, WARN once a minute).
    DropOldest,
    /// Refuse new records (counted, WARN once a minute).
    DropNewest,
}

/// Default `store.commit_interval`: chosen from measurements at 1,000 msg/s (docs/ARCHITECTURE.md,
/// "Durability and flash wear").
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(25);

/// Longest `store.commit_interval` accepted: every enqueue waits up to one interval.
pub const MAX_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// The durable store-and-forward queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite database file (WAL). Its directory must be writable.
    pub path: PathBuf,
    /// Cap on the database size on disk, bytes.
    pub max_bytes: u64,
    /// Records older than this are deleted unsent (counted).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    pub on_full: OnFull,
    /// Group commit window: writes (enqueues and acks) arriving within it share one
    /// transaction and one fsync. `0s` commits as soon as the store worker is free. Callers get
    /// their `Ok` only after the commit, so this adds up to one interval of latency.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("/var/lib/dlms-bridge/queue.db"),
            max_bytes: 1024 * 1024 * 1024,
            max_age: Duration::from_secs(30 * 24 * 3600),
            on_full: OnFull::DropOldest,
            commit_interval: DEFAULT_COMMIT_INTERVAL,
        }
    }
}

/// Where the device name comes from for a local client speaking the ThingsBoard *device* API
/// (`v1/devices/me/*`) without `deviceName` in its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceNameSource {
    /// The MQTT username, else the client id.
    UsernameThenClientId,
    /// Always the client id.
    ClientId,
}

/// Built-in handling of local MQTT traffic (what works with no mapping written).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalConfig {
    /// Device profile for devices created from local messages.
    pub device_type: String,
    pub device_name_source: DeviceNameSource,
    /// Accept the ThingsBoard gateway API (`v1/gateway/*`) from local clients and forward it.
    pub gateway_api: bool,
    /// Refuse device-API messages whose device would be named after a client id the broker
    /// generated (`auto-<uuid>`, the client sent none): a new device on every reconnect.
    pub reject_generated_client_ids: bool,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            device_type: DEFAULT_DEVICE_TYPE.into(),
            device_name_source: DeviceNameSource::UsernameThenClientId,
            gateway_api: true,
            reject_generated_client_ids: true,
        }
    }
}

/// Default ThingsBoard profile for meters and local devices.
pub const DEFAULT_DEVICE_TYPE: &str = "DLMS Energy Meter";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long shutdown may take before remaining tasks are aborted (exit non-zero).
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: Duration::from_secs(10),
        }
    }
}

/// The embedded HTTP server (health, Prometheus metrics, JSON API, status page).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub enabled: bool,
    /// Where the server listens. A non-loopback address needs `token` or `admin_token`.
    pub listen: String,
    /// Read-only access: `Authorization: Bearer <token>`, or basic auth with it as the password.
    pub token: Option<Secret>,
    /// Read and admin access (meter changes through the API); same forms as `token`.
    pub admin_token: Option<Secret>,
    /// Telemetry key whose last hour the status page draws for each meter.
    pub sparkline_key: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: "127.0.0.1:8484".into(),
            token: None,
            admin_token: None,
            sparkline_key: "active_power".into(),
        }
    }
}

/// Built-in simulated meters (for the demo run and benchmarks), served on loopback.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulatorConfig {
    /// Number of simulated meters; 0 = none. Each becomes a polled meter named `sim-meter-NNNN`.
    pub meters: usize,
    /// `wrapper` or `hdlc`.
    pub transport: DlmsTransport,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// The simulator-only demo: an empty `thingsboard.access_token` is accepted (the uplink
    /// retries in the background, readings wait in the queue). Not allowed with `[[meters]]`.
    pub demo: bool,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            meters: 0,
            transport: DlmsTransport::Hdlc,
            interval: Duration::from_secs(2),
            demo: false,
        }
    }
}

/// How DLMS APDUs travel over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DlmsTransport {
    /// HDLC frames (IEC 62056-46) carried on TCP, e.g. a serial-to-Ethernet converter.
    #[default]
    Hdlc,
    /// IEC 62056-47 TCP wrapper (usually port 4059).
    Wrapper,
}

/// Meter authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DlmsAuth {
    #[default]
    None,
    /// Low-level security: password.
    Lls,
    /// High-level security with GMAC, security suite 0: authentication and block cipher keys,
    /// our system title, every APDU ciphered.
    #[serde(rename = "hls-gmac")]
    HlsGmac,
}

/// A meter's HLS-GMAC keys and our system title, resolved by validation from the config and
/// its `key_file`. `Debug` never prints the keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HlsKeys {
    pub keys: crate::dlms::ciphering::Keys,
    /// Our (the client's) system title.
    pub system_title: [u8; 8],
}

/// One register to read: `key` is the ThingsBoard telemetry key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    pub key: String,
    /// OBIS code, `1.0.32.7.0.255` (also `1-0:32.7.0*255`).
    pub obis: String,
    #[serde(default = "default_class_id")]
    pub class_id: u16,
    #[serde(default = "default_attribute")]
    pub attribute: i8,
}

fn default_class_id() -> u16 {
    3
}
fn default_attribute() -> i8 {
    2
}

/// Default recovery attempts per request before a meter's association is declared dead.
pub const DEFAULT_METER_RETRIES: u32 = 3;

/// Most recovery attempts per request a meter may be configured with.
pub const MAX_METER_RETRIES: u32 = 10;

/// One DLMS meter (or, with `database`, every meter listed in the original system's registry).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeterConfig {
    /// ThingsBoard device name.
    pub name: String,
    pub host: String,
    pub port: u16,
    /// Instead of name/host/port: the original system's SQLite registry
    /// (`meters(id, name, ip_address, port, ...)`); every row becomes a meter with this entry's
    /// other settings.
    pub database: Option<PathBuf>,
    pub transport: DlmsTransport,
    /// Client SAP (16 = public client).
    pub client_address: u16,
    /// HDLC server upper (logical) address.
    pub logical_address: u16,
    /// HDLC server lower (physical) address.
    pub physical_address: u16,
    /// HDLC server address size in bytes: 1, 2 or 4.
    pub address_size: u8,
    pub auth: DlmsAuth,
    pub password: Option<Secret>,
    /// HLS-GMAC authentication key: 16 bytes as 32 hex digits.
    pub authentication_key: Option<Secret>,
    /// HLS-GMAC global unicast encryption (block cipher) key: 16 bytes as 32 hex digits.
    pub block_cipher_key: Option<Secret>,
    /// Our (client) system title for HLS-GMAC: 8 bytes as 16 hex digits.
    pub system_title: Option<String>,
    /// A file (owner-readable only) with `authentication_key`, `block_cipher_key` and/or
    /// `system_title` as `key = "value"` lines, instead of writing them in the config.
    pub key_file: Option<PathBuf>,
    /// HLS-GMAC: propose a random dedicated key per association (the meter then answers
    /// ded-ciphered APDUs).
    pub dedicated_key: bool,
    /// The resolved HLS keys (set by validation for `auth = "hls-gmac"`, not a config key).
    #[serde(skip)]
    pub hls: Option<HlsKeys>,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Wait for each answer from the meter.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Recovery attempts per request (HDLC RR poll / re-send; wrapper re-send) before the
    /// association is declared dead and opened again.
    pub retries: u32,
    /// ThingsBoard profile; defaults to `DLMS Energy Meter`.
    pub device_type: Option<String>,
    /// Named register set (`default` = the five registers of the original system).
    pub profile: String,
    /// Explicit registers; replace the profile's when non-empty.
    pub registers: Vec<RegisterConfig>,
    /// Which RPC `set`/`action` ThingsBoard may run on this meter: `false` (none, the
    /// default), `true` (all), or a list of allowed OBIS codes.
    pub rpc_write: RpcWrite,
    /// Consecutive failed polls after which the meter is reported `disconnect`ed (with the
    /// reason in its health telemetry); it is `connect`ed again when it answers.
    pub disconnect_after: u32,
    /// Profile generic objects (load profiles) read every `interval` and caught up after
    /// outages.
    pub profiles: Vec<ProfileConfig>,
    /// Where profile read positions are kept: the store's directory (set by validation, not
    /// a config key); `None` keeps them in memory only.
    #[serde(skip)]
    pub state_dir: Option<PathBuf>,
}

/// `rpc_write`: `true`/`false`, or the OBIS codes `set`/`action` may touch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RpcWrite {
    All(bool),
    Obis(Vec<String>),
}

impl RpcWrite {
    /// Whether RPCs may change the object `obis` (`sync_clock` asks for the clock's).
    pub fn allows(&self, obis: &crate::dlms::obis::ObisCode) -> bool {
        match self {
            RpcWrite::All(b) => *b,
            RpcWrite::Obis(list) => list.iter().any(|o| {
                o.parse::<crate::dlms::obis::ObisCode>()
                    .is_ok_and(|a| a == *obis)
            }),
        }
    }
}

impl Default for RpcWrite {
    fn default() -> Self {
        RpcWrite::All(false)
    }
}

/// One Profile generic (class 7) of a meter, e.g. the load profile `1.0.99.1.0.255`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// OBIS code of the Profile generic object.
    pub obis: String,
    /// How often new entries are fetched (usually the capture period).
    #[serde(with = "humantime_serde", default = "default_profile_interval")]
    pub interval: Duration,
    /// OBIS codes of the captured objects to send; empty = every column but the clock.
    #[serde(default)]
    pub columns: Vec<String>,
}

fn default_profile_interval() -> Duration {
    Duration::from_secs(900)
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            name: String::new(),
            host: String::new(),
            port: 0,
            database: None,
            transport: DlmsTransport::Hdlc,
            client_address: 16,
            logical_address: 1,
            physical_address: 17,
            address_size: 1,
            auth: DlmsAuth::None,
            password: None,
            authentication_key: None,
            block_cipher_key: None,
            system_title: None,
            key_file: None,
            dedicated_key: false,
            hls: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
            retries: DEFAULT_METER_RETRIES,
            device_type: None,
            profile: "default".into(),
            registers: Vec::new(),
            rpc_write: RpcWrite::default(),
            disconnect_after: 3,
            profiles: Vec::new(),
            state_dir: None,
        }
    }
}

/// One local-MQTT mapping rule: tb-gateway MQTT connector semantics written in TOML, or a
/// tb-gateway connector JSON file used as is (`tb_gateway_file`). Compiled and checked by
/// `router::mapping::MappingSet::from_config`; the fields mirror tb-gateway keys (spec §6).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MappingConfig {
    /// What the rule does; `data` (the default) maps messages to telemetry/attributes.
    pub kind: MappingKind,
    /// MQTT topic filter with `+`/`#` (not used by `attribute_update` and `rpc`).
    pub topic_filter: String,
    /// How the payload is read: `json` (default) or `bytes` (expressions are slices like `[0:4]`).
    pub converter: ConverterKind,
    /// Device name expression, e.g. `${deviceName}` or `Meter ${serial}` (JSON) ...
    pub device_name_json: Option<String>,
    /// ... or a regex over the topic (last capture group) ...
    pub device_name_topic: Option<String>,
    /// ... or a constant.
    pub device_name: Option<String>,
    /// Device profile: a constant, or an expression over the payload when it contains `${`;
    /// default `local.device_type`.
    pub device_type: Option<String>,
    /// Device profile from a regex over the topic (last capture group).
    pub device_type_topic: Option<String>,
    /// Telemetry: keys to take (`"*"` = the whole payload) or `{ key, type, value, report_strategy }`.
    pub timeseries: Vec<DatapointConfig>,
    /// Client attributes, same forms as `timeseries`.
    pub attributes: Vec<DatapointConfig>,
    /// Stamp telemetry with the receive time even when the payload has `ts`/`timestamp`.
    pub use_received_ts: bool,
    /// `bytes` converter: values as hex text instead of UTF-8 text.
    pub hex_mode: bool,
    /// When values are sent (default: every message, `ON_RECEIVED`).
    pub report_strategy: Option<ReportStrategyConfig>,
    /// Old tb-gateway switch, same as `report_strategy = { type = "ON_CHANGE" }`.
    pub send_data_only_on_change: bool,
    /// `attribute_request`: attribute names, e.g. `${keys}` or `fw, serial` (comma-separated).
    pub attribute_names: Option<String>,
    /// `attribute_request`: attribute names from a regex over the topic.
    pub attribute_names_topic: Option<String>,
    /// `attribute_request`: `shared` (default) or `client`.
    pub scope: Option<String>,
    /// `attribute_update`/`rpc`: regex over the device name.
    pub device_name_filter: Option<String>,
    /// `attribute_update`: regex over the attribute key.
    pub attribute_filter: Option<String>,
    /// `rpc`: regex over the method name.
    pub method_filter: Option<String>,
    /// Local topic to publish to (`attribute_request` answers, `attribute_update`, `rpc` request),
    /// with `${deviceName}`, `${attributeKey}`, `${methodName}`, `${requestId}`, `${params.x}`.
    pub topic_expression: Option<String>,
    /// `rpc` two-way: local topic the device answers on.
    pub response_topic_expression: Option<String>,
    /// `rpc` two-way: how long to wait for the answer.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Option<Duration>,
    /// Payload to publish, e.g. `${attributeValue}` or `${params}` (values JSON-encoded).
    pub value_expression: Option<String>,
    /// Publish locally with the retain flag.
    pub retain: bool,
    /// tb-gateway connector JSON file used as is (its `mapping` etc.), instead of the fields above.
    pub tb_gateway_file: Option<PathBuf>,
}

/// What a `[[mappings]]` entry does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MappingKind {
    /// Messages become telemetry and client attributes.
    #[default]
    Data,
    /// A message announces the device (`v1/gateway/connect`).
    Connect,
    /// A message disconnects the device (`v1/gateway/disconnect`).
    Disconnect,
    /// A message asks ThingsBoard for attribute values; the answer is published locally.
    AttributeRequest,
    /// Shared-attribute changes from ThingsBoard are published locally.
    AttributeUpdate,
    /// Server-side RPC from ThingsBoard is published locally (and answered).
    Rpc,
}

/// Payload format of a data mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConverterKind {
    #[default]
    Json,
    Bytes,
}

/// One telemetry/attribute entry: a bare key (`"voltage"`, `"*"`) or a full entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DatapointConfig {
    Key(String),
    Entry(DatapointEntry),
}

/// A full telemetry/attribute entry, as tb-gateway's `{type, key, value}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatapointEntry {
    /// ThingsBoard key: literal or `${…}` from the payload.
    pub key: String,
    /// `string`, `double`, `integer`, `boolean` or `raw` (default).
    #[serde(rename = "type", default)]
    pub data_type: Option<String>,
    /// Value expression; default `${<key>}`.
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub report_strategy: Option<ReportStrategyConfig>,
}

/// tb-gateway `reportStrategy`: `ON_RECEIVED`, `ON_CHANGE`, `ON_REPORT_PERIOD`,
/// `ON_CHANGE_OR_REPORT_PERIOD` or `DISABLED`, with a period for the periodic ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportStrategyConfig {
    #[serde(rename = "type")]
    pub strategy: String,
    #[serde(default, with = "humantime_serde")]
    pub report_period: Option<Duration>,
}

/// Load the configuration: built-in defaults, then the TOML file, then `DLMS_BRIDGE_*`
/// environment overrides. The file must exist (`path`, else [`DEFAULT_CONFIG_PATH`]). Every
/// problem found is reported at once ([`Error::Invalid`]), each with its key path; no message
/// quotes a line of the file (it may hold a secret).
pub fn load(path: Option<&Path>) -> Result<RawConfig, Error> {
    match load_collecting(path)? {
        (raw, errs) if errs.is_empty() => Ok(raw),
        (_, errs) => Err(Error::Invalid(errs)),
    }
}

/// [`load`], but keys that failed to parse are left at their defaults and returned as errors
/// beside the rest, so one run can also validate what remains (`check-config`).
pub fn load_collecting(path: Option<&Path>) -> Result<(RawConfig, Vec<ConfigError>), Error> {
    let p = path.unwrap_or(Path::new(DEFAULT_CONFIG_PATH));
    let text = match std::fs::read_to_string(p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Missing {
                path: p.to_path_buf(),
            })
        }
        Err(e) => {
            return Err(Error::Read {
                path: p.to_path_buf(),
                source: e,
            })
        }
    };
    load::load_text_collecting(&text, load::Source::File(p), true)
}

/// `DLMS_BRIDGE_<SECTION>__<KEY>` overrides. Every configuration key lives in a section, so a
/// variable without `__` is not configuration: `DLMS_BRIDGE_CONFIG` (the `--config` flag) and
/// the CLI's own variables are left alone, while a misspelt section or key is still an error.
fn env_provider() -> Env {
    Env::prefixed(ENV_PREFIX)
        .filter(|k| k.as_str().contains("__"))
        .split("__")
}

/// Load from a TOML string only (tests, `check-config` of a fixture).
pub fn load_str(toml: &str) -> Result<RawConfig, Error> {
    load::load_text(toml, load::Source::Str, false)
}

/// Parse `host:port` (also `[::1]:port`) for a listen address.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| format!("`{s}` is not an address like 127.0.0.1:1884 or [::1]:1884"))
}
