//! The only code that touches rusqlite: schema and migrations, the connection pragmas (WAL,
//! `synchronous=FULL`, 1 KiB pages, incremental auto-vacuum), the queue's SQL (group insert + ack,
//! cursor reads, evictions) and the size measurements behind the cap.
//!
//! On-disk layout (schema v2): one row holds the records of one group commit (up to
//! [`MAX_ROW_RECORDS`] of them), compressed: ids `id - count + 1 ..= id` (record ids stay one
//! counter that never goes back; the row id is its last record's), `acked` a bitmap of the records
//! already acknowledged, `body` the records. A row is deleted once every record in it is acked;
//! until then an ack sets bits in `acked`, in the same transaction as the group's inserts. Why:
//! a commit then writes one small compressed row instead of ~25 rows spread over several pages,
//! which is most of the bytes a commit costs the flash (docs/ARCHITECTURE.md, "Durability and
//! flash wear").
//!
//! It runs only on the store worker thread. It must not know about tokio, channels, policies or
//! the clock: the worker decides what to evict and passes times in.

use std::io;
use std::path::{Path, PathBuf};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use rusqlite::types::ValueRef;
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

/// One schema migration.
enum Migration {
    /// SQL run as is.
    Sql(&'static str),
    /// Rust code, for a migration that rewrites rows.
    Code(fn(&Connection) -> rusqlite::Result<()>),
}

/// Schema migrations, applied in order; `PRAGMA user_version` holds how many have run.
/// Append only: never edit a released entry.
const MIGRATIONS: &[Migration] = &[
    // v1: the queue, one row per record. AUTOINCREMENT so an id is never reused, even after
    // every row was acked, because the uplink keeps an `after_id` cursor.
    Migration::Sql(
        "CREATE TABLE queue (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        created_ms  INTEGER NOT NULL,
        kind        INTEGER NOT NULL,
        device      TEXT    NOT NULL,
        device_type TEXT    NOT NULL,
        payload     TEXT    NOT NULL
    );",
    ),
    // v2: one compressed row per group of records (the module docs); v1 rows are carried over
    // with their ids.
    Migration::Code(migrate_v2_grouped_rows),
];

/// The v2 queue table. `id` is the id of the row's last record, `count` how many records the
/// row holds (ids `id - count + 1 ..= id`), `acked` one bit per record (bit `i % 8` of byte
/// `i / 8`, set once acked; fixed length, so setting a bit rewrites only the row's leaf page),
/// `body` the records ([`encode_body`]). AUTOINCREMENT keeps the highest id ever handed out in
/// `sqlite_sequence`, so ids are never reused, even across restarts (devices.rs remembers ids).
const CREATE_V2_SQL: &str = "CREATE TABLE queue (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        created_ms INTEGER NOT NULL,
        count      INTEGER NOT NULL,
        acked      BLOB    NOT NULL,
        body       BLOB    NOT NULL
    );";

/// Most records in one row: a reader wanting a few records decodes the whole row.
const MAX_ROW_RECORDS: usize = 256;

/// Records assumed at most in a row whose `count` says more (it can only be damaged).
const MAX_DAMAGED_ROW_RECORDS: usize = 65_536;

/// A row stops taking records once their text reaches this many bytes (a bigger single record
/// still gets a row of its own).
const MAX_ROW_RAW_BYTES: usize = 64 * 1024;

/// First byte of a row body: the rest is a raw deflate stream of the JSON array
/// `[[kind, device, device_type, payload_json_text], ..]`.
const BODY_DEFLATE_JSON: u8 = 1;

/// Page size of a new database. Every commit rewrites whole pages (the row's leaf page, its
/// parents, the sequence and header pages), so small pages write fewer bytes per commit
/// (docs/ARCHITECTURE.md, "Durability and flash wear"). A database created with another page
/// size keeps it.
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
    "INSERT INTO queue (id, created_ms, count, acked, body) VALUES (?1, ?2, ?3, ?4, ?5)";
