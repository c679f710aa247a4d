//! `dlms-bridge read`: read a meter once and print each value with its unit, the field
//! engineer's "is this meter answering?" tool.
//!
//! It uses the same connect/associate path as the poller, prints to stdout (the one place where
//! `println!` is right) and returns an error the binary maps to a non-zero exit code. It never
//! retries: a failure is the answer the engineer is asking for.

use std::time::{Duration, Instant};

use super::client::{self, ReadingValue, Register};
use super::poller::{self, error_chain, DEFAULT_REGISTERS};
use crate::config::{DlmsAuth, DlmsTransport, MeterConfig, Secret};
use crate::dlms::apdu::{AttrRef, Data};
use crate::dlms::obis::ObisCode;

/// Why a one-shot read failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not connect or associate.
    #[error("cannot reach the meter")]
    Connect(#[source] poller::Error),
    /// The read request itself failed.
    #[error("read failed")]
    Read(#[source] client::Error),
    /// The meter answered but refused some registers.
    #[error("{0} of {1} registers could not be read")]
    Partial(usize, usize),
    /// A command-line value is not usable.
    #[error("invalid argument: {0}")]
    Argument(String),
    /// The profile could not be read.
    #[error("profile read failed")]
    Profile(#[source] super::profile::Error),
}

/// Link transport on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// HDLC frames over TCP (serial-to-Ethernet converters).
    Hdlc,
    /// IEC 62056-47 wrapper over TCP (port 4059).
    Wrapper,
}

/// Arguments of `dlms-bridge read`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReadArgs {
    /// Meter (or converter) host name or IP address.
    #[arg(long)]
    pub host: String,
    /// TCP port (3333-style converter for HDLC, 4059 for the wrapper).
    #[arg(long)]
    pub port: u16,
    /// Link layer.
    #[arg(long, value_enum, default_value = "hdlc")]
    pub transport: Transport,
    /// OBIS code of a register (class 3, attribute 2) to read; repeatable. Default: the five
    /// registers of the default profile. `CLASS/OBIS/ATTR` (e.g. `8/0.0.1.0.0.255/2`) reads any
    /// attribute.
    #[arg(long = "obis")]
    pub obis: Vec<String>,
    /// Client SAP (16 = public client). Defaults are those of `[[meters]]`.
    #[arg(long, default_value_t = MeterConfig::default().client_address)]
    pub client_address: u16,
    /// Server logical device address (HDLC upper address; wrapper destination port).
    #[arg(long, default_value_t = MeterConfig::default().logical_address)]
    pub logical_address: u16,
    /// Server physical device address (HDLC lower address).
    #[arg(long, default_value_t = MeterConfig::default().physical_address)]
    pub physical_address: u16,
    /// HDLC server address size in bytes: 1, 2 or 4.
    #[arg(long, default_value_t = MeterConfig::default().address_size)]
    pub address_size: u8,
    /// Read this Profile generic (e.g. the load profile 1.0.99.1.0.255) instead of registers:
    /// its entries from `--from` to `--to`, one line each.
    #[arg(long)]
    pub profile: Option<String>,
    /// Profile entries from this time (RFC 3339, UTC: `2026-11-30T00:00:00Z`); default: a day
    /// before `--to`.
    #[arg(long, requires = "profile", value_parser = humantime_serde::re::humantime::parse_rfc3339_weak)]
    pub from: Option<std::time::SystemTime>,
    /// Profile entries up to this time (RFC 3339, UTC); default: now.
    #[arg(long, requires = "profile", value_parser = humantime_serde::re::humantime::parse_rfc3339_weak)]
    pub to: Option<std::time::SystemTime>,
    /// Recovery attempts per request (RR poll / re-send) before giving up.
    #[arg(long, default_value_t = MeterConfig::default().retries)]
    pub retries: u32,
    /// LLS password; associates with low-level security when given.
    #[arg(long, env = "DLMS_BRIDGE_READ_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// `--auth` and the HLS-GMAC keys.
    #[command(flatten)]
    pub security: SecurityArgs,
    /// Per-request timeout.
    #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration, default_value = "5s")]
    pub timeout: Duration,
}

/// Authentication on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Auth {
    /// No authentication (lowest level security).
    None,
    /// Low-level security: `--password`.
    Lls,
    /// High-level security with GMAC (security suite 0): keys and system title.
    #[value(name = "hls-gmac")]
    HlsGmac,
}

