//! `dlms-bridge import tb-gateway`: turn an existing ThingsBoard IoT Gateway configuration
//! directory (tb_gateway.json + its MQTT connector files) and an optional Mosquitto config into a
//! dlms-bridge `config.toml`.
//!
//! It never guesses silently: every setting that is not carried over is listed in
//! [`ImportResult::not_carried`] with the reason, and the same list heads the generated file as
//! comments. MQTT connector files are used as is (`tb_gateway_file`), after checking that the
//! mapping engine accepts them; [`import_tb_gateway_into`] plans copies of them beside the new
//! config (`<config dir>/tb-gateway/`), so the result never depends on tb-gateway's directory,
//! which is deleted when tb-gateway is purged.
//!
//! [`write`] puts the result in place: atomically (temporary file + rename), mode 0640 and the
//! service's group (the file holds the access token), replacing the unmodified packaged default
//! (kept as `config.toml.orig`) but a modified file only with `force` (kept as a timestamped
//! backup).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::router::mapping::MappingSet;

/// Why an import could not produce a configuration at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No `tb_gateway.json` in the directory.
    #[error("{dir}: no tb_gateway.json found (is this the tb-gateway config directory, usually /etc/thingsboard-gateway/config?)")]
    NoConfig { dir: PathBuf },
    /// Only the deprecated YAML main configuration exists.
    #[error("{path}: tb_gateway.yaml is not supported; start tb-gateway 3.x once (it converts the file to tb_gateway.json) or convert it to JSON, then import again")]
    YamlUnsupported { path: PathBuf },
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file does not parse.
    #[error("{path} is not valid JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The target config was edited since installation: replacing it needs `force`.
    #[error("{path} was changed since installation; replace it with --force (a timestamped backup is kept), or write elsewhere with --output PATH")]
    Modified { path: PathBuf },
    /// Writing the result failed.
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A setting the result cannot do without is missing or malformed.
    #[error("{path}: {key}: {message}")]
    Setting {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The generated configuration and everything that did not make it into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportResult {
    /// A complete dlms-bridge `config.toml`.
    pub toml: String,
    /// Each setting not carried over, with the reason.
    pub not_carried: Vec<String>,
    /// Connector files to copy: (tb-gateway's file, where `toml` refers to it).
    pub copies: Vec<(PathBuf, PathBuf)>,
}

/// `thingsboard` keys of tb_gateway.json with no dlms-bridge equivalent, and why.
const TB_NOT_CARRIED: &[(&str, &str)] = &[
    ("keep_alive", "dlms-bridge uses a short keep-alive (thingsboard.keep_alive, default 20s) so a dead link is noticed quickly"),
    ("remoteConfiguration", "remote configuration from the ThingsBoard UI is not supported; edit config.toml"),
    ("remoteShell", "the remote shell is not supported"),
    ("statistics", "tb-gateway statistics telemetry is not produced by dlms-bridge"),
    ("deviceFiltering", "device allow/deny lists are not supported"),
    ("maxPayloadSizeBytes", "dlms-bridge splits messages by thingsboard.max_packet_size (default 64 KiB)"),
    ("minPackSendDelayMS", "dlms-bridge sends as soon as records are stored (thingsboard.batch_linger)"),
    ("minPackSizeToSend", "unused by tb-gateway itself"),
    ("checkConnectorsConfigurationInSeconds", "configuration is read at start-up; restart to apply changes"),
    ("handleDeviceRenaming", "device renaming is not configurable in dlms-bridge"),
    ("checkingDeviceActivity", "the gateway-side inactivity check is not carried (it is broken in tb-gateway 3.8.5, spec §7.1)"),
    ("provisioning", "device provisioning is not supported; create the gateway device and copy its access token"),
    ("proxy_host", "HTTP CONNECT proxies are not supported"),
    ("proxy_port", "HTTP CONNECT proxies are not supported"),
    ("latencyDebugMode", "latency metadata is not sent"),
    ("syncDevicesSharedAttributesOnConnect", "shared attributes are synchronised by the attribute rules"),
    ("rateLimits", "dlms-bridge learns rate limits from ThingsBoard (getSessionLimits)"),
    ("dpRateLimits", "dlms-bridge learns rate limits from ThingsBoard (getSessionLimits)"),
    ("messagesRateLimits", "dlms-bridge learns rate limits from ThingsBoard (getSessionLimits)"),
    ("deviceRateLimits", "dlms-bridge learns rate limits from ThingsBoard (getSessionLimits)"),
    ("deviceDpRateLimits", "dlms-bridge learns rate limits from ThingsBoard (getSessionLimits)"),
    ("deviceMessagesRateLimits", "dlms-bridge learns rate limits from ThingsBoard (getSessionLimits)"),
];

/// Read `<dir>/tb_gateway.json`, its MQTT connectors and (optionally) a Mosquitto config, and
/// produce a dlms-bridge configuration.
/// Connector files are referenced where they are (see [`import_tb_gateway_into`]).
pub fn import_tb_gateway(dir: &Path, mosquitto_conf: Option<&Path>) -> Result<ImportResult, Error> {
    import(dir, mosquitto_conf, None)
}

/// Like [`import_tb_gateway`], but the connector files are to be copied into `connectors_dir`
/// (listed in [`ImportResult::copies`]; [`write`] copies them) and the config refers to the copies.
pub fn import_tb_gateway_into(
    dir: &Path,
    mosquitto_conf: Option<&Path>,
    connectors_dir: &Path,
) -> Result<ImportResult, Error> {
    import(dir, mosquitto_conf, Some(connectors_dir))
}

fn import(
    dir: &Path,
    mosquitto_conf: Option<&Path>,
    connectors_dir: Option<&Path>,
) -> Result<ImportResult, Error> {
    let main_path = dir.join("tb_gateway.json");
    if !main_path.exists() {
        for yaml in ["tb_gateway.yaml", "tb_gateway.yml"] {
            let p = dir.join(yaml);
            if p.exists() {
                return Err(Error::YamlUnsupported { path: p });
            }
        }
        return Err(Error::NoConfig {
            dir: dir.to_path_buf(),
        });
    }
    let main = read_json(&main_path)?;
    let mut out = Out {
        connectors_dir: connectors_dir.map(Path::to_path_buf),
        ..Out::default()
    };
    out.not_carried.push(
        "environment variables that override tb_gateway.json (TB_GW_HOST, TB_GW_ACCESS_TOKEN, ...) are not read: check the tb-gateway service environment".into(),
    );

    let setting = |key: &str, message: &str| Error::Setting {
        path: main_path.clone(),
        key: key.to_string(),
        message: message.to_string(),
    };
    let tb = main
        .get("thingsboard")
        .and_then(Value::as_object)
        .ok_or_else(|| setting("thingsboard", "missing"))?;
    thingsboard_section(tb, &mut out, &setting)?;
    if let Some(storage) = main.get("storage").and_then(Value::as_object) {
        storage_section(storage, &mut out);
    }
    for (k, _) in main.as_object().into_iter().flatten() {
        match k.as_str() {
            "thingsboard" | "storage" | "connectors" => {}
            "grpc" => out.skip("grpc: out-of-process (gRPC) connectors are not supported"),
            other => out.skip(format!("{other}: no dlms-bridge equivalent")),
        }
    }

    let mut local_ports = Vec::new();
    let connectors = main
        .get("connectors")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (i, c) in connectors.iter().enumerate() {
        connector(dir, i, c, &mut out, &mut local_ports)?;
    }

    if let Some(conf) = mosquitto_conf {
        mosquitto(conf, &local_ports, &mut out)?;
    } else if !local_ports.is_empty() {
        out.skip(format!(
            "the MQTT connectors subscribe to a broker on port(s) {}; without --mosquitto the embedded broker keeps its default address 127.0.0.1:1884 and allows anonymous clients",
            local_ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
        ));
    }

    Ok(out.finish())
}

/// The result being built: TOML sections in order, and the list of what is left behind.
#[derive(Default)]
struct Out {
    /// Where connector files are copied to; `None` = referenced in place.
    connectors_dir: Option<PathBuf>,
    copies: Vec<(PathBuf, PathBuf)>,
    thingsboard: Vec<String>,
    store: Vec<String>,
    broker: Vec<String>,
    mappings: String,
    not_carried: Vec<String>,
}

impl Out {
    fn skip(&mut self, s: impl Into<String>) {
        self.not_carried.push(s.into());
    }

    /// Where the config will find connector file `src`: a copy in `connectors_dir` (a unique
    /// name, in case two directories hold files of the same name), or `src` itself.
    fn connector_path(&mut self, src: &Path) -> PathBuf {
        let Some(dir) = &self.connectors_dir else {
            return src.to_path_buf();
        };
        if let Some((_, dest)) = self.copies.iter().find(|(s, _)| s == src) {
            return dest.clone();
        }
        let stem = src
            .file_stem()
            .map_or_else(|| "connector".into(), |s| s.to_string_lossy().into_owned());
        let ext = src
            .extension()
            .map_or_else(|| "json".into(), |s| s.to_string_lossy().into_owned());
        let mut dest = dir.join(format!("{stem}.{ext}"));
        let mut n = 2;
        while self.copies.iter().any(|(_, d)| *d == dest) {
            dest = dir.join(format!("{stem}-{n}.{ext}"));
            n += 1;
        }
        self.copies.push((src.to_path_buf(), dest.clone()));
        dest
    }

    fn finish(self) -> ImportResult {
        let mut t = String::new();
        t.push_str("# dlms-bridge configuration generated by `dlms-bridge import tb-gateway`.\n");
        t.push_str("# Review it, in particular the settings that were not carried over:\n");
        for n in &self.not_carried {
            let _ = writeln!(t, "#   - {}", n.replace('\n', " "));
        }
        for (name, lines) in [
            ("thingsboard", &self.thingsboard),
            ("store", &self.store),
            ("broker", &self.broker),
        ] {
            if !lines.is_empty() {
                let _ = writeln!(t, "\n[{name}]");
                for l in lines {
                    t.push_str(l);
                    t.push('\n');
                }
            }
        }
        t.push_str(&self.mappings);
        ImportResult {
            toml: t,
            not_carried: self.not_carried,
            copies: self.copies,
        }
    }
}

/// A TOML basic string (JSON string escapes are valid TOML escapes).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn read_text(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json(path: &Path) -> Result<Value, Error> {
    serde_json::from_str(&read_text(path)?).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn thingsboard_section(
    tb: &Map<String, Value>,
    out: &mut Out,
    setting: &dyn Fn(&str, &str) -> Error,
) -> Result<(), Error> {
    let host = tb
        .get("host")
        .and_then(Value::as_str)
        .filter(|h| !h.trim().is_empty())
        .ok_or_else(|| {
            setting(
                "thingsboard.host",
                "missing (the ThingsBoard MQTT host is required)",
            )
        })?;
    out.thingsboard.push(format!("host = {}", toml_str(host)));
    let port = match tb.get("port") {
        None => 1883,
        Some(p) => p
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| setting("thingsboard.port", "must be a port number"))?,
    };
    out.thingsboard.push(format!("port = {port}"));
    tls_security(tb.get("security").and_then(Value::as_object), port, out);

    match tb.get("security").and_then(Value::as_object) {
        Some(sec) => {
            let ty = sec
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("accessToken");
            let token = sec.get("accessToken").and_then(Value::as_str);
            match (ty, token) {
                ("accessToken", Some(tok)) | ("tlsAccessToken", Some(tok)) => {
                    out.thingsboard.push(format!("access_token = {}", toml_str(tok)));
                }
                // X.509 credentials: carried by `tls_security`, no token needed.
                ("tlsPrivateKey", _) => {}
                ("accessToken", None) | ("tlsAccessToken", None) => out.skip(
                    "thingsboard.security.accessToken is missing: set thingsboard.access_token",
                ),
                (other, _) => out.skip(format!(
                    "thingsboard.security type {other}: dlms-bridge authenticates with an access token (accessToken, tlsAccessToken) or an X.509 certificate (tlsPrivateKey); set thingsboard.access_token to the gateway device's token"
                )),
            }
        }
        None => out.skip("thingsboard.security missing: set thingsboard.access_token"),
    }

    match tb.get("qos").and_then(Value::as_u64) {
        None | Some(1) => {}
        Some(q) => out.skip(format!(
            "thingsboard.qos {q}: dlms-bridge always publishes with QoS 1 (QoS 0 on v1/gateway/* is harmful, spec §2.5)"
        )),
    }
    if let Some(rs) = tb.get("reportStrategy") {
        let ty = rs
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("ON_RECEIVED");
        if ty != "ON_RECEIVED" {
            out.skip(format!(
                "thingsboard.reportStrategy {ty} (gateway-wide default): set reportStrategy in each connector file or mapping instead"
            ));
        }
    }
    for (k, _) in tb {
        if matches!(
            k.as_str(),
            "host" | "port" | "security" | "qos" | "reportStrategy"
        ) {
            continue;
        }
        match TB_NOT_CARRIED.iter().find(|(n, _)| n == k) {
            Some((_, why)) => out.skip(format!("thingsboard.{k}: {why}")),
            None => out.skip(format!("thingsboard.{k}: no dlms-bridge equivalent")),
        }
    }
    Ok(())
}

