//! The durable store-and-forward queue between the router and the uplink.
//!
//! Its job: make every record durable before anyone treats it as safe (`enqueue` answers `Ok`
//! only once the SQLite transaction holding it is committed with `synchronous=FULL`, so it
//! survives power loss), hand rows to the uplink oldest first behind an `after_id` cursor on ids
//! that strictly increase and are never reused, and delete a row only when the uplink acks it
//! (after ThingsBoard's PUBACK). The disk it may use is capped (`max_bytes`, `max_age`): every
//! record dropped to stay within the caps is counted, and a WARN with the counts goes out at most
//! once a minute.
//!
//! Shape: a clonable async [`StoreHandle`] in front of one dedicated `std::thread` (the worker)
//! that alone owns the rusqlite `Connection` (all SQL is in `sqlite.rs`). The worker commits at
//! most once per `store.commit_interval`: all the enqueues and acks that arrive until one
//! interval after the previous commit go into ONE transaction (group commit), so one fsync
//! serves every caller of that window; then it answers each caller. Reads (`next_batch`, `stats`) are answered at once from what is committed. On
//! flash this is what keeps the fsync rate and the rewritten pages per message low (see
//! docs/ARCHITECTURE.md, "Durability and flash wear").
//!
//! It must not: run SQLite on an async task or any thread but the worker; delete a row that was
//! not acked except through the counted `max_bytes`/`max_age` policy; crash-loop on a corrupt
//! file (the file is moved aside, `queue.db.corrupt-<unix-ts>`, with an ERROR log); know about
//! MQTT or ThingsBoard.
//!
//! Delivery is at least once: a row handed out by `next_batch` stays until acked, and is handed
//! out again after a restart. A cancelled `enqueue` future may still have been committed.
//!
//! Latency and throughput: every `enqueue` waits for its group's commit, up to one
//! `commit_interval` plus the fsync. A group that reaches [`COMMIT_EARLY_BYTES`] commits at once,
//! so a busy caller is not capped at one group per interval. A caller that must not wait for one
//! commit before handing over its next records (the router) uses [`StoreHandle::submit`] and
//! keeps several enqueues in flight; they join the open group as they come. `benches/store.rs`
//! measures the shapes.
//!
//! `max_age` is measured on `created_ms`, the wall clock at commit. Stamps never go backwards,
//! but a clock that jumps forward (a box without RTC syncing NTP after boot) makes older rows
//! look expired.

pub mod devices;
mod sqlite;

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::config::{OnFull, StoreConfig};
use crate::model::{now_ms, Record, StoredRecord};

use self::sqlite::{Db, EncodedRecord, OpenError};

/// Capacity of the request channel from every [`StoreHandle`] to the worker. Callers beyond it
/// wait in `send().await`: that wait is the backpressure on the router when the disk is slow.
pub const REQUEST_CHANNEL_CAPACITY: usize = 1024;

/// A group stops taking pending requests once they write about this many bytes: it bounds one
/// transaction's size, the WAL growth it causes and the wait of the callers in it. At a few ms
/// per fsync this still allows far more than the disk can take. (One `enqueue` call is always
/// one transaction, however large.)
pub const MAX_GROUP_BYTES: usize = 8 * 1024 * 1024;

/// A group holding this many bytes commits at once instead of waiting out `commit_interval`:
/// the fsync is then already shared by enough data, and a longer wait would only cap the
/// throughput of a caller that enqueues one batch at a time (the router). 64 KiB is about 250
/// local messages, 10,000 msg/s at the default 25 ms interval.
pub const COMMIT_EARLY_BYTES: usize = 64 * 1024;

/// The tail of records taken but not yet handed to the uplink (served from memory, see
/// [`StoreHandle::next_batch`]) keeps at most this many records beyond those still uncommitted;
/// older committed ones are read from the database. About half a second at 30,000 msg/s.
pub const TAIL_MAX_RECORDS: usize = 16_384;

/// ... and at most this many encoded bytes.
pub const TAIL_MAX_BYTES: usize = 4 * 1024 * 1024;

/// How often the idle worker runs its maintenance: age eviction, size check, returning free
/// pages to the file system and the drop WARN.
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(60);

/// At most one WARN about dropped records per this interval.
pub const DROP_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// When `DropOldest` evicts for size, it evicts down to this share of `max_bytes` (percent),
/// so the next commits do not each evict a few rows again.
const SIZE_LOW_WATER_PERCENT: u64 = 95;

/// Free pages are returned to the file system once they are at least this share of the file
/// (percent) and at least [`MIN_FREE_PAGES_TO_VACUUM`] pages.
const FREE_PAGES_VACUUM_PERCENT: u64 = 25;

/// Below this many free pages, keep them for reuse rather than shrink the file.
const MIN_FREE_PAGES_TO_VACUUM: u64 = 256;

/// Upper bound of pages released per maintenance pass, so one pass stays short.
const MAX_VACUUM_PAGES_PER_PASS: u64 = 16_384;