/// `dlms-bridge read` authentication beyond `--password`: `--auth` and the HLS-GMAC keys.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityArgs {
    /// Authentication: `none`, `lls` (with `--password`) or `hls-gmac` (with the keys and
    /// `--system-title`, or `--key-file`). Default: `lls` when a password is given, else `none`.
    #[arg(long, value_enum)]
    pub auth: Option<Auth>,
    /// HLS-GMAC authentication key (32 hex digits).
    #[arg(
        long,
        env = "DLMS_BRIDGE_READ_AUTHENTICATION_KEY",
        hide_env_values = true
    )]
    pub authentication_key: Option<String>,
    /// HLS-GMAC global unicast block cipher key (32 hex digits).
    #[arg(
        long,
        env = "DLMS_BRIDGE_READ_BLOCK_CIPHER_KEY",
        hide_env_values = true
    )]
    pub block_cipher_key: Option<String>,
    /// HLS-GMAC client system title (16 hex digits).
    #[arg(long)]
    pub system_title: Option<String>,
    /// File with the HLS keys and/or system title as `name = value` lines (owner-readable only),
    /// as `key_file` of `[[meters]]`.
    #[arg(long)]
    pub key_file: Option<std::path::PathBuf>,
    /// HLS-GMAC: propose a dedicated key (the meter then answers ded-ciphered APDUs).
    #[arg(long)]
    pub dedicated_key: bool,
    /// HLS-GMAC: keep the invocation counter in this file (created if missing; reserved in
    /// blocks, like the bridge's). Without it, counting starts at `--invocation-counter`.
    #[arg(long)]
    pub counter_file: Option<std::path::PathBuf>,
    /// HLS-GMAC: first invocation counter value when no counter file exists yet. Default: the
    /// current Unix time in seconds (grows between runs; see docs/DLMS.md).
    #[arg(long)]
    pub invocation_counter: Option<u32>,
}

/// Parse `--obis` values: a bare OBIS code is a register value (3/obis/2).
fn parse_targets(list: &[String]) -> Result<Vec<Register>, String> {
    if list.is_empty() {
        return Ok(DEFAULT_REGISTERS
            .iter()
            .map(|(k, o)| Register {
                key: (*k).to_string(),
                attr: AttrRef::new(3, *o, 2),
            })
            .collect());
    }
    list.iter()
        .map(|s| {
            let parts: Vec<&str> = s.split('/').collect();
            let attr = match parts.as_slice() {
                [obis] => AttrRef::new(3, obis.parse::<ObisCode>().map_err(|e| e.to_string())?, 2),
                [class, obis, attr] => AttrRef::new(
                    class
                        .parse()
                        .map_err(|_| format!("bad class id in `{s}`"))?,
                    obis.parse::<ObisCode>().map_err(|e| e.to_string())?,
                    attr.parse()
                        .map_err(|_| format!("bad attribute in `{s}`"))?,
                ),
                _ => return Err(format!("`{s}` is neither OBIS nor CLASS/OBIS/ATTR")),
            };
            let key = DEFAULT_REGISTERS
                .iter()
                .find(|(_, o)| *o == attr.obis && attr.class_id == 3 && attr.attribute == 2)
                .map_or_else(|| attr.to_string(), |(k, _)| (*k).to_string());
            Ok(Register { key, attr })
        })
        .collect()
}

