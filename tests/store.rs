//! Store integration tests on real SQLite files in temporary directories.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dlms_bridge::config::{OnFull, StoreConfig};
use dlms_bridge::model::{Record, RecordKind};
use dlms_bridge::store::{self, Error, StoreHandle};
use rand::distr::Alphanumeric;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map};

/// Upper bound for any single wait; a hang fails the test instead of blocking CI.
const WAIT: Duration = Duration::from_secs(30);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .expect("store call did not finish in time")
}

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        // A subdirectory that does not exist yet: open must create it.
        path: dir.join("state").join("queue.db"),
        max_bytes: 1 << 30,
        max_age: Duration::from_secs(3600),
        on_full: OnFull::DropOldest,
        // The shipped default: every test runs with group commits on an interval.
        commit_interval: dlms_bridge::config::DEFAULT_COMMIT_INTERVAL,
    }
}

fn record(i: u64) -> Record {
    let mut values = Map::new();
    values.insert("seq".into(), json!(i));
    values.insert("voltage_l1".into(), json!(230.1));
    Record::telemetry(
        format!("Meter {}", i % 3),
        "DLMS Energy Meter",
        1_700_000_000_000 + i as i64,
        values,
    )
}

/// A record of roughly `size` bytes of payload. Random text (seeded by `i`): the store
/// compresses its rows, and a repeated character would take no room at all.
fn big_record(i: u64, size: usize) -> Record {
    let blob: String = StdRng::seed_from_u64(i)
        .sample_iter(&Alphanumeric)
        .take(size)
        .map(char::from)
        .collect();
    let mut values = Map::new();
    values.insert("seq".into(), json!(i));
    values.insert("blob".into(), json!(blob));
    Record::telemetry("Meter", "DLMS Energy Meter", i as i64, values)
}

fn seq_of(r: &Record) -> u64 {
    r.payload["values"]["seq"]
        .as_u64()
        .expect("test records carry values.seq")
}

async fn drain_all(store: &StoreHandle) -> Vec<dlms_bridge::model::StoredRecord> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let batch = within(store.next_batch(after, 500))
            .await
            .expect("next_batch");
        match batch.last() {
            Some(last) => after = last.id,
            None => return out,
        }
        out.extend(batch);
    }
}

/// A clock the test moves by hand.
fn manual_clock(start_ms: i64) -> (Arc<AtomicI64>, store::Clock) {
    let now = Arc::new(AtomicI64::new(start_ms));
    let c = Arc::clone(&now);
    (now, Arc::new(move || c.load(Ordering::SeqCst)))
}

#[tokio::test]
async fn enqueue_then_next_batch_returns_records_in_order_with_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store::open(&config(dir.path())).expect("open");
    let records: Vec<Record> = (0..10).map(record).collect();
    let mut attrs = Map::new();
    attrs.insert("firmware".into(), json!("1.2.3"));
    let attr = Record::attributes("Meter 9", "DLMS Energy Meter", attrs);

    within(store.enqueue(records[..4].to_vec()))
        .await
        .expect("enqueue");
    within(store.enqueue(vec![attr.clone()]))
        .await
        .expect("enqueue");
    within(store.enqueue(records[4..].to_vec()))
        .await
        .expect("enqueue");

    let got = within(store.next_batch(0, 100)).await.expect("next_batch");
    let mut expected = records[..4].to_vec();
    expected.push(attr);
    expected.extend_from_slice(&records[4..]);
    assert_eq!(
        got.iter().map(|s| s.record.clone()).collect::<Vec<_>>(),
        expected,
        "same records, same order"
    );
    assert!(
        got.windows(2).all(|w| w[0].id < w[1].id),
        "ids strictly increase"
    );
    assert_eq!(got[4].record.kind, RecordKind::Attributes);

    // max_records is honoured.
    let two = within(store.next_batch(0, 2)).await.expect("next_batch");
    assert_eq!(two.len(), 2);
    assert_eq!(two[0].id, got[0].id);
    assert!(within(store.next_batch(0, 0))
        .await
        .expect("next_batch")
        .is_empty());
    within(store.close()).await.expect("close");
}

