//! Profile generic (class 7) reading for the meter actor: `capture_objects` once, then the
//! buffer from the last entry already delivered up to now, by range (selector 1) or, for meters
//! without range access, by entry (selector 2); each entry becomes one telemetry value set with
//! the meter's own timestamp. The read position is persisted (one small file per meter and
//! profile, replaced atomically) so that after an outage or a restart the missed intervals are
//! caught up and nothing already delivered is sent again.
//!
//! It runs on the actor's association and never opens connections itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use super::client::{self, scale, DlmsClient, Link};
use super::poller::{data_to_json, DEFAULT_REGISTERS};
use crate::dlms::apdu::{self, AttrRef, CaptureObject, Data, DataAccessResult};
use crate::dlms::clock;
use crate::dlms::obis::ObisCode;

/// With no stored position, how far back the first read goes.
pub const DEFAULT_BACKFILL: Duration = Duration::from_secs(24 * 3600);

/// Class id of Profile generic.
pub const PROFILE_GENERIC: u16 = 7;

/// Why a profile could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request failed on the wire (the association may be gone).
    #[error("profile request failed")]
    Client(#[from] client::Error),
    /// The meter refused an attribute of the profile.
    #[error("meter refused {attr}: {result}")]
    Refused {
        attr: AttrRef,
        result: DataAccessResult,
    },
    /// The meter's answer does not look like a profile (capture objects, buffer rows).
    #[error("unusable profile data: {0}")]
    Shape(String),
    /// The profile has no clock column to time its entries.
    #[error("profile {0} captures no clock (class 8, attribute 2)")]
    NoClock(ObisCode),
    /// The read position could not be stored.
    #[error("cannot store the profile position in {path}")]
    Position {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the association is still usable after this error.
    pub fn needs_reconnect(&self) -> bool {
        matches!(self, Error::Client(e) if e.needs_reconnect())
    }
}

/// One profile entry: the meter's timestamp and the selected columns.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Milliseconds since the Unix epoch, from the entry's clock column.
    pub ts_ms: i64,
    /// Telemetry key → value (scaled numbers where the column is a register value).
    pub values: Map<String, Value>,
}

/// A column that is sent: its key and its scaler.
#[derive(Debug, Clone)]
struct Column {
    index: usize,
    key: String,
    scaler: Option<i8>,
}

/// The layout of a profile, learned once from `capture_objects`.
#[derive(Debug, Clone)]
struct Layout {
    clock_col: usize,
    clock: CaptureObject,
    columns: Vec<Column>,
}

/// Reads one profile of one meter.
#[derive(Debug)]
pub struct ProfileReader {
    /// The Profile generic object.
    obis: ObisCode,
    /// Columns to send (OBIS of capture objects); empty = every column but the clock.
    wanted: Vec<ObisCode>,
    /// Learned on the first read.
    layout: Option<Layout>,
    /// Cleared when the meter refuses range access: entries are then read by index.
    range_ok: bool,
}

/// Telemetry key of a captured attribute: the dashboard key of a default register, else
/// `CLASS/OBIS/ATTR` (or just the OBIS for a register value).
pub fn column_key(c: &CaptureObject) -> String {
    if c.attr.class_id == 3 && c.attr.attribute == 2 {
        if let Some((k, _)) = DEFAULT_REGISTERS.iter().find(|(_, o)| *o == c.attr.obis) {
            return (*k).to_string();
        }
        return c.attr.obis.to_string();
    }
    c.attr.to_string()
}

impl ProfileReader {
    /// A reader for the profile `obis`, sending `wanted` columns (empty = all but the clock).
    pub fn new(obis: ObisCode, wanted: Vec<ObisCode>) -> Self {
        ProfileReader {
            obis,
            wanted,
            layout: None,
            range_ok: true,
        }
    }

    /// Read by entry only, as for a meter without range access (tests and meters known to
    /// lack it).
    pub fn entry_access_only(mut self) -> Self {
        self.range_ok = false;
        self
    }

    /// The profile's OBIS code.
    pub fn obis(&self) -> ObisCode {
        self.obis
    }

    fn attr(&self, attribute: i8) -> AttrRef {
        AttrRef::new(PROFILE_GENERIC, self.obis, attribute)
    }

    async fn get<L: Link>(&self, c: &mut DlmsClient<L>, attribute: i8) -> Result<Data, Error> {
        let attr = self.attr(attribute);
        c.get_one(&attr)
            .await?
            .map_err(|result| Error::Refused { attr, result })
    }