/// tb-gateway's TLS settings (spec §7.2) → `tls`, `ca_file`, `cert_file`, `key_file`, naming
/// the same files. TLS is on with a `tls*` security type, a `caCert` or port 8883, as in
/// tb-gateway; what cannot be kept the same is listed (dlms-bridge always verifies the server).
fn tls_security(sec: Option<&Map<String, Value>>, port: u16, out: &mut Out) {
    let empty = Map::new();
    let sec = sec.unwrap_or(&empty);
    let ty = sec.get("type").and_then(Value::as_str).unwrap_or("");
    let file = |k: &str| sec.get(k).and_then(Value::as_str).filter(|f| !f.is_empty());
    let tls = ty.starts_with("tls") || file("caCert").is_some() || port == 8883;
    if !tls {
        return;
    }
    out.thingsboard.push("tls = true".into());
    match file("caCert") {
        Some(ca) => out.thingsboard.push(format!("ca_file = {}", toml_str(ca))),
        None => out.skip("thingsboard.security.caCert is not set: tb-gateway then skips server verification; dlms-bridge verifies ThingsBoard's certificate against the system CAs (set thingsboard.ca_file if a private CA issued it)"),
    }
    if ty == "tlsPrivateKey" {
        match (file("cert"), file("privateKey")) {
            (Some(cert), Some(key)) => {
                out.thingsboard.push(format!("cert_file = {}", toml_str(cert)));
                out.thingsboard.push(format!("key_file = {}", toml_str(key)));
                out.skip(format!("thingsboard.security.privateKey: {key} must be readable by the dlms-bridge user only (chown dlms-bridge, chmod 600), or check-config refuses it"));
            }
            _ => out.skip("thingsboard.security tlsPrivateKey needs cert and privateKey: set thingsboard.cert_file and key_file"),
        }
    }
    if sec.get("insecure").and_then(Value::as_bool) == Some(true) {
        out.skip("thingsboard.security.insecure: dlms-bridge always checks ThingsBoard's certificate and host name");
    }
    for k in ["checkCertPeriod", "certificateDaysLeft"] {
        if sec.contains_key(k) {
            out.skip(format!("thingsboard.security.{k}: certificate expiry is not watched; an expired certificate is logged as an ERROR at connect"));
        }
    }
}

