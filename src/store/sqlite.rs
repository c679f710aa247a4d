//! The only code that touches rusqlite: schema and migrations, the connection pragmas (WAL,
//! `synchronous=FULL`, 1 KiB pages, incremental auto-vacuum), the queue's SQL (group insert + ack, cursor
//! reads, evictions) and the size measurements behind the cap.
//!
//! It runs only on the store worker thread. It must not know about tokio, channels, policies or
//! the clock: the worker decides what to evict and passes times in.

use std::io;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use crate::model::{Record, RecordKind, StoredRecord};

/// A record ready for the worker: the caller serialises the payload, so the single worker
/// thread spends its time in SQLite only.
#[derive(Debug, Clone)]
pub(super) struct EncodedRecord {
    pub kind: u8,
    pub device: String,
    pub device_type: String,
    /// `record.payload` as JSON text.
    pub payload: String,
}

/// Schema migrations, applied in order; `PRAGMA user_version` holds how many have run.
/// Append only: never edit a released entry.
const MIGRATIONS: &[&str] = &[
    // v1: the queue. AUTOINCREMENT so an id is never reused, even after every row was acked,
    // because the uplink keeps an `after_id` cursor.
    "CREATE TABLE queue (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        created_ms  INTEGER NOT NULL,
        kind        INTEGER NOT NULL,
        device      TEXT    NOT NULL,
        device_type TEXT    NOT NULL,
        payload     TEXT    NOT NULL
    );",
];

/// Page size of a new database. Every commit rewrites whole pages (the partly filled last leaf,
/// its parents, the sequence and header pages), so at ~25 records per commit 1 KiB pages write
/// about half the bytes of SQLite's default 4 KiB (docs/ARCHITECTURE.md, "Durability and flash
/// wear"). A database created with another page size keeps it.
const PAGE_SIZE_BYTES: i64 = 1024;

/// After a checkpoint, SQLite truncates the WAL file down to this size, so a burst (one big
/// group or an eviction) does not leave a large `-wal` file behind.
const WAL_SIZE_LIMIT_BYTES: i64 = 16 * 1024 * 1024;

/// Pages released per incremental-vacuum transaction: below the 1000-page auto-checkpoint, so
/// the WAL is checkpointed and reused between chunks instead of growing.
const VACUUM_CHUNK_PAGES: u64 = 512;

/// How long a statement waits for a lock held by another connection (an operator inspecting
/// the file with `sqlite3`) before failing.
const BUSY_TIMEOUT_MS: i64 = 5_000;

/// Rows scanned (and deleted) per statement by the age eviction, so a huge expired backlog is
/// removed in bounded transactions.
const EVICT_CHUNK_ROWS: i64 = 10_000;

const INSERT_SQL: &str =
    "INSERT INTO queue (created_ms, kind, device, device_type, payload) VALUES (?1, ?2, ?3, ?4, ?5)";
const DELETE_ONE_SQL: &str = "DELETE FROM queue WHERE id = ?1";
const READ_SQL: &str = "SELECT id, kind, device, device_type, payload FROM queue \
                        WHERE id > ?1 ORDER BY id LIMIT ?2";

/// Why the database could not be opened.
#[derive(Debug)]
pub(super) enum OpenError {
    /// The file is not a usable SQLite database: it should be moved aside.
    Corrupt(String),
    /// Written by a newer version of the bridge: keep it, an operator must decide.
    SchemaTooNew { found: i64, supported: i64 },
    /// SQLite would not switch to WAL (it reports this journal mode instead), e.g. on a file
    /// system without shared memory support.
    NoWal(String),
    /// Anything else (permissions, I/O, locked): not a reason to discard the file.
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for OpenError {
    fn from(e: rusqlite::Error) -> Self {
        if is_corruption(&e) {
            OpenError::Corrupt(e.to_string())
        } else {
            OpenError::Sqlite(e)
        }
    }
}

/// True when SQLite reports that the file is damaged or not a database at all.
pub(super) fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// What one group transaction did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct GroupOutcome {
    /// Rows inserted.
    pub inserted: u64,
    /// Id of the last row inserted (the highest committed id), when any.
    pub last_id: Option<i64>,
    /// Rows deleted by acks (ids that were not in the queue are not counted).
    pub acked: u64,
}

/// A row that could not be turned back into a [`Record`]; it has been deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BadRow {
    pub id: i64,
    pub reason: String,
}

/// The queue database. Owned by the worker thread.
pub(super) struct Db {
    conn: Connection,
    path: PathBuf,
    /// Page size in bytes, fixed once the database exists.
    page_size: u64,
}

