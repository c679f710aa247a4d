//! `RawConfig` → `Config`: every check, every error with its key path, all reported at once.
//! Pure: no sockets, no file writes.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use super::*;

/// The validated configuration the application runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub log_level: String,
    pub log_format: crate::logging::LogFormat,
    pub broker: BrokerConfig,
    /// `broker.listen`, parsed.
    pub broker_listen: SocketAddr,
    pub thingsboard: ThingsboardConfig,
    pub store: StoreConfig,
    pub local: LocalConfig,
    pub shutdown: ShutdownConfig,
    pub http: HttpConfig,
    /// `http.listen`, parsed.
    pub http_listen: SocketAddr,
    pub simulator: SimulatorConfig,
    pub meters: Vec<MeterConfig>,
    pub mappings: Vec<MappingConfig>,
    pub gateway: GatewayConfig,
}

/// Check everything; return every problem found, each naming its key.
pub fn validate(raw: RawConfig) -> Result<Config, Vec<ConfigError>> {
    let mut errs = Vec::new();

    if tracing_subscriber::EnvFilter::try_new(&raw.log.level).is_err() {
        errs.push(ConfigError::new(
            "log.level",
            format!(
                "`{}` is not a log filter like `info` or `info,dlms_bridge=debug`",
                raw.log.level
            ),
        ));
    }

    let broker_listen = match parse_listen(&raw.broker.listen) {
        Ok(a) => a,
        Err(m) => {
            errs.push(ConfigError::new("broker.listen", m));
            SocketAddr::from(([127, 0, 0, 1], 1884))
        }
    };
    errs.extend(check_broker_tls(&raw.broker, broker_listen));
    if raw.broker.username.is_some() != raw.broker.password.is_some() {
        errs.push(ConfigError::new(
            "broker.password",
            "broker.username and broker.password must be set together",
        ));
    }
    if raw.broker.max_packet_size < 1024 {
        errs.push(ConfigError::new(
            "broker.max_packet_size",
            "must be at least 1024 bytes",
        ));
    }
    if raw.broker.max_packet_size > 256 * 1024 * 1024 {
        errs.push(ConfigError::new(
            "broker.max_packet_size",
            "must be at most 268435456 bytes (the MQTT limit)",
        ));
    }
    if raw.broker.max_connections == 0 {
        errs.push(ConfigError::new(
            "broker.max_connections",
            "must be at least 1",
        ));
    }
    if raw.broker.max_queued_messages == 0 {
        errs.push(ConfigError::new(
            "broker.max_queued_messages",
            "must be at least 1",
        ));
    }
    if raw.broker.max_inflight_messages == 0 {
        errs.push(ConfigError::new(
            "broker.max_inflight_messages",
            "must be between 1 and 65535",
        ));
    }
    if raw.broker.persistence && raw.broker.autosave_interval < Duration::from_secs(1) {
        errs.push(ConfigError::new(
            "broker.autosave_interval",
            "must be at least 1s",
        ));
    }
    if !raw.broker.sys_interval.is_zero() && raw.broker.sys_interval < Duration::from_secs(1) {
        errs.push(ConfigError::new(
            "broker.sys_interval",
            "must be 0s (off) or at least 1s",
        ));
    }

    let tb = &raw.thingsboard;
    if tb.host.trim().is_empty() {
        errs.push(ConfigError::new("thingsboard.host", "must not be empty"));
    }
    if tb.port == 0 {
        errs.push(ConfigError::new("thingsboard.port", "port must be 1–65535"));
    }
    if !(1024..=256 * 1024 * 1024).contains(&tb.max_packet_size) {
        errs.push(ConfigError::new(
            "thingsboard.max_packet_size",
            "must be between 1024 and 268435456 bytes",
        ));
    }
    if tb.max_inflight == 0 {
        errs.push(ConfigError::new(
            "thingsboard.max_inflight",
            "must be at least 1",
        ));
    }
    if tb.keep_alive < Duration::from_secs(5) || tb.keep_alive > Duration::from_secs(65_535) {
        errs.push(ConfigError::new(
            "thingsboard.keep_alive",
            "must be between 5s and 65535s",
        ));
    }
    if tb.reconnect_min.is_zero() || tb.reconnect_min > tb.reconnect_max {
        errs.push(ConfigError::new(
            "thingsboard.reconnect_min",
            "must be above 0 and not above thingsboard.reconnect_max",
        ));
    }
    if tb.ack_timeout < Duration::from_secs(1) {
        errs.push(ConfigError::new(
            "thingsboard.ack_timeout",
            "must be at least 1s",
        ));
    }

    errs.extend(check_tls(tb));

    if raw.store.path.as_os_str().is_empty() {
        errs.push(ConfigError::new("store.path", "must not be empty"));
    }
    if raw.store.max_bytes < 1024 * 1024 {
        errs.push(ConfigError::new(
            "store.max_bytes",
            "must be at least 1 MiB (1048576)",
        ));
    }
    if raw.store.max_age < Duration::from_secs(60) {
        errs.push(ConfigError::new("store.max_age", "must be at least 1m"));
    }
    if raw.store.commit_interval > MAX_COMMIT_INTERVAL {
        errs.push(ConfigError::new(
            "store.commit_interval",
            "must be at most 1s (every enqueue waits up to one interval)",
        ));
    }

    if raw.local.device_type.trim().is_empty() {
        errs.push(ConfigError::new("local.device_type", "must not be empty"));
    }

    let http_listen = match parse_listen(&raw.http.listen) {
        Ok(a) => a,
        Err(m) => {
            errs.push(ConfigError::new("http.listen", m));
            SocketAddr::from(([127, 0, 0, 1], 8484))
        }
    };
    let has = |s: &Option<Secret>| s.as_ref().is_some_and(|s| !s.is_empty());
    if raw.http.enabled
        && !http_listen.ip().is_loopback()
        && !has(&raw.http.token)
        && !has(&raw.http.admin_token)
    {
        errs.push(ConfigError::new(
            "http.token",
            format!(
                "required (or http.admin_token) when http.listen `{}` is not a loopback address",
                raw.http.listen
            ),
        ));
    }
    if has(&raw.http.token) && raw.http.token == raw.http.admin_token {
        errs.push(ConfigError::new(
            "http.admin_token",
            "must differ from http.token (read-only and admin rights are separate)",
        ));
    }
    if raw.http.sparkline_key.trim().is_empty() {
        errs.push(ConfigError::new("http.sparkline_key", "must not be empty"));
    }

    if raw.simulator.meters > 100_000 {
        errs.push(ConfigError::new(
            "simulator.meters",
            "must be at most 100000",
        ));
    }
    if raw.simulator.interval < Duration::from_millis(10) {
        errs.push(ConfigError::new(
            "simulator.interval",
            "must be at least 10ms",
        ));
    }

    if raw.simulator.demo && (raw.simulator.meters == 0 || !raw.meters.is_empty()) {
        errs.push(ConfigError::new(
            "simulator.demo",
            "the demo runs only simulated meters: needs simulator.meters above 0 and no [[meters]]",
        ));
    }

    let mut names = HashSet::new();
    let mut hls_keys: Vec<Option<HlsKeys>> = Vec::with_capacity(raw.meters.len());
    for (i, m) in raw.meters.iter().enumerate() {
        match resolve_hls(m, &format!("meters[{i}]")) {
            Ok(k) => hls_keys.push(k),
            Err(e) => {
                errs.extend(e);
                hls_keys.push(None);
            }
        }
        let key = |k: &str| format!("meters[{i}].{k}");
        if m.database.is_some() {
            if !m.name.is_empty() || !m.host.is_empty() {
                errs.push(ConfigError::new(
                    key("database"),
                    "a `database` entry takes names and addresses from the database: remove name/host",
                ));
            }
        } else {
            match crate::model::check_device_name(&m.name) {
                Ok(()) => {
                    if !names.insert(m.name.clone()) {
                        errs.push(ConfigError::new(
                            key("name"),
                            format!("duplicate meter name `{}`", m.name),
                        ));
                    }
                }
                Err(why) => errs.push(ConfigError::new(key("name"), why)),
            }
            if m.host.trim().is_empty() {
                errs.push(ConfigError::new(key("host"), "must not be empty"));
            }
            if m.port == 0 {
                errs.push(ConfigError::new(key("port"), "port must be 1–65535"));
            }
        }
        if ![1, 2, 4].contains(&m.address_size) {
            errs.push(ConfigError::new(key("address_size"), "must be 1, 2 or 4"));
        }
        if m.auth == DlmsAuth::Lls && m.password.as_ref().is_none_or(|p| p.is_empty()) {
            errs.push(ConfigError::new(
                key("password"),
                "auth = \"lls\" needs a password",
            ));
        }
        if m.interval < Duration::from_millis(10) {
            errs.push(ConfigError::new(key("interval"), "must be at least 10ms"));
        }
        if m.timeout.is_zero() {
            errs.push(ConfigError::new(key("timeout"), "must be above 0"));
        }
        errs.extend(crate::downlink::validate_rpc_write(
            &m.rpc_write,
            &key("rpc_write"),
        ));
        for (j, p) in m.profiles.iter().enumerate() {
            let pkey = |k: &str| format!("meters[{i}].profiles[{j}].{k}");
            if let Err(e) = parse_obis(&p.obis) {
                errs.push(ConfigError::new(pkey("obis"), e));
            }
            if p.interval < Duration::from_secs(1) {
                errs.push(ConfigError::new(pkey("interval"), "must be at least 1s"));
            }
            for (k, c) in p.columns.iter().enumerate() {
                if let Err(e) = parse_obis(c) {
                    errs.push(ConfigError::new(
                        format!("meters[{i}].profiles[{j}].columns[{k}]"),
                        e,
                    ));
                }
            }
        }
        if m.retries > super::MAX_METER_RETRIES {
            errs.push(ConfigError::new(
                key("retries"),
                format!("must be at most {}", super::MAX_METER_RETRIES),
            ));
        }
        if m.registers.is_empty() && m.profile != "default" {
            errs.push(ConfigError::new(
                key("profile"),
                format!("unknown register profile `{}` (known: default)", m.profile),
            ));
        }
        let mut keys = HashSet::new();
        for (j, r) in m.registers.iter().enumerate() {
            if r.key.trim().is_empty() {
                errs.push(ConfigError::new(
                    key(&format!("registers[{j}].key")),
                    "must not be empty",
                ));
            } else if !keys.insert(r.key.as_str()) {
                errs.push(ConfigError::new(
                    key(&format!("registers[{j}].key")),
                    format!("duplicate key `{}`", r.key),
                ));
            }
            if let Err(m) = parse_obis(&r.obis) {
                errs.push(ConfigError::new(key(&format!("registers[{j}].obis")), m));
            }
        }
    }

    if let Err(e) =
        crate::router::mapping::MappingSet::from_config(&raw.mappings, &raw.local.device_type)
    {
        errs.extend(e);
    }

    errs.extend(crate::uplink::limits::validate_gateway(&raw.gateway));

    if !errs.is_empty() {
        return Err(errs);
    }
    let mut raw = raw;
    raw.thingsboard.tls = Some(raw.thingsboard.tls_enabled());
    let mut broker = raw.broker;
    broker.persistence_file = raw
        .store
        .path
        .parent()
        .map(|d| d.join("broker.db"))
        .unwrap_or_else(|| "broker.db".into());
    let store_dir = raw
        .store
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(std::path::Path::to_path_buf);
    Ok(Config {
        log_level: raw.log.level,
        log_format: raw.log.format,
        broker,
        broker_listen,
        thingsboard: raw.thingsboard,
        store: raw.store,
        local: raw.local,
        shutdown: raw.shutdown,
        http: raw.http,
        http_listen,
        simulator: raw.simulator,
        meters: raw
            .meters
            .into_iter()
            .zip(hls_keys)
            .map(|(m, hls)| MeterConfig {
                hls,
                // Profile read positions live beside the queue (same durability, same unit
                // StateDirectory).
                state_dir: Some(
                    store_dir
                        .clone()
                        .unwrap_or_else(|| std::path::PathBuf::from(".")),
                ),
                ..m
            })
            .collect(),
        mappings: raw.mappings,
        gateway: raw.gateway,
    })
}