/// The wall clock the store stamps `created_ms` with and measures `max_age` against, in ms since
/// the Unix epoch. [`open`] uses [`now_ms`]; tests and simulations pass their own.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory of the database could not be created.
    #[error("cannot create store directory {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// SQLite could not open or prepare the database.
    #[error("cannot open store database {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// SQLite would not use WAL mode for the database.
    #[error("store database {} cannot use WAL (journal mode is {mode})", path.display())]
    NoWal { path: PathBuf, mode: String },
    /// The database was written by a newer version; it is kept for that version.
    #[error(
        "store database {} has schema version {found}, this version supports up to {supported}",
        path.display()
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// A fresh database created after moving a corrupt one aside is corrupt too.
    #[error("store database {} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// A corrupt database could not be renamed aside.
    #[error("cannot move corrupt store database {} aside", path.display())]
    MoveAside {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The worker thread could not be started.
    #[error("cannot start the store worker")]
    Spawn(#[source] std::io::Error),
    /// A record payload could not be serialised.
    #[error("cannot encode record payload")]
    Encode(#[source] serde_json::Error),
    /// A SQLite statement failed (shared by every caller of the failed group).
    #[error("store {op} failed")]
    Sqlite {
        op: &'static str,
        #[source]
        source: Arc<rusqlite::Error>,
    },
    /// `on_full = "drop_newest"` and the store is at `max_bytes`: these records were refused.
    #[error("store is full; records refused")]
    Full,
    /// The store was closed (or its worker stopped).
    #[error("store is closed")]
    Closed,
}

/// A snapshot of the queue, for the health endpoint and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Rows waiting for an ack.
    pub depth: u64,
    /// `created_ms` of the oldest waiting row.
    pub oldest_created_ms: Option<i64>,
    /// Database plus WAL file length.
    pub bytes_on_disk: u64,
    /// Records dropped by the `max_bytes` policy since open (evicted or refused).
    pub dropped_full: u64,
    /// Records deleted unsent by `max_age` since open.
    pub dropped_age: u64,
    /// Records taken since open: committed, or delivered before their commit and so never
    /// written.
    pub enqueued: u64,
}

/// Clonable front of the store worker (a dedicated std::thread owning the rusqlite
/// `Connection`).
#[derive(Clone)]
pub struct StoreHandle {
    /// Requests to the worker; bounded by [`REQUEST_CHANNEL_CAPACITY`], so a slow disk makes
    /// callers wait instead of queueing without limit in memory.
    req_tx: mpsc::Sender<Request>,
    /// Template for [`StoreHandle::subscribe`]. The worker owns the only sender, so subscribers
    /// see the channel close when the worker stops.
    committed_rx: watch::Receiver<i64>,
    /// Template for [`StoreHandle::subscribe_ready`]; like `committed_rx`, owned by the worker.
    ready_rx: watch::Receiver<i64>,
}

/// Opens (or creates) the queue at `cfg.path` and starts its worker.
///
/// Creates the parent directory and runs the schema migrations. A corrupt database is renamed
/// aside (`queue.db.corrupt-<unix-ts>`, with its `-wal`/`-shm`) with an ERROR log and a fresh one
/// is created, so a damaged file never causes a crash loop. Rows older than `max_age` are
/// evicted right after open.
///
/// Blocks the calling thread while the database is opened and checked (`PRAGMA quick_check`
/// reads the whole file): call it at startup, before traffic flows.
pub fn open(cfg: &StoreConfig) -> Result<StoreHandle, Error> {
    open_with_clock(cfg, Arc::new(now_ms))
}

/// [`open`] with the wall clock supplied by the caller.
pub fn open_with_clock(cfg: &StoreConfig, clock: Clock) -> Result<StoreHandle, Error> {
    if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let (req_tx, req_rx) = mpsc::channel(REQUEST_CHANNEL_CAPACITY);
    let (committed_tx, committed_rx) = watch::channel(0);
    let (ready_tx, ready_rx) = watch::channel(0);
    // The worker reports how opening went before it serves anything.
    let (opened_tx, opened_rx) = std::sync::mpsc::sync_channel(1);
    let path = cfg.path.clone();
    let limits = Limits::from_config(cfg);
    let watches = Watches {
        committed: committed_tx,
        ready: ready_tx,
    };
    std::thread::Builder::new()
        .name("store".into())
        .spawn(move || worker_main(path, limits, clock, req_rx, watches, opened_tx))
        .map_err(Error::Spawn)?;
    match opened_rx.recv() {
        Ok(Ok(())) => Ok(StoreHandle {
            req_tx,
            committed_rx,
            ready_rx,
        }),
        Ok(Err(e)) => Err(e),
        // The worker ended without a word; nothing more is known.
        Err(_) => Err(Error::Closed),
    }
}

impl StoreHandle {
    /// Makes `records` durable. Returns `Ok` only once they are committed (fsynced); an `Err`
    /// means none of them was stored. `Error::Full` when `on_full = "drop_newest"` and the store
    /// is at its size cap (counted in `dropped_full`).
    pub async fn enqueue(&self, records: Vec<Record>) -> Result<(), Error> {
        self.submit(records).await?.await
    }

    /// The first half of [`StoreHandle::enqueue`]: hands `records` to the worker (waiting only
    /// while its request channel is full) and returns the commit still to be awaited. A caller
    /// can so keep several enqueues in flight; they are committed in the order submitted, and
    /// each [`PendingEnqueue`] resolves exactly as `enqueue` would have. Dropping it does not
    /// withdraw the records.
    pub async fn submit(&self, records: Vec<Record>) -> Result<PendingEnqueue, Error> {
        // Serialise here, on the caller's task: the worker thread is the bottleneck.
        let texts = records
            .iter()
            .map(|r| serde_json::to_string(&r.payload).map_err(Error::Encode))
            .collect::<Result<Vec<_>, _>>()?;
        self.submit_encoded(records.into_iter().zip(texts).collect())
            .await
    }

    /// [`StoreHandle::submit`] for records the caller has serialised already: each `String`
    /// must be `serde_json::to_string(&record.payload)` (the router has it from sizing the
    /// record, and it is what the database stores and the uplink sends).
    pub async fn submit_encoded(
        &self,
        records: Vec<(Record, String)>,
    ) -> Result<PendingEnqueue, Error> {
        let mut encoded = Vec::with_capacity(records.len());
        let mut originals = Vec::with_capacity(records.len());
        for (record, payload) in records {
            encoded.push(EncodedRecord {
                kind: record.kind as u8,
                payload,
                device: record.device.clone(),
                device_type: record.device_type.clone(),
            });
            originals.push(record);
        }
        let records = originals;
        let (reply_tx, reply_rx) = oneshot::channel();
        self.req_tx
            .send(Request::Enqueue {
                encoded,
                records,
                reply_tx,
            })
            .await
            .map_err(|_| Error::Closed)?;
        Ok(PendingEnqueue(reply_rx))
    }

    /// Up to `max_records` rows with `id > after_id`, oldest first. Rows this version cannot
    /// decode are deleted with a WARN and skipped.
    ///
    /// Records are handed out as soon as the worker has taken them, before their commit (see
    /// "Forwarding before the commit" in the module doc): the newest come from memory, older
    /// ones from the database. A read that needs records already handed out whose commit is
    /// still open waits for that commit.
    pub async fn next_batch(
        &self,
        after_id: i64,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, Error> {
        self.call(|reply_tx| Request::NextBatch {
            after_id,
            max_records,
            reply_tx,
        })
        .await
    }

    /// Deletes delivered rows. Ids no longer in the queue are ignored.
    pub async fn ack(&self, ids: Vec<i64>) -> Result<(), Error> {
        self.call(|reply_tx| Request::Ack { ids, reply_tx }).await
    }

    /// Queue depth, oldest row, size and drop counters.
    pub async fn stats(&self) -> Result<StoreStats, Error> {
        self.call(|reply_tx| Request::Stats { reply_tx }).await
    }

    /// The highest committed id; `changed()` returns an error once the store has stopped.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        let mut rx = self.committed_rx.clone();
        // Only ids committed after this call count as a change.
        rx.borrow_and_update();
        rx
    }

    /// The highest id [`StoreHandle::next_batch`] can hand out: records taken by the worker,
    /// committed or not yet. The uplink awaits `changed()` to learn of new records; it returns
    /// an error once the store has stopped.
    pub fn subscribe_ready(&self) -> watch::Receiver<i64> {
        let mut rx = self.ready_rx.clone();
        rx.borrow_and_update();
        rx
    }

    /// Checkpoints the WAL into the database (`TRUNCATE`) and stops the worker once the
    /// requests already sent are served. Every later call on any clone returns `Error::Closed`.
    pub async fn close(&self) -> Result<(), Error> {
        self.call(|reply_tx| Request::Close { reply_tx }).await
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Request,
    ) -> Result<T, Error> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.req_tx
            .send(make(reply_tx))
            .await
            .map_err(|_| Error::Closed)?;
        reply_rx.await.map_err(|_| Error::Closed)?
    }
}