    async fn layout<L: Link>(&mut self, c: &mut DlmsClient<L>) -> Result<Layout, Error> {
        if let Some(l) = &self.layout {
            return Ok(l.clone());
        }
        let captured = apdu::parse_capture_objects(&self.get(c, 3).await?)
            .map_err(|e| Error::Shape(e.to_string()))?;
        let clock_col = captured
            .iter()
            .position(|o| o.attr.class_id == 8 && o.attr.attribute == 2)
            .ok_or(Error::NoClock(self.obis))?;
        let mut columns = Vec::new();
        for (index, o) in captured.iter().enumerate() {
            let wanted = if self.wanted.is_empty() {
                index != clock_col
            } else {
                self.wanted.contains(&o.attr.obis)
            };
            if !wanted {
                continue;
            }
            let scaler = if o.data_index == 0 {
                c.scaler_unit(&o.attr).await?.map(|(s, _)| s)
            } else {
                None
            };
            columns.push(Column {
                index,
                key: column_key(o),
                scaler,
            });
        }
        let l = Layout {
            clock_col,
            clock: captured[clock_col],
            columns,
        };
        self.layout = Some(l.clone());
        Ok(l)
    }

    /// Entries with a timestamp after `after_ms` up to `now_ms`, oldest first. Range access
    /// first; a meter that refuses it is read by entry from then on.
    pub async fn read_since<L: Link>(
        &mut self,
        c: &mut DlmsClient<L>,
        after_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<Entry>, Error> {
        let layout = self.layout(c).await?;
        let rows = if self.range_ok {
            // Date-times have whole seconds in most meters: start at the next second.
            let from = clock::encode_utc(after_ms.div_euclid(1000) * 1000 + 1000);
            let to = clock::encode_utc(now_ms);
            let params = apdu::range_descriptor(&layout.clock, from, to);
            match c.get_selective(&self.attr(2), 1, &params).await? {
                Ok(d) => Some(d),
                Err(result) => {
                    tracing::info!(profile = %self.obis, %result, "Meter refused range access; reading profile by entry.");
                    self.range_ok = false;
                    None
                }
            }
        } else {
            None
        };
        let rows = match rows {
            Some(d) => d,
            None => self.read_by_entry(c, after_ms, now_ms).await?,
        };
        let mut out = entries(&layout, &rows)?;
        out.retain(|e| e.ts_ms > after_ms);
        out.sort_by_key(|e| e.ts_ms);
        Ok(out)
    }

    /// The entries that may be newer than `after_ms`: as many of the last ones as capture
    /// periods passed since (all when the period is unknown).
    async fn read_by_entry<L: Link>(
        &mut self,
        c: &mut DlmsClient<L>,
        after_ms: i64,
        now_ms: i64,
    ) -> Result<Data, Error> {
        let in_use = self
            .get(c, 7)
            .await?
            .as_i64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| Error::Shape("entries_in_use is not a number".into()))?;
        if in_use == 0 {
            return Ok(Data::Array(Vec::new()));
        }
        let period_s = self.get(c, 4).await?.as_i64().unwrap_or(0);
        let first = if period_s > 0 {
            let missed = (now_ms - after_ms).max(0) / 1000 / period_s + 2;
            in_use.saturating_sub(u32::try_from(missed).unwrap_or(u32::MAX)) + 1
        } else {
            1
        };
        let attr = self.attr(2);
        c.get_selective(&attr, 2, &apdu::entry_descriptor(first.max(1), in_use))
            .await?
            .map_err(|result| Error::Refused { attr, result })
    }
}

/// Rows of a buffer as entries (rows whose clock is unusable are skipped with a log line).
fn entries(layout: &Layout, rows: &Data) -> Result<Vec<Entry>, Error> {
    let Data::Array(rows) = rows else {
        return Err(Error::Shape("buffer is not an array".into()));
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let Data::Structure(cells) = row else {
            return Err(Error::Shape("buffer row is not a structure".into()));
        };
        let ts = match cells.get(layout.clock_col) {
            Some(Data::OctetString(b)) => clock::decode(b),
            Some(Data::DateTime(b)) => clock::decode(b),
            _ => Err(clock::Error::Length(0)),
        };
        let ts = match ts {
            Ok(t) => t,
            Err(error) => {
                tracing::warn!(%error, "Profile entry without a usable time skipped.");
                continue;
            }
        };
        let mut values = Map::new();
        for col in &layout.columns {
            let Some(cell) = cells.get(col.index) else {
                continue;
            };
            let v = match (cell.as_f64(), col.scaler) {
                (Some(v), Some(s)) => {
                    serde_json::Number::from_f64(scale(v, s)).map_or(Value::Null, Value::Number)
                }
                _ => data_to_json(cell),
            };
            values.insert(col.key.clone(), v);
        }
        out.push(Entry {
            ts_ms: ts.unix_ms,
            values,
        });
    }
    Ok(out)
}

