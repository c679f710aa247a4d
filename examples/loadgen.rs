//! Paced MQTT load generator for `../shared/bench` (`--loadgen`), a compiled stand-in for its
//! Python `lib/loadgen.py`, which tops out near 10,000 msg/s on 2 cores.
//!
//! Same topic (`sensors/<deviceName>/telemetry`), same JSON keys, `seq` from 0 per device,
//! `sent_us` = wall-clock µs at send, absolute schedule (no drift; a late sender catches up and
//! reports its lateness), and one JSON object on stdout with the harness's fields.
//!
//! `cargo build --release --example loadgen` →
//! `target/release/examples/loadgen --port P -D 100 -R 20000 -T 30 --qos 1 --start-at T --tag x`

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 21884)]
    port: u16,
    #[arg(short = 'D', long = "devices", default_value_t = 10)]
    devices: usize,
    #[arg(short = 'R', long = "rate", default_value_t = 10.0)]
    rate: f64,
    #[arg(short = 'T', long = "duration", default_value_t = 30.0)]
    duration: f64,
    /// Accepted for compatibility; one process with one connection per `--conns`.
    #[arg(short = 'P', long = "procs", default_value_t = 0)]
    procs: usize,
    #[arg(long, default_value_t = 1)]
    qos: u8,
    #[arg(long, default_value_t = 1000)]
    inflight: u16,
    #[arg(long, default_value = "meter")]
    prefix: String,
    #[arg(long, default_value = "x")]
    tag: String,
    /// Unix time (s) to start; 0 = now + 0.5 s.
    #[arg(long = "start-at", default_value_t = 0.0)]
    start_at: f64,
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// CPU seconds used by this process (utime + stime from /proc, 100 ticks/s).
fn cpu_s() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ut: f64 = f.get(11)?.parse().ok()?;
            let st: f64 = f.get(12)?.parse().ok()?;
            Some((ut + st) / 100.0)
        })
        .unwrap_or(0.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = Args::parse();
    let qos = match a.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let mut opts = MqttOptions::new(format!("bench-lg-{}-rs", a.tag), &a.host, a.port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_clean_session(true);
    opts.set_inflight(a.inflight.max(1));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 10_000);

    let (conn_tx, conn_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let (acks_tx, mut acks_rx) = tokio::sync::watch::channel(0u64);
    tokio::spawn(async move {
        let mut conn_tx = Some(conn_tx);
        let mut acks = 0u64;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    if let Some(tx) = conn_tx.take() {
                        let _ = tx.send(Ok(()));
                    }
                }
                Ok(Event::Incoming(Incoming::PubAck(_) | Incoming::PubComp(_))) => {
                    acks += 1;
                    let _ = acks_tx.send(acks);
                }
                Ok(_) => {}
                Err(e) => {
                    if let Some(tx) = conn_tx.take() {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(10), conn_rx).await {
        Ok(Ok(Ok(()))) => {}
        other => {
            let why = match other {
                Ok(Ok(Err(e))) => e,
                _ => format!("cannot connect to {}:{}", a.host, a.port),
            };
            println!("{}", serde_json::json!({ "error": [why] }));
            std::process::exit(1);
        }
    }

    let n = a.devices.max(1);
    let names: Vec<String> = (0..n).map(|d| format!("{}-{:04}", a.prefix, d)).collect();
    let topics: Vec<String> = names
        .iter()
        .map(|d| format!("sensors/{d}/telemetry"))
        .collect();
    let mut seq = vec![0u64; n];
    let t0_us = if a.start_at > 0.0 {
        (a.start_at * 1e6) as i64
    } else {
        now_us() + 500_000
    };
    let period_us = 1e6 / a.rate.max(0.001);
    let end_us = t0_us + (a.duration * 1e6) as i64;
    let (mut late_n, mut late_max) = (0u64, 0f64);
    let mut first_send: Option<i64> = None;
    let mut i: u64 = 0;
    loop {
        let target = t0_us + (i as f64 * period_us) as i64;
        if target >= end_us {
            break;
        }
        let now = now_us();
        if target > now {
            tokio::time::sleep(Duration::from_micros((target - now) as u64)).await;
        } else {
            let late = (now - target) as f64 / 1e6;
            if late > 0.002 {
                late_n += 1;
                late_max = late_max.max(late);
            }
        }
        let d = (i % n as u64) as usize;
        let s = seq[d];
        let sent_us = now_us();
        first_send.get_or_insert(sent_us);
        let payload = format!(
            "{{\"deviceName\":\"{}\",\"ts\":{},\"voltage_l1\":{:.1},\"current_l1\":{:.1},\"frequency\":{:.1},\"active_power\":{:.1},\"active_energy\":{:.1},\"seq\":{},\"sent_us\":{}}}",
            names[d],
            sent_us / 1000,
            229.8 + (s % 10) as f64 * 0.1,
            4.2 + (s % 7) as f64 * 0.1,
            60.0,
            950.1 + (s % 13) as f64,
            123456.0 + s as f64 * 0.5,
            s,
            sent_us
        );
        if client
            .publish(topics[d].as_str(), qos, false, payload)
            .await
            .is_err()
        {
            break;
        }
        seq[d] = s + 1;
        i += 1;
    }
    let last_send = now_us();
    let mut unacked = false;
    if qos != QoS::AtMostOnce {
        let want = i;
        unacked = tokio::time::timeout(
            Duration::from_secs(60),
            acks_rx.wait_for(|&acked| acked >= want),
        )
        .await
        .map(|r| r.is_err())
        .unwrap_or(true);
    }
    let _ = client.disconnect().await;
    let first = first_send.unwrap_or(last_send);
    let sent: BTreeMap<&str, u64> = names
        .iter()
        .map(String::as_str)
        .zip(seq.iter().copied())
        .collect();
    let out = serde_json::json!({
        "t0": t0_us as f64 / 1e6,
        "procs": 1,
        "sent_total": i,
        "sent_per_device": sent,
        "first_send_us": first,
        "last_send_us": last_send,
        "achieved_rate": i as f64 / (((last_send - first) as f64 / 1e6).max(1e-9)),
        "late_count": late_n,
        "late_max_s": late_max,
        "unacked": unacked,
        "cpu_s": cpu_s(),
    });
    let _ = a.procs;
    println!("{out}");
}