fn storage_section(st: &Map<String, Value>, out: &mut Out) {
    let ty = st.get("type").and_then(Value::as_str).unwrap_or("memory");
    out.store.push("# Queue location and format are dlms-bridge's own (SQLite WAL); tb-gateway's stored events are not migrated.".into());
    out.skip(format!(
        "storage ({ty}): events still queued in tb-gateway's storage are not migrated; let tb-gateway drain before stopping it"
    ));
    if ty == "sqlite" {
        if let Some(days) = st
            .get("messages_ttl_in_days")
            .and_then(Value::as_u64)
            .filter(|d| *d > 0)
        {
            out.store.push(format!("max_age = \"{days}days\""));
        }
        let size = st.get("size_limit").and_then(Value::as_u64);
        let count = st.get("max_db_amount").and_then(Value::as_u64);
        if let (Some(mb), Some(n)) = (size, count) {
            out.store.push(format!(
                "max_bytes = {}",
                mb.saturating_mul(n).saturating_mul(1024 * 1024)
            ));
        }
    }
    for (k, _) in st {
        let carried = match ty {
            "sqlite" => matches!(
                k.as_str(),
                "type" | "messages_ttl_in_days" | "size_limit" | "max_db_amount"
            ),
            _ => k == "type",
        };
        if !carried {
            out.skip(format!(
                "storage.{k}: dlms-bridge caps its queue by size (store.max_bytes) and age (store.max_age) and evicts the oldest records"
            ));
        }
    }
}