/// A submitted enqueue whose commit is awaited (see [`StoreHandle::submit`]): resolves `Ok` once
/// the records are committed, `Err` when none of them was stored.
#[derive(Debug)]
#[must_use = "the records are durable only once this resolves Ok"]
pub struct PendingEnqueue(oneshot::Receiver<Result<(), Error>>);

impl Future for PendingEnqueue {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::Closed)))
    }
}

#[cfg(test)]
fn encode(r: &Record) -> Result<EncodedRecord, Error> {
    Ok(EncodedRecord {
        kind: r.kind as u8,
        payload: serde_json::to_string(&r.payload).map_err(Error::Encode)?,
        device: r.device.clone(),
        device_type: r.device_type.clone(),
    })
}

/// The worker's two watch senders (see [`StoreHandle::subscribe`] and
/// [`StoreHandle::subscribe_ready`]).
struct Watches {
    committed: watch::Sender<i64>,
    ready: watch::Sender<i64>,
}

/// A record taken by the worker and not yet handed to the uplink.
struct TailEntry {
    record: StoredRecord,
    /// Its encoded size, for the bound on the tail.
    bytes: usize,
}

/// One request to the worker; every variant carries the oneshot its caller awaits.
enum Request {
    Enqueue {
        /// What goes into the database.
        encoded: Vec<EncodedRecord>,
        /// The same records, for the uplink straight from memory; moved to the worker's tail
        /// when the worker takes the request (then empty).
        records: Vec<Record>,
        reply_tx: oneshot::Sender<Result<(), Error>>,
    },
    NextBatch {
        after_id: i64,
        max_records: usize,
        reply_tx: oneshot::Sender<Result<Vec<StoredRecord>, Error>>,
    },
    Ack {
        ids: Vec<i64>,
        reply_tx: oneshot::Sender<Result<(), Error>>,
    },
    Stats {
        reply_tx: oneshot::Sender<Result<StoreStats, Error>>,
    },
    Close {
        reply_tx: oneshot::Sender<Result<(), Error>>,
    },
}

impl Request {
    /// Enqueues and acks: what a group commit is for.
    fn is_write(&self) -> bool {
        matches!(self, Request::Enqueue { .. } | Request::Ack { .. })
    }

    /// Next-batch and stats: answered from what is committed, never held for a commit.
    fn is_read(&self) -> bool {
        matches!(self, Request::NextBatch { .. } | Request::Stats { .. })
    }

    /// Roughly how many bytes this request writes, to size a group.
    fn write_bytes(&self) -> usize {
        /// Row header, id, created_ms and kind, roughly.
        const ROW_OVERHEAD_BYTES: usize = 24;
        match self {
            Request::Enqueue { encoded, .. } => encoded
                .iter()
                .map(|r| r.payload.len() + r.device.len() + r.device_type.len())
                .sum::<usize>()
                .saturating_add(encoded.len() * ROW_OVERHEAD_BYTES),
            Request::Ack { ids, .. } => ids.len() * ROW_OVERHEAD_BYTES,
            _ => 0,
        }
    }

    /// Answers the request with `Error::Closed`. A caller that went away is no one's concern.
    fn refuse_closed(self) {
        match self {
            Request::Enqueue { reply_tx, .. }
            | Request::Ack { reply_tx, .. }
            | Request::Close { reply_tx } => {
                let _ = reply_tx.send(Err(Error::Closed));
            }
            Request::NextBatch { reply_tx, .. } => {
                let _ = reply_tx.send(Err(Error::Closed));
            }
            Request::Stats { reply_tx } => {
                let _ = reply_tx.send(Err(Error::Closed));
            }
        }
    }
}

/// The caps from [`StoreConfig`], in the units the worker uses.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Cap on the bytes held by live database pages (the WAL comes on top, see `sqlite.rs`).
    max_bytes: u64,
    /// Rows older than this (by `created_ms`) are deleted unsent.
    max_age_ms: i64,
    /// What to drop when at `max_bytes`.
    on_full: OnFull,
    /// Group commit window (`store.commit_interval`), see [`Worker::collect_group`].
    commit_interval: Duration,
}

impl Limits {
    fn from_config(cfg: &StoreConfig) -> Self {
        Limits {
            max_bytes: cfg.max_bytes,
            max_age_ms: i64::try_from(cfg.max_age.as_millis()).unwrap_or(i64::MAX),
            on_full: cfg.on_full,
            commit_interval: cfg.commit_interval,
        }
    }
}

