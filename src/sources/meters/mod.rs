//! The DLMS/COSEM meter source: the clonable [`MeterHandle`] front and the spawn helpers that
//! start one actor per meter, plus the loader for the original system's meter registry.
//!
//! Layers, bottom up: the pure protocol in [`crate::dlms`] (`hdlc`/`wrapper` framing, `apdu`
//! with A-XDR, `obis`, `clock`) → `link` (async client/server link drivers with recovery) →
//! `client` (the session: association, HLS-GMAC and ciphering, services; `counter` keeps its
//! invocation counter) → `profile` (Profile generic reading) →
//! `poller` (the actor); `cli` is `dlms-bridge read`. This module only wires them; it owns no
//! connection itself.

pub mod cli;
pub mod client;
pub mod counter;
pub mod link;
pub mod poller;
pub mod profile;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::MeterConfig;
use crate::dlms::apdu::{AttrRef, Data, MethodRef};
use crate::sources::SourceEvent;
use poller::{Command, Meter};
pub use poller::{CommandError, Error};

/// Commands that may wait for one meter; a full queue makes RPC callers wait (backpressure),
/// which is right: the meter serves one request at a time anyway.
pub const COMMAND_CAPACITY: usize = 16;

/// Clonable front of one meter actor: RPCs queue here behind the actor's polls and run on its
/// association.
#[derive(Debug, Clone)]
pub struct MeterHandle {
    name: Arc<str>,
    /// To the meter actor; closed when it stops.
    cmd_tx: mpsc::Sender<Command>,
    /// Which `set`/`action` RPCs ThingsBoard may run (checked by `downlink`).
    rpc_write: Arc<crate::config::RpcWrite>,
    /// The meter's ThingsBoard profile (an RPC reply may be the first record of the device).
    device_type: Arc<str>,
}

impl MeterHandle {
    /// The meter's device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The meter's ThingsBoard profile.
    pub fn device_type(&self) -> &str {
        &self.device_type
    }

    /// The meter's `rpc_write` setting.
    pub fn rpc_write(&self) -> &crate::config::RpcWrite {
        &self.rpc_write
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, CommandError>>) -> Command,
    ) -> Result<T, CommandError> {
        let (reply, rx) = oneshot::channel();
        self.cmd_tx
            .send(make(reply))
            .await
            .map_err(|_| CommandError::Stopped)?;
        rx.await.map_err(|_| CommandError::Stopped)?
    }

    /// Read one attribute.
    /// Poll now; the readings also go out as telemetry. Replies with the telemetry values.
    pub async fn poll_now(&self) -> Result<serde_json::Value, CommandError> {
        self.call(|reply| Command::PollNow { reply }).await
    }

    /// Change the poll interval live (shared attribute `poll_interval`).
    pub async fn set_interval(&self, period: std::time::Duration) -> Result<(), CommandError> {
        self.call(|reply| Command::SetInterval { period, reply })
            .await
    }

    pub async fn get(&self, attr: AttrRef) -> Result<Data, CommandError> {
        self.call(|reply| Command::Get { attr, reply }).await
    }

    /// Write one attribute.
    pub async fn set(&self, attr: AttrRef, value: Data) -> Result<(), CommandError> {
        self.call(|reply| Command::Set { attr, value, reply }).await
    }

    /// Set the meter clock to the bridge's time (keeping the meter's deviation); refused unless
    /// the meter has `rpc_write = true`. Returns the drift (s) before the correction.
    pub async fn sync_clock(&self) -> Result<f64, CommandError> {
        self.call(|reply| Command::SyncClock { reply }).await
    }

    /// Invoke one method; returns its return parameters, if any.
    pub async fn action(
        &self,
        method: MethodRef,
        params: Option<Data>,
    ) -> Result<Option<Data>, CommandError> {
        self.call(|reply| Command::Action {
            method,
            params,
            reply,
        })
        .await
    }
}

/// Start the actor of one meter on `tracker`. It polls until `cancel` fires, then releases the
/// association and ends.
pub fn spawn_meter(
    cfg: MeterConfig,
    events_tx: mpsc::Sender<SourceEvent>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> MeterHandle {
    spawn_meter_with(
        cfg,
        events_tx,
        tracker,
        cancel,
        client::DEFAULT_MAX_RECEIVE_PDU,
    )
}

/// [`spawn_meter`] proposing a given max-receive-pdu-size (tests force block transfer with it).
pub fn spawn_meter_with(
    cfg: MeterConfig,
    events_tx: mpsc::Sender<SourceEvent>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
    max_receive_pdu: u16,
) -> MeterHandle {
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CAPACITY);
    let name: Arc<str> = cfg.name.as_str().into();
    let rpc_write = Arc::new(cfg.rpc_write.clone());
    let device_type: Arc<str> = cfg
        .device_type
        .as_deref()
        .filter(|t| !t.is_empty())
        .unwrap_or(poller::DEFAULT_DEVICE_TYPE)
        .into();
    let meter = Meter::new(cfg, events_tx, cmd_rx, cancel).with_max_receive_pdu(max_receive_pdu);
    tracker.spawn(meter.run());
    MeterHandle {
        name,
        cmd_tx,
        rpc_write,
        device_type,
    }
}