#[tokio::test]
async fn ack_deletes_rows_and_the_after_id_cursor_skips_seen_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store::open(&config(dir.path())).expect("open");
    within(store.enqueue((0..6).map(record).collect()))
        .await
        .expect("enqueue");

    let first = within(store.next_batch(0, 3)).await.expect("next_batch");
    assert_eq!(
        first.iter().map(|s| seq_of(&s.record)).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    // The cursor moves on without an ack (in-flight rows are not handed out twice).
    let second = within(store.next_batch(first[2].id, 10))
        .await
        .expect("next_batch");
    assert_eq!(
        second.iter().map(|s| seq_of(&s.record)).collect::<Vec<_>>(),
        [3, 4, 5]
    );

    // Ack out of order, and an id that does not exist.
    within(store.ack(vec![second[0].id, first[1].id, 999_999]))
        .await
        .expect("ack");
    let left = within(store.next_batch(0, 10)).await.expect("next_batch");
    assert_eq!(
        left.iter().map(|s| seq_of(&s.record)).collect::<Vec<_>>(),
        [0, 2, 4, 5]
    );
    let stats = within(store.stats()).await.expect("stats");
    assert_eq!(stats.depth, 4);
    assert_eq!(stats.enqueued, 6);

    within(store.ack(left.iter().map(|s| s.id).collect()))
        .await
        .expect("ack");
    assert!(within(store.next_batch(0, 10))
        .await
        .expect("next_batch")
        .is_empty());
    assert_eq!(within(store.stats()).await.expect("stats").depth, 0);
    within(store.close()).await.expect("close");
}

#[tokio::test]
async fn ids_are_never_reused_after_everything_is_acked_and_reopened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let store = store::open(&cfg).expect("open");
    within(store.enqueue((0..5).map(record).collect()))
        .await
        .expect("enqueue");
    let rows = within(store.next_batch(0, 10)).await.expect("next_batch");
    let max_before = rows.last().expect("rows").id;
    within(store.ack(rows.iter().map(|s| s.id).collect()))
        .await
        .expect("ack");
    within(store.close()).await.expect("close");

    let store = store::open(&cfg).expect("reopen");
    assert_eq!(
        *store.subscribe().borrow(),
        max_before,
        "highest id survives"
    );
    within(store.enqueue(vec![record(100)]))
        .await
        .expect("enqueue");
    let rows = within(store.next_batch(0, 10)).await.expect("next_batch");
    assert_eq!(rows.len(), 1);
    assert!(rows[0].id > max_before, "a new id, never a reused one");
    within(store.close()).await.expect("close");
}

#[tokio::test]
async fn rows_survive_close_without_ack_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let store = store::open(&cfg).expect("open");
    let records: Vec<Record> = (0..20).map(record).collect();
    within(store.enqueue(records.clone()))
        .await
        .expect("enqueue");
    // Handed out but never acked, as when ThingsBoard never PUBACKed.
    let sent = within(store.next_batch(0, 5)).await.expect("next_batch");
    assert_eq!(sent.len(), 5);
    within(store.close()).await.expect("close");
    assert!(
        !sidecar(&cfg.path, "-wal").exists()
            || std::fs::metadata(sidecar(&cfg.path, "-wal"))
                .expect("wal metadata")
                .len()
                == 0,
        "close checkpoints and truncates the WAL"
    );

    let store = store::open(&cfg).expect("reopen");
    let got = drain_all(&store).await;
    assert_eq!(
        got.into_iter().map(|s| s.record).collect::<Vec<_>>(),
        records
    );
    assert_eq!(within(store.stats()).await.expect("stats").depth, 20);
    within(store.close()).await.expect("close");
}

#[tokio::test]
async fn rows_survive_the_handle_being_dropped_without_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let store = store::open(&cfg).expect("open");
    let records: Vec<Record> = (0..50).map(record).collect();
    within(store.enqueue(records.clone()))
        .await
        .expect("enqueue");
    let mut committed = store.subscribe();
    drop(store);
    // The worker stops once every handle is gone; the watch closes with it.
    within(async { while committed.changed().await.is_ok() {} }).await;

    let store = store::open(&cfg).expect("reopen");
    let got = drain_all(&store).await;
    assert_eq!(
        got.into_iter().map(|s| s.record).collect::<Vec<_>>(),
        records
    );
    within(store.close()).await.expect("close");
}