impl Db {
    /// Opens (or creates) the database, sets the pragmas, checks its integrity and applies the
    /// migrations.
    pub fn open(path: &Path) -> Result<Db, OpenError> {
        let conn = Connection::open(path)?;
        // Both must precede the first table: no-ops on an existing database, which keeps the
        // page size it was created with.
        conn.pragma_update(None, "page_size", PAGE_SIZE_BYTES)?;
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(OpenError::NoWal(mode));
        }
        // FULL: in WAL mode NORMAL may lose the last commits on power loss; `enqueue` promises
        // that an Ok survives it.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)?;
        conn.pragma_update(None, "busy_timeout", BUSY_TIMEOUT_MS)?;
        check_integrity(&conn)?;
        migrate(&conn)?;
        let page_size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
        Ok(Db {
            conn,
            path: path.to_path_buf(),
            page_size: u64::try_from(page_size).unwrap_or(4096),
        })
    }

    /// Inserts every enqueued record and deletes every acked id in ONE transaction: one fsync
    /// for everyone waiting.
    pub fn commit_group(
        &mut self,
        created_ms: i64,
        enqueues: &[&[EncodedRecord]],
        acks: &[&[i64]],
    ) -> rusqlite::Result<GroupOutcome> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut out = GroupOutcome::default();
        {
            let mut insert = tx.prepare_cached(INSERT_SQL)?;
            for r in enqueues.iter().flat_map(|batch| batch.iter()) {
                insert.execute(params![
                    created_ms,
                    i64::from(r.kind),
                    r.device,
                    r.device_type,
                    r.payload
                ])?;
                out.inserted += 1;
            }
        }
        if out.inserted > 0 {
            out.last_id = Some(tx.last_insert_rowid());
        }
        {
            let mut delete = tx.prepare_cached(DELETE_ONE_SQL)?;
            for id in acks.iter().flat_map(|ids| ids.iter()) {
                out.acked += delete.execute([id])? as u64;
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Up to `max_records` readable rows with `id > after_id`, oldest first. Rows that cannot be
    /// decoded (unknown kind, bad JSON) are deleted and returned separately; reading goes on
    /// past them so a bad row never hides the good ones behind it.
    pub fn read_batch(
        &mut self,
        after_id: i64,
        max_records: usize,
    ) -> rusqlite::Result<(Vec<StoredRecord>, Vec<BadRow>)> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        let mut cursor = after_id;
        while good.len() < max_records {
            let want = max_records - good.len();
            let mut scanned = 0usize;
            {
                let mut stmt = self.conn.prepare_cached(READ_SQL)?;
                let mut rows =
                    stmt.query(params![cursor, i64::try_from(want).unwrap_or(i64::MAX)])?;
                while let Some(row) = rows.next()? {
                    scanned += 1;
                    let id: i64 = row.get(0)?;
                    cursor = id;
                    match decode_row(row)? {
                        Ok(record) => good.push(StoredRecord { id, record }),
                        Err(reason) => bad.push(BadRow { id, reason }),
                    }
                }
            }
            if scanned < want {
                break;
            }
        }
        if !bad.is_empty() {
            let tx = self.conn.transaction()?;
            {
                let mut delete = tx.prepare_cached(DELETE_ONE_SQL)?;
                for b in &bad {
                    delete.execute([b.id])?;
                }
            }
            tx.commit()?;
        }
        Ok((good, bad))
    }

    /// Deletes the `n` oldest rows; returns how many went.
    pub fn evict_oldest(&mut self, n: u64) -> rusqlite::Result<u64> {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        let deleted = self.conn.execute(
            "DELETE FROM queue WHERE id IN (SELECT id FROM queue ORDER BY id LIMIT ?1)",
            [n],
        )?;
        Ok(deleted as u64)
    }

    /// Deletes the rows at the head of the queue whose `created_ms` is before `cutoff_ms`.
    ///
    /// Walks in id order and stops at the first row that is young enough: the worker stamps
    /// rows with a non-decreasing clock, so id order is age order. No index on `created_ms` is
    /// needed, which keeps inserts cheap.
    pub fn evict_older_than(&mut self, cutoff_ms: i64) -> rusqlite::Result<u64> {
        let mut deleted = 0u64;
        loop {
            let mut last_expired = None;
            let mut scanned = 0i64;
            let mut reached_young = false;
            {
                let mut stmt = self
                    .conn
                    .prepare_cached("SELECT id, created_ms FROM queue ORDER BY id LIMIT ?1")?;
                let mut rows = stmt.query([EVICT_CHUNK_ROWS])?;
                while let Some(row) = rows.next()? {
                    scanned += 1;
                    let (id, created): (i64, i64) = (row.get(0)?, row.get(1)?);
                    if created >= cutoff_ms {
                        reached_young = true;
                        break;
                    }
                    last_expired = Some(id);
                }
            }
            if let Some(last) = last_expired {
                deleted += self
                    .conn
                    .execute("DELETE FROM queue WHERE id <= ?1", [last])?
                    as u64;
            }
            if reached_young || scanned < EVICT_CHUNK_ROWS || last_expired.is_none() {
                return Ok(deleted);
            }
        }
    }

    /// Number of rows (a full scan: call at open only; the worker keeps a counter).
    pub fn count(&self) -> rusqlite::Result<u64> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM queue", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// `created_ms` of the oldest row.
    pub fn oldest_created_ms(&self) -> rusqlite::Result<Option<i64>> {
        self.conn
            .prepare_cached("SELECT created_ms FROM queue ORDER BY id LIMIT 1")?
            .query_row([], |r| r.get(0))
            .optional()
    }

    /// `created_ms` of the newest row.
    pub fn newest_created_ms(&self) -> rusqlite::Result<Option<i64>> {
        self.conn
            .prepare_cached("SELECT created_ms FROM queue ORDER BY id DESC LIMIT 1")?
            .query_row([], |r| r.get(0))
            .optional()
    }

    /// The highest id ever handed out (0 for a new database), acked or not.
    pub fn max_id(&self) -> rusqlite::Result<i64> {
        let seq: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'queue'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(seq.unwrap_or(0))
    }

    /// Bytes held by live pages: `(page_count - freelist_count) * page_size`. Free pages are
    /// reused by new rows, so this, not the file length, says how close the queue is to its cap
    /// (and it falls again as soon as rows are acked).
    pub fn used_bytes(&self) -> rusqlite::Result<u64> {
        let (pages, free) = self.page_counts()?;
        Ok(pages.saturating_sub(free) * self.page_size)
    }

    /// `(page_count, freelist_count)`: read from the header, cheap.
    pub fn page_counts(&self) -> rusqlite::Result<(u64, u64)> {
        let pages: i64 = self
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))?;
        let free: i64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))?;
        Ok((
            u64::try_from(pages).unwrap_or(0),
            u64::try_from(free).unwrap_or(0),
        ))
    }

    /// Returns up to `max_pages` free pages to the file system (needs `auto_vacuum=INCREMENTAL`).
    ///
    /// Works in transactions of at most [`VACUUM_CHUNK_PAGES`] so the WAL, which holds every
    /// moved page until the next checkpoint, stays small.
    pub fn incremental_vacuum(&mut self, max_pages: u64) -> rusqlite::Result<()> {
        let mut left = max_pages;
        while left > 0 {
            let chunk = left.min(VACUUM_CHUNK_PAGES);
            let (_, free_before) = self.page_counts()?;
            if free_before == 0 {
                break;
            }
            // Each step frees one page: step to the end (`execute_batch` steps once only).
            let mut stmt = self
                .conn
                .prepare(&format!("PRAGMA incremental_vacuum({chunk})"))?;
            let mut rows = stmt.query([])?;
            while rows.next()?.is_some() {}
            left -= chunk;
        }
        Ok(())
    }

    /// Copies the WAL into the database and truncates the WAL file. Returns false when a reader
    /// blocked a complete checkpoint.
    pub fn checkpoint_truncate(&mut self) -> rusqlite::Result<bool> {
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
        Ok(busy == 0)
    }

    /// Database plus WAL file length; a file that cannot be stat'ed counts as 0.
    pub fn file_bytes(&self) -> u64 {
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        len(&self.path) + len(&sidecar(&self.path, "-wal"))
    }
}

