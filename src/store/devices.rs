//! Device renames and deletions made in ThingsBoard (`gateway_device_renamed` /
//! `gateway_device_deleted`, spec §2.8), kept durably in a small SQLite file beside the queue
//! (`devices.db`), so that after a restart a renamed device keeps its new name and a deleted one
//! stays forgotten.
//!
//! Sources (meters, mapping rules, local clients) keep producing the names they always did (the
//! *source name*); the uplink translates a source name to the ThingsBoard name when it sends,
//! which is how rows queued before a rename follow it, and translates back for what ThingsBoard
//! sends down. A deletion remembers the highest row id queued at that moment: older rows of the
//! device are dropped unsent, newer data re-creates the device under its source name.
//!
//! The in-memory view ([`DeviceNames`]) is pure; [`DeviceRegistry`] adds the SQLite file. Its
//! writes are rare (one per rename/delete) and run on the blocking pool, never on an async task.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection};

/// File name of the registry, in the directory of the queue database.
pub const FILE_NAME: &str = "devices.db";

/// What can go wrong with the registry file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open device registry {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("device registry {op} failed")]
    Sqlite {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("device registry worker failed")]
    Join,
}

/// What to do with a queued row of a source device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Send it under this ThingsBoard name.
    Send(String),
    /// The device was deleted after this row was queued: drop it unsent.
    Drop,
}

/// Source name → ThingsBoard name, and deleted sources; pure bookkeeping.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DeviceNames {
    /// Source name → ThingsBoard name, for renamed devices only.
    renamed: HashMap<String, String>,
    /// Source name → highest row id queued when ThingsBoard deleted it.
    deleted: HashMap<String, i64>,
}

impl DeviceNames {
    /// Sources whose ThingsBoard name is `tb_name` (itself when nothing maps to it).
    fn sources_of(&self, tb_name: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .renamed
            .iter()
            .filter(|(_, n)| n.as_str() == tb_name)
            .map(|(s, _)| s.clone())
            .collect();
        if v.is_empty() && !self.renamed.contains_key(tb_name) {
            v.push(tb_name.to_owned());
        }
        v.sort();
        v
    }

    /// ThingsBoard renamed `old` to `new`. Returns the source names affected.
    pub fn rename(&mut self, old: &str, new: &str) -> Vec<String> {
        let sources = self.sources_of(old);
        for s in &sources {
            if s == new {
                self.renamed.remove(s);
            } else {
                self.renamed.insert(s.clone(), new.to_owned());
            }
        }
        sources
    }

    /// ThingsBoard deleted `tb_name`; rows up to `last_row` are dropped. Returns the sources.
    pub fn delete(&mut self, tb_name: &str, last_row: i64) -> Vec<String> {
        let sources = self.sources_of(tb_name);
        for s in &sources {
            self.renamed.remove(s);
            self.deleted.insert(s.clone(), last_row);
        }
        sources
    }

    /// Where row `row` of `source` goes. A row newer than the deletion re-creates the device:
    /// the deletion is forgotten and `true` says so (the caller logs it and persists).
    pub fn route(&mut self, source: &str, row: i64) -> (Route, bool) {
        let mut recreated = false;
        if let Some(&last) = self.deleted.get(source) {
            if row <= last {
                return (Route::Drop, false);
            }
            self.deleted.remove(source);
            recreated = true;
        }
        (Route::Send(self.tb_name(source).to_owned()), recreated)
    }

    /// The ThingsBoard name of a source device.
    pub fn tb_name<'a>(&'a self, source: &'a str) -> &'a str {
        self.renamed.get(source).map_or(source, String::as_str)
    }

    /// The source name of a ThingsBoard device (for RPCs and attribute updates going down).
    pub fn source_name<'a>(&'a self, tb_name: &'a str) -> &'a str {
        self.renamed
            .iter()
            .filter(|(_, n)| n.as_str() == tb_name)
            .map(|(s, _)| s.as_str())
            .min()
            .unwrap_or(tb_name)
    }

    pub fn renamed(&self) -> &HashMap<String, String> {
        &self.renamed
    }

    pub fn is_deleted(&self, source: &str) -> bool {
        self.deleted.contains_key(source)
    }
}