/// The HLS-GMAC keys of meter `m` (config key prefix `at`, e.g. `meters[0]`): from its own keys
/// and its `key_file` (owner-readable only), each given exactly once, as hex of the right size.
/// `None` for other `auth` values, which must not carry keys. Messages never quote a key.
pub fn resolve_hls(m: &MeterConfig, at: &str) -> Result<Option<HlsKeys>, Vec<ConfigError>> {
    let key = |k: &str| format!("{at}.{k}");
    let mut errs = Vec::new();
    let given = [
        ("authentication_key", m.authentication_key.is_some()),
        ("block_cipher_key", m.block_cipher_key.is_some()),
        ("system_title", m.system_title.is_some()),
        ("key_file", m.key_file.is_some()),
        ("dedicated_key", m.dedicated_key),
    ];
    if m.auth != DlmsAuth::HlsGmac {
        for (k, set) in given {
            if set {
                errs.push(ConfigError::new(
                    key(k),
                    "is only used with auth = \"hls-gmac\"",
                ));
            }
        }
        return if errs.is_empty() { Ok(None) } else { Err(errs) };
    }
    let mut from_file: std::collections::HashMap<String, String> = Default::default();
    if let Some(path) = &m.key_file {
        match read_key_file(path) {
            Ok(map) => from_file = map,
            Err(message) => return Err(vec![ConfigError::new(key("key_file"), message)]),
        }
    }
    let mut pick = |name: &str, inline: Option<&str>, len: usize| -> Option<Vec<u8>> {
        let file = from_file.remove(name);
        let (value, where_) = match (inline, file) {
            (Some(_), Some(_)) => {
                errs.push(ConfigError::new(
                    key(name),
                    "is set both here and in key_file: keep one",
                ));
                return None;
            }
            (Some(v), None) => (v.to_string(), key(name)),
            (None, Some(v)) => (v, format!("{} ({name})", key("key_file"))),
            (None, None) => {
                errs.push(ConfigError::new(
                    key(name),
                    format!("auth = \"hls-gmac\" needs {name} (here or in key_file)"),
                ));
                return None;
            }
        };
        match parse_hex(&value, len) {
            Some(b) => Some(b),
            None => {
                errs.push(ConfigError::new(
                    where_,
                    format!("must be {len} bytes written as {} hex digits", 2 * len),
                ));
                None
            }
        }
    };
    let ak = pick(
        "authentication_key",
        m.authentication_key.as_ref().map(Secret::expose),
        16,
    );
    let ek = pick(
        "block_cipher_key",
        m.block_cipher_key.as_ref().map(Secret::expose),
        16,
    );
    let st = pick("system_title", m.system_title.as_deref(), 8);
    for unknown in from_file.keys() {
        errs.push(ConfigError::new(
            key("key_file"),
            format!("unknown key `{unknown}` (known: authentication_key, block_cipher_key, system_title)"),
        ));
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    match (ak, ek, st) {
        (Some(ak), Some(ek), Some(st)) => {
            let mut keys = crate::dlms::ciphering::Keys {
                block_cipher: [0; 16],
                authentication: [0; 16],
            };
            keys.authentication.copy_from_slice(&ak);
            keys.block_cipher.copy_from_slice(&ek);
            let mut system_title = [0u8; 8];
            system_title.copy_from_slice(&st);
            Ok(Some(HlsKeys { keys, system_title }))
        }
        _ => Err(vec![ConfigError::new(key("auth"), "incomplete HLS keys")]),
    }
}

/// `len` bytes from hex digits (spaces and colons between bytes allowed).
fn parse_hex(s: &str, len: usize) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s
        .bytes()
        .filter(|b| !matches!(b, b' ' | b':' | b'-'))
        .collect();
    if digits.len() != 2 * len {
        return None;
    }
    digits
        .chunks(2)
        .map(|p| {
            let d = std::str::from_utf8(p).ok()?;
            u8::from_str_radix(d, 16).ok()
        })
        .collect()
}