#[tokio::test]
async fn committed_rows_are_in_the_files_on_disk_while_the_store_runs() {
    // A crash image: copy the database and its WAL as they are on disk right after enqueue
    // returned Ok, with no checkpoint and no close, and open the copy.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let store = store::open(&cfg).expect("open");
    let records: Vec<Record> = (0..30).map(record).collect();
    within(store.enqueue(records.clone()))
        .await
        .expect("enqueue");

    let crash_dir = dir.path().join("crash");
    std::fs::create_dir_all(&crash_dir).expect("mkdir");
    let copy = crash_dir.join("queue.db");
    std::fs::copy(&cfg.path, &copy).expect("copy db");
    if sidecar(&cfg.path, "-wal").exists() {
        std::fs::copy(sidecar(&cfg.path, "-wal"), sidecar(&copy, "-wal")).expect("copy wal");
    }

    let crashed = store::open(&StoreConfig {
        path: copy,
        ..cfg.clone()
    })
    .expect("open the crash image");
    let got = drain_all(&crashed).await;
    assert_eq!(
        got.into_iter().map(|s| s.record).collect::<Vec<_>>(),
        records
    );
    within(crashed.close()).await.expect("close");
    within(store.close()).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueuers_all_get_ok_and_every_record_is_stored_once() {
    const TASKS: u64 = 16;
    const CALLS: u64 = 40;
    const PER_CALL: u64 = 3;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store::open(&config(dir.path())).expect("open");
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for c in 0..CALLS {
                let base = (t * CALLS + c) * PER_CALL;
                let batch = (base..base + PER_CALL).map(record).collect();
                store.enqueue(batch).await.expect("every enqueue succeeds");
            }
        }));
    }
    for task in tasks {
        within(task).await.expect("enqueuer task");
    }

    let got = drain_all(&store).await;
    let total = TASKS * CALLS * PER_CALL;
    assert_eq!(got.len() as u64, total);
    let seqs: HashSet<u64> = got.iter().map(|s| seq_of(&s.record)).collect();
    assert_eq!(
        seqs,
        (0..total).collect::<HashSet<_>>(),
        "each record exactly once"
    );
    assert!(got.windows(2).all(|w| w[0].id < w[1].id));
    // A caller's records stay together and in order (one request = one contiguous run).
    for w in got.chunks(PER_CALL as usize) {
        let first = seq_of(&w[0].record);
        assert_eq!(first % PER_CALL, 0);
        for (k, s) in w.iter().enumerate() {
            assert_eq!(seq_of(&s.record), first + k as u64);
        }
    }
    let stats = within(store.stats()).await.expect("stats");
    assert_eq!(stats.enqueued, total);
    assert_eq!(stats.depth, total);
    within(store.close()).await.expect("close");
}

#[tokio::test]
async fn size_cap_drop_oldest_evicts_the_oldest_counts_them_and_keeps_the_file_small() {
    let dir = tempfile::tempdir().expect("tempdir");
    let max_bytes: u64 = 1024 * 1024;
    let cfg = StoreConfig {
        max_bytes,
        ..config(dir.path())
    };
    let store = store::open(&cfg).expect("open");
    // ~5 MB of records into a 1 MiB cap.
    let total: u64 = 5_000;
    for chunk in (0..total).collect::<Vec<_>>().chunks(50) {
        let batch = chunk.iter().map(|&i| big_record(i, 1000)).collect();
        within(store.enqueue(batch))
            .await
            .expect("DropOldest always accepts");
    }
    let stats = within(store.stats()).await.expect("stats");
    assert!(
        stats.dropped_full > 0,
        "oldest rows were evicted: {stats:?}"
    );
    assert_eq!(
        stats.depth + stats.dropped_full,
        total,
        "every record counted: {stats:?}"
    );
    assert_eq!(stats.enqueued, total);

    let kept = drain_all(&store).await;
    assert_eq!(kept.len() as u64, stats.depth);
    let seqs: Vec<u64> = kept.iter().map(|s| seq_of(&s.record)).collect();
    assert_eq!(
        *seqs.last().expect("rows kept"),
        total - 1,
        "the newest is kept"
    );
    assert_eq!(
        seqs[0], stats.dropped_full,
        "exactly the oldest were dropped"
    );
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "no holes");

    within(store.close()).await.expect("close");
    let file = std::fs::metadata(&cfg.path).expect("db metadata").len();
    // One group may overshoot before the check: 50 records of ~1 KB.
    assert!(
        file <= max_bytes + 128 * 1024,
        "database file {file} bytes exceeds the {max_bytes} cap"
    );
}