/// How many of the oldest rows to evict so `used` bytes fall to `target`, from the average row
/// size. Rounds up (and adds 1/16) so the loop converges in one or two passes; never more than
/// `depth`, never 0 while over target.
fn rows_to_evict(used: u64, target: u64, depth: u64) -> u64 {
    if used <= target || depth == 0 {
        return 0;
    }
    let per_row = (used / depth).max(1);
    let n = (used - target).div_ceil(per_row);
    (n + n / 16).clamp(1, depth)
}

/// Rate limit for the WARN about dropped records: reports when counts moved, at most once per
/// [`DROP_WARN_INTERVAL`].
#[derive(Debug, Default)]
struct DropWarner {
    last_warn: Option<Instant>,
    reported_full: u64,
    reported_age: u64,
}

impl DropWarner {
    /// `Some((new_full, new_age))` drops since the last report when a WARN is due now.
    fn take(&mut self, now: Instant, dropped_full: u64, dropped_age: u64) -> Option<(u64, u64)> {
        if dropped_full == self.reported_full && dropped_age == self.reported_age {
            return None;
        }
        if let Some(last) = self.last_warn {
            if now.saturating_duration_since(last) < DROP_WARN_INTERVAL {
                return None;
            }
        }
        let delta = (
            dropped_full - self.reported_full,
            dropped_age - self.reported_age,
        );
        self.last_warn = Some(now);
        self.reported_full = dropped_full;
        self.reported_age = dropped_age;
        Some(delta)
    }
}

/// Whether the worker goes on after a group.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// The requests of one group commit being gathered ([`Worker::collect_group`]).
#[derive(Default)]
struct Group {
    requests: Vec<Request>,
    /// Roughly the bytes they write.
    bytes: usize,
    /// Enqueues and acks among them.
    writes: usize,
    /// A close came: the group ends with it.
    closing: bool,
}

impl Group {
    /// No more requests join: a close came, or the group hit its size bounds.
    fn is_full(&self) -> bool {
        self.closing
            || self.requests.len() >= REQUEST_CHANNEL_CAPACITY
            || self.bytes >= MAX_GROUP_BYTES
    }
}

/// The store actor: owns the database and every counter, on its own thread.
struct Worker {
    /// The only connection to the queue database.
    db: Db,
    /// Database path, for logs.
    path: PathBuf,
    /// `max_bytes` / `max_age` / `on_full`, enforced after every commit and every minute.
    limits: Limits,
    /// Stamps `created_ms` and measures `max_age`.
    clock: Clock,
    /// Requests from every [`StoreHandle`] clone.
    req_rx: mpsc::Receiver<Request>,
    /// Highest committed id ([`StoreHandle::subscribe`]) and highest id taken
    /// ([`StoreHandle::subscribe_ready`]).
    watches: Watches,
    /// Records taken and not yet handed out, consecutive ids ending at `assigned_max`: what
    /// `next_batch` serves from memory. Bounded by [`TAIL_MAX_RECORDS`] and
    /// [`TAIL_MAX_BYTES`] by dropping committed entries (they are read from the database).
    tail: VecDeque<TailEntry>,
    /// Sum of the `bytes` of `tail`.
    tail_bytes: usize,
    /// The highest id given to a record taken by the worker.
    assigned_max: i64,
    /// Every id up to this one is committed, or its commit failed (it never will be).
    settled_max: i64,
    /// `next_batch` requests that need records handed out before whose commit is still open;
    /// served after the commit.
    deferred: Vec<Request>,
    /// Rows in the queue; kept here because `count(*)` scans the table.
    depth: u64,
    /// `created_ms` of the oldest row, so the age check after every group costs no query.
    oldest_created_ms: Option<i64>,
    /// Stamps never go backwards, so id order stays age order even if the clock steps back.
    last_created_ms: i64,
    /// Records taken since open (committed or delivered before their commit).
    enqueued: u64,
    /// Records evicted or refused for `max_bytes` since open.
    dropped_full: u64,
    /// Records evicted for `max_age` since open.
    dropped_age: u64,
    /// `DropNewest` only: the last size check found the store at `max_bytes`.
    full: bool,
    /// Rate limit of the WARN about drops.
    drop_warner: DropWarner,
    /// When the last write group closed its window; the next window ends one
    /// `commit_interval` after it (see [`Worker::collect_group`]).
    last_commit_at: Instant,
}

fn worker_main(
    path: PathBuf,
    limits: Limits,
    clock: Clock,
    req_rx: mpsc::Receiver<Request>,
    watches: Watches,
    ready_tx: std::sync::mpsc::SyncSender<Result<(), Error>>,
) {
    // A timer-only runtime so the worker can wait for a request or the next maintenance tick.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready_tx.send(Err(Error::Spawn(e)));
            return;
        }
    };
    let mut worker = match Worker::open(path, limits, clock, req_rx, watches) {
        Ok(w) => w,
        Err(e) => {
            let _ = ready_tx.send(Err(e));
            return;
        }
    };
    if ready_tx.send(Ok(())).is_err() {
        return;
    }
    worker.maintain();
    worker.run(&rt);
}

impl Worker {
    fn open(
        path: PathBuf,
        limits: Limits,
        clock: Clock,
        req_rx: mpsc::Receiver<Request>,
        watches: Watches,
    ) -> Result<Self, Error> {
        let db = open_or_recover(&path)?;
        let sql_err = |source| Error::Open {
            path: path.clone(),
            source,
        };
        let depth = db.count().map_err(sql_err)?;
        let oldest_created_ms = db.oldest_created_ms().map_err(sql_err)?;
        let last_created_ms = db.newest_created_ms().map_err(sql_err)?.unwrap_or(0);
        let max_id = db.max_id().map_err(sql_err)?;
        watches.committed.send_replace(max_id);
        watches.ready.send_replace(max_id);
        let assigned_max = db.last_id();
        info!(path = %path.display(), depth, max_id, "Store opened.");
        Ok(Worker {
            db,
            path,
            limits,
            clock,
            req_rx,
            watches,
            tail: VecDeque::new(),
            tail_bytes: 0,
            assigned_max,
            settled_max: assigned_max,
            deferred: Vec::new(),
            depth,
            oldest_created_ms,
            last_created_ms,
            enqueued: 0,
            dropped_full: 0,
            dropped_age: 0,
            full: false,
            drop_warner: DropWarner::default(),
            last_commit_at: Instant::now(),
        })
    }