/// A key file: `name = value` lines (TOML strings or bare hex), `#` comments. Refused when
/// group or others may read it. The error text never quotes a value.
fn read_key_file(
    path: &std::path::Path,
) -> Result<std::collections::HashMap<String, String>, String> {
    crate::tls::check_key_permissions(path).map_err(|e| e.to_string())?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = std::collections::HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!(
                "{} line {}: expected `name = value`",
                path.display(),
                n + 1
            ));
        };
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v);
        if out.insert(k.trim().to_string(), v.to_string()).is_some() {
            return Err(format!(
                "{} line {}: `{}` given twice",
                path.display(),
                n + 1,
                k.trim()
            ));
        }
    }
    Ok(out)
}

/// `[thingsboard]` TLS keys: files only with TLS on, cert and key together and readable (the key
/// not by group or others), a token or a client certificate to authenticate with.
fn check_tls(tb: &ThingsboardConfig) -> Vec<ConfigError> {
    use crate::tls;
    let mut errs = Vec::new();
    let files = [
        ("thingsboard.ca_file", &tb.ca_file),
        ("thingsboard.cert_file", &tb.cert_file),
        ("thingsboard.key_file", &tb.key_file),
    ];
    if !tb.tls_enabled() {
        for (key, f) in files {
            if f.is_some() {
                errs.push(ConfigError::new(
                    key,
                    "is only used with TLS: set thingsboard.tls = true (or port 8883)",
                ));
            }
        }
        return errs;
    }
    if let Some(ca) = &tb.ca_file {
        if let Err(e) = tls::read_certs(ca, "CA certificates") {
            errs.push(ConfigError::new("thingsboard.ca_file", e.to_string()));
        }
    }
    match (&tb.cert_file, &tb.key_file) {
        (Some(cert), Some(key)) => {
            if let Err(e) = tls::read_identity(cert, key, "client certificate") {
                let k = if e.is_key() {
                    "thingsboard.key_file"
                } else {
                    "thingsboard.cert_file"
                };
                errs.push(ConfigError::new(k, e.to_string()));
            }
        }
        (Some(_), None) => errs.push(ConfigError::new(
            "thingsboard.key_file",
            "thingsboard.cert_file needs its private key in thingsboard.key_file",
        )),
        (None, Some(_)) => errs.push(ConfigError::new(
            "thingsboard.cert_file",
            "thingsboard.key_file needs its certificate in thingsboard.cert_file",
        )),
        (None, None) => {}
    }
    errs
}

