//! Hostile clients against the embedded broker. Each test runs one kind of abuse while a healthy
//! client keeps a publish → subscribe round trip going; the round trips must keep completing
//! (each within a bounded wait) during and after the abuse. A broker that panics, stalls or
//! starves its other clients fails here.
//!
//! Like tests/broker_conformance.rs, `BROKER_CONFORMANCE_ADDR` points these at an external
//! broker (Mosquitto) to compare.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::broker_harness::{
    encode_remaining_length, uniq, uniq_id, Conn, Opts, Pkt, Target, Will, V, WAIT,
};
use dlms_bridge::config::BrokerConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::timeout;

/// How long one abusive connection may take to connect before the test gives up on it.
const ABUSE_WAIT: Duration = Duration::from_secs(30);
/// How long an abusive connection stays open after its bytes, waiting for the broker to close.
const LINGER: Duration = Duration::from_secs(2);

/// A client that keeps proving the broker serves others: QoS 1 publish to its own topic and
/// wait for the message to come back.
struct Healthy {
    conn: Conn,
    topic: String,
    seq: u32,
}

impl Healthy {
    async fn start(addr: SocketAddr) -> Healthy {
        let (mut conn, _) = Conn::connect(addr, V::V311, Opts::new(&uniq_id("healthy"))).await;
        let topic = uniq("healthy");
        conn.subscribe(&topic, 1).await;
        Healthy {
            conn,
            topic,
            seq: 0,
        }
    }