    fn run(mut self, rt: &tokio::runtime::Runtime) {
        let mut next_tick = Instant::now() + MAINTENANCE_INTERVAL;
        loop {
            let deadline = tokio::time::Instant::from_std(next_tick);
            // The timer must be created inside the runtime, hence the async block.
            let req_rx = &mut self.req_rx;
            let first =
                rt.block_on(async { tokio::time::timeout_at(deadline, req_rx.recv()).await });
            let first = match first {
                Err(_elapsed) => {
                    self.maintain();
                    next_tick = Instant::now() + MAINTENANCE_INTERVAL;
                    continue;
                }
                Ok(None) => {
                    debug!("Every store handle was dropped; the store worker stops.");
                    return;
                }
                Ok(Some(req)) => req,
            };
            if first.is_read() {
                // Never held for a commit, even when writes are waiting behind it.
                self.serve_read(first);
            } else {
                let group = self.collect_group(rt, first);
                if self.serve_group(group) == Flow::Stop {
                    return;
                }
            }
            if Instant::now() >= next_tick {
                self.maintain();
                next_tick = Instant::now() + MAINTENANCE_INTERVAL;
            }
        }
    }

    /// Gathers one group: every request already waiting and, when it holds a write and
    /// `commit_interval` is set, whatever arrives until one interval after the previous group
    /// (at once when that is already past).
    /// Reads arriving during the window are answered at once (they must not wait for someone
    /// else's fsync). The window closes early on a close request, on the group's size bound,
    /// or once it holds [`COMMIT_EARLY_BYTES`]: under heavy load waiting saves no fsync per
    /// byte and would only cap throughput.
    fn collect_group(&mut self, rt: &tokio::runtime::Runtime, first: Request) -> Vec<Request> {
        // Anchored on the previous commit, not on this request: a caller that sends its next
        // batch as soon as the last one is committed (the router) then waits one interval per
        // cycle, not the interval plus the fsync, and commits stay at most one per interval.
        let window_end = self.last_commit_at + self.limits.commit_interval;
        let mut group = Group::default();
        self.join(&mut group, first);
        // Everything already waiting joins this transaction; reads are answered at once (one
        // held until the commit would stall its caller, the uplink, for a whole interval).
        while !group.is_full() {
            match self.req_rx.try_recv() {
                Ok(req) => self.join(&mut group, req),
                Err(_) => break,
            }
        }
        if group.writes == 0 || self.limits.commit_interval.is_zero() {
            return group.requests;
        }

        let deadline = tokio::time::Instant::from_std(window_end);
        while !group.is_full() && group.bytes < COMMIT_EARLY_BYTES {
            let req_rx = &mut self.req_rx;
            let next =
                rt.block_on(async { tokio::time::timeout_at(deadline, req_rx.recv()).await });
            match next {
                Ok(Some(req)) => self.join(&mut group, req),
                // Window over, or every handle dropped (the next receive notices).
                Err(_) | Ok(None) => break,
            }
        }
        self.last_commit_at = Instant::now();
        group.requests
    }

    /// Adds a request to the open group: a read is answered now, an enqueue is taken (its
    /// records get their ids and become readable) or refused when the store is full under
    /// `drop_newest`.
    fn join(&mut self, group: &mut Group, req: Request) {
        if req.is_read() {
            self.serve_read(req);
            return;
        }
        let Some(req) = self.take(req) else {
            return;
        };
        group.bytes += req.write_bytes();
        group.writes += usize::from(req.is_write());
        group.closing |= matches!(req, Request::Close { .. });
        group.requests.push(req);
    }

    /// Takes an enqueue: gives its records the ids they will be committed with and puts them
    /// on the tail, where `next_batch` finds them before the commit. Returns the request to
    /// commit, or `None` when it was refused (`drop_newest` at `max_bytes`).
    fn take(&mut self, req: Request) -> Option<Request> {
        let Request::Enqueue {
            encoded,
            records,
            reply_tx,
        } = req
        else {
            return Some(req);
        };
        if self.full && self.limits.on_full == OnFull::DropNewest {
            self.dropped_full += encoded.len() as u64;
            let _ = reply_tx.send(Err(Error::Full));
            return None;
        }
        for (record, enc) in records.into_iter().zip(&encoded) {
            self.assigned_max += 1;
            let bytes = enc.payload.len() + enc.device.len() + enc.device_type.len();
            self.tail_bytes += bytes;
            self.tail.push_back(TailEntry {
                record: StoredRecord {
                    id: self.assigned_max,
                    record,
                    text: Some(enc.payload.clone()),
                },
                bytes,
            });
        }
        if !encoded.is_empty() {
            self.watches.ready.send_replace(self.assigned_max);
        }
        Some(Request::Enqueue {
            encoded,
            records: Vec::new(),
            reply_tx,
        })
    }

