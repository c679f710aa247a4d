//! Load client for `bench/broker_bench.sh`: measures an MQTT broker on its own (ours or
//! Mosquitto) with raw MQTT 3.1.1 connections (packets from rumqttc's codec, no client library
//! in the hot path).
//!
//! - `throughput`: P publishers send QoS 1 to one QoS 1 subscriber in the same process. At most
//!   `--window` messages are between publish and receipt at any time (end-to-end closed loop,
//!   below the brokers' default 1,000-message client queue, so nothing is dropped by design);
//!   prints msg/s, p50/p99/max latency publish → receipt, and lost messages.
//! - `paced`: the same path at a fixed rate (`--rate` msg/s): latency at a normal load.
//! - `churn`: C tasks loop TCP connect → CONNECT → CONNACK → DISCONNECT → close for `--seconds`;
//!   prints connections per second.
//!
//! One JSON object per run on stdout. `--tls-ca FILE` connects over TLS (the broker's
//! `tls_listen`), trusting the CA in FILE; the certificate must name `--host`.
//! `cargo run --release --example broker_bench -- --port 1884 throughput --messages 200000`

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::{Parser, Subcommand};
use rumqttc::mqttbytes::v4::{self, Packet};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1884)]
    port: u16,
    /// Connect over TLS, trusting the CA certificate(s) in this PEM file.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    Throughput {
        #[arg(long, default_value_t = 200_000)]
        messages: u64,
        #[arg(long, default_value_t = 1)]
        publishers: u64,
        #[arg(long, default_value_t = 500)]
        window: u64,
        #[arg(long, default_value_t = 64)]
        payload: usize,
    },
    Paced {
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 64)]
        payload: usize,
    },
    Churn {
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The reading and writing halves of a plain or TLS connection.
type Rd = Box<dyn AsyncRead + Send + Unpin>;
type Wr = Box<dyn AsyncWrite + Send + Unpin>;

/// Where and how to connect: the broker's address, and the TLS client configuration when the
/// run goes over TLS.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

/// Write and flush (TLS buffers what it encrypts; a no-op for plain TCP).
async fn send(wr: &mut Wr, bytes: &[u8]) -> std::io::Result<()> {
    wr.write_all(bytes).await?;
    wr.flush().await
}

/// A framed MQTT 3.1.1 reader.
struct Reader {
    rd: Rd,
    buf: BytesMut,
}

impl Reader {
    async fn next(&mut self) -> Result<Packet, BoxError> {
        loop {
            match Packet::read(&mut self.buf, usize::MAX) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(e.into()),
            }
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                return Err("connection closed by the broker".into());
            }
        }
    }
}