/// [`DeviceNames`] kept in `devices.db`; clonable.
#[derive(Clone)]
pub struct DeviceRegistry {
    /// Used only inside `spawn_blocking` (or at open, before any traffic).
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl DeviceRegistry {
    /// Open (or create) the registry beside the queue database `queue_path`, and load it.
    /// Blocking: call at startup.
    pub fn open_beside(queue_path: &Path) -> Result<(DeviceRegistry, DeviceNames), Error> {
        let dir = queue_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let path = dir.join(FILE_NAME);
        let open = |source| Error::Open {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(open)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS renamed (source TEXT PRIMARY KEY, name TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS deleted (source TEXT PRIMARY KEY, last_row INTEGER NOT NULL);",
        )
        .map_err(open)?;
        let mut names = DeviceNames::default();
        let load = |op| move |source| Error::Sqlite { op, source };
        {
            let mut st = conn
                .prepare("SELECT source, name FROM renamed")
                .map_err(load("load"))?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(load("load"))?;
            for row in rows {
                let (s, n) = row.map_err(load("load"))?;
                names.renamed.insert(s, n);
            }
            let mut st = conn
                .prepare("SELECT source, last_row FROM deleted")
                .map_err(load("load"))?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(load("load"))?;
            for row in rows {
                let (s, n) = row.map_err(load("load"))?;
                names.deleted.insert(s, n);
            }
        }
        Ok((
            DeviceRegistry {
                conn: Arc::new(Mutex::new(conn)),
                path,
            },
            names,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Make the state of `sources` in `names` durable (one transaction, fsynced).
    pub async fn save(&self, names: &DeviceNames, sources: Vec<String>) -> Result<(), Error> {
        let rows: Vec<(String, Option<String>, Option<i64>)> = sources
            .into_iter()
            .map(|s| {
                let n = names.renamed.get(&s).cloned();
                let d = names.deleted.get(&s).copied();
                (s, n, d)
            })
            .collect();
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().map_err(|_| Error::Join)?;
            let op = |source| Error::Sqlite { op: "save", source };
            let tx = conn.transaction().map_err(op)?;
            for (s, n, d) in rows {
                tx.execute("DELETE FROM renamed WHERE source = ?1", params![s])
                    .map_err(op)?;
                tx.execute("DELETE FROM deleted WHERE source = ?1", params![s])
                    .map_err(op)?;
                if let Some(n) = n {
                    tx.execute(
                        "INSERT INTO renamed (source, name) VALUES (?1, ?2)",
                        params![s, n],
                    )
                    .map_err(op)?;
                }
                if let Some(d) = d {
                    tx.execute(
                        "INSERT INTO deleted (source, last_row) VALUES (?1, ?2)",
                        params![s, d],
                    )
                    .map_err(op)?;
                }
            }
            tx.commit().map_err(op)
        })
        .await
        .map_err(|_| Error::Join)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_chain_and_translate_both_ways() {
        let mut n = DeviceNames::default();
        assert_eq!(n.rename("Pump", "Pump 7"), vec!["Pump".to_string()]);
        assert_eq!(n.tb_name("Pump"), "Pump 7");
        assert_eq!(n.source_name("Pump 7"), "Pump");
        // Renamed again in ThingsBoard: the source follows.
        assert_eq!(n.rename("Pump 7", "Pump B"), vec!["Pump".to_string()]);
        assert_eq!(n.tb_name("Pump"), "Pump B");
        assert_eq!(n.route("Pump", 1), (Route::Send("Pump B".into()), false));
        // Renamed back to the source name: no entry left.
        n.rename("Pump B", "Pump");
        assert!(n.renamed().is_empty());
    }

    #[test]
    fn deletion_drops_older_rows_and_newer_data_recreates() {
        let mut n = DeviceNames::default();
        n.rename("Meter", "Meter X");
        assert_eq!(n.delete("Meter X", 10), vec!["Meter".to_string()]);
        assert_eq!(n.route("Meter", 9), (Route::Drop, false));
        assert_eq!(n.route("Meter", 10), (Route::Drop, false));
        // New data: re-created under the source name, the rename forgotten.
        assert_eq!(n.route("Meter", 11), (Route::Send("Meter".into()), true));
        assert!(!n.is_deleted("Meter"));
        assert_eq!(n.route("Meter", 5), (Route::Send("Meter".into()), false));
    }

    #[tokio::test]
    async fn the_registry_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().join("queue.db");
        let (reg, mut names) = DeviceRegistry::open_beside(&queue).unwrap();
        let s = names.rename("A", "B");
        reg.save(&names, s).await.unwrap();
        let s = names.delete("C", 42);
        reg.save(&names, s).await.unwrap();
        drop(reg);
        let (_, loaded) = DeviceRegistry::open_beside(&queue).unwrap();
        assert_eq!(loaded, names);
        assert_eq!(loaded.tb_name("A"), "B");
        assert!(loaded.is_deleted("C"));
    }
}