#[tokio::test]
async fn size_cap_drop_newest_refuses_with_full_and_recovers_after_acks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig {
        max_bytes: 1024 * 1024,
        on_full: OnFull::DropNewest,
        ..config(dir.path())
    };
    let store = store::open(&cfg).expect("open");
    let mut accepted = 0u64;
    let mut refused = 0u64;
    let mut i = 0u64;
    while refused < 3 {
        assert!(i < 100_000, "the store never reported Full");
        let batch: Vec<Record> = (i..i + 10).map(|k| big_record(k, 1000)).collect();
        i += 10;
        match within(store.enqueue(batch)).await {
            Ok(()) => {
                assert_eq!(refused, 0, "once full, stays full until acks");
                accepted += 10;
            }
            Err(Error::Full) => refused += 10,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    let stats = within(store.stats()).await.expect("stats");
    assert_eq!(stats.dropped_full, refused);
    assert_eq!(stats.depth, accepted);
    let kept = drain_all(&store).await;
    assert_eq!(
        kept.iter().map(|s| seq_of(&s.record)).collect::<Vec<_>>(),
        (0..accepted).collect::<Vec<_>>(),
        "the oldest are kept, nothing accepted was lost"
    );

    // The uplink drains: the store must accept again (tb-gateway's memory storage never did).
    within(store.ack(kept.iter().map(|s| s.id).collect()))
        .await
        .expect("ack");
    within(store.enqueue(vec![record(1)]))
        .await
        .expect("accepting again after the queue drained");
    within(store.close()).await.expect("close");
}

#[tokio::test]
async fn max_age_evicts_expired_rows_and_counts_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let max_age_ms = cfg.max_age.as_millis() as i64;
    let t0 = 1_800_000_000_000;
    let (now, clock) = manual_clock(t0);
    let store = store::open_with_clock(&cfg, clock).expect("open");
    within(store.enqueue((0..3).map(record).collect()))
        .await
        .expect("enqueue");
    now.store(t0 + 1000, Ordering::SeqCst);
    within(store.enqueue((3..5).map(record).collect()))
        .await
        .expect("enqueue");
    let stats = within(store.stats()).await.expect("stats");
    assert_eq!(stats.oldest_created_ms, Some(t0));
    assert_eq!(stats.dropped_age, 0);

    // Exactly max_age old is not expired yet.
    now.store(t0 + max_age_ms, Ordering::SeqCst);
    assert_eq!(within(store.stats()).await.expect("stats").dropped_age, 0);

    // The first three are now older than max_age; the worker evicts them on its next turn.
    now.store(t0 + max_age_ms + 1, Ordering::SeqCst);
    within(store.enqueue(vec![record(5)]))
        .await
        .expect("enqueue");
    let stats = within(store.stats()).await.expect("stats");
    assert_eq!(stats.dropped_age, 3, "{stats:?}");
    assert_eq!(stats.depth, 3);
    assert_eq!(stats.oldest_created_ms, Some(t0 + 1000));
    let left = drain_all(&store).await;
    assert_eq!(
        left.iter().map(|s| seq_of(&s.record)).collect::<Vec<_>>(),
        [3, 4, 5]
    );
    within(store.close()).await.expect("close");
}

#[tokio::test]
async fn max_age_eviction_runs_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let max_age_ms = cfg.max_age.as_millis() as i64;
    let t0 = 1_800_000_000_000;
    let (now, clock) = manual_clock(t0);
    let store = store::open_with_clock(&cfg, Arc::clone(&clock)).expect("open");
    within(store.enqueue((0..4).map(record).collect()))
        .await
        .expect("enqueue");
    within(store.close()).await.expect("close");

    // Down for longer than max_age.
    now.store(t0 + max_age_ms + 60_000, Ordering::SeqCst);
    let store = store::open_with_clock(&cfg, clock).expect("reopen");
    let stats = within(store.stats()).await.expect("stats");
    assert_eq!(stats.dropped_age, 4);
    assert_eq!(stats.depth, 0);
    assert_eq!(stats.oldest_created_ms, None);
    assert!(drain_all(&store).await.is_empty());
    within(store.close()).await.expect("close");
}

#[tokio::test]
async fn a_corrupt_file_is_moved_aside_and_a_fresh_queue_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let state = cfg.path.parent().expect("parent").to_path_buf();
    std::fs::create_dir_all(&state).expect("mkdir");
    let garbage: Vec<u8> = (0..16_384u32).map(|i| (i * 7 + 13) as u8).collect();
    std::fs::write(&cfg.path, &garbage).expect("write garbage");
    std::fs::write(sidecar(&cfg.path, "-wal"), b"stale wal").expect("write stale wal");

    let store = store::open(&cfg).expect("open recovers from corruption");
    within(store.enqueue(vec![record(7)]))
        .await
        .expect("enqueue");
    let rows = within(store.next_batch(0, 10)).await.expect("next_batch");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].record, record(7));
    within(store.close()).await.expect("close");

    let aside: Vec<PathBuf> = std::fs::read_dir(&state)
        .expect("read_dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("queue.db.corrupt-") && !n.ends_with("-wal"))
        })
        .collect();
    assert_eq!(aside.len(), 1, "one database moved aside: {aside:?}");
    assert_eq!(
        std::fs::read(&aside[0]).expect("read aside"),
        garbage,
        "kept as it was"
    );
    // SQLite may discard an invalid WAL itself; either way it must not live on beside the new
    // database.
    let wal = std::fs::read(sidecar(&cfg.path, "-wal")).unwrap_or_default();
    assert!(
        !wal.starts_with(b"stale wal"),
        "the stale WAL is not the new database's WAL"
    );
}