/// Expand a `[[meters]]` entry with `database = "..."` into one meter per row of the original
/// system's `meters(id, name, ip_address, port, tb_host, tb_port, tb_token)` table; every other
/// setting comes from `entry`. Blocking (SQLite): call at start-up, before the runtime is busy.
/// The tb_* columns are never read (a single uplink replaces them; the token must not leak).
pub fn load_meter_registry(entry: &MeterConfig) -> Result<Vec<MeterConfig>, Error> {
    let Some(path) = entry.database.as_ref() else {
        return Ok(vec![entry.clone()]);
    };
    let shown = path.display().to_string();
    let err = |source| Error::Registry {
        path: shown.clone(),
        source,
    };
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    let mut stmt = conn
        .prepare("SELECT id, name, ip_address, port FROM meters ORDER BY id")
        .map_err(err)?;
    let rows = stmt
        .query_map([], |row| {
            Ok((
                row.get::<_, rusqlite::types::Value>(0)?,
                row.get::<_, Option<String>>(1)?,
                row.get::<_, Option<String>>(2)?,
                row.get::<_, rusqlite::types::Value>(3)?,
            ))
        })
        .map_err(err)?;
    let mut out = Vec::new();
    for row in rows {
        let (id, name, ip, port) = row.map_err(err)?;
        let id = match id {
            rusqlite::types::Value::Integer(i) => i.to_string(),
            rusqlite::types::Value::Text(t) => t,
            _ => "?".into(),
        };
        let port = match port {
            rusqlite::types::Value::Integer(p) => u16::try_from(p).ok(),
            rusqlite::types::Value::Text(t) => t.trim().parse().ok(),
            _ => None,
        };
        let (Some(name), Some(host), Some(port)) = (
            name.filter(|n| !n.trim().is_empty()),
            ip.filter(|h| !h.trim().is_empty()),
            port,
        ) else {
            warn!(registry = %shown, id = %id, "Registry row without name, address or valid port skipped.");
            continue;
        };
        out.push(MeterConfig {
            name: name.trim().to_string(),
            host: host.trim().to_string(),
            port,
            database: None,
            ..entry.clone()
        });
    }
    info!(
        registry = %shown,
        meters = out.len(),
        "Loaded meter registry; its tb_host, tb_port and tb_token columns are obsolete and ignored (all meters use the single ThingsBoard uplink)."
    );
    Ok(out)
}

/// Replaces the small state file `path` (invocation counter, profile position) durably: writes
/// `bytes` to `tmp`, syncs it, renames it over `path`, then syncs the directory so the rename
/// survives a power cut too.
pub(crate) async fn write_file_durably(
    path: &std::path::Path,
    tmp: &std::path::Path,
    bytes: &[u8],
) -> std::io::Result<()> {
    let mut f = tokio::fs::File::create(tmp).await?;
    tokio::io::AsyncWriteExt::write_all(&mut f, bytes).await?;
    f.sync_all().await?;
    drop(f);
    tokio::fs::rename(tmp, path).await?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = tokio::fs::File::open(dir).await {
            let _ = d.sync_all().await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_rows_become_meters_and_tokens_are_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.db");
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.execute_batch(
            "CREATE TABLE meters(id INTEGER PRIMARY KEY, name TEXT, ip_address TEXT, port INTEGER,
                                 tb_host TEXT, tb_port INTEGER, tb_token TEXT);
             INSERT INTO meters VALUES (1, 'Meter A', '192.168.1.127', 3333, 'tb', 1883, 'SECRET1');
             INSERT INTO meters VALUES (2, 'Meter B', '192.168.1.128', '4059', NULL, NULL, NULL);
             INSERT INTO meters VALUES (3, '', '192.168.1.129', 1, NULL, NULL, NULL);",
        )
        .expect("schema");
        drop(conn);
        let entry = MeterConfig {
            database: Some(path),
            password: None,
            ..MeterConfig::default()
        };
        let meters = load_meter_registry(&entry).expect("load");
        assert_eq!(meters.len(), 2);
        assert_eq!(meters[0].name, "Meter A");
        assert_eq!(meters[0].host, "192.168.1.127");
        assert_eq!(meters[0].port, 3333);
        assert_eq!(meters[1].port, 4059);
        assert!(meters.iter().all(|m| m.database.is_none()));
        assert!(!format!("{meters:?}").contains("SECRET1"));
    }

    #[test]
    fn registry_missing_file_is_an_error() {
        let entry = MeterConfig {
            database: Some("/nonexistent/admin.db".into()),
            ..MeterConfig::default()
        };
        let e = load_meter_registry(&entry).expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/admin.db"));
    }
}