/// `[broker]` TLS listener keys: an address other than `listen`, a readable certificate and key
/// (the key not readable by group or others) that belong together, a client CA when client
/// certificates are required; files only with `tls_listen`.
fn check_broker_tls(b: &BrokerConfig, listen: SocketAddr) -> Vec<ConfigError> {
    let mut errs = Vec::new();
    let Some(tls_listen) = &b.tls_listen else {
        let set = [
            ("broker.tls_cert_file", b.tls_cert_file.is_some()),
            ("broker.tls_key_file", b.tls_key_file.is_some()),
            ("broker.tls_ca_file", b.tls_ca_file.is_some()),
            ("broker.tls_require_client_cert", b.tls_require_client_cert),
        ];
        for (key, _) in set.into_iter().filter(|(_, on)| *on) {
            errs.push(ConfigError::new(
                key,
                "is only used with the TLS listener: set broker.tls_listen",
            ));
        }
        return errs;
    };
    match parse_listen(tls_listen) {
        // The same port on the same or an overlapping (unspecified) address cannot be bound twice.
        Ok(a) if a.port() == listen.port()
            && a.port() != 0
            && (a.ip() == listen.ip() || a.ip().is_unspecified() || listen.ip().is_unspecified()) =>
        {
            errs.push(ConfigError::new(
                "broker.tls_listen",
                format!(
                    "`{tls_listen}` takes the port of broker.listen `{}`; use another port (e.g. 8884)",
                    b.listen
                ),
            ))
        }
        Ok(_) => {}
        Err(m) => errs.push(ConfigError::new("broker.tls_listen", m)),
    }
    if b.tls_cert_file.is_none() {
        errs.push(ConfigError::new(
            "broker.tls_cert_file",
            "required with broker.tls_listen (PEM certificate chain)",
        ));
    }
    if b.tls_key_file.is_none() {
        errs.push(ConfigError::new(
            "broker.tls_key_file",
            "required with broker.tls_listen (PEM private key)",
        ));
    }
    if b.tls_require_client_cert && b.tls_ca_file.is_none() {
        errs.push(ConfigError::new(
            "broker.tls_require_client_cert",
            "needs broker.tls_ca_file, the CA that signs the client certificates",
        ));
    }
    if let Some(settings) = crate::broker::tls::TlsSettings::from_config(b) {
        if let Err(e) = crate::broker::tls::server_config(&settings) {
            errs.push(ConfigError::new(e.config_key(), e.to_string()));
        }
    }
    errs
}