/// Makes ?1 the lowest id AUTOINCREMENT may hand out next (ids of records never written).
const BUMP_SEQUENCE_SQL: &str = "INSERT OR REPLACE INTO sqlite_sequence (rowid, name, seq) \
     SELECT (SELECT rowid FROM sqlite_sequence WHERE name = 'queue'), 'queue', \
     max(?1, coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'queue'), 0))";
/// The row holding record id ?1, if it is still there (checked by the caller against `count`).
const FIND_ROW_SQL: &str = "SELECT id, count, acked FROM queue WHERE id >= ?1 ORDER BY id LIMIT 1";
const UPDATE_ACKED_SQL: &str = "UPDATE queue SET acked = ?2 WHERE id = ?1";
const DELETE_ROW_SQL: &str = "DELETE FROM queue WHERE id = ?1";
/// Rows that may hold records with ids above ?1, oldest first.
const READ_SQL: &str = "SELECT id, count, acked, body FROM queue WHERE id > ?1 ORDER BY id";
const OLDEST_ROWS_SQL: &str = "SELECT id, count, acked, created_ms FROM queue ORDER BY id";

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
    /// Records written.
    pub inserted: u64,
    /// Records of the group not written because an ack for them came in the same group (they
    /// were delivered before their commit).
    pub delivered: u64,
    /// Id of the group's last record (the highest committed id), when it had any.
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
    /// The highest record id handed out so far; the next group's records follow it.
    last_id: i64,
    /// Compressor and decompressor of row bodies, reused from row to row.
    codec: Codec,
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
        let last_id = read_max_id(&conn)?;
        Ok(Db {
            conn,
            path: path.to_path_buf(),
            page_size: u64::try_from(page_size).unwrap_or(4096),
            last_id,
            codec: Codec::new(),
        })
    }

    /// The highest record id handed out so far; the next group's records follow it.
    pub fn last_id(&self) -> i64 {
        self.last_id
    }

    /// Never hands out ids up to `id` (the ids of a group whose commit failed: the uplink may
    /// have seen them).
    pub fn skip_ids_to(&mut self, id: i64) {
        self.last_id = self.last_id.max(id);
    }

    /// Inserts every enqueued record and applies every acked id in ONE transaction: one fsync
    /// for everyone waiting. The records go into as few rows as [`MAX_ROW_RECORDS`] and
    /// [`MAX_ROW_RAW_BYTES`] allow, with consecutive ids after the highest one handed out.
    /// A record whose ack is in the same group (ThingsBoard confirmed it before its commit) is
    /// not written at all: its id is used up, its ack has nothing left to do.
    pub fn commit_group(
        &mut self,
        created_ms: i64,
        enqueues: &[&[EncodedRecord]],
        acks: &[&[i64]],
    ) -> rusqlite::Result<GroupOutcome> {
        let total: usize = enqueues.iter().map(|b| b.len()).sum();
        let first_new = self.last_id + 1;
        let last_new = self.last_id + total as i64;
        let mut acked_ids: Vec<i64> = acks.iter().flat_map(|a| a.iter().copied()).collect();
        acked_ids.sort_unstable();
        acked_ids.dedup();
        // Acks of this group's own records: those records are skipped instead.
        let (delivered_ids, old_acks): (Vec<i64>, Vec<i64>) = acked_ids
            .into_iter()
            .partition(|id| (first_new..=last_new).contains(id));
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut last_id = self.last_id;
        let mut inserted = 0u64;
        {
            let mut insert = tx.prepare_cached(INSERT_SQL)?;
            // The current row holds the records after `row_base`, consecutive ids.
            let mut row: Vec<&EncodedRecord> = Vec::new();
            let mut row_base = last_id;
            let mut raw = 0usize;
            let mut delivered = delivered_ids.iter().peekable();
            for r in enqueues.iter().flat_map(|batch| batch.iter()) {
                let id = last_id + 1;
                if delivered.next_if_eq(&&id).is_some() {
                    if !row.is_empty() {
                        insert_row(&mut insert, &mut self.codec, created_ms, row_base, &row)?;
                        inserted += row.len() as u64;
                        row.clear();
                        raw = 0;
                    }
                    last_id = id;
                    row_base = id;
                    continue;
                }
                let size = r.payload.len() + r.device.len() + r.device_type.len();
                if !row.is_empty()
                    && (row.len() >= MAX_ROW_RECORDS || raw + size > MAX_ROW_RAW_BYTES)
                {
                    insert_row(&mut insert, &mut self.codec, created_ms, row_base, &row)?;
                    inserted += row.len() as u64;
                    row.clear();
                    raw = 0;
                    row_base = last_id;
                }
                row.push(r);
                raw += size;
                last_id = id;
            }
            if !row.is_empty() {
                insert_row(&mut insert, &mut self.codec, created_ms, row_base, &row)?;
                inserted += row.len() as u64;
            }
        }
        if total > 0 && delivered_ids.last() == Some(&last_new) {
            // The group's last ids were not written: keep them used up across a restart (the
            // device registry keeps row ids).
            tx.prepare_cached(BUMP_SEQUENCE_SQL)?.execute([last_id])?;
        }
        let acked = apply_acks(&tx, &old_acks)?;
        tx.commit()?;
        self.last_id = last_id;
        Ok(GroupOutcome {
            inserted,
            delivered: delivered_ids.len() as u64,
            last_id: (total > 0).then_some(last_id),
            acked,
        })
    }

    /// Up to `max_records` readable, unacked records with `id > after_id`, oldest first.
    /// Records that cannot be decoded (unknown kind, bad JSON, a damaged row) are marked acked
    /// (their row deleted once nothing else in it is waiting) and returned separately; reading
    /// goes on past them so a bad record never hides the good ones behind it.
    pub fn read_batch(
        &mut self,
        after_id: i64,
        max_records: usize,
    ) -> rusqlite::Result<(Vec<StoredRecord>, Vec<BadRow>)> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        // Rows that gained acked bits (bad records) and must be written back.
        let mut changed = Vec::new();
        if max_records > 0 {
            let mut stmt = self.conn.prepare_cached(READ_SQL)?;
            let mut rows = stmt.query([after_id])?;
            while let Some(row) = rows.next()? {
                let mut meta = RowMeta::from_row(row)?;
                let body = row.get_ref(3)?;
                let full = read_row(
                    &mut self.codec,
                    &mut meta,
                    body.as_blob().unwrap_or(&[]),
                    after_id,
                    max_records,
                    &mut good,
                    &mut bad,
                );
                if meta.dirty {
                    changed.push(meta);
                }
                if full {
                    break;
                }
            }
        }
        if !changed.is_empty() {
            let tx = self.conn.transaction()?;
            for meta in &changed {
                meta.save(&tx)?;
            }
            tx.commit()?;
        }
        Ok((good, bad))
    }

    /// Deletes the oldest rows until at least `n` waiting records went (whole rows: one more
    /// row's worth at most); returns how many waiting records went.
    pub fn evict_oldest(&mut self, n: u64) -> rusqlite::Result<u64> {
        if n == 0 {
            return Ok(0);
        }
        let mut dropped = 0u64;
        let mut last = None;
        {
            let mut stmt = self.conn.prepare_cached(OLDEST_ROWS_SQL)?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let meta = RowMeta::from_row(row)?;
                dropped += meta.unacked();
                last = Some(meta.last_id);
                if dropped >= n {
                    break;
                }
            }
        }
        if let Some(last) = last {
            self.conn
                .execute("DELETE FROM queue WHERE id <= ?1", [last])?;
        }
        Ok(dropped)
    }

    /// Deletes the rows at the head of the queue whose `created_ms` is before `cutoff_ms`;
    /// returns how many waiting records went.
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
                let mut stmt = self.conn.prepare_cached(
                    "SELECT id, count, acked, created_ms FROM queue ORDER BY id LIMIT ?1",
                )?;
                let mut rows = stmt.query([EVICT_CHUNK_ROWS])?;
                while let Some(row) = rows.next()? {
                    scanned += 1;
                    let meta = RowMeta::from_row(row)?;
                    let created: i64 = row.get(3)?;
                    if created >= cutoff_ms {
                        reached_young = true;
                        break;
                    }
                    deleted += meta.unacked();
                    last_expired = Some(meta.last_id);
                }
            }
            if let Some(last) = last_expired {
                self.conn
                    .execute("DELETE FROM queue WHERE id <= ?1", [last])?;
            }
            if reached_young || scanned < EVICT_CHUNK_ROWS || last_expired.is_none() {
                return Ok(deleted);
            }
        }
    }

    /// Number of waiting (unacked) records (a full scan: call at open only; the worker keeps a
    /// counter).
    pub fn count(&self) -> rusqlite::Result<u64> {
        let mut stmt = self.conn.prepare("SELECT id, count, acked FROM queue")?;
        let mut rows = stmt.query([])?;
        let mut n = 0u64;
        while let Some(row) = rows.next()? {
            n += RowMeta::from_row(row)?.unacked();
        }
        Ok(n)
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
        read_max_id(&self.conn)
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

/// One record of a row body as stored: `(kind, device, device_type, payload_json_text)`.
type BodyRecord = (i64, String, String, String);

/// A row's id range and ack bitmap (`SELECT id, count, acked ...`).
#[derive(Debug)]
struct RowMeta {
    /// Id of the row's last record (the rowid).
    last_id: i64,
    /// Records in the row.
    count: usize,
    /// One bit per record, set once acked.
    acked: Vec<u8>,
    /// `acked` changed since it was read.
    dirty: bool,
}

impl RowMeta {
    /// From a row whose first three columns are `id, count, acked`. A damaged `count` or
    /// `acked` reads as an empty row or as nothing acked, never as an error.
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RowMeta> {
        let last_id: i64 = row.get(0)?;
        let count = row
            .get_ref(1)?
            .as_i64()
            .ok()
            .and_then(|c| usize::try_from(c).ok())
            .unwrap_or(0)
            // Only a damaged row holds more than MAX_ROW_RECORDS; bounded so that scanning it
            // cannot take forever.
            .min(MAX_DAMAGED_ROW_RECORDS);
        let acked = row
            .get_ref(2)?
            .as_blob()
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        Ok(RowMeta {
            last_id,
            count,
            acked,
            dirty: false,
        })
    }

    /// Id of the record at `index`.
    fn id_of(&self, index: usize) -> i64 {
        self.first_id() + index as i64
    }

    fn first_id(&self) -> i64 {
        self.last_id - self.count as i64 + 1
    }

    fn is_acked(&self, index: usize) -> bool {
        self.acked
            .get(index / 8)
            .is_some_and(|b| b & (1 << (index % 8)) != 0)
    }

    /// Marks the record at `index` acked; true when it was not yet.
    fn ack(&mut self, index: usize) -> bool {
        if index >= self.count || self.is_acked(index) {
            return false;
        }
        let len = bitmap_len(self.count);
        if self.acked.len() < len {
            self.acked.resize(len, 0);
        }
        self.acked[index / 8] |= 1 << (index % 8);
        self.dirty = true;
        true
    }

    /// Records still waiting for an ack.
    fn unacked(&self) -> u64 {
        (0..self.count).filter(|&i| !self.is_acked(i)).count() as u64
    }

    /// Writes the bitmap back, or deletes the row when nothing in it is waiting any more.
    fn save(&self, conn: &Connection) -> rusqlite::Result<()> {
        if self.unacked() == 0 {
            conn.prepare_cached(DELETE_ROW_SQL)?
                .execute([self.last_id])?;
        } else {
            conn.prepare_cached(UPDATE_ACKED_SQL)?
                .execute(params![self.last_id, self.acked])?;
        }
        Ok(())
    }
}

/// Bytes of an ack bitmap for `count` records.
fn bitmap_len(count: usize) -> usize {
    count.div_ceil(8)
}

/// Inserts `records` as one row with the ids after `last_id`; returns the row's (new last) id.
fn insert_row(
    insert: &mut rusqlite::CachedStatement<'_>,
    codec: &mut Codec,
    created_ms: i64,
    last_id: i64,
    records: &[&EncodedRecord],
) -> rusqlite::Result<i64> {
    let body = codec
        .encode_body(
            records
                .iter()
                .map(|r| (i64::from(r.kind), &r.device, &r.device_type, &r.payload)),
        )
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let id = last_id + records.len() as i64;
    insert.execute(params![
        id,
        created_ms,
        records.len() as i64,
        vec![0u8; bitmap_len(records.len())],
        body
    ])?;
    Ok(id)
}

/// Sets the acked bits of `acks` (deleting rows left with nothing waiting); returns how many
/// records were newly acked. Ids no longer in the queue are ignored.
fn apply_acks(conn: &Connection, ids: &[i64]) -> rusqlite::Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let mut find = conn.prepare_cached(FIND_ROW_SQL)?;
    let mut acked = 0u64;
    let mut i = 0;
    while i < ids.len() {
        let Some(mut meta) = find.query_row([ids[i]], RowMeta::from_row).optional()? else {
            // No row at or above this id: every id left is gone.
            break;
        };
        let first = meta.first_id();
        while i < ids.len() && ids[i] <= meta.last_id {
            if let Ok(index) = usize::try_from(ids[i] - first) {
                acked += u64::from(meta.ack(index));
            }
            i += 1;
        }
        if meta.dirty {
            meta.save(conn)?;
        }
    }
    Ok(acked)
}