    /// Writes first (one transaction), then answers, then the reads that waited for it, then a
    /// close if one came. Requests arriving after a close in the same group are refused.
    fn serve_group(&mut self, group: Vec<Request>) -> Flow {
        let mut enqueues = Vec::new();
        let mut acks = Vec::new();
        let mut reads = Vec::new();
        let mut close = None;
        for req in group {
            if close.is_some() {
                req.refuse_closed();
                continue;
            }
            match req {
                Request::Enqueue {
                    encoded, reply_tx, ..
                } => enqueues.push((encoded, reply_tx)),
                Request::Ack { ids, reply_tx } => acks.push((ids, reply_tx)),
                Request::Close { reply_tx } => close = Some(reply_tx),
                read => reads.push(read),
            }
        }
        self.commit_writes(enqueues, acks);
        self.evict_expired();
        self.warn_drops();
        self.trim_tail();
        reads.append(&mut self.deferred);
        for read in reads {
            self.serve_read(read);
        }
        match close {
            None => Flow::Continue,
            Some(reply_tx) => {
                let result = match self.db.checkpoint_truncate() {
                    Ok(true) => Ok(()),
                    Ok(false) => {
                        warn!("WAL checkpoint at close was incomplete; SQLite finishes it at the next open.");
                        Ok(())
                    }
                    Err(e) => Err(Error::Sqlite {
                        op: "checkpoint",
                        source: Arc::new(e),
                    }),
                };
                info!(depth = self.depth, "Store closed.");
                let _ = reply_tx.send(result);
                Flow::Stop
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn commit_writes(
        &mut self,
        enqueues: Vec<(Vec<EncodedRecord>, oneshot::Sender<Result<(), Error>>)>,
        acks: Vec<(Vec<i64>, oneshot::Sender<Result<(), Error>>)>,
    ) {
        if enqueues.is_empty() && acks.is_empty() {
            return;
        }
        let created_ms = (self.clock)().max(self.last_created_ms);
        let enqueue_slices: Vec<&[EncodedRecord]> =
            enqueues.iter().map(|(r, _)| r.as_slice()).collect();
        let ack_slices: Vec<&[i64]> = acks.iter().map(|(ids, _)| ids.as_slice()).collect();
        let result = self
            .db
            .commit_group(created_ms, &enqueue_slices, &ack_slices);
        let replies = enqueues
            .into_iter()
            .map(|(_, tx)| tx)
            .chain(acks.into_iter().map(|(_, tx)| tx));
        match result {
            Ok(out) => {
                debug_assert_eq!(self.db.last_id(), self.assigned_max);
                self.settled_max = self.assigned_max;
                self.depth = (self.depth + out.inserted).saturating_sub(out.acked);
                self.enqueued += out.inserted + out.delivered;
                if let Some(last_id) = out.last_id {
                    self.last_created_ms = created_ms;
                    self.watches.committed.send_replace(last_id);
                }
                for reply_tx in replies {
                    let _ = reply_tx.send(Ok(()));
                }
                if out.acked > 0 || self.oldest_created_ms.is_none() {
                    self.refresh_oldest();
                }
                self.enforce_size_cap();
            }
            Err(e) => {
                error!(error = %e, path = %self.path.display(), "Store commit failed; its callers get the error.");
                // Those records are not stored: out of the tail, and their ids never reused
                // (the uplink may have seen them; acks for them are ignored).
                while self
                    .tail
                    .back()
                    .is_some_and(|t| t.record.id > self.settled_max)
                {
                    if let Some(t) = self.tail.pop_back() {
                        self.tail_bytes -= t.bytes;
                    }
                }
                self.db.skip_ids_to(self.assigned_max);
                self.settled_max = self.assigned_max;
                let e = Arc::new(e);
                for reply_tx in replies {
                    let _ = reply_tx.send(Err(Error::Sqlite {
                        op: "commit",
                        source: Arc::clone(&e),
                    }));
                }
            }
        }
    }

    fn serve_read(&mut self, read: Request) {
        match read {
            Request::NextBatch {
                after_id,
                max_records,
                reply_tx,
            } => match self.next_batch(after_id, max_records) {
                Some(result) => {
                    let _ = reply_tx.send(result);
                }
                None => self.deferred.push(Request::NextBatch {
                    after_id,
                    max_records,
                    reply_tx,
                }),
            },
            Request::Stats { reply_tx } => {
                let _ = reply_tx.send(Ok(StoreStats {
                    depth: self.depth,
                    oldest_created_ms: self.oldest_created_ms,
                    bytes_on_disk: self.db.file_bytes(),
                    dropped_full: self.dropped_full,
                    dropped_age: self.dropped_age,
                    enqueued: self.enqueued,
                }));
            }
            other => other.refuse_closed(),
        }
    }

    /// Up to `max_records` records with `id > after_id`, oldest first: from the tail when the
    /// caller has everything before it (the steady case: no SQL, no decoding), else from the
    /// database and then the tail. `None` when some of the records asked for were handed out
    /// and are not committed yet: the read waits for the open group's commit (a caller going
    /// back, the uplink after a reconnect, would otherwise skip them).
    fn next_batch(
        &mut self,
        after_id: i64,
        max_records: usize,
    ) -> Option<Result<Vec<StoredRecord>, Error>> {
        let mut out = Vec::new();
        let mut after = after_id;
        while out.len() < max_records {
            // The caller has these already.
            while self.tail.front().is_some_and(|t| t.record.id <= after) {
                self.pop_tail();
            }
            let front = self
                .tail
                .front()
                .map_or(self.assigned_max + 1, |t| t.record.id);
            if after + 1 >= front {
                while out.len() < max_records {
                    let Some(t) = self.pop_tail() else { break };
                    out.push(t.record);
                }
                break;
            }
            // Ids after..front are only in the database, or in a commit still open.
            if self.settled_max < front - 1 {
                if out.is_empty() {
                    return None;
                }
                break;
            }
            let want = max_records - out.len();
            let rows = match self.read_db(after, want) {
                Ok(rows) => rows,
                Err(e) => return Some(Err(e)),
            };
            let got = rows.len();
            if let Some(last) = rows.last() {
                after = last.id;
            }
            out.extend(rows);
            if got < want {
                // Nothing more is waiting in the database before the tail.
                after = after.max(front - 1);
            }
        }
        Some(Ok(out))
    }

    fn pop_tail(&mut self) -> Option<TailEntry> {
        let t = self.tail.pop_front()?;
        self.tail_bytes -= t.bytes;
        Some(t)
    }

    /// Keeps the tail within its bounds by dropping its oldest committed entries (an uplink
    /// that does not read, e.g. while ThingsBoard is down, then reads them from the database).
    fn trim_tail(&mut self) {
        while (self.tail.len() > TAIL_MAX_RECORDS || self.tail_bytes > TAIL_MAX_BYTES)
            && self
                .tail
                .front()
                .is_some_and(|t| t.record.id <= self.settled_max)
        {
            self.pop_tail();
        }
    }

    /// After an eviction: the committed records on the tail may be gone from the database, so
    /// they are read from there (or not at all) rather than sent from memory.
    fn drop_committed_tail(&mut self) {
        while self
            .tail
            .front()
            .is_some_and(|t| t.record.id <= self.settled_max)
        {
            self.pop_tail();
        }
    }

    /// Committed records with `id > after_id` from the database.
    fn read_db(&mut self, after_id: i64, max_records: usize) -> Result<Vec<StoredRecord>, Error> {
        match self.db.read_batch(after_id, max_records) {
            Ok((records, bad)) => {
                for b in &bad {
                    warn!(id = b.id, reason = %b.reason, "Skipped and deleted a queued record this version cannot read.");
                }
                if !bad.is_empty() {
                    self.depth = self.depth.saturating_sub(bad.len() as u64);
                    self.refresh_oldest();
                }
                Ok(records)
            }
            Err(e) => {
                warn!(error = %e, "Store read failed.");
                Err(Error::Sqlite {
                    op: "read",
                    source: Arc::new(e),
                })
            }
        }
    }

    /// Periodic housekeeping (at open and every [`MAINTENANCE_INTERVAL`]).
    fn maintain(&mut self) {
        self.evict_expired();
        self.enforce_size_cap();
        self.release_free_pages();
        self.warn_drops();
    }

    /// Deletes rows older than `max_age`. Costs one comparison when nothing expired.
    fn evict_expired(&mut self) {
        let Some(oldest) = self.oldest_created_ms else {
            return;
        };
        let cutoff = (self.clock)().saturating_sub(self.limits.max_age_ms);
        if oldest >= cutoff {
            return;
        }
        match self.db.evict_older_than(cutoff) {
            Ok(deleted) => {
                self.dropped_age += deleted;
                self.depth = self.depth.saturating_sub(deleted);
                if deleted > 0 {
                    self.drop_committed_tail();
                }
            }
            Err(e) => warn!(error = %e, "Store age eviction failed; retrying later."),
        }
        self.refresh_oldest();
    }

    /// Keeps the live pages under `max_bytes`: evicts the oldest rows (`DropOldest`) or marks the
    /// store full so enqueues are refused (`DropNewest`) until acks make room.
    fn enforce_size_cap(&mut self) {
        let mut used = match self.db.used_bytes() {
            Ok(u) => u,
            Err(e) => {
                warn!(error = %e, "Store size check failed.");
                return;
            }
        };
        if used < self.limits.max_bytes {
            if self.full {
                info!(
                    used_bytes = used,
                    "Store has room again; accepting records."
                );
            }
            self.full = false;
            return;
        }
        match self.limits.on_full {
            OnFull::DropNewest => {
                if !self.full {
                    warn!(
                        used_bytes = used,
                        max_bytes = self.limits.max_bytes,
                        "Store is full; refusing new records until the uplink drains it."
                    );
                }
                self.full = true;
            }
            OnFull::DropOldest => {
                let target = self.limits.max_bytes / 100 * SIZE_LOW_WATER_PERCENT;
                while used > target && self.depth > 0 {
                    let n = rows_to_evict(used, target, self.depth);
                    match self.db.evict_oldest(n) {
                        Ok(0) => break,
                        Ok(deleted) => {
                            self.dropped_full += deleted;
                            self.depth = self.depth.saturating_sub(deleted);
                            self.drop_committed_tail();
                        }
                        Err(e) => {
                            error!(error = %e, "Store size eviction failed; the store may exceed max_bytes.");
                            break;
                        }
                    }
                    used = match self.db.used_bytes() {
                        Ok(u) => u,
                        Err(_) => break,
                    };
                }
                self.refresh_oldest();
            }
        }
    }

    /// Gives free pages back to the file system once many accumulated (after an outage
    /// drained), so the file shrinks instead of staying at its high-water mark.
    fn release_free_pages(&mut self) {
        let (pages, free) = match self.db.page_counts() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "Store page count failed.");
                return;
            }
        };
        if free >= MIN_FREE_PAGES_TO_VACUUM && free * 100 >= pages * FREE_PAGES_VACUUM_PERCENT {
            if let Err(e) = self.db.incremental_vacuum(MAX_VACUUM_PAGES_PER_PASS) {
                warn!(error = %e, "Store incremental vacuum failed.");
            }
        }
    }