fn connector(
    dir: &Path,
    i: usize,
    c: &Value,
    out: &mut Out,
    local_ports: &mut Vec<u16>,
) -> Result<(), Error> {
    let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
    let ty = c.get("type").and_then(Value::as_str).unwrap_or("?");
    if ty != "mqtt"
        || c.get("class").is_some()
        || c.get("useGRPC").and_then(Value::as_bool) == Some(true)
    {
        out.skip(format!(
            "connectors[{i}] `{name}` (type {ty}): only tb-gateway's built-in mqtt connector is supported"
        ));
        return Ok(());
    }
    let Some(file) = c.get("configuration").and_then(Value::as_str) else {
        out.skip(format!(
            "connectors[{i}] `{name}`: no configuration file named"
        ));
        return Ok(());
    };
    let path = dir.join(file);
    let path = path.canonicalize().map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    let conn = read_json(&path)?;
    if let Some(b) = conn.get("broker").and_then(Value::as_object) {
        let host = b.get("host").and_then(Value::as_str).unwrap_or("?");
        let port = b
            .get("port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(1883);
        if !local_ports.contains(&port) {
            local_ports.push(port);
        }
        if !matches!(host, "127.0.0.1" | "localhost" | "::1" | "0.0.0.0") {
            out.skip(format!(
                "connectors[{i}] `{name}`: its broker is {host}:{port}, not local; dlms-bridge maps only what its embedded broker receives, so point those publishers at broker.listen"
            ));
        }
        out.skip(format!(
            "{}: broker section (client id, workers, security of the connector's own client) is not needed: the embedded broker replaces it",
            path.display()
        ));
    }
    let dest = out.connector_path(&path);
    match MappingSet::from_connector_json(&conn, &path.display().to_string()) {
        Ok(_) => {
            let _ = write!(
                out.mappings,
                "\n# tb-gateway connector `{}` (from {})\n[[mappings]]\ntb_gateway_file = {}\n",
                name.replace('\n', " "),
                path.display().to_string().replace('\n', " "),
                toml_str(&dest.display().to_string())
            );
        }
        Err(errs) => {
            let why = errs
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            out.skip(format!(
                "connectors[{i}] `{name}` ({}): not usable as is: {why}",
                path.display()
            ));
            let _ = write!(
                out.mappings,
                "\n# tb-gateway connector `{}` is NOT active: fix it, then uncomment (see the list above).\n# [[mappings]]\n# tb_gateway_file = {}\n",
                name.replace('\n', " "),
                toml_str(&dest.display().to_string())
            );
        }
    }
    Ok(())
}

/// One Mosquitto listener and its TLS options (`certfile` etc. apply to the listener above
/// them; before any `listener` line, to the default one).
#[derive(Debug, Default)]
struct MosquittoListener {
    port: u16,
    addr: Option<String>,
    certfile: Option<String>,
    keyfile: Option<String>,
    cafile: Option<String>,
    require_certificate: bool,
}

/// The Mosquitto settings dlms-bridge's broker can take: one plain listener and one TLS
/// listener, anonymous or not.
fn mosquitto(conf: &Path, local_ports: &[u16], out: &mut Out) -> Result<(), Error> {
    let text = read_text(conf)?;
    let mut listeners: Vec<MosquittoListener> = Vec::new();
    // TLS options met before any `listener` line: Mosquitto's default listener.
    let mut default_tls = MosquittoListener::default();
    let mut bind_address: Option<String> = None;
    let mut allow_anonymous: Option<bool> = None;
    let mut password_file: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let key = words.next().unwrap_or_default();
        let args: Vec<&str> = words.collect();
        let bad = |m: &str| Error::Setting {
            path: conf.to_path_buf(),
            key: format!("line {}: {key}", n + 1),
            message: m.to_string(),
        };
        match key {
            "listener" | "port" => {
                let port = args
                    .first()
                    .and_then(|p| p.parse::<u16>().ok())
                    .ok_or_else(|| bad("needs a port number"))?;
                // `port` is the default listener: it takes the TLS options given before it.
                let base = if key == "port" {
                    std::mem::take(&mut default_tls)
                } else {
                    MosquittoListener::default()
                };
                listeners.push(MosquittoListener {
                    port,
                    addr: args.get(1).map(|s| s.to_string()),
                    ..base
                });
            }
            "certfile" | "keyfile" | "cafile" | "require_certificate" => {
                let l = listeners.last_mut().unwrap_or(&mut default_tls);
                let value = args.first().map(|s| s.to_string());
                match key {
                    "certfile" => l.certfile = value,
                    "keyfile" => l.keyfile = value,
                    "cafile" => l.cafile = value,
                    _ => l.require_certificate = value.as_deref() == Some("true"),
                }
            }
            "bind_address" => bind_address = args.first().map(|s| s.to_string()),
            "allow_anonymous" => allow_anonymous = Some(args.first() == Some(&"true")),
            "password_file" => password_file = args.first().map(|s| s.to_string()),
            "max_connections" => match args.first().and_then(|m| m.parse::<i64>().ok()) {
                Some(m) if m > 0 => out.broker.push(format!("max_connections = {m}")),
                _ => out.skip(format!(
                    "mosquitto `{line}`: unlimited connections are not supported; broker.max_connections keeps its default (10000)"
                )),
            },
            "per_listener_settings" if args.first() != Some(&"true") => {}
            other => out.skip(format!(
                "mosquitto `{line}` ({}:{}): `{other}` has no equivalent in dlms-bridge's embedded broker",
                conf.display(),
                n + 1
            )),
        }
    }
    if listeners.is_empty() {
        listeners.push(MosquittoListener {
            port: 1883,
            ..default_tls
        });
        out.skip(format!(
            "{}: no listener/port line, so Mosquitto listened on 1883 on all addresses; carried as 0.0.0.0:1883",
            conf.display()
        ));
    }
    let address = |l: &MosquittoListener| {
        let port = l.port;
        let addr = l
            .addr
            .clone()
            .or(bind_address.clone())
            .unwrap_or_else(|| "0.0.0.0".into());
        if addr.contains(':') {
            format!("[{addr}]:{port}")
        } else if addr == "localhost" {
            format!("127.0.0.1:{port}")
        } else {
            format!("{addr}:{port}")
        }
    };
    let (tls, plain): (Vec<_>, Vec<_>) = listeners.iter().partition(|l| l.certfile.is_some());
    if let Some(chosen) = plain
        .iter()
        .position(|l| local_ports.contains(&l.port))
        .or((!plain.is_empty()).then_some(0))
    {
        for (j, l) in plain.iter().enumerate() {
            if j != chosen {
                out.skip(format!(
                    "mosquitto listener {} {}: the embedded broker has one plain listener; kept {}",
                    l.port,
                    l.addr.as_deref().unwrap_or(""),
                    plain[chosen].port
                ));
            }
        }
        out.broker
            .insert(0, format!("listen = {}", toml_str(&address(plain[chosen]))));
    } else {
        out.skip(
            "mosquitto has TLS listeners only: broker.listen keeps 127.0.0.1:1884 (loopback, plain)",
        );
    }
    for (j, l) in tls.iter().enumerate() {
        if j > 0 {
            out.skip(format!(
                "mosquitto TLS listener {} {}: the embedded broker has one TLS listener; kept {}",
                l.port,
                l.addr.as_deref().unwrap_or(""),
                tls[0].port
            ));
            continue;
        }
        let (Some(cert), Some(key)) = (&l.certfile, &l.keyfile) else {
            out.skip(format!(
                "mosquitto TLS listener {}: certfile without keyfile; set broker.tls_listen, tls_cert_file and tls_key_file",
                l.port
            ));
            continue;
        };
        out.broker
            .push(format!("tls_listen = {}", toml_str(&address(l))));
        out.broker
            .push(format!("tls_cert_file = {}", toml_str(cert)));
        out.broker.push(format!("tls_key_file = {}", toml_str(key)));
        if let Some(ca) = &l.cafile {
            out.broker.push(format!("tls_ca_file = {}", toml_str(ca)));
            if l.require_certificate {
                out.broker.push("tls_require_client_cert = true".into());
            }
        }
        out.skip(format!(
            "mosquitto keyfile {key}: dlms-bridge refuses a key that group or others may read \
             (Mosquitto's are often 640 root:mosquitto); if check-config says so, copy it: \
             install -o dlms-bridge -g dlms-bridge -m 600 {key} /etc/dlms-bridge/broker.key \
             and point broker.tls_key_file there"
        ));
    }
    match (allow_anonymous, &password_file) {
        (_, Some(pf)) => out.skip(format!(
            "mosquitto password_file {pf}: Mosquitto keeps only password hashes, which cannot be turned back into passwords; the imported broker accepts anonymous clients until you set broker.username and broker.password (one account)"
        )),
        (Some(false), None) => out.skip(
            "mosquitto allow_anonymous false without a password_file: set broker.username and broker.password; until then the imported broker accepts anonymous clients",
        ),
        _ => {}
    }
    Ok(())
}