/// Reads one row into `good`/`bad` (its records above `after_id` not yet acked), marking bad
/// records acked in `meta`. Returns true once `good` holds `max_records`.
fn read_row(
    codec: &mut Codec,
    meta: &mut RowMeta,
    body: &[u8],
    after_id: i64,
    max_records: usize,
    good: &mut Vec<StoredRecord>,
    bad: &mut Vec<BadRow>,
) -> bool {
    let mut decoded = codec.decode_body(body);
    for index in 0..meta.count {
        let id = meta.id_of(index);
        if id <= after_id || meta.is_acked(index) {
            continue;
        }
        let result = match &mut decoded {
            Err(reason) => Err(reason.clone()),
            Ok(records) => match records.get_mut(index) {
                Some(r) => {
                    decode_record(std::mem::take(r)).map(|(record, text)| (record, Some(text)))
                }
                None => Err(format!("record {index} is missing from its row")),
            },
        };
        match result {
            Ok((record, text)) => {
                good.push(StoredRecord { id, record, text });
                if good.len() >= max_records {
                    return true;
                }
            }
            Err(reason) => {
                meta.ack(index);
                bad.push(BadRow { id, reason });
            }
        }
    }
    false
}

/// Deflate state kept for the life of the database: creating a compressor allocates and clears
/// some 300 KB, which cost more than compressing a row (profile in docs/benchmarks.md).
pub(super) struct Codec {
    deflate: Compress,
    inflate: Decompress,
}