#[tokio::test]
async fn subscribe_sees_the_new_highest_id_after_enqueue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store::open(&config(dir.path())).expect("open");
    let mut committed = store.subscribe();
    assert_eq!(*committed.borrow(), 0);

    let waiter = tokio::spawn(async move {
        committed.changed().await.expect("store open");
        *committed.borrow_and_update()
    });
    within(store.enqueue((0..3).map(record).collect()))
        .await
        .expect("enqueue");
    let seen = within(waiter).await.expect("waiter");
    let rows = within(store.next_batch(0, 10)).await.expect("next_batch");
    assert_eq!(seen, rows.last().expect("rows").id, "highest committed id");

    // A new subscriber starts at the current value, without a pending change.
    let mut late = store.subscribe();
    assert_eq!(*late.borrow(), seen);
    assert!(!late.has_changed().expect("store open"));
    within(store.enqueue(vec![record(3)]))
        .await
        .expect("enqueue");
    within(late.changed()).await.expect("changed");
    assert_eq!(*late.borrow(), seen + 1);

    within(store.close()).await.expect("close");
    assert!(
        within(late.changed()).await.is_err(),
        "subscribers learn that the store stopped"
    );
}

#[tokio::test]
async fn calls_after_close_return_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store::open(&config(dir.path())).expect("open");
    let other = store.clone();
    within(store.close()).await.expect("close");
    assert!(matches!(
        within(other.enqueue(vec![record(1)])).await,
        Err(Error::Closed)
    ));
    assert!(matches!(
        within(other.next_batch(0, 1)).await,
        Err(Error::Closed)
    ));
    assert!(matches!(
        within(other.ack(vec![1])).await,
        Err(Error::Closed)
    ));
    assert!(matches!(within(other.stats()).await, Err(Error::Closed)));
    assert!(matches!(within(store.close()).await, Err(Error::Closed)));
}

#[tokio::test]
async fn rows_of_an_unknown_kind_are_skipped_and_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let store = store::open(&cfg).expect("open");
    within(store.enqueue(vec![record(0)]))
        .await
        .expect("enqueue");
    within(store.close()).await.expect("close");
    {
        // Rows in the v2 layout (docs/ARCHITECTURE.md, "Durability and flash wear"): ids 2..=3
        // hold a record of a kind from some future version and one with a damaged payload;
        // id 4 is a row whose body does not inflate at all.
        let conn = rusqlite::Connection::open(&cfg.path).expect("sqlite open");
        let insert = "INSERT INTO queue (id, created_ms, count, acked, body) \
                      VALUES (?1, ?2, ?3, ?4, ?5)";
        let records = json!([
            [99, "Meter", "DLMS Energy Meter", "{}"],
            [1, "Meter", "DLMS Energy Meter", "{not json"]
        ]);
        conn.execute(
            insert,
            rusqlite::params![3i64, now_ms(), 2i64, vec![0u8], v2_body(&records)],
        )
        .expect("insert a row with bad records");
        conn.execute(
            insert,
            rusqlite::params![4i64, now_ms(), 1i64, vec![0u8], vec![1u8, 0xff, 0x00]],
        )
        .expect("insert a damaged row");
    }
    let store = store::open(&cfg).expect("reopen");
    within(store.enqueue(vec![record(1)]))
        .await
        .expect("enqueue");
    assert_eq!(within(store.stats()).await.expect("stats").depth, 5);
    // max_records = 2 still yields two good rows: reading goes past the bad ones.
    let rows = within(store.next_batch(0, 2)).await.expect("next_batch");
    assert_eq!(
        rows.iter().map(|s| seq_of(&s.record)).collect::<Vec<_>>(),
        [0, 1]
    );
    assert_eq!(
        within(store.stats()).await.expect("stats").depth,
        2,
        "bad rows deleted"
    );
    within(store.close()).await.expect("close");
    let rows: Vec<i64> = rusqlite::Connection::open(&cfg.path)
        .expect("sqlite open")
        .prepare("SELECT id FROM queue ORDER BY id")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("row ids");
    assert_eq!(rows, [1, 5], "the rows holding only bad records are gone");
}

/// A v2 row body: format byte 1, then the deflated JSON record list.
fn v2_body(records: &serde_json::Value) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::DeflateEncoder::new(vec![1u8], flate2::Compression::default());
    enc.write_all(records.to_string().as_bytes())
        .expect("deflate");
    enc.finish().expect("deflate")
}

fn now_ms() -> i64 {
    dlms_bridge::model::now_ms()
}