    fn refresh_oldest(&mut self) {
        match self.db.oldest_created_ms() {
            Ok(oldest) => self.oldest_created_ms = oldest,
            Err(e) => warn!(error = %e, "Store oldest-row query failed."),
        }
    }

    fn warn_drops(&mut self) {
        if let Some((new_full, new_age)) =
            self.drop_warner
                .take(Instant::now(), self.dropped_full, self.dropped_age)
        {
            warn!(
                new_dropped_full = new_full,
                new_dropped_age = new_age,
                dropped_full = self.dropped_full,
                dropped_age = self.dropped_age,
                depth = self.depth,
                on_full = ?self.limits.on_full,
                "Store dropped records to stay within max_bytes/max_age."
            );
        }
    }
}

/// Opens the database; a corrupt one is moved aside (ERROR) and replaced by an empty one.
fn open_or_recover(path: &Path) -> Result<Db, Error> {
    match Db::open(path) {
        Ok(db) => Ok(db),
        Err(OpenError::Corrupt(reason)) => {
            let unix_ts = u64::try_from(now_ms() / 1000).unwrap_or(0);
            let aside = sqlite::move_aside(path, unix_ts).map_err(|source| Error::MoveAside {
                path: path.to_path_buf(),
                source,
            })?;
            error!(
                path = %path.display(),
                moved_to = %aside.display(),
                %reason,
                "Store database is corrupt; moved it aside and started an empty queue. Its unsent records are not delivered."
            );
            Db::open(path).map_err(|e| open_error(path, e))
        }
        Err(e) => Err(open_error(path, e)),
    }
}