impl Codec {
    fn new() -> Codec {
        Codec {
            // Fast level: the bytes saved by a slower one are small next to a commit's page
            // overhead. Raw deflate: the row has its own format byte.
            deflate: Compress::new(Compression::fast(), false),
            inflate: Decompress::new(false),
        }
    }

    /// A row body: [`BODY_DEFLATE_JSON`], then the records as a deflated JSON array.
    fn encode_body<'a>(
        &mut self,
        records: impl Iterator<Item = (i64, &'a String, &'a String, &'a String)>,
    ) -> io::Result<Vec<u8>> {
        let json = serde_json::to_vec(&records.collect::<Vec<_>>())?;
        let mut body = Vec::with_capacity(json.len() / 2 + 64);
        body.push(BODY_DEFLATE_JSON);
        self.deflate.reset();
        loop {
            let done = usize::try_from(self.deflate.total_in()).unwrap_or(usize::MAX);
            let input = json.get(done..).unwrap_or(&[]);
            let status = self
                .deflate
                .compress_vec(input, &mut body, FlushCompress::Finish)
                .map_err(io::Error::other)?;
            if status == Status::StreamEnd {
                return Ok(body);
            }
            // Out of room for the end of the stream.
            body.reserve(body.capacity().max(1024));
        }
    }

