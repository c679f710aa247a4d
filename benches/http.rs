//! The HTTP server's costs (issue #13).
//!
//! `cargo bench --bench http` prints:
//! - idle CPU of the whole bridge (no meters, no traffic) over `HTTP_BENCH_IDLE_SECS` (default
//!   30) with the HTTP server off and on: the server must add nothing measurable;
//! - `/metrics` scrape latency over loopback with 1,000 simulated meters polled every 2 s (the
//!   bar: under 20 ms), after every meter has answered once: min / median / p95 / max of 50
//!   scrapes, and the page size.
//!
//! Process CPU comes from /proc/self/stat (user + system, 10 ms ticks).

use std::time::{Duration, Instant};

use dlms_bridge::app;
use dlms_bridge::config;

fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name "(...)": state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn cfg(dir: &std::path::Path, extra: &str) -> config::Config {
    let toml = format!(
        "[broker]\nlisten = \"127.0.0.1:0\"\n[thingsboard]\nport = 9\nreconnect_max = \"60s\"\n\
         [store]\npath = \"{}/queue.db\"\n[log]\nlevel = \"warn\"\n{extra}",
        dir.display()
    );
    config::validate(config::load_str(&toml).expect("parses")).expect("valid")
}

async fn idle(http: bool, secs: u64) -> u64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = if http {
        "[http]\nlisten = \"127.0.0.1:0\"\n"
    } else {
        "[http]\nenabled = false\n"
    };
    let running = app::start(cfg(dir.path(), extra)).await.expect("starts");
    // Let start-up settle before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t0 = cpu_ticks();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let used = cpu_ticks() - t0;
    running.shutdown().await.expect("shutdown");
    used
}

async fn scrape_1000() {
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = "[http]\nlisten = \"127.0.0.1:0\"\n[simulator]\nmeters = 1000\ninterval = \"2s\"\n";
    let running = app::start(cfg(dir.path(), extra)).await.expect("starts");
    let url = format!("http://{}/metrics", running.http_addr.expect("http"));
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let page = client
            .get(&url)
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        let up = page
            .lines()
            .filter(|l| l.starts_with("dlms_bridge_meter_poll_duration_seconds_count"))
            .count();
        if up >= 1000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {up} meters polled after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..50 {
        let t = Instant::now();
        let body = client
            .get(&url)
            .send()
            .await
            .expect("scrape")
            .bytes()
            .await
            .expect("body");
        times.push(t.elapsed());
        size = body.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "/metrics with 1000 meters: {} bytes, {} lines; min {:.1} ms, median {:.1} ms, p95 {:.1} ms, max {:.1} ms (bar: < 20 ms)",
        size,
        client.get(&url).send().await.expect("scrape").text().await.expect("body").lines().count(),
        ms(times[0]),
        ms(times[times.len() / 2]),
        ms(times[times.len() * 95 / 100]),
        ms(times[times.len() - 1]),
    );
    // The same page without HTTP: the facade part alone (histograms, counters, process).
    let mut facade = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let page = dlms_bridge::http::metrics::render_facade();
        facade.push(t.elapsed());
        std::hint::black_box(page);
    }
    facade.sort();
    println!(
        "  of which the facade part (1000 poll-duration histograms, counters, process): median {:.1} ms",
        ms(facade[facade.len() / 2])
    );
    let mut stats = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        running.store.stats().await.expect("stats");
        stats.push(t.elapsed());
    }
    stats.sort();
    println!(
        "  the queue's stats call (waits behind the store's group commits): median {:.1} ms, max {:.1} ms",
        ms(stats[stats.len() / 2]),
        ms(stats[stats.len() - 1])
    );
    running.shutdown().await.expect("shutdown");
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it.
    if !std::env::args().any(|a| a == "--bench") {
        println!("http benchmark: run it with `cargo bench --bench http`");
        return;
    }
    let secs: u64 = std::env::var("HTTP_BENCH_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let off = idle(false, secs).await;
        let on = idle(true, secs).await;
        println!(
            "idle bridge CPU over {secs} s: {} ms with the HTTP server off, {} ms with it on",
            off * 10,
            on * 10
        );
        scrape_1000().await;
    });
}