/// Decodes one `SELECT id, kind, device, device_type, payload` row. The outer error is SQLite's;
/// the inner one says why a row from disk is not a record this version can send.
fn decode_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Record, String>> {
    let kind_raw: i64 = row.get(1)?;
    let device: String = row.get(2)?;
    let device_type: String = row.get(3)?;
    let payload: String = row.get(4)?;
    let Some(kind) = u8::try_from(kind_raw).ok().and_then(RecordKind::from_u8) else {
        return Ok(Err(format!("unknown record kind {kind_raw}")));
    };
    Ok(match serde_json::from_str(&payload) {
        Ok(payload) => Ok(Record {
            device,
            device_type,
            kind,
            payload,
        }),
        Err(e) => Err(format!("payload is not JSON: {e}")),
    })
}

/// `PRAGMA quick_check`: catches a damaged file at open, where it can be moved aside, rather
/// than as a failing read on every uplink retry.
fn check_integrity(conn: &Connection) -> Result<(), OpenError> {
    let mut stmt = conn.prepare("PRAGMA quick_check(1)")?;
    let result: String = stmt.query_row([], |r| r.get(0))?;
    if result.eq_ignore_ascii_case("ok") {
        Ok(())
    } else {
        Err(OpenError::Corrupt(format!("quick_check: {result}")))
    }
}