    /// The records of a row body; the error says why a body from disk is not readable.
    fn decode_body(&mut self, body: &[u8]) -> Result<Vec<BodyRecord>, String> {
        let deflated = match body.split_first() {
            Some((&BODY_DEFLATE_JSON, deflated)) => deflated,
            Some((format, _)) => return Err(format!("unknown row body format {format}")),
            None => return Err("empty row body".into()),
        };
        let mut json = Vec::with_capacity(deflated.len() * 4 + 64);
        self.inflate.reset(false);
        loop {
            let (in_before, out_before) = (self.inflate.total_in(), self.inflate.total_out());
            let input = usize::try_from(in_before)
                .ok()
                .and_then(|done| deflated.get(done..))
                .unwrap_or(&[]);
            let status = self
                .inflate
                .decompress_vec(input, &mut json, FlushDecompress::None)
                .map_err(|e| format!("row body does not inflate: {e}"))?;
            if status == Status::StreamEnd {
                break;
            }
            if json.len() == json.capacity() {
                json.reserve(json.capacity().max(1024));
            } else if (self.inflate.total_in(), self.inflate.total_out()) == (in_before, out_before)
            {
                return Err("row body is truncated".into());
            }
        }
        serde_json::from_slice(&json).map_err(|e| format!("row body is not a record list: {e}"))
    }
}