fn open_error(path: &Path, e: OpenError) -> Error {
    let path = path.to_path_buf();
    match e {
        OpenError::Corrupt(reason) => Error::Corrupt { path, reason },
        OpenError::SchemaTooNew { found, supported } => Error::SchemaTooNew {
            path,
            found,
            supported,
        },
        OpenError::NoWal(mode) => Error::NoWal { path, mode },
        OpenError::Sqlite(source) => Error::Open { path, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_to_evict_targets_the_excess_by_average_row_size() {
        assert_eq!(rows_to_evict(100, 100, 10), 0);
        assert_eq!(rows_to_evict(100, 90, 0), 0);
        // 1000 bytes in 100 rows = 10 B/row; 100 B over → 10 rows, +1/16 rounds to 10.
        assert_eq!(rows_to_evict(1000, 900, 100), 10);
        // Large excess: 100 rows over → 106 with the margin.
        assert_eq!(rows_to_evict(10_000, 9_000, 1_000), 106);
        // Never more than what is there, never 0 while over.
        assert_eq!(rows_to_evict(1000, 0, 3), 3);
        assert_eq!(rows_to_evict(1_000_000, 999_999, 10), 1);
    }

    #[test]
    fn drop_warner_reports_changes_at_most_once_per_interval() {
        let t0 = Instant::now();
        let mut w = DropWarner::default();
        assert_eq!(w.take(t0, 0, 0), None, "nothing dropped");
        assert_eq!(w.take(t0, 5, 0), Some((5, 0)), "first drop reports at once");
        assert_eq!(w.take(t0 + Duration::from_secs(10), 9, 1), None);
        assert_eq!(
            w.take(t0 + DROP_WARN_INTERVAL, 9, 1),
            Some((4, 1)),
            "deltas since the last report"
        );
        assert_eq!(
            w.take(t0 + DROP_WARN_INTERVAL * 3, 9, 1),
            None,
            "no news, no WARN"
        );
    }

    /// Reads already waiting behind a write when a group starts are answered at once, not
    /// after that group's commit: the uplink's `next_batch` must never wait out an interval, and
    /// it gets the records of the open group before their commit. A read going back over
    /// records handed out but not committed (the uplink after a reconnect) waits for the
    /// commit instead of skipping them. (The channel is filled before the worker starts, so the
    /// order is certain.)
    #[test]
    fn reads_queued_behind_a_write_are_not_held_for_its_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = StoreConfig {
            path: dir.path().join("queue.db"),
            commit_interval: Duration::from_secs(3600),
            ..StoreConfig::default()
        };
        let (req_tx, req_rx) = mpsc::channel(8);
        let (enq_tx, mut enq_rx) = oneshot::channel();
        let (batch_tx, batch_rx) = oneshot::channel();
        let (again_tx, mut again_rx) = oneshot::channel();
        let (stats_tx, stats_rx) = oneshot::channel();
        let (close_tx, close_rx) = oneshot::channel();
        let record = Record {
            device: "Meter A".into(),
            device_type: String::new(),
            kind: crate::model::RecordKind::Telemetry,
            payload: serde_json::json!({"v": 1}),
        };
        let encoded = encode(&record).expect("encode");
        for req in [
            Request::Enqueue {
                encoded: vec![encoded],
                records: vec![record],
                reply_tx: enq_tx,
            },
            Request::NextBatch {
                after_id: 0,
                max_records: 10,
                reply_tx: batch_tx,
            },
            // The same read again, as after a reconnect: record 1 was handed out above.
            Request::NextBatch {
                after_id: 0,
                max_records: 10,
                reply_tx: again_tx,
            },
            Request::Stats { reply_tx: stats_tx },
        ] {
            req_tx.try_send(req).map_err(|_| "full").expect("queued");
        }
        let (committed_tx, _committed_rx) = watch::channel(0);
        let (ready_tx, _ready_rx) = watch::channel(0);
        let (opened_tx, opened_rx) = std::sync::mpsc::sync_channel(1);
        let limits = Limits::from_config(&cfg);
        let path = cfg.path.clone();
        let watches = Watches {
            committed: committed_tx,
            ready: ready_tx,
        };
        let worker = std::thread::spawn(move || {
            worker_main(path, limits, Arc::new(now_ms), req_rx, watches, opened_tx)
        });
        opened_rx
            .recv()
            .expect("worker ready")
            .expect("store opens");

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let within = Duration::from_secs(20);
            let batch = tokio::time::timeout(within, batch_rx).await;
            let batch = batch
                .expect("next_batch answered during the window")
                .expect("reply")
                .expect("next_batch");
            let ids: Vec<i64> = batch.iter().map(|r| r.id).collect();
            assert_eq!(ids, [1], "the open group's record is handed out");
            assert_eq!(batch[0].record.payload, serde_json::json!({"v": 1}));
            let stats = tokio::time::timeout(within, stats_rx).await;
            let stats = stats
                .expect("stats answered during the window")
                .expect("reply");
            assert_eq!(stats.expect("stats").depth, 0, "nothing committed yet");
            assert!(
                enq_rx.try_recv().is_err(),
                "the enqueue still waits for its commit"
            );
            assert!(
                again_rx.try_recv().is_err(),
                "going back over an uncommitted record waits for its commit"
            );
            // Close ends the window: the enqueue is committed, then answered.
            req_tx
                .send(Request::Close { reply_tx: close_tx })
                .await
                .map_err(|_| "closed")
                .expect("close sent");
            tokio::time::timeout(within, enq_rx)
                .await
                .expect("enqueue answered")
                .expect("reply")
                .expect("enqueue committed");
            let again = tokio::time::timeout(within, again_rx)
                .await
                .expect("the read going back is answered after the commit")
                .expect("reply")
                .expect("next_batch");
            let ids: Vec<i64> = again.iter().map(|r| r.id).collect();
            assert_eq!(ids, [1], "read again from the database, not skipped");
            tokio::time::timeout(within, close_rx)
                .await
                .expect("close answered")
                .expect("reply")
                .expect("closed");
        });
        worker.join().expect("worker ends");
    }

    #[test]
    fn limits_convert_max_age_to_ms() {
        let cfg = StoreConfig {
            max_age: Duration::from_secs(90),
            ..StoreConfig::default()
        };
        let l = Limits::from_config(&cfg);
        assert_eq!(l.max_age_ms, 90_000);
        assert_eq!(l.on_full, OnFull::DropOldest);
    }
}