#[tokio::test]
async fn stats_report_depth_oldest_size_and_totals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t0 = 1_800_000_000_000;
    let (_now, clock) = manual_clock(t0);
    let store = store::open_with_clock(&config(dir.path()), clock).expect("open");
    let empty = within(store.stats()).await.expect("stats");
    assert_eq!(empty.depth, 0);
    assert_eq!(empty.oldest_created_ms, None);
    assert!(empty.bytes_on_disk > 0);
    within(store.enqueue((0..7).map(record).collect()))
        .await
        .expect("enqueue");
    let stats = within(store.stats()).await.expect("stats");
    assert_eq!(stats.depth, 7);
    assert_eq!(stats.enqueued, 7);
    assert_eq!(stats.oldest_created_ms, Some(t0));
    assert_eq!((stats.dropped_full, stats.dropped_age), (0, 0));
    within(store.close()).await.expect("close");
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[tokio::test]
async fn free_pages_go_back_to_the_file_system_after_the_queue_drains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let store = store::open(&cfg).expect("open");
    for chunk in (0..3_000u64).collect::<Vec<_>>().chunks(100) {
        let batch = chunk.iter().map(|&i| big_record(i, 1000)).collect();
        within(store.enqueue(batch)).await.expect("enqueue");
    }
    // The uplink delivered everything.
    let rows = drain_all(&store).await;
    within(store.ack(rows.iter().map(|s| s.id).collect()))
        .await
        .expect("ack");
    within(store.close()).await.expect("close");
    let full = std::fs::metadata(&cfg.path).expect("db metadata").len();
    assert!(full > 2_000_000, "the backlog grew the file: {full}");

    // Maintenance runs at open (and every minute): the freed pages are released.
    let store = store::open(&cfg).expect("reopen");
    assert_eq!(within(store.stats()).await.expect("stats").depth, 0);
    within(store.close()).await.expect("close");
    let shrunk = std::fs::metadata(&cfg.path).expect("db metadata").len();
    assert!(
        shrunk < full / 4,
        "file should shrink after the drain: {full} -> {shrunk} bytes"
    );
}

#[tokio::test]
async fn errors_that_are_not_corruption_keep_the_file_where_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");

    // A database from a newer version: refused, never discarded.
    let cfg = config(dir.path());
    let store = store::open(&cfg).expect("open");
    within(store.enqueue(vec![record(1)]))
        .await
        .expect("enqueue");
    within(store.close()).await.expect("close");
    rusqlite::Connection::open(&cfg.path)
        .and_then(|c| c.pragma_update(None, "user_version", 99))
        .expect("bump user_version");
    assert!(matches!(
        store::open(&cfg),
        Err(Error::SchemaTooNew { found: 99, .. })
    ));
    assert!(cfg.path.exists());

    // A path SQLite cannot open (a directory): an error, and nothing renamed.
    let not_a_file = StoreConfig {
        path: dir.path().join("is-a-dir"),
        ..cfg.clone()
    };
    std::fs::create_dir_all(&not_a_file.path).expect("mkdir");
    assert!(matches!(store::open(&not_a_file), Err(Error::Open { .. })));
    assert!(not_a_file.path.is_dir());
    let renamed = std::fs::read_dir(dir.path())
        .expect("read_dir")
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains("corrupt"));
    assert!(!renamed, "nothing was moved aside");
}

/// Copies the database and its WAL as they are on disk now (a power cut), opens the copy and
/// returns the `seq` of every record in it.
async fn crash_image(cfg: &StoreConfig, name: &str) -> Vec<u64> {
    let crash_dir = cfg.path.with_file_name(name);
    std::fs::create_dir_all(&crash_dir).expect("mkdir");
    let copy = crash_dir.join("queue.db");
    std::fs::copy(&cfg.path, &copy).expect("copy db");
    if sidecar(&cfg.path, "-wal").exists() {
        std::fs::copy(sidecar(&cfg.path, "-wal"), sidecar(&copy, "-wal")).expect("copy wal");
    }
    let crashed = store::open(&StoreConfig {
        path: copy,
        ..cfg.clone()
    })
    .expect("open the crash image");
    let got = drain_all(&crashed).await;
    within(crashed.close()).await.expect("close");
    got.iter().map(|s| seq_of(&s.record)).collect()
}

#[tokio::test]
async fn with_a_commit_interval_ok_never_precedes_the_commit() {
    // A window far longer than the test: it only ends early (a group reaching
    // COMMIT_EARLY_BYTES, or close), so "still pending" below is certain, not a race.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig {
        commit_interval: Duration::from_secs(3600),
        ..config(dir.path())
    };
    let store = store::open(&cfg).expect("open");

    // Step 1: an enqueue is sent and waits for its group's commit.
    let mut first = Box::pin(store.enqueue(vec![record(1)]));
    assert!(
        tokio::time::timeout(Duration::ZERO, &mut first)
            .await
            .is_err(),
        "no Ok before the commit"
    );
    // Served during the window, after the enqueue (one FIFO channel): the worker holds it.
    let stats = within(store.stats()).await.expect("stats");
    assert_eq!(stats.depth, 0, "reads see only committed rows");
    assert_eq!(crash_image(&cfg, "crash-1").await, Vec::<u64>::new());

    // Step 2: a large enqueue fills the group: one commit for both, then both Ok.
    let big: Vec<Record> = (2..80).map(|i| big_record(i, 1000)).collect();
    within(store.enqueue(big)).await.expect("big enqueue");
    within(&mut first).await.expect("first enqueue");
    let after_commit = crash_image(&cfg, "crash-2").await;
    assert_eq!(
        after_commit,
        (1..80).collect::<Vec<_>>(),
        "every Ok is on disk"
    );

    // Step 3: an ack waits for a commit too; until then the row is still on disk.
    let rows = drain_all(&store).await;
    let mut ack = Box::pin(store.ack(vec![rows[0].id]));
    assert!(tokio::time::timeout(Duration::ZERO, &mut ack)
        .await
        .is_err());
    within(store.stats()).await.expect("stats");
    assert_eq!(crash_image(&cfg, "crash-3").await, after_commit);

    // Step 4: close ends the window: the ack is committed, then answered.
    let closer = store.clone();
    let close = tokio::spawn(async move { closer.close().await });
    within(&mut ack).await.expect("ack");
    within(close).await.expect("close task").expect("close");
    assert_eq!(
        crash_image(&cfg, "crash-4").await,
        (2..80).collect::<Vec<_>>()
    );
}