/// One stored record back to a [`Record`]; the error says why this version cannot send it.
fn decode_record(
    (kind_raw, device, device_type, payload): BodyRecord,
) -> Result<(Record, String), String> {
    let Some(kind) = u8::try_from(kind_raw).ok().and_then(RecordKind::from_u8) else {
        return Err(format!("unknown record kind {kind_raw}"));
    };
    match serde_json::from_str(&payload) {
        Ok(value) => Ok((
            Record {
                device,
                device_type,
                kind,
                payload: value,
            },
            payload,
        )),
        Err(e) => Err(format!("payload is not JSON: {e}")),
    }
}

/// The highest record id ever handed out: AUTOINCREMENT's sequence (it survives the rows).
fn read_max_id(conn: &Connection) -> rusqlite::Result<i64> {
    let seq: Option<i64> = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'queue'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let max_row: Option<i64> = conn.query_row("SELECT max(id) FROM queue", [], |r| r.get(0))?;
    Ok(seq.unwrap_or(0).max(max_row.unwrap_or(0)))
}

/// v1 → v2: the per-record rows become grouped rows with the same ids (runs of consecutive
/// ids with the same `created_ms`, as one group commit wrote them), and the id sequence is
/// carried over, so no id is ever handed out twice. Runs in the migration's transaction: a
/// crash leaves the v1 table as it was.
fn migrate_v2_grouped_rows(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "ALTER TABLE queue RENAME TO queue_v1;
         {CREATE_V2_SQL}
         INSERT INTO sqlite_sequence (name, seq)
             SELECT 'queue', seq FROM sqlite_sequence WHERE name = 'queue_v1';"
    ))?;
    {
        let mut select = conn.prepare(
            "SELECT id, created_ms, kind, device, device_type, payload FROM queue_v1 ORDER BY id",
        )?;
        let mut insert = conn.prepare_cached(INSERT_SQL)?;
        let mut codec = Codec::new();
        let mut rows = select.query([])?;
        // The run being gathered: its last id, created_ms, records and their text size.
        let mut run: Vec<BodyRecord> = Vec::new();
        let mut run_last = 0i64;
        let mut run_created = 0i64;
        let mut run_raw = 0usize;
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let created_ms = row.get_ref(1)?.as_i64().unwrap_or(0);
            // Old rows are carried over as they are: a damaged one is reported when read.
            let record: BodyRecord = (
                row.get_ref(2)?.as_i64().unwrap_or(-1),
                lossy_text(row.get_ref(3)?),
                lossy_text(row.get_ref(4)?),
                lossy_text(row.get_ref(5)?),
            );
            let size = record.1.len() + record.2.len() + record.3.len();
            let continues = id == run_last + 1
                && created_ms == run_created
                && run.len() < MAX_ROW_RECORDS
                && run_raw + size <= MAX_ROW_RAW_BYTES;
            if !run.is_empty() && !continues {
                insert_body(&mut insert, &mut codec, run_last, run_created, &run)?;
                run.clear();
                run_raw = 0;
            }
            run_last = id;
            run_created = created_ms;
            run_raw += size;
            run.push(record);
        }
        if !run.is_empty() {
            insert_body(&mut insert, &mut codec, run_last, run_created, &run)?;
        }
    }
    conn.execute_batch("DROP TABLE queue_v1;")
}