    /// One round trip; panics if the broker does not complete it within [`WAIT`].
    async fn round_trip(&mut self) {
        self.seq += 1;
        let payload = self.seq.to_be_bytes();
        let topic = self.topic.clone();
        timeout(WAIT, async {
            self.conn.publish(&topic, 1, &payload, false).await;
            loop {
                let m = self.conn.next_msg().await;
                if m.topic == topic && m.payload[..] == payload {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("healthy round trip {} not served within {WAIT:?}", self.seq));
    }
}

/// Run `abuse` while the healthy client does round trips; then a few more. Returns the number
/// of round trips completed while the abuse ran (at least one is required).
async fn while_healthy<F>(addr: SocketAddr, abuse: F) -> u64
where
    F: Future<Output = ()> + Send + 'static,
{
    let mut healthy = Healthy::start(addr).await;
    healthy.round_trip().await;
    let task = tokio::spawn(abuse);
    let mut during = 0;
    loop {
        healthy.round_trip().await;
        during += 1;
        if task.is_finished() {
            break;
        }
    }
    task.await.expect("abuse task ran to its end");
    for _ in 0..3 {
        healthy.round_trip().await;
    }
    // A fresh client still gets in.
    let (mut fresh, _) = Conn::connect(addr, V::V5, Opts::new(&uniq_id("fresh"))).await;
    assert!(fresh.ping().await, "a new client is served after the abuse");
    during
}

/// The tests of this file run one at a time: they share the process's descriptor limit, and a
/// flood from one would starve another's healthy client of file descriptors, not of broker time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn broker() -> Target {
    Target::start(BrokerConfig::default()).await
}

/// Send `bytes` on a new connection, then read until the broker closes it or [`LINGER`]
/// passes (a broker may wait for the rest of a packet); the connection is dropped either way.
async fn hit(addr: SocketAddr, bytes: Vec<u8>) {
    let Ok(Ok(mut s)) = timeout(ABUSE_WAIT, TcpStream::connect(addr)).await else {
        return;
    };
    let _ = s.write_all(&bytes).await;
    let _ = timeout(LINGER, async {
        let mut scratch = [0u8; 1024];
        loop {
            match s.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

fn encode(p: Pkt) -> Vec<u8> {
    Conn::encode(&p).to_vec()
}

fn connect_v4(id: &str) -> Vec<u8> {
    encode(Pkt::V4(v4::Packet::Connect(v4::Connect::new(id))))
}

fn connect_v5(id: &str) -> Vec<u8> {
    encode(Pkt::V5(v5::Packet::Connect(
        v5::Connect {
            keep_alive: 30,
            client_id: id.to_owned(),
            clean_start: true,
            properties: None,
        },
        None,
        None,
    )))
}

/// A fixed corpus of malformed and truncated packets, each sent after a valid CONNECT or as the
/// first packet.
fn malformed_corpus() -> Vec<Vec<u8>> {
    let mut publish = BytesMut::new();
    let mut p = v4::Publish::new("a/b", rumqttc::mqttbytes::QoS::AtLeastOnce, b"x".to_vec());
    p.pkid = 1;
    p.write(&mut publish).expect("serialise");
    let publish = publish.to_vec();
    let connect = connect_v4("m");
    let mut corpus = vec![
        // Remaining length with five continuation bytes (never valid).
        vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
        // Wrong protocol name, wrong level, reserved flag set.
        b"\x10\x0c\x00\x04MQTX\x04\x02\x00\x3c\x00\x00".to_vec(),
        b"\x10\x0c\x00\x04MQTT\x07\x02\x00\x3c\x00\x00".to_vec(),
        b"\x10\x0c\x00\x04MQTT\x04\x03\x00\x3c\x00\x00".to_vec(),
        // Packet type 0 and 15 (reserved).
        vec![0x00, 0x00],
        vec![0xF0, 0x00],
        // CONNECT truncated mid-packet, then close.
        connect[..connect.len() / 2].to_vec(),
        // A string length longer than the packet.
        b"\x10\x0c\x00\xffMQTT\x04\x02\x00\x3c\x00\x00".to_vec(),
        // Client id that is not UTF-8.
        b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02\xc3\x28".to_vec(),
    ];
    let after_connect: Vec<Vec<u8>> = vec![
        // PUBLISH with QoS 3.
        {
            let mut b = publish.clone();
            b[0] |= 0x06;
            b
        },
        // PUBLISH truncated.
        publish[..publish.len() - 2].to_vec(),
        // PUBLISH with an empty topic (3.1.1).
        b"\x30\x03\x00\x00x".to_vec(),
        // PUBLISH topic that is not UTF-8 / contains NUL.
        b"\x30\x05\x00\x02\xc3\x28x".to_vec(),
        b"\x30\x05\x00\x02a\x00x".to_vec(),
        // SUBSCRIBE with no filter, with bad flags, with QoS 3 options.
        b"\x82\x02\x00\x01".to_vec(),
        b"\x80\x06\x00\x01\x00\x01a\x01".to_vec(),
        b"\x82\x06\x00\x01\x00\x01a\x03".to_vec(),
        // UNSUBSCRIBE with no filter; PUBACK with a missing packet id.
        b"\xa2\x02\x00\x01".to_vec(),
        b"\x40\x01\x00".to_vec(),
        // PINGREQ with a body.
        b"\xc0\x02\x00\x00".to_vec(),
    ];
    for p in after_connect {
        let mut b = connect.clone();
        b.extend_from_slice(&p);
        corpus.push(b);
    }
    corpus
}

/// Mosquitto: each malformed, truncated or random packet closes only the connection that sent
/// it; other clients are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_truncated_and_random_packets() {
    let _serial = SERIAL.lock().await;
    let b = broker().await;
    let addr = b.addr;
    let during = while_healthy(addr, async move {
        let mut set = JoinSet::new();
        for bytes in malformed_corpus() {
            set.spawn(hit(addr, bytes));
        }
        // Random bytes, with and without a valid CONNECT first; seeded so a failure replays.
        let mut rng = StdRng::seed_from_u64(0x0005_EED9);
        for i in 0..300 {
            let len = rng.random_range(1..512);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            match i % 3 {
                0 => {
                    let mut c = connect_v4(&format!("rnd{i}"));
                    c.append(&mut bytes);
                    bytes = c;
                }
                1 => {
                    let mut c = connect_v5(&format!("rnd{i}"));
                    c.append(&mut bytes);
                    bytes = c;
                }
                _ => {}
            }
            set.spawn(hit(addr, bytes));
            if set.len() >= 32 {
                set.join_next().await;
            }
        }
        while set.join_next().await.is_some() {}
    })
    .await;
    assert!(during >= 1);
}

/// Mosquitto: a fixed header announcing a 256 MiB remaining length (above its message size
/// limit) gets the connection closed without the broker reserving that memory; others are
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_remaining_length_is_refused() {
    let _serial = SERIAL.lock().await;
    let b = broker().await;
    let addr = b.addr;
    while_healthy(addr, async move {
        let mut header = Vec::new();
        encode_remaining_length(&mut header, 256 * 1024 * 1024);
        for first in [true, false] {
            let mut bytes = if first {
                Vec::new()
            } else {
                connect_v4("huge")
            };
            bytes.push(if first { 0x10 } else { 0x30 });
            bytes.extend_from_slice(&header);
            let s = TcpStream::connect(addr).await.expect("connect");
            let (mut rd, mut wr) = s.into_split();
            let _ = wr.write_all(&bytes).await;
            // Keep streaming payload until the broker closes the connection.
            let chunk = vec![0u8; 64 * 1024];
            let closed = timeout(WAIT, async {
                let mut scratch = [0u8; 256];
                loop {
                    tokio::select! {
                        r = rd.read(&mut scratch) => match r {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        },
                        w = wr.write_all(&chunk) => if w.is_err() { return },
                    }
                }
            })
            .await;
            assert!(
                closed.is_ok(),
                "connection with a 256 MiB packet not closed (CONNECT first: {})",
                !first
            );
        }
    })
    .await;
}

/// Mosquitto: connections that never finish their CONNECT (slow-loris) do not keep other
/// clients from connecting and being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_connects_do_not_block_others() {
    let _serial = SERIAL.lock().await;
    raise_fd_limit();
    let b = broker().await;
    let addr = b.addr;
    let mut lingering = Vec::new();
    for i in 0..500 {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            break;
        };
        // Half a CONNECT: fixed header and part of the protocol name, then silence.
        let partial: &[u8] = if i % 2 == 0 { b"\x10\x0c\x00" } else { b"\x10" };
        let _ = s.write_all(partial).await;
        lingering.push(s);
    }
    assert!(
        lingering.len() >= 100,
        "only {} sockets opened",
        lingering.len()
    );
    while_healthy(addr, async move {
        let mut set = JoinSet::new();
        for i in 0..20 {
            set.spawn(async move {
                let (mut c, _) =
                    Conn::connect(addr, V::V311, Opts::new(&uniq_id(&format!("n{i}")))).await;
                assert!(c.ping().await);
            });
        }
        while let Some(r) = set.join_next().await {
            r.expect("new client served while slow-loris sockets wait");
        }
    })
    .await;
    drop(lingering);
}

/// Raise the soft open-file limit to the hard limit (each test connection costs two
/// descriptors in this process: ours and the broker's). Returns the soft limit in force.
fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    }
}

/// The bridge binary as a child process, so that its sockets and the test's count against two
/// open-file limits (10,000 connections are 20,000 descriptors in one process). Killed on drop.
struct BridgeProcess {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl BridgeProcess {
    /// Start `dlms-bridge run` with a broker on an ephemeral port (`broker_extra` appended to
    /// its `[broker]` section); returns once the log says where the broker listens.
    fn start(broker_extra: &str) -> BridgeProcess {
        use std::io::{BufRead, BufReader};
        let dir = tempfile::tempdir().expect("tempdir");
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[broker]\nlisten = \"127.0.0.1:0\"\n{broker_extra}\n[http]\nlisten = \"127.0.0.1:0\"\n\
                 [thingsboard]\nhost = \"127.0.0.1\"\nport = {closed}\naccess_token = \"t\"\n\
                 [store]\npath = \"{}\"\n",
                dir.path().join("queue.db").display()
            ),
        )
        .expect("write config");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dlms-bridge"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn dlms-bridge");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // Drains the log for the whole run so the pipe never fills.
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains("Local MQTT broker listening") {
                    if let Some(a) = line.split("listen=").nth(1) {
                        let _ = tx.send(a.split_whitespace().next().unwrap_or("").to_owned());
                    }
                }
            }
        });
        let listen = rx
            .recv_timeout(WAIT * 3)
            .expect("the bridge logged its broker address");
        let addr = listen.parse().expect("broker address in the log");
        BridgeProcess {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Open a connection from one of several loopback source addresses (spreads the ephemeral
/// ports), send CONNECT and return the stream with the first bytes of the answer: the CONNACK,
/// or `None` when the broker closed the connection without one.
async fn connect_from(addr: SocketAddr, i: usize, id: &str) -> (TcpStream, Option<[u8; 4]>) {
    let source = SocketAddr::from(([127, 0, 0, 1 + (i % 4) as u8], 0));
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(source).expect("bind a loopback source address");
    let mut s = timeout(WAIT, socket.connect(addr))
        .await
        .expect("tcp connect in time")
        .expect("tcp connect");
    s.write_all(&connect_v4(id)).await.expect("CONNECT");
    let mut ack = [0u8; 4];
    let answer = match timeout(WAIT, s.read_exact(&mut ack)).await {
        Ok(Ok(_)) => Some(ack),
        Ok(Err(_)) => None,
        Err(_) => panic!("{id}: neither CONNACK nor close within {WAIT:?}"),
    };
    (s, answer)
}

/// Mosquitto (`max_connections`, default unlimited there): up to the limit every client is
/// accepted and served; beyond it a new connection is closed at once without a CONNACK, the
/// connected clients are unaffected, and a place freed by a client that leaves is given to the
/// next one. Here with our default `max_connections` (10,000), all held at once: a healthy
/// client plus 9,999 idle ones, connected while the healthy client keeps its round trip going.
/// The bridge runs as a child process (see [`BridgeProcess`]); this process's soft open-file
/// limit is raised to the hard one and inherited by the child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_at_once_and_the_limit_beyond() {
    let _serial = SERIAL.lock().await;
    let max = BrokerConfig::default().max_connections;
    assert_eq!(max, 10_000, "the default limit this test holds");
    let limit = raise_fd_limit();
    assert!(
        limit as usize >= max + 500,
        "open-file limit {limit} too low to hold {max} connections (raise `ulimit -Hn`)"
    );
    let bridge = BridgeProcess::start("sys_interval = \"1s\"");
    let addr = bridge.addr;

    let mut healthy = Healthy::start(addr).await;
    healthy.round_trip().await;
    let others = max - 1;
    let storm = tokio::spawn(async move {
        let mut held = Vec::with_capacity(others);
        let mut set = JoinSet::new();
        for i in 0..others {
            set.spawn(async move {
                let id = format!("many-{i}");
                let (s, ack) = connect_from(addr, i, &id).await;
                assert_eq!(ack, Some([0x20, 0x02, 0x00, 0x00]), "{id} accepted");
                s
            });
            if set.len() >= 128 {
                held.push(set.join_next().await.expect("task").expect("connected"));
            }
        }
        while let Some(s) = set.join_next().await {
            held.push(s.expect("connected"));
        }
        held
    });
    while !storm.is_finished() {
        healthy.round_trip().await;
    }
    let mut held = storm.await.expect("every client connected");
    assert_eq!(held.len(), others);

    // The broker counts them all: `$SYS/broker/clients/connected` reaches the limit.
    let sys = "$SYS/broker/clients/connected";
    assert_eq!(healthy.conn.subscribe(sys, 0).await, 0);
    let want = max.to_string();
    timeout(WAIT * 3, async {
        loop {
            let m = healthy.conn.next_msg().await;
            if m.topic == sys && m.payload[..] == *want.as_bytes() {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{sys} never reached {max}"));
    healthy.round_trip().await;

    // Beyond the limit: closed without a CONNACK, several times over; the others are served.
    for i in 0..3 {
        let (_s, ack) = connect_from(addr, i, &format!("over-{i}")).await;
        assert_eq!(ack, None, "connection {} beyond the limit refused", max + 1);
        healthy.round_trip().await;
    }

    // A client leaves; its place goes to a new client (once the broker has seen it leave:
    // refused attempts until then, each answered at once).
    drop(held.pop());
    let got_in = timeout(WAIT * 3, async {
        let mut attempt = 0;
        loop {
            if let (s, Some(ack)) = connect_from(addr, attempt, "latecomer").await {
                assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
                return s;
            }
            attempt += 1;
        }
    })
    .await
    .expect("a freed place is given to a new client");
    healthy.round_trip().await;
    drop(got_in);
    drop(held);
    healthy.round_trip().await;
}

/// Mosquitto: the same client id reconnecting in a tight loop with a will, each connection
/// followed by a malformed packet or an abrupt close (the burst that aborted the bridge under
/// rumqttd), only ever affects that client id; the will subscribers and everyone else are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_storm_with_wills() {
    let _serial = SERIAL.lock().await;
    let b = broker().await;
    let addr = b.addr;
    let will_topic = uniq("storm-will");
    let mut watcher = Conn::connect(addr, V::V311, Opts::new(&uniq_id("watch")))
        .await
        .0;
    watcher.subscribe(&will_topic, 1).await;
    let id = uniq_id("storm");
    let during = while_healthy(addr, async move {
        let mut set = JoinSet::new();
        for worker in 0..8u32 {
            let id = id.clone();
            let will_topic = will_topic.clone();
            set.spawn(async move {
                for i in 0..150u32 {
                    let v = if (i + worker) % 2 == 0 {
                        V::V311
                    } else {
                        V::V5
                    };
                    let w = Will {
                        topic: will_topic.clone(),
                        payload: Bytes::from_static(b"storm"),
                        qos: 1,
                        retain: false,
                        props: None,
                    };
                    let mut c = Conn::open(addr, v).await;
                    let mut o = Opts::new(&id).with_will(w);
                    o.keep_alive = 5;
                    let mut connect = Conn::encode(&c.connect_pkt(&o)).to_vec();
                    match i % 6 {
                        // A valid CONNECT with a will, then garbage, a lying PUBLISH, a second
                        // CONNECT, or nothing (abrupt close).
                        0 => connect.extend_from_slice(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]),
                        1 => connect.extend_from_slice(b"\x30\x03\x00\x05a"),
                        2 => connect.extend_from_slice(&connect_v4(&id)),
                        3 => {}
                        // The CONNECT with its will itself malformed: truncated, or with the
                        // reserved connect-flags bit set.
                        4 => connect.truncate(connect.len() - 3),
                        _ => {
                            let flags = connect
                                .iter()
                                .position(|&b| b == 4 || b == 5)
                                .map(|p| p + 1);
                            if let Some(f) = flags {
                                connect[f] |= 0x01;
                            }
                        }
                    }
                    c.send_bytes(&connect).await;
                    drop(c);
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.expect("storm worker");
        }
    })
    .await;
    assert!(during >= 1);
    // The wills were published (at least one: the last connection of the id died abruptly).
    let m = watcher.next_msg().await;
    assert_eq!(&m.payload[..], b"storm");
}

/// Mosquitto 2.0.11: a client sending a packet only a server sends is disconnected for CONNACK
/// and (v5) AUTH without an authentication method; SUBACK, UNSUBACK and PINGRESP are ignored
/// (the connection stays open and answers PINGREQ). Required here: CONNACK and AUTH close the
/// sender; after the others the sender is either closed or still served (never left hanging);
/// everyone else is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_only_packet_types_do_not_disturb_others() {
    let _serial = SERIAL.lock().await;
    let b = broker().await;
    let addr = b.addr;
    while_healthy(addr, async move {
        // (packet, must close)
        let v4_packets: Vec<(&[u8], bool)> = vec![
            (b"\x20\x02\x00\x00", true),
            (b"\x90\x03\x00\x01\x00", false),
            (b"\xb0\x02\x00\x01", false),
            (b"\xd0\x00", false),
        ];
        let v5_packets: Vec<(&[u8], bool)> = vec![
            (b"\x20\x03\x00\x00\x00", true),
            (b"\x90\x04\x00\x01\x00\x00", false),
            (b"\xb0\x04\x00\x01\x00\x00", false),
            (b"\xd0\x00", false),
            (b"\xf0\x02\x00\x00", true),
        ];
        for (v, packets) in [(V::V311, v4_packets), (V::V5, v5_packets)] {
            for (p, must_close) in packets {
                let (mut c, _) = Conn::connect(addr, v, Opts::new(&uniq_id("srv-only"))).await;
                c.send_bytes(p).await;
                if must_close {
                    c.closed().await;
                    continue;
                }
                let ping = match v {
                    V::V311 => Pkt::V4(v4::Packet::PingReq),
                    V::V5 => Pkt::V5(v5::Packet::PingReq(v5::PingReq)),
                };
                c.send(ping).await;
                loop {
                    match c.recv_within(WAIT).await {
                        Err(()) => panic!("connection left hanging after {p:02x?}"),
                        Ok(None) => break,
                        Ok(Some(Pkt::V4(v4::Packet::PingResp)))
                        | Ok(Some(Pkt::V5(v5::Packet::PingResp(_)))) => break,
                        Ok(Some(_)) => {}
                    }
                }
            }
        }
    })
    .await;
}

/// Mosquitto: a second CONNECT on an established connection is a protocol violation; that
/// connection is closed (v5: after DISCONNECT 0x82 Protocol Error), the others are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connect_closes_the_connection() {
    let _serial = SERIAL.lock().await;
    let b = broker().await;
    let addr = b.addr;
    while_healthy(addr, async move {
        for v in [V::V311, V::V5] {
            let id = uniq_id("twice");
            let (mut c, _) = Conn::connect(addr, v, Opts::new(&id)).await;
            c.send_connect(&Opts::new(&id)).await;
            if let Some(d) = c.closed().await {
                assert_eq!(d.reason_code, v5::DisconnectReasonCode::ProtocolError);
            }
        }
    })
    .await;
}