/// Read the meter once and print one line per register.
pub async fn read(args: ReadArgs) -> Result<(), Error> {
    let regs = parse_targets(&args.obis).map_err(|e| {
        Error::Connect(poller::Error::Client(client::Error::Apdu(
            crate::dlms::apdu::Error::Invalid(e),
        )))
    })?;
    let cfg = MeterConfig {
        name: format!("{}:{}", args.host, args.port),
        host: args.host.clone(),
        port: args.port,
        transport: match args.transport {
            Transport::Hdlc => DlmsTransport::Hdlc,
            Transport::Wrapper => DlmsTransport::Wrapper,
        },
        client_address: args.client_address,
        logical_address: args.logical_address,
        physical_address: args.physical_address,
        address_size: args.address_size,
        auth: match (args.security.auth, &args.password) {
            (Some(Auth::None), _) => DlmsAuth::None,
            (Some(Auth::Lls), _) | (None, Some(_)) => DlmsAuth::Lls,
            (Some(Auth::HlsGmac), _) => DlmsAuth::HlsGmac,
            (None, None) => DlmsAuth::None,
        },
        password: args.password.clone().map(Secret::new),
        authentication_key: args.security.authentication_key.clone().map(Secret::new),
        block_cipher_key: args.security.block_cipher_key.clone().map(Secret::new),
        system_title: args.security.system_title.clone(),
        key_file: args.security.key_file.clone(),
        dedicated_key: args.security.dedicated_key,
        timeout: args.timeout,
        retries: args.retries,
        ..MeterConfig::default()
    };
    let cfg = MeterConfig {
        hls: crate::config::validate::resolve_hls(&cfg, "read").map_err(|errs| {
            Error::Argument(
                errs.iter()
                    .map(|e| {
                        let flag = e.key.strip_prefix("read.").unwrap_or(&e.key);
                        format!("--{}: {}", flag.replace('_', "-"), e.message)
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?,
        ..cfg
    };
    let counter = match cfg.auth {
        DlmsAuth::HlsGmac => {
            let start = args.security.invocation_counter.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_secs().min(u64::from(u32::MAX / 2)) as u32)
            });
            Some(
                super::counter::InvocationCounter::shared(
                    args.security.counter_file.clone(),
                    start,
                )
                .await
                .map_err(|e| Error::Connect(poller::Error::Client(client::Error::Counter(e))))?,
            )
        }
        _ => None,
    };
    let started = Instant::now();
    let mut c = poller::connect_with(&cfg, client::DEFAULT_MAX_RECEIVE_PDU, counter)
        .await
        .map_err(Error::Connect)?;
    if let Some(obis) = &args.profile {
        let obis: ObisCode = obis
            .parse()
            .map_err(|e| Error::Argument(format!("--profile {obis}: {e}")))?;
        let ms = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
        };
        let to = args.to.map_or_else(crate::model::now_ms, ms);
        let from = args
            .from
            .map_or(to - super::profile::DEFAULT_BACKFILL.as_millis() as i64, ms);
        let mut reader = super::profile::ProfileReader::new(obis, Vec::new());
        // `read_since` starts after its position: one millisecond before `from` includes it.
        let r = reader.read_since(&mut c, from - 1, to).await;
        let _ = c.release().await;
        let entries = r.map_err(Error::Profile)?;
        for e in &entries {
            let when = humantime_serde::re::humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(e.ts_ms.max(0) as u64),
            );
            let cells: Vec<String> = e.values.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("{when}  {}", cells.join("  "));
        }
        println!("{} entries of {obis}", entries.len());
        return Ok(());
    }
    if let Some(a) = c.association() {
        println!(
            "associated with {} in {} ms (max pdu {}, conformance 0x{:06X})",
            cfg.name,
            started.elapsed().as_millis(),
            a.server_max_receive_pdu,
            a.conformance.0
        );
    }
    let t = Instant::now();
    let results = c.read_registers(&regs).await.map_err(Error::Read)?;
    let read_ms = t.elapsed().as_secs_f64() * 1000.0;
    let _ = c.release().await;
    let width = regs.iter().map(|r| r.key.len()).max().unwrap_or(0);
    let mut failed = 0;
    for (reg, r) in regs.iter().zip(&results) {
        match r {
            Ok(reading) => {
                let value = match &reading.value {
                    ReadingValue::Number(v) => v.to_string(),
                    ReadingValue::Raw(d) => show_raw(d),
                };
                let unit = reading.unit.map(|u| format!(" {u}")).unwrap_or_default();
                println!(
                    "{:width$}  {:15}  {value}{unit}",
                    reg.key,
                    reg.attr.obis.to_string()
                );
            }
            Err(e) => {
                failed += 1;
                println!(
                    "{:width$}  {:15}  error: {}",
                    reg.key,
                    reg.attr.obis.to_string(),
                    error_chain(e)
                );
            }
        }
    }
    println!("read {} registers in {read_ms:.1} ms", regs.len());
    if failed > 0 {
        return Err(Error::Partial(failed, regs.len()));
    }
    Ok(())
}

fn show_raw(d: &Data) -> String {
    d.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_default_and_explicit() {
        let d = parse_targets(&[]).expect("default");
        assert_eq!(d.len(), 5);
        let t = parse_targets(&["1-0:32.7.0*255".into(), "8/0.0.1.0.0.255/2".into()])
            .expect("explicit");
        assert_eq!(t[0].key, "voltage_l1");
        assert_eq!(t[1].attr.class_id, 8);
        assert_eq!(t[1].key, "8/0.0.1.0.0.255/2");
        assert!(parse_targets(&["1.2.3".into()]).is_err());
        assert!(parse_targets(&["x/1.0.1.8.0.255/2".into()]).is_err());
    }

    #[derive(clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        read: ReadArgs,
    }

    #[test]
    fn read_defaults_are_the_meters_defaults() {
        use clap::Parser;
        let a = Wrap::try_parse_from(["read", "--host", "h", "--port", "1"])
            .expect("parses")
            .read;
        let m = MeterConfig::default();
        assert_eq!(a.client_address, m.client_address);
        assert_eq!(a.logical_address, m.logical_address);
        assert_eq!(a.physical_address, 17);
        assert_eq!(a.physical_address, m.physical_address);
        assert_eq!(a.address_size, m.address_size);
        assert_eq!(a.retries, m.retries);
        assert_eq!(a.timeout, m.timeout);
    }
}
