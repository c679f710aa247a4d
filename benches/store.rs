//! Store throughput on this machine's disk (real files, `synchronous=FULL`).
//!
//! `cargo bench --bench store` prints:
//! - enqueue throughput with concurrent enqueuers (records/s; the bar is >= 50,000), for several
//!   concurrency / records-per-call shapes;
//! - a backlog of `STORE_BENCH_BACKLOG` rows (default 1,000,000): fill rate, file size, reopen
//!   time (quick_check + count), and the drain rate through `next_batch` + `ack`.
//!
//! Set `STORE_BENCH_DIR` to measure on another file system (default: the system temp dir).
//!
//! Reading the numbers: every enqueue waits for its group's fsync, so throughput is at most
//! (records pending during one fsync) / (fsync latency), i.e. concurrency x records per call /
//! fsync time. One sequential caller of single records measures the fsync latency itself.

use std::time::{Duration, Instant};

use dlms_bridge::config::{OnFull, StoreConfig};
use dlms_bridge::model::Record;
use dlms_bridge::store::{self, StoreHandle};
use serde_json::{json, Map};

/// A telemetry record shaped like one meter poll: the five default registers.
fn reading(i: u64) -> Record {
    let mut values = Map::new();
    values.insert("voltage_l1".into(), json!(230.0 + (i % 10) as f64 / 10.0));
    values.insert("current_l1".into(), json!(5.25));
    values.insert("frequency".into(), json!(50.01));
    values.insert("active_power".into(), json!(1207.5));
    values.insert("active_energy".into(), json!(123_456.7 + i as f64));
    Record::telemetry(
        format!("Meter {}", i % 16),
        "DLMS Energy Meter",
        1_700_000_000_000 + i as i64,
        values,
    )
}

fn config(dir: &std::path::Path) -> StoreConfig {
    StoreConfig {
        path: dir.join("queue.db"),
        max_bytes: 64 * 1024 * 1024 * 1024,
        max_age: Duration::from_secs(365 * 24 * 3600),
        on_full: OnFull::DropOldest,
        commit_interval: dlms_bridge::config::DEFAULT_COMMIT_INTERVAL,
    }
}

fn tempdir() -> tempfile::TempDir {
    match std::env::var_os("STORE_BENCH_DIR") {
        Some(base) => tempfile::tempdir_in(base),
        None => tempfile::tempdir(),
    }
    .expect("temporary directory for the benchmark")
}

/// `tasks` enqueuers each send `calls` requests of `per_call` records; returns records/s.
async fn concurrent_enqueue(store: &StoreHandle, tasks: u64, calls: u64, per_call: u64) -> f64 {
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            for c in 0..calls {
                let base = (t * calls + c) * per_call;
                let batch = (base..base + per_call).map(reading).collect();
                store.enqueue(batch).await.expect("enqueue");
            }
        }));
    }
    for h in handles {
        h.await.expect("enqueuer task");
    }
    (tasks * calls * per_call) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it, and a
    // benchmark has no place in the test run.
    if !std::env::args().any(|a| a == "--bench") {
        println!("store benchmark: run it with `cargo bench --bench store`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run());
}

async fn run() {
    println!("store bench (synchronous=FULL, WAL, group commit)");
    // Shared machines skew every number here: say how busy this one was.
    println!("load average at start: {}", loadavg());
    println!("-- enqueue throughput, concurrent enqueuers --");
    let shapes: [(u64, u64, u64); 6] = [
        // (tasks, calls per task, records per call)
        (1, 2_000, 1),
        (64, 1_500, 1),
        (256, 400, 1),
        (1_024, 100, 1),
        (16, 1_000, 10),
        (8, 250, 100),
    ];
    for (tasks, calls, per_call) in shapes {
        let dir = tempdir();
        let store = store::open(&config(dir.path())).expect("open");
        let rate = concurrent_enqueue(&store, tasks, calls, per_call).await;
        let stats = store.stats().await.expect("stats");
        store.close().await.expect("close");
        println!(
            "enqueue: {tasks:>5} tasks x {per_call:>3} records/call: {rate:>10.0} records/s ({} records)",
            stats.enqueued
        );
    }

    let backlog: u64 = std::env::var("STORE_BENCH_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    println!("-- backlog of {backlog} rows --");
    let dir = tempdir();
    let cfg = config(dir.path());
    let store = store::open(&cfg).expect("open");
    let per_call = 1_000;
    let tasks = 4;
    let calls = backlog / (tasks * per_call);
    let rate = concurrent_enqueue(&store, tasks, calls, per_call).await;
    println!("fill: {tasks} tasks x {per_call} records/call: {rate:.0} records/s");
    store.close().await.expect("close");

    let start = Instant::now();
    let store = store::open(&cfg).expect("reopen");
    let stats = store.stats().await.expect("stats");
    println!(
        "reopen (quick_check + count): {:.3} s; depth {}; {:.1} MiB on disk ({:.0} bytes/row)",
        start.elapsed().as_secs_f64(),
        stats.depth,
        stats.bytes_on_disk as f64 / (1024.0 * 1024.0),
        stats.bytes_on_disk as f64 / stats.depth.max(1) as f64
    );

    for batch in [100usize, 1_000] {
        if stats.depth == 0 {
            break;
        }
        // Drain half the backlog with each batch size, as the uplink would: read, then ack.
        let target = stats.depth / 2;
        let start = Instant::now();
        let mut drained = 0u64;
        let mut after = 0;
        while drained < target {
            let rows = store.next_batch(after, batch).await.expect("next_batch");
            let Some(last) = rows.last() else { break };
            after = last.id;
            drained += rows.len() as u64;
            store
                .ack(rows.iter().map(|r| r.id).collect())
                .await
                .expect("ack");
        }
        println!(
            "drain: next_batch({batch}) + ack: {:.0} records/s ({drained} records)",
            drained as f64 / start.elapsed().as_secs_f64()
        );
    }
    let stats = store.stats().await.expect("stats");
    println!(
        "after drain: depth {}; {:.1} MiB on disk",
        stats.depth,
        stats.bytes_on_disk as f64 / (1024.0 * 1024.0)
    );
    store.close().await.expect("close");
    // Maintenance at open (then every minute) hands free pages back to the file system.
    let start = Instant::now();
    let store = store::open(&cfg).expect("reopen");
    let stats = store.stats().await.expect("stats");
    println!(
        "reopen after drain (one maintenance pass): {:.3} s; {:.1} MiB on disk",
        start.elapsed().as_secs_f64(),
        stats.bytes_on_disk as f64 / (1024.0 * 1024.0)
    );
    store.close().await.expect("close");
    println!("load average at end: {}", loadavg());
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