/// Mode of the written config and connector copies: they hold the access token.
const FILE_MODE: u32 = 0o640;
/// Mode of the connector directory.
const DIR_MODE: u32 = 0o750;

/// How [`write`] treats an existing file and who may read the result.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Replace a config that was changed since installation (after a timestamped backup).
    pub force: bool,
    /// Group given read access (`dlms-bridge`), when it exists on this machine.
    pub group: Option<String>,
}

/// What [`write`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteReport {
    /// The previous file, kept: `config.toml.orig` (the packaged default) or a timestamped
    /// `config.toml.bak-…` (a changed file replaced with `force`).
    pub backup: Option<PathBuf>,
    /// Connector files written.
    pub copied: Vec<PathBuf>,
    /// The group given to the files, if any.
    pub group: Option<String>,
    /// Why the group could not be set (the files are then readable by their owner only).
    pub group_warning: Option<String>,
}

/// Write `result` to `out` and copy its connector files (see the module doc for the rules).
/// `packaged_default` is the text the package installs at `out`: a file still equal to it is
/// replaced without `force`.
pub fn write(
    result: &ImportResult,
    out: &Path,
    packaged_default: &str,
    opts: &WriteOptions,
) -> Result<WriteReport, Error> {
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Write { path, source }
    };
    let mut report = WriteReport::default();
    let gid = match &opts.group {
        Some(g) => match nix::unistd::Group::from_name(g) {
            Ok(Some(grp)) => Some(grp.gid),
            _ => None,
        },
        None => None,
    };
    let backup = match std::fs::read(out) {
        Ok(old) if old == packaged_default.as_bytes() => Some(sibling(out, ".orig")),
        Ok(_) if opts.force => Some(sibling(out, &format!(".bak-{}", timestamp()))),
        Ok(_) => {
            return Err(Error::Modified {
                path: out.to_path_buf(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(werr(out)(e)),
    };

    let note_group =
        |report: &mut WriteReport, path: &Path, res: Option<nix::Error>| match (res, &opts.group) {
            (None, Some(g)) if gid.is_some() => report.group = Some(g.clone()),
            (Some(e), Some(g)) => {
                report.group_warning =
                    Some(format!("cannot give group {g} to {}: {e}", path.display()))
            }
            _ => {}
        };

    // Connector copies first: the new config must never point at files not yet there.
    let mut dirs_made: Vec<PathBuf> = Vec::new();
    for (src, dest) in &result.copies {
        if let Some(dir) = dest.parent() {
            if !dirs_made.iter().any(|d| d == dir) {
                std::fs::create_dir_all(dir).map_err(werr(dir))?;
                let f = std::fs::File::open(dir).map_err(werr(dir))?;
                set_mode(&f, DIR_MODE).map_err(werr(dir))?;
                note_group(&mut report, dir, give_group(&f, gid));
                dirs_made.push(dir.to_path_buf());
            }
        }
        let bytes = std::fs::read(src).map_err(|source| Error::Read {
            path: src.clone(),
            source,
        })?;
        let g = atomic_write(dest, &bytes, gid).map_err(werr(dest))?;
        note_group(&mut report, dest, g);
        report.copied.push(dest.clone());
    }

    if let Some(b) = &backup {
        // A hard link keeps the old file's owner, group and mode (it holds the token too).
        let _ = std::fs::remove_file(b);
        if std::fs::hard_link(out, b).is_err() {
            std::fs::copy(out, b).map_err(werr(b))?;
        }
        report.backup = Some(b.clone());
    }
    let g = atomic_write(out, result.toml.as_bytes(), gid).map_err(werr(out))?;
    note_group(&mut report, out, g);
    Ok(report)
}

/// `path` + `suffix` (`config.toml` → `config.toml.orig`).
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// UTC, sortable, no colons: `20261130T071502Z`.
fn timestamp() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(['-', ':'], "")
}

fn set_mode(f: &std::fs::File, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Give `gid` to the open file; the error, if any (the caller reports it, the write goes on).
fn give_group(f: &std::fs::File, gid: Option<nix::unistd::Gid>) -> Option<nix::Error> {
    gid.and_then(|g| nix::unistd::fchown(f, None, Some(g)).err())
}

/// Write to a temporary file beside `path` (mode 0640 before any byte is written), sync, then
/// rename over `path`: a reader sees the old file or the new one, never a partial one. Returns
/// the group error, if giving `gid` failed.
fn atomic_write(
    path: &Path,
    bytes: &[u8],
    gid: Option<nix::unistd::Gid>,
) -> std::io::Result<Option<nix::Error>> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "config".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        set_mode(&f, FILE_MODE)?;
        let group_err = give_group(&f, gid);
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable once the directory is synced.
        std::fs::File::open(dir)?.sync_all()?;
        Ok(group_err)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_str("x\ny"), r#""x\ny""#);
    }

    #[test]
    fn missing_dir_and_yaml_are_clear_errors() {
        let d = tempfile::tempdir().expect("tempdir");
        let e = import_tb_gateway(d.path(), None).expect_err("empty dir");
        assert!(e.to_string().contains("no tb_gateway.json"), "{e}");
        std::fs::write(d.path().join("tb_gateway.yaml"), "thingsboard: {}").expect("write");
        let e = import_tb_gateway(d.path(), None).expect_err("yaml");
        assert!(e.to_string().contains("not supported"), "{e}");
    }

    #[test]
    fn tls_security_settings_carry_over_with_their_files() {
        let d = tempfile::tempdir().expect("tempdir");
        let write = |security: &str| {
            let main = format!(
                r#"{{"thingsboard": {{"host": "tb.example", "port": 8883, "security": {security}}}}}"#
            );
            std::fs::write(d.path().join("tb_gateway.json"), main).expect("write");
            import_tb_gateway(d.path(), None).expect("import")
        };
        let r = write(
            r#"{"type": "tlsAccessToken", "accessToken": "T0K", "caCert": "/etc/tb/ca.pem"}"#,
        );
        assert!(r.toml.contains("tls = true"), "{}", r.toml);
        assert!(
            r.toml.contains("ca_file = \"/etc/tb/ca.pem\""),
            "{}",
            r.toml
        );
        assert!(r.toml.contains("access_token = \"T0K\""), "{}", r.toml);
        let r = write(
            r#"{"type": "tlsPrivateKey", "caCert": "/etc/tb/ca.pem", "cert": "/etc/tb/gw.pem", "privateKey": "/etc/tb/gw.key", "insecure": true}"#,
        );
        assert!(
            r.toml.contains("cert_file = \"/etc/tb/gw.pem\""),
            "{}",
            r.toml
        );
        assert!(
            r.toml.contains("key_file = \"/etc/tb/gw.key\""),
            "{}",
            r.toml
        );
        assert!(!r.toml.contains("access_token ="), "{}", r.toml);
        assert!(r.not_carried.iter().any(|n| n.contains("chmod 600")));
        assert!(r.not_carried.iter().any(|n| n.contains("insecure")));
    }

    #[test]
    fn mosquitto_tls_listeners_become_the_broker_tls_listener() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            d.path().join("tb_gateway.json"),
            r#"{"thingsboard": {"host": "tb.example", "port": 1883, "security": {"accessToken": "T"}}}"#,
        )
        .expect("write");
        let import = |conf: &str| {
            let path = d.path().join("mosquitto.conf");
            std::fs::write(&path, conf).expect("write");
            let r = import_tb_gateway(d.path(), Some(&path)).expect("import");
            let raw =
                crate::config::load_str(&r.toml).unwrap_or_else(|e| panic!("{e}\n{}", r.toml));
            (r, raw)
        };
        let (r, raw) = import(
            "listener 1884 127.0.0.1\n\
             listener 8883\n\
             certfile /etc/mosquitto/certs/server.crt\n\
             keyfile /etc/mosquitto/certs/server.key\n\
             cafile /etc/mosquitto/ca_certificates/clients.crt\n\
             require_certificate true\n\
             tls_version tlsv1.2\n\
             listener 8884\n\
             certfile /etc/mosquitto/certs/other.crt\n\
             keyfile /etc/mosquitto/certs/other.key\n",
        );
        let b = &raw.broker;
        assert_eq!(b.listen, "127.0.0.1:1884");
        assert_eq!(b.tls_listen.as_deref(), Some("0.0.0.0:8883"));
        assert_eq!(
            b.tls_cert_file.as_deref(),
            Some(Path::new("/etc/mosquitto/certs/server.crt"))
        );
        assert_eq!(
            b.tls_key_file.as_deref(),
            Some(Path::new("/etc/mosquitto/certs/server.key"))
        );
        assert_eq!(
            b.tls_ca_file.as_deref(),
            Some(Path::new("/etc/mosquitto/ca_certificates/clients.crt"))
        );
        assert!(b.tls_require_client_cert);
        let nc = r.not_carried.join("\n");
        for expect in ["tls_version", "TLS listener 8884", "install -o dlms-bridge"] {
            assert!(nc.contains(expect), "`{expect}` not listed in:\n{nc}");
        }

        // TLS options before the `port` line belong to that default listener; no plain one.
        let (r, raw) = import(
            "certfile /etc/m/s.crt\nkeyfile /etc/m/s.key\nport 8883\nbind_address 10.0.0.2\n",
        );
        assert_eq!(raw.broker.listen, "127.0.0.1:1884", "the default, loopback");
        assert_eq!(raw.broker.tls_listen.as_deref(), Some("10.0.0.2:8883"));
        assert!(raw.broker.tls_ca_file.is_none());
        assert!(r
            .not_carried
            .iter()
            .any(|n| n.contains("TLS listeners only")));
    }
}