/// Applies the migrations `user_version` has not seen yet, each in its own transaction.
fn migrate(conn: &Connection) -> Result<(), OpenError> {
    let supported = MIGRATIONS.len() as i64;
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > supported {
        return Err(OpenError::SchemaTooNew { found, supported });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        conn.execute_batch("BEGIN IMMEDIATE;")?;
        let applied = conn
            .execute_batch(sql)
            .and_then(|()| conn.pragma_update(None, "user_version", (i + 1) as i64));
        match applied {
            Ok(()) => conn.execute_batch("COMMIT;")?,
            Err(e) => {
                // Best effort: the original error is the one worth reporting.
                let _ = conn.execute_batch("ROLLBACK;");
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// `queue.db` + `-wal` → `queue.db-wal`: SQLite's names for the files beside a database.
pub(super) fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Where a corrupt `queue.db` goes: `queue.db.corrupt-<unix-ts>` (with `.1`, `.2`, .. if that
/// name is taken).
pub(super) fn aside_path(path: &Path, unix_ts: u64, exists: impl Fn(&Path) -> bool) -> PathBuf {
    let base = sidecar(path, &format!(".corrupt-{unix_ts}"));
    let mut candidate = base.clone();
    let mut n = 0u32;
    while exists(&candidate) {
        n += 1;
        candidate = sidecar(&base, &format!(".{n}"));
    }
    candidate
}

/// Renames the database and its `-wal`/`-shm` files aside (a stale WAL left next to a fresh
/// database would be replayed into it). Returns the new database path.
pub(super) fn move_aside(path: &Path, unix_ts: u64) -> io::Result<PathBuf> {
    let aside = aside_path(path, unix_ts, |p| p.exists());
    std::fs::rename(path, &aside)?;
    for suffix in ["-wal", "-shm"] {
        match std::fs::rename(sidecar(path, suffix), sidecar(&aside, suffix)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_bring_a_new_database_to_the_latest_version_once() {
        let conn = Connection::open_in_memory().expect("in-memory database");
        migrate(&conn).expect("first migration");
        migrate(&conn).expect("second run is a no-op");
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("user_version");
        assert_eq!(v, MIGRATIONS.len() as i64);
    }

    #[test]
    fn a_newer_schema_is_refused_not_discarded() {
        let conn = Connection::open_in_memory().expect("in-memory database");
        conn.pragma_update(None, "user_version", 99)
            .expect("set user_version");
        assert!(matches!(
            migrate(&conn),
            Err(OpenError::SchemaTooNew { found: 99, .. })
        ));
    }

    #[test]
    fn aside_path_appends_timestamp_and_avoids_taken_names() {
        let p = Path::new("/var/lib/dlms-bridge/queue.db");
        assert_eq!(
            aside_path(p, 1700000000, |_| false),
            PathBuf::from("/var/lib/dlms-bridge/queue.db.corrupt-1700000000")
        );
        let taken = PathBuf::from("/var/lib/dlms-bridge/queue.db.corrupt-1700000000");
        assert_eq!(
            aside_path(p, 1700000000, |c| c == taken),
            PathBuf::from("/var/lib/dlms-bridge/queue.db.corrupt-1700000000.1")
        );
        assert_eq!(
            sidecar(p, "-wal"),
            PathBuf::from("/var/lib/dlms-bridge/queue.db-wal")
        );
    }

    #[test]
    fn move_aside_takes_the_wal_and_shm_along() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("queue.db");
        for (p, body) in [
            (db.clone(), "db"),
            (sidecar(&db, "-wal"), "wal"),
            (sidecar(&db, "-shm"), "shm"),
        ] {
            std::fs::write(p, body).expect("write");
        }
        let aside = move_aside(&db, 42).expect("move aside");
        assert_eq!(aside, dir.path().join("queue.db.corrupt-42"));
        assert!(!db.exists() && !sidecar(&db, "-wal").exists() && !sidecar(&db, "-shm").exists());
        assert_eq!(std::fs::read_to_string(&aside).expect("db"), "db");
        assert_eq!(
            std::fs::read_to_string(sidecar(&aside, "-wal")).expect("wal"),
            "wal"
        );
        assert_eq!(
            std::fs::read_to_string(sidecar(&aside, "-shm")).expect("shm"),
            "shm"
        );
    }
}