/// The uplink need not wait for a commit: `next_batch` hands out the records of the open group
/// at once (their ids are fixed when the worker takes them), `subscribe_ready` tells of them,
/// and a record acked in the group that takes it was delivered before its commit: it is never
/// written. The enqueue's Ok still waits for the commit; a read going back over records
/// handed out but not yet committed waits for it too.
#[tokio::test]
async fn records_are_handed_out_before_their_commit_and_those_acked_first_are_never_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig {
        commit_interval: Duration::from_secs(3600),
        ..config(dir.path())
    };
    let store = store::open(&cfg).expect("open");
    let mut ready = store.subscribe_ready();
    let committed = store.subscribe();

    let mut first = within(store.submit((1..=3).map(record).collect()))
        .await
        .expect("submit");
    within(ready.changed()).await.expect("ready");
    assert_eq!(*ready.borrow_and_update(), 3);
    let batch = within(store.next_batch(0, 10)).await.expect("next_batch");
    assert_eq!(batch.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(
        batch.iter().map(|r| seq_of(&r.record)).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(
        tokio::time::timeout(Duration::ZERO, &mut first)
            .await
            .is_err(),
        "no Ok before the commit"
    );
    assert_eq!(*committed.borrow(), 0, "nothing committed yet");
    assert_eq!(crash_image(&cfg, "crash-1").await, Vec::<u64>::new());

    // Delivered: 1 and 2 acked within their own group. A read going back to the start (as
    // after a reconnect) waits for the commit, then finds record 3 in the database.
    let mut ack = Box::pin(store.ack(vec![1, 2]));
    assert!(tokio::time::timeout(Duration::ZERO, &mut ack)
        .await
        .is_err());
    let reader = store.clone();
    let again = tokio::spawn(async move { reader.next_batch(0, 10).await });
    // Stats is served in order behind both: once it answers, the read waits in the worker.
    within(store.stats()).await.expect("stats");
    assert!(
        !again.is_finished(),
        "the read going back waits for the commit"
    );

    let closer = store.clone();
    let close = tokio::spawn(async move { closer.close().await });
    within(&mut first).await.expect("enqueue committed");
    within(&mut ack).await.expect("ack committed");
    let again = within(again).await.expect("read task").expect("read");
    assert_eq!(again.iter().map(|r| r.id).collect::<Vec<_>>(), [3]);
    within(close).await.expect("close task").expect("close");
    assert_eq!(
        crash_image(&cfg, "crash-2").await,
        vec![3],
        "1 and 2 never written"
    );

    // The ids stay used up; the counts include the records never written.
    let store = store::open(&cfg).expect("reopen");
    let stats = within(store.stats()).await.expect("stats");
    assert_eq!(stats.depth, 1);
    let fourth = within(store.submit(vec![record(4)])).await.expect("submit");
    // Record 3 from the database, then record 4 from memory, in one read.
    let rows = within(store.next_batch(0, 10)).await.expect("next_batch");
    assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), [3, 4]);
    within(store.close()).await.expect("close");
    within(fourth).await.expect("committed at close");
}

#[tokio::test]
async fn without_a_commit_interval_each_group_commits_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig {
        commit_interval: Duration::ZERO,
        ..config(dir.path())
    };
    let store = store::open(&cfg).expect("open");
    within(store.enqueue(vec![record(7)]))
        .await
        .expect("enqueue");
    assert_eq!(crash_image(&cfg, "crash").await, vec![7]);
    within(store.close()).await.expect("close");
}

