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
    pub broker: BrokerConfig,
    /// `broker.listen`, parsed.
    pub broker_listen: SocketAddr,
    pub thingsboard: ThingsboardConfig,
    pub store: StoreConfig,
    pub local: LocalConfig,
    pub shutdown: ShutdownConfig,
    pub simulator: SimulatorConfig,
    pub meters: Vec<MeterConfig>,
    pub mappings: Vec<MappingConfig>,
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

    let tb = &raw.thingsboard;
    if tb.host.trim().is_empty() {
        errs.push(ConfigError::new("thingsboard.host", "must not be empty"));
    }
    if tb.port == 0 {
        errs.push(ConfigError::new("thingsboard.port", "must not be 0"));
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

    if raw.local.device_type.trim().is_empty() {
        errs.push(ConfigError::new("local.device_type", "must not be empty"));
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

    let mut names = HashSet::new();
    for (i, m) in raw.meters.iter().enumerate() {
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
                errs.push(ConfigError::new(key("port"), "must not be 0"));
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

    if !errs.is_empty() {
        return Err(errs);
    }
    let store_dir = raw
        .store
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(std::path::Path::to_path_buf);
    Ok(Config {
        log_level: raw.log.level,
        broker: raw.broker,
        broker_listen,
        thingsboard: raw.thingsboard,
        store: raw.store,
        local: raw.local,
        shutdown: raw.shutdown,
        simulator: raw.simulator,
        meters: raw
            .meters
            .into_iter()
            .map(|m| MeterConfig {
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
    })
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

    #[test]
    fn defaults_are_valid() {
        let c = validate(RawConfig::default()).expect("defaults validate");
        assert_eq!(c.broker_listen.to_string(), "127.0.0.1:1884");
        assert_eq!(c.thingsboard.max_packet_size, 65_536);
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
    fn unknown_keys_are_rejected_with_their_name() {
        let err = load_str("[thingsboard]\nacess_token = \"x\"\n").expect_err("unknown key");
        assert!(err.to_string().contains("acess_token"), "{err}");
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