/// Parse an OBIS code `a.b.c.d.e.f` (also `a-b:c.d.e*f`) into its six bytes.
pub fn parse_obis(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(['.', '-', ':', '*']).collect();
    if parts.len() != 6 {
        return Err(format!("`{s}` is not an OBIS code like 1.0.32.7.0.255"));
    }
    let mut out = [0u8; 6];
    for (o, p) in out.iter_mut().zip(parts) {
        *o = p
            .trim()
            .parse::<u8>()
            .map_err(|_| format!("`{s}` is not an OBIS code like 1.0.32.7.0.255"))?;
    }
    Ok(out)
}

/// An MQTT topic filter: non-empty, `#` only last and alone in its level, `+` alone in its level.
pub fn check_topic_filter(f: &str) -> Result<(), String> {
    if f.is_empty() {
        return Err("must not be empty".into());
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i != levels.len() - 1) {
            return Err(format!("`{f}`: `#` must be a whole level and the last one"));
        }
        if l.contains('+') && *l != "+" {
            return Err(format!("`{f}`: `+` must be a whole level"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hls_meter(extra: &str) -> String {
        format!("[[meters]]\nname = \"M\"\nhost = \"h\"\nport = 4059\nauth = \"hls-gmac\"\n{extra}")
    }

    #[test]
    fn hls_keys_resolve_from_config_or_key_file_and_are_never_quoted() {
        let ok = hls_meter(
            "authentication_key = \"D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF\"\n\
             block_cipher_key = \"00 01 02 03 04 05 06 07 08 09 0A 0B 0C 0D 0E 0F\"\n\
             system_title = \"4D4D4D0000BC614E\"\n",
        );
        let c = validate(load_str(&ok).expect("parses")).expect("valid");
        let hls = c.meters[0].hls.as_ref().expect("resolved");
        assert_eq!(hls.keys.authentication[0], 0xD0);
        assert_eq!(hls.keys.block_cipher[15], 0x0F);
        assert_eq!(hls.system_title, [0x4D, 0x4D, 0x4D, 0, 0, 0xBC, 0x61, 0x4E]);
        let shown = format!("{:?}", c.meters[0]);
        assert!(!shown.contains("D0D1") && !shown.contains("208"), "{shown}");

        let errs = validate(
            load_str(&hls_meter(
                "authentication_key = \"D0D1XX\"\nsystem_title = \"4D4D\"\n",
            ))
            .expect("parses"),
        )
        .expect_err("bad keys");
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "meters[0].authentication_key",
                "meters[0].block_cipher_key",
                "meters[0].system_title"
            ]
        );
        assert!(errs.iter().all(|e| !e.message.contains("D0D1XX")));

        let errs = validate(
            load_str(
                "[[meters]]\nname = \"M\"\nhost = \"h\"\nport = 1\nblock_cipher_key = \"00\"\n",
            )
            .expect("parses"),
        )
        .expect_err("keys without hls");
        assert_eq!(errs[0].key, "meters[0].block_cipher_key");
        assert!(errs[0].message.contains("hls-gmac"));
        let errs = validate(
            load_str("[[meters]]\nname = \"M\"\nhost = \"h\"\nport = 1\ndedicated_key = true\n")
                .expect("parses"),
        )
        .expect_err("dedicated key without hls");
        assert_eq!(errs[0].key, "meters[0].dedicated_key");

        // A key file: owner-only, its keys merged, none given twice, nothing unknown.
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("keys");
        std::fs::write(
            &f,
            "# meter 1\nauthentication_key = \"D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF\"\n\
             block_cipher_key = 000102030405060708090A0B0C0D0E0F\n",
        )
        .expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let with_file = |extra: &str| {
            hls_meter(&format!(
                "key_file = {:?}\nsystem_title = \"4D4D4D0000BC614E\"\n{extra}",
                f.display().to_string()
            ))
        };
        let c = validate(load_str(&with_file("")).expect("parses")).expect("valid");
        assert_eq!(
            c.meters[0].hls.as_ref().map(|h| h.keys.authentication[15]),
            Some(0xDF)
        );
        let errs = validate(
            load_str(&with_file(
                "block_cipher_key = \"000102030405060708090A0B0C0D0E0F\"\n",
            ))
            .expect("parses"),
        )
        .expect_err("twice");
        assert_eq!(errs[0].key, "meters[0].block_cipher_key");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let errs =
            validate(load_str(&with_file("")).expect("parses")).expect_err("readable by others");
        assert_eq!(errs[0].key, "meters[0].key_file");
        assert!(errs[0].message.contains("chmod 600"), "{}", errs[0].message);
    }

    #[test]
    fn defaults_are_valid() {
        let c = validate(RawConfig::default()).expect("defaults validate");
        assert_eq!(c.broker_listen.to_string(), "127.0.0.1:1884");
        assert_eq!(c.thingsboard.max_packet_size, 65_536);
    }

    #[test]
    fn broker_keys_are_checked_and_persistence_lives_beside_the_queue() {
        let raw = load_str(
            r#"
            [broker]
            max_queued_messages = 0
            max_inflight_messages = 0
            persistence = true
            autosave_interval = "0s"
            sys_interval = "10ms"
            "#,
        )
        .expect("parses");
        let errs = validate(raw).expect_err("invalid");
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "broker.max_queued_messages",
            "broker.max_inflight_messages",
            "broker.autosave_interval",
            "broker.sys_interval",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        let raw = load_str(
            r#"
            [broker]
            persistence = true
            [store]
            path = "/data/q/queue.db"
            "#,
        )
        .expect("parses");
        let c = validate(raw).expect("valid");
        assert_eq!(
            c.broker.persistence_file,
            PathBuf::from("/data/q/broker.db")
        );
        assert_eq!(c.broker.max_queued_messages, 1000);
    }

    #[test]
    fn every_error_is_reported_with_its_key() {
        let raw = load_str(
            r#"
            [broker]
            listen = "nope"
            [thingsboard]
            port = 0
            keep_alive = "1s"
            [[meters]]
            name = ""
            host = "127.0.0.1"
            port = 4059
            registers = [{ key = "v", obis = "1.0.32.7.0" }]
            "#,
        )
        .expect("parses");
        let errs = validate(raw).expect_err("invalid");
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "broker.listen",
            "thingsboard.port",
            "thingsboard.keep_alive",
            "meters[0].name",
            "meters[0].registers[0].obis",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn tls_defaults_to_port_8883_and_its_files_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let c = validate(load_str("[thingsboard]\nport = 8883\n").expect("parses")).expect("valid");
        assert_eq!(c.thingsboard.tls, Some(true), "on by default on 8883");
        let c = validate(RawConfig::default()).expect("valid");
        assert_eq!(c.thingsboard.tls, Some(false), "off by default on 1883");

        let dir = tempfile::tempdir().expect("tempdir");
        let key_pair = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["gw".to_string()])
            .expect("params")
            .self_signed(&key_pair)
            .expect("cert");
        let cert_file = dir.path().join("gw.pem");
        let key_file = dir.path().join("gw.key");
        std::fs::write(&cert_file, cert.pem()).expect("write");
        std::fs::write(&key_file, key_pair.serialize_pem()).expect("write");
        let toml = |extra: &str| {
            format!(
                "[thingsboard]\nport = 8883\ncert_file = {:?}\nkey_file = {:?}\n{extra}",
                cert_file.display().to_string(),
                key_file.display().to_string()
            )
        };
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let errs = validate(load_str(&toml("")).expect("parses")).expect_err("readable key");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].key, "thingsboard.key_file");
        assert!(errs[0].message.contains("chmod 600"), "{}", errs[0].message);

        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        validate(load_str(&toml("")).expect("parses")).expect("a private key is accepted");
        let errs = validate(load_str(&toml("tls = false")).expect("parses")).expect_err("no tls");
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["thingsboard.cert_file", "thingsboard.key_file"]);
        let errs = validate(
            load_str(&format!(
                "[thingsboard]\ntls = true\ncert_file = {:?}\nca_file = \"/nonexistent/ca.pem\"\n",
                cert_file.display().to_string()
            ))
            .expect("parses"),
        )
        .expect_err("missing key and CA file");
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["thingsboard.ca_file", "thingsboard.key_file"]);
    }

    #[test]
    fn the_broker_tls_listener_needs_its_files_and_a_private_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = |name: &str, text: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            p.display().to_string()
        };
        let key_pair = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .expect("params")
            .self_signed(&key_pair)
            .expect("cert");
        let cert_file = pem("broker.pem", cert.pem());
        let key_file = pem("broker.key", key_pair.serialize_pem());
        let other_key = pem(
            "other.key",
            rcgen::KeyPair::generate().expect("key").serialize_pem(),
        );
        let keys = |toml: &str| -> Vec<String> {
            match validate(load_str(toml).expect("parses")) {
                Ok(_) => Vec::new(),
                Err(errs) => errs.into_iter().map(|e| e.key).collect(),
            }
        };
        let tls = |extra: &str| {
            format!(
                "[broker]\ntls_listen = \"0.0.0.0:8884\"\ntls_cert_file = {cert_file:?}\n\
                 tls_key_file = {key_file:?}\n{extra}"
            )
        };

        let c = validate(load_str(&tls("")).expect("parses")).expect("valid");
        assert_eq!(c.broker.tls_listen.as_deref(), Some("0.0.0.0:8884"));
        assert!(validate(RawConfig::default())
            .expect("valid")
            .broker
            .tls_listen
            .is_none());

        assert_eq!(
            keys("[broker]\ntls_listen = \"0.0.0.0:8884\"\n"),
            ["broker.tls_cert_file", "broker.tls_key_file"]
        );
        assert_eq!(
            keys(&format!(
                "[broker]\ntls_cert_file = {cert_file:?}\ntls_require_client_cert = true\n"
            )),
            ["broker.tls_cert_file", "broker.tls_require_client_cert"],
            "TLS files without tls_listen"
        );
        assert_eq!(
            keys(&tls("tls_require_client_cert = true")),
            ["broker.tls_require_client_cert"]
        );
        assert_eq!(
            keys(&tls("listen = \"0.0.0.0:8884\"")),
            ["broker.tls_listen"],
            "same address as listen"
        );
        assert_eq!(
            keys(&tls("listen = \"127.0.0.1:8884\"")),
            ["broker.tls_listen"],
            "0.0.0.0 overlaps 127.0.0.1 on the same port"
        );
        assert!(keys(&tls("listen = \"127.0.0.1:1884\"")).is_empty());
        assert_eq!(
            keys(&tls("tls_ca_file = \"/nonexistent/ca.pem\"")),
            ["broker.tls_ca_file"]
        );
        assert_eq!(
            keys(&format!(
                "[broker]\ntls_listen = \"0.0.0.0:8884\"\ntls_cert_file = {cert_file:?}\n\
                 tls_key_file = {other_key:?}\n"
            )),
            ["broker.tls_key_file"],
            "a key that does not belong to the certificate"
        );
        assert_eq!(
            keys(&format!(
                "[broker]\ntls_listen = \"0.0.0.0:8884\"\ntls_cert_file = {key_file:?}\n\
                 tls_key_file = {key_file:?}\n"
            )),
            ["broker.tls_cert_file"],
            "no certificate in the certificate file"
        );
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let errs = validate(load_str(&tls("")).expect("parses")).expect_err("readable key");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].key, "broker.tls_key_file");
        assert!(errs[0].message.contains("chmod 600"), "{}", errs[0].message);
    }

    #[test]
    fn commit_interval_is_bounded() {
        let errs = validate(load_str("[store]\ncommit_interval = \"2s\"\n").expect("parses"))
            .expect_err("too long");
        assert_eq!(errs[0].key, "store.commit_interval");
        let c = validate(RawConfig::default()).expect("valid");
        assert_eq!(c.store.commit_interval, DEFAULT_COMMIT_INTERVAL);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = load_str("[thingsboard]\nacess_token = \"x\"\n").expect_err("unknown key");
        assert!(err.to_string().contains("acess_token"), "{err}");
    }

    #[test]
    fn http_beyond_loopback_needs_a_token() {
        let errs = validate(load_str("[http]\nlisten = \"0.0.0.0:8484\"\n").expect("parses"))
            .expect_err("no token");
        assert_eq!(errs[0].key, "http.token", "{errs:?}");
        let ok = "[http]\nlisten = \"0.0.0.0:8484\"\ntoken = \"r\"\nadmin_token = \"a\"\n";
        assert!(validate(load_str(ok).expect("parses")).is_ok());
        let off = "[http]\nlisten = \"0.0.0.0:8484\"\nenabled = false\n";
        assert!(validate(load_str(off).expect("parses")).is_ok());
        let same = "[http]\ntoken = \"x\"\nadmin_token = \"x\"\n";
        let errs = validate(load_str(same).expect("parses")).expect_err("same tokens");
        assert_eq!(errs[0].key, "http.admin_token");
        let bad = validate(load_str("[http]\nlisten = \"x\"\n").expect("parses"))
            .expect_err("bad listen");
        assert_eq!(bad[0].key, "http.listen");
    }

    #[test]
    fn obis_forms() {
        assert_eq!(parse_obis("1.0.32.7.0.255"), Ok([1, 0, 32, 7, 0, 255]));
        assert_eq!(parse_obis("1-0:32.7.0*255"), Ok([1, 0, 32, 7, 0, 255]));
        assert!(parse_obis("1.0.32.7.0.256").is_err());
        assert!(parse_obis("").is_err());
    }

    #[test]
    fn topic_filters() {
        for ok in ["a/b", "a/+/c", "#", "a/#", "+"] {
            assert!(check_topic_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/#/b", "a/b#", "a+/b"] {
            assert!(check_topic_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_are_masked() {
        let s = Secret::new("tok123");
        assert_eq!(format!("{s:?}"), "\"***\"");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
    }
}