#[tokio::test]
async fn acks_of_part_of_a_group_are_durable_and_the_row_goes_with_the_last_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig {
        commit_interval: Duration::ZERO,
        ..config(dir.path())
    };
    let store = store::open(&cfg).expect("open");
    // One enqueue, one group: the ten records share one row.
    within(store.enqueue((0..10).map(record).collect()))
        .await
        .expect("enqueue");
    let rows = drain_all(&store).await;
    assert_eq!(rows.len(), 10);
    within(store.ack(vec![rows[2].id, rows[5].id, rows[5].id]))
        .await
        .expect("ack part of the row");
    let left: Vec<u64> = [0, 1, 3, 4, 6, 7, 8, 9].to_vec();
    assert_eq!(crash_image(&cfg, "crash-partial").await, left);
    assert_eq!(within(store.stats()).await.expect("stats").depth, 8);
    // A re-read from the start skips the acked records.
    let again = drain_all(&store).await;
    assert_eq!(
        again.iter().map(|s| seq_of(&s.record)).collect::<Vec<_>>(),
        left
    );
    // Acking the rest (and an id twice, and one that never existed) empties the row.
    let mut rest: Vec<i64> = again.iter().map(|s| s.id).collect();
    rest.extend([rows[2].id, 9_999]);
    within(store.ack(rest)).await.expect("ack the rest");
    assert_eq!(crash_image(&cfg, "crash-all").await, Vec::<u64>::new());
    assert_eq!(within(store.stats()).await.expect("stats").depth, 0);
    within(store.close()).await.expect("close");
    let n: i64 = rusqlite::Connection::open(&cfg.path)
        .expect("sqlite open")
        .query_row("SELECT count(*) FROM queue", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 0, "the row was deleted with its last record");
}

#[tokio::test]
async fn a_v1_queue_is_migrated_with_its_ids_and_its_id_sequence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let t0 = 1_800_000_000_000;
    std::fs::create_dir_all(cfg.path.parent().expect("parent")).expect("mkdir");
    {
        // The schema of the previous version (user_version 1), one row per record.
        let conn = rusqlite::Connection::open(&cfg.path).expect("sqlite open");
        conn.execute_batch(
            "PRAGMA page_size = 1024; PRAGMA auto_vacuum = INCREMENTAL;
             PRAGMA journal_mode = WAL;
             CREATE TABLE queue (
                 id          INTEGER PRIMARY KEY AUTOINCREMENT,
                 created_ms  INTEGER NOT NULL,
                 kind        INTEGER NOT NULL,
                 device      TEXT    NOT NULL,
                 device_type TEXT    NOT NULL,
                 payload     TEXT    NOT NULL
             );
             PRAGMA user_version = 1;",
        )
        .expect("v1 schema");
        let insert = "INSERT INTO queue (created_ms, kind, device, device_type, payload) \
                      VALUES (?1, ?2, ?3, ?4, ?5)";
        // Ids 1..=12 in two group commits; 11 and 12 were acked later, and 3 and 4.
        for i in 0..12u64 {
            let r = record(i);
            let created = if i < 5 { t0 - 2_000 } else { t0 - 1_000 };
            conn.execute(
                insert,
                rusqlite::params![
                    created,
                    r.kind as i64,
                    r.device,
                    r.device_type,
                    r.payload.to_string()
                ],
            )
            .expect("insert v1 row");
        }
        conn.execute("DELETE FROM queue WHERE id IN (3, 4, 11, 12)", [])
            .expect("delete acked v1 rows");
    }

    let (_now, clock) = manual_clock(t0);
    let store = store::open_with_clock(&cfg, clock.clone()).expect("open migrates");
    assert_eq!(
        *store.subscribe().borrow(),
        12,
        "the id sequence is carried over"
    );
    let stats = within(store.stats()).await.expect("stats");
    assert_eq!(stats.depth, 8);
    assert_eq!(stats.oldest_created_ms, Some(t0 - 2_000));
    let rows = drain_all(&store).await;
    assert_eq!(
        rows.iter().map(|s| s.id).collect::<Vec<_>>(),
        [1, 2, 5, 6, 7, 8, 9, 10],
        "every record keeps its id"
    );
    assert_eq!(
        rows.iter().map(|s| s.record.clone()).collect::<Vec<_>>(),
        [0, 1, 4, 5, 6, 7, 8, 9].map(record).to_vec(),
        "and its content"
    );
    within(store.enqueue(vec![record(100)]))
        .await
        .expect("enqueue");
    within(store.ack(vec![1, 2, 5])).await.expect("ack");
    within(store.close()).await.expect("close");

    let version: i64 = rusqlite::Connection::open(&cfg.path)
        .expect("sqlite open")
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("user_version");
    assert_eq!(version, 2);
    let store = store::open_with_clock(&cfg, clock).expect("reopen");
    let rows = drain_all(&store).await;
    assert_eq!(
        rows.iter()
            .map(|s| (s.id, seq_of(&s.record)))
            .collect::<Vec<_>>(),
        [(6, 5), (7, 6), (8, 7), (9, 8), (10, 9), (13, 100)],
        "new ids continue after the highest v1 id, never reusing 11 or 12"
    );
    within(store.close()).await.expect("close");
}