/// Inserts v1 `records` as one row whose last id is `last_id`.
fn insert_body(
    insert: &mut rusqlite::CachedStatement<'_>,
    codec: &mut Codec,
    last_id: i64,
    created_ms: i64,
    records: &[BodyRecord],
) -> rusqlite::Result<()> {
    let body = codec
        .encode_body(records.iter().map(|(k, d, t, p)| (*k, d, t, p)))
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    insert.execute(params![
        last_id,
        created_ms,
        records.len() as i64,
        vec![0u8; bitmap_len(records.len())],
        body
    ])?;
    Ok(())
}

/// A v1 text column as text, whatever SQLite holds in it.
fn lossy_text(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Text(t) | ValueRef::Blob(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Null => String::new(),
    }
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
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        conn.execute_batch("BEGIN IMMEDIATE;")?;
        let applied = match migration {
            Migration::Sql(sql) => conn.execute_batch(sql),
            Migration::Code(run) => run(conn),
        }
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

    fn encoded(i: usize, payload_len: usize) -> EncodedRecord {
        EncodedRecord {
            kind: RecordKind::Telemetry as u8,
            device: format!("Meter {}", i % 7),
            device_type: "DLMS Energy Meter".into(),
            payload: format!("{{\"seq\":{i},\"pad\":\"{}\"}}", "p".repeat(payload_len)),
        }
    }

    fn row_counts(db: &Db) -> Vec<(i64, i64)> {
        db.conn
            .prepare("SELECT id, count FROM queue ORDER BY id")
            .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            .expect("rows")
    }

    #[test]
    fn a_group_is_split_into_rows_by_record_count_and_size_with_consecutive_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut db = Db::open(&dir.path().join("q.db")).expect("open");
        let small: Vec<EncodedRecord> = (0..600).map(|i| encoded(i, 10)).collect();
        let out = db.commit_group(1, &[&small[..]], &[]).expect("commit");
        assert_eq!((out.inserted, out.last_id), (600, Some(600)));
        assert_eq!(row_counts(&db), [(256, 256), (512, 256), (600, 88)]);
        // Records of ~30 KiB: two per row at most (64 KiB of text), one bigger than that alone.
        let big = [
            encoded(600, 30_000),
            encoded(601, 30_000),
            encoded(602, 30_000),
        ];
        let huge = [encoded(603, 100_000)];
        let out = db
            .commit_group(2, &[&big[..], &huge[..]], &[])
            .expect("commit");
        assert_eq!((out.inserted, out.last_id), (4, Some(604)));
        assert_eq!(row_counts(&db)[3..], [(602, 2), (603, 1), (604, 1)]);
        let (rows, bad) = db.read_batch(0, 1000).expect("read");
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(
            rows.iter().map(|r| r.id).collect::<Vec<_>>(),
            (1..=604).collect::<Vec<_>>()
        );
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(r.record.payload["seq"], serde_json::json!(i), "row content");
        }
        // A read from the middle of a row starts at the next id.
        let (rows, _) = db.read_batch(300, 2).expect("read");
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), [301, 302]);
        assert_eq!(db.count().expect("count"), 604);
    }

    /// Records acked in the group that takes them (delivered before their commit) are never
    /// written; the others keep their ids, in rows of consecutive ids around the gaps.
    #[test]
    fn records_acked_in_their_own_group_are_not_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut db = Db::open(&dir.path().join("q.db")).expect("open");
        let first: Vec<EncodedRecord> = (0..3).map(|i| encoded(i, 10)).collect();
        db.commit_group(1, &[&first[..]], &[]).expect("commit");
        let group: Vec<EncodedRecord> = (3..10).map(|i| encoded(i, 10)).collect();
        // Ids 4..=10 are this group's; 4, 5 and 8 were delivered already, 2 is an older row.
        let out = db
            .commit_group(2, &[&group[..]], &[&[8, 4, 2], &[5]])
            .expect("commit");
        assert_eq!(out.inserted, 4, "6, 7, 9, 10 written");
        assert_eq!(out.delivered, 3);
        assert_eq!(out.acked, 1, "the older record 2");
        assert_eq!(out.last_id, Some(10));
        assert_eq!(row_counts(&db), [(3, 3), (7, 2), (10, 2)]);
        let (rows, bad) = db.read_batch(0, 100).expect("read");
        assert!(bad.is_empty(), "{bad:?}");
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        assert_eq!(ids, [1, 3, 6, 7, 9, 10]);
        for r in &rows {
            assert_eq!(
                r.record.payload["seq"],
                serde_json::json!(r.id - 1),
                "row content"
            );
        }
        // A group whose records were all delivered writes no row and still moves the ids on.
        let all = [encoded(10, 10), encoded(11, 10)];
        let out = db
            .commit_group(3, &[&all[..]], &[&[11, 12]])
            .expect("commit");
        assert_eq!((out.inserted, out.delivered), (0, 2));
        assert_eq!(db.last_id(), 12);
        assert_eq!(row_counts(&db).len(), 3);
        // Those ids stay used after a restart.
        drop(db);
        let db = Db::open(&dir.path().join("q.db")).expect("reopen");
        assert_eq!(db.last_id(), 12);
    }

    #[test]
    fn a_truncated_or_foreign_body_is_an_error_not_a_hang() {
        let mut codec = Codec::new();
        let records: Vec<EncodedRecord> = (0..50).map(|i| encoded(i, 100)).collect();
        let body = codec
            .encode_body(
                records
                    .iter()
                    .map(|r| (i64::from(r.kind), &r.device, &r.device_type, &r.payload)),
            )
            .expect("encode");
        assert_eq!(codec.decode_body(&body).expect("decode").len(), 50);
        assert!(codec.decode_body(&body[..body.len() / 2]).is_err());
        assert!(codec.decode_body(&[2, 1, 2]).is_err(), "unknown format");
        assert!(codec.decode_body(&[]).is_err());
        // Still usable after the errors.
        let again = codec.decode_body(&body).expect("decode");
        assert_eq!(again[49].3, records[49].payload);
    }

    #[test]
    fn evictions_drop_whole_rows_and_count_only_unacked_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut db = Db::open(&dir.path().join("q.db")).expect("open");
        let group: Vec<EncodedRecord> = (0..10).map(|i| encoded(i, 10)).collect();
        db.commit_group(100, &[&group[..]], &[]).expect("commit");
        db.commit_group(200, &[&group[..]], &[]).expect("commit");
        db.commit_group(300, &[&group[..]], &[]).expect("commit");
        let out = db
            .commit_group(300, &[], &[&[1, 2, 3, 3, 42]])
            .expect("ack");
        assert_eq!(out.acked, 3, "duplicates and unknown ids are not counted");
        assert_eq!(db.count().expect("count"), 27);
        // Age: the first row (7 records waiting) is older than 150.
        assert_eq!(db.evict_older_than(150).expect("evict"), 7);
        assert_eq!(db.oldest_created_ms().expect("oldest"), Some(200));
        // Size: asking for 3 records takes the whole next row.
        assert_eq!(db.evict_oldest(3).expect("evict"), 10);
        assert_eq!(row_counts(&db), [(30, 10)]);
        assert_eq!(db.max_id().expect("max id"), 30);
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