async fn connect(target: &Target, id: &str) -> Result<(Reader, Wr), BoxError> {
    let s = TcpStream::connect(target.addr).await?;
    s.set_nodelay(true)?;
    let (rd, mut wr): (Rd, Wr) = match &target.tls {
        None => {
            let (rd, wr) = s.into_split();
            (Box::new(rd), Box::new(wr))
        }
        Some((connector, name)) => {
            let (rd, wr) = tokio::io::split(connector.connect(name.clone(), s).await?);
            (Box::new(rd), Box::new(wr))
        }
    };
    let mut c = v4::Connect::new(id);
    c.keep_alive = 60;
    let mut b = BytesMut::new();
    Packet::Connect(c).write(&mut b, usize::MAX)?;
    send(&mut wr, &b).await?;
    let mut r = Reader {
        rd,
        buf: BytesMut::with_capacity(64 * 1024),
    };
    match r.next().await? {
        Packet::ConnAck(a) if a.code == v4::ConnectReturnCode::Success => Ok((r, wr)),
        other => Err(format!("expected CONNACK success, got {other:?}").into()),
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// The subscriber: PUBACKs every message, records latency (µs) from the timestamp in the
/// payload, counts receipts, stops after `expect` messages or `deadline`.
async fn subscribe(
    target: &Target,
    topic: String,
    start: Instant,
) -> Result<(Reader, Wr), BoxError> {
    let (mut r, mut wr) = connect(target, &format!("bench-sub-{}", std::process::id())).await?;
    let mut s = v4::Subscribe::new(topic, QoS::AtLeastOnce);
    s.pkid = 1;
    let mut b = BytesMut::new();
    Packet::Subscribe(s).write(&mut b, usize::MAX)?;
    send(&mut wr, &b).await?;
    loop {
        if let Packet::SubAck(_) = r.next().await? {
            break;
        }
    }
    let _ = start;
    Ok((r, wr))
}

async fn receive(
    mut r: Reader,
    mut wr: Wr,
    expect: u64,
    start: Instant,
    received: Arc<AtomicU64>,
    progress: Arc<Notify>,
    stop: Arc<AtomicBool>,
) -> Result<Vec<u64>, BoxError> {
    let mut lat = Vec::with_capacity(expect as usize);
    let mut out = BytesMut::with_capacity(64 * 1024);
    while (lat.len() as u64) < expect && !stop.load(Ordering::Relaxed) {
        let p = match tokio::time::timeout(Duration::from_secs(5), r.next()).await {
            Ok(p) => p?,
            Err(_) => break, // nothing for 5 s: the rest is lost
        };
        if let Packet::Publish(p) = p {
            let sent = u64::from_be_bytes(p.payload[..8].try_into()?);
            let now = start.elapsed().as_nanos() as u64;
            lat.push(now.saturating_sub(sent));
            if p.qos == QoS::AtLeastOnce {
                Packet::PubAck(v4::PubAck::new(p.pkid)).write(&mut out, usize::MAX)?;
            }
            received.fetch_add(1, Ordering::Release);
            progress.notify_waiters();
            // Flush acks in batches when nothing more is buffered.
            if r.buf.is_empty() || out.len() > 32 * 1024 {
                send(&mut wr, &out).await?;
                out.clear();
            }
        }
    }
    if !out.is_empty() {
        send(&mut wr, &out).await?;
    }
    Ok(lat)
}

/// What the publishers and the subscriber of one run share.
struct Flow {
    start: Instant,
    sent: AtomicU64,
    received: Arc<AtomicU64>,
    window: u64,
    progress: Arc<Notify>,
}

/// One QoS 1 publisher. `gate` decides when the next message may go.
async fn publish(
    target: Target,
    (id, topic): (String, String),
    count: u64,
    payload: usize,
    mut gate: impl FnMut(u64) -> Option<tokio::time::Instant> + Send,
    flow: Arc<Flow>,
) -> Result<(), BoxError> {
    let (start, sent_total, received, window, progress) = (
        flow.start,
        &flow.sent,
        &flow.received,
        flow.window,
        &flow.progress,
    );
    let (mut r, mut wr) = connect(&target, &id).await?;
    // PUBACKs are read (and dropped) by a separate task so the writer never blocks on them.
    let acks = tokio::spawn(async move {
        let mut n = 0u64;
        while n < count {
            match r.next().await {
                Ok(Packet::PubAck(_)) => n += 1,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    let mut body = vec![0u8; payload.max(8)];
    let mut out = BytesMut::with_capacity(64 * 1024);
    for i in 0..count {
        let paced = gate(i);
        if let Some(at) = paced {
            tokio::time::sleep_until(at).await;
        }
        // End-to-end window: wait until the subscriber has caught up.
        loop {
            let notified = progress.notified();
            if sent_total.load(Ordering::Acquire) < received.load(Ordering::Acquire) + window {
                break;
            }
            if !out.is_empty() {
                send(&mut wr, &out).await?;
                out.clear();
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
        let now = start.elapsed().as_nanos() as u64;
        body[..8].copy_from_slice(&now.to_be_bytes());
        let mut p = v4::Publish::new(topic.as_str(), QoS::AtLeastOnce, body.clone());
        p.pkid = (i % 65_535 + 1) as u16;
        Packet::Publish(p).write(&mut out, usize::MAX)?;
        sent_total.fetch_add(1, Ordering::AcqRel);
        // Paced: every message goes out at once (latency); closed loop: in 16 KiB batches.
        if paced.is_some() || out.len() > 16 * 1024 || window <= 1 {
            send(&mut wr, &out).await?;
            out.clear();
        }
    }
    send(&mut wr, &out).await?;
    let _ = tokio::time::timeout(Duration::from_secs(10), acks).await;
    Ok(())
}

async fn run_flow(
    target: &Target,
    messages: u64,
    publishers: u64,
    window: u64,
    payload: usize,
    rate: Option<u64>,
) -> Result<serde_json::Value, BoxError> {
    let start = Instant::now();
    let run = format!(
        "bench/{}/{}",
        std::process::id(),
        start.elapsed().as_nanos()
    );
    let (r, wr) = subscribe(target, format!("{run}/#"), start).await?;
    let received = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(Notify::new());
    let stop = Arc::new(AtomicBool::new(false));
    let rx = tokio::spawn(receive(
        r,
        wr,
        messages,
        start,
        received.clone(),
        progress.clone(),
        stop.clone(),
    ));
    let flow = Arc::new(Flow {
        start,
        sent: AtomicU64::new(0),
        received: received.clone(),
        window,
        progress: progress.clone(),
    });
    let t0 = Instant::now();
    let per = messages / publishers;
    let mut pubs = Vec::new();
    let base = tokio::time::Instant::now() + Duration::from_millis(100);
    for k in 0..publishers {
        let period = rate.map(|r| Duration::from_secs_f64(publishers as f64 / r as f64));
        let gate = move |i: u64| period.map(|p| base + p.mul_f64(i as f64));
        pubs.push(tokio::spawn(publish(
            target.clone(),
            (
                format!("bench-pub-{}-{k}", std::process::id()),
                format!("{run}/{k}"),
            ),
            per,
            payload,
            gate,
            flow.clone(),
        )));
    }
    for p in pubs {
        p.await??;
    }
    let mut lat = rx.await??;
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    lat.sort_unstable();
    let got = lat.len() as u64;
    Ok(serde_json::json!({
        "messages": per * publishers,
        "received": got,
        "lost": per * publishers - got.min(per * publishers),
        "publishers": publishers,
        "window": window,
        "payload_bytes": payload,
        "seconds": elapsed,
        "msg_per_s": got as f64 / elapsed,
        "p50_ms": percentile(&lat, 0.50) / 1000.0,
        "p99_ms": percentile(&lat, 0.99) / 1000.0,
        "max_ms": percentile(&lat, 1.0) / 1000.0,
    }))
}

async fn churn(target: &Target, concurrency: usize, seconds: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let done = done.clone();
        let failed = failed.clone();
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            let disconnect = {
                let mut b = BytesMut::new();
                Packet::Disconnect.write(&mut b, usize::MAX).ok();
                b
            };
            while Instant::now() < deadline {
                i += 1;
                let id = format!("churn-{}-{t}-{i}", std::process::id());
                match connect(&target, &id).await {
                    Ok((mut r, mut wr)) => {
                        let _ = send(&mut wr, &disconnect).await;
                        let _ = wr.shutdown().await;
                        // Wait for the broker's close so the connection is really finished.
                        let _ =
                            tokio::time::timeout(Duration::from_secs(5), r.rd.read_buf(&mut r.buf))
                                .await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let n = done.load(Ordering::Relaxed);
    serde_json::json!({
        "concurrency": concurrency,
        "seconds": seconds,
        "connections": n,
        "failed": failed.load(Ordering::Relaxed),
        "conn_per_s": n as f64 / seconds as f64,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let addr: SocketAddr = tokio::net::lookup_host((args.host.as_str(), args.port))
        .await?
        .next()
        .ok_or("host resolves to nothing")?;
    let tls = match &args.tls_ca {
        None => None,
        Some(ca) => {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)? {
                roots.add(cert?)?;
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from(args.host.clone())?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        }
    };
    let target = Target { addr, tls };
    let out = match args.mode {
        Mode::Throughput {
            messages,
            publishers,
            window,
            payload,
        } => {
            let mut v = run_flow(&target, messages, publishers, window, payload, None).await?;
            v["mode"] = "throughput".into();
            v
        }
        Mode::Paced {
            rate,
            seconds,
            payload,
        } => {
            let mut v = run_flow(
                &target,
                rate * seconds,
                1,
                u64::MAX / 2,
                payload,
                Some(rate),
            )
            .await?;
            v["mode"] = "paced".into();
            v["rate"] = rate.into();
            v
        }
        Mode::Churn {
            concurrency,
            seconds,
        } => {
            let mut v = churn(&target, concurrency, seconds).await;
            v["mode"] = "churn".into();
            v
        }
    };
    println!("{out}");
    Ok(())
}