/// Where the read position of one meter's profile is kept: `DIR/profile-<meter>-<obis>.pos`
/// (the meter name hex-encoded when it is not plain), holding the last delivered entry's time
/// in Unix ms.
pub fn position_path(dir: &Path, meter: &str, obis: ObisCode) -> PathBuf {
    dir.join(format!(
        "profile-{}-{}.pos",
        file_stem(meter),
        obis.to_string().replace('.', "_")
    ))
}

/// A meter name as part of a file name: as is when plain, hex otherwise (no separators, no
/// dots, no collisions between names).
pub fn file_stem(meter: &str) -> String {
    let plain = meter
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if plain {
        meter.to_string()
    } else {
        meter.bytes().map(|b| format!("{b:02x}")).collect()
    }
}

/// The stored position, if any (an unreadable file counts as none, with a warning).
pub async fn load_position(path: &Path) -> Option<i64> {
    match tokio::fs::read_to_string(path).await {
        Ok(s) => match s.trim().parse() {
            Ok(v) => Some(v),
            Err(_) => {
                tracing::warn!(path = %path.display(), "Unreadable profile position ignored.");
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "Profile position not readable.");
            None
        }
    }
}

/// Store the position durably: write a temporary file, sync it, rename it over the old one.
pub async fn store_position(path: &Path, ts_ms: i64) -> Result<(), Error> {
    let err = |source| Error::Position {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("pos.tmp");
    super::write_file_durably(path, &tmp, ts_ms.to_string().as_bytes())
        .await
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        let clock = CaptureObject {
            attr: AttrRef::new(8, ObisCode::new(0, 0, 1, 0, 0, 255), 2),
            data_index: 0,
        };
        Layout {
            clock_col: 0,
            clock,
            columns: vec![Column {
                index: 1,
                key: "active_energy".into(),
                scaler: Some(-1),
            }],
        }
    }

    #[test]
    fn rows_become_entries_with_meter_time_and_scaled_values() {
        let t = 1_795_935_600_000;
        let mut bad_clock = clock::encode_utc(t + 900_000);
        bad_clock[11] = clock::STATUS_INVALID;
        let rows = Data::Array(vec![
            Data::Structure(vec![
                Data::OctetString(clock::encode_utc(t).to_vec()),
                Data::U32(12345),
            ]),
            Data::Structure(vec![Data::OctetString(bad_clock.to_vec()), Data::U32(1)]),
        ]);
        let e = entries(&layout(), &rows).expect("entries");
        assert_eq!(e.len(), 1, "the invalid clock row is skipped");
        assert_eq!(e[0].ts_ms, t);
        assert_eq!(e[0].values["active_energy"], serde_json::json!(1234.5));
        assert!(entries(&layout(), &Data::U8(1)).is_err());
    }

    #[test]
    fn column_keys() {
        let reg = |o| CaptureObject {
            attr: AttrRef::new(3, o, 2),
            data_index: 0,
        };
        assert_eq!(
            column_key(&reg(ObisCode::new(1, 0, 1, 8, 0, 255))),
            "active_energy"
        );
        assert_eq!(
            column_key(&reg(ObisCode::new(1, 0, 2, 8, 0, 255))),
            "1.0.2.8.0.255"
        );
        let status = CaptureObject {
            attr: AttrRef::new(1, ObisCode::new(0, 0, 96, 10, 1, 255), 2),
            data_index: 0,
        };
        assert_eq!(column_key(&status), "1/0.0.96.10.1.255/2");
    }

    #[tokio::test]
    async fn position_survives_and_is_replaced_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = position_path(dir.path(), "Meter 1", ObisCode::new(1, 0, 99, 1, 0, 255));
        assert!(p
            .to_string_lossy()
            .ends_with("profile-4d657465722031-1_0_99_1_0_255.pos"));
        assert_eq!(load_position(&p).await, None);
        store_position(&p, 42).await.expect("store");
        store_position(&p, 1_795_935_600_000)
            .await
            .expect("replace");
        assert_eq!(load_position(&p).await, Some(1_795_935_600_000));
        assert!(!p.with_extension("pos.tmp").exists());
    }
}
