//! The broker's TLS listener (`[broker] tls_listen`) against real clients: rumqttc v4 and v5
//! over rustls, raw TCP and raw TLS sockets. Certificates are made here with rcgen. Every wait is
//! on an event with a timeout. The last test runs the whole bridge (`app::start`): start-up,
//! `/api/status` and the SIGHUP reload path.

#[path = "common/bridge_config.rs"]
mod bridge_config;
#[path = "common/certs.rs"]
mod certs;
#[path = "common/v4_client.rs"]
mod v4_client;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use certs::{write_pem, Ca};
use dlms_bridge::broker::tls::TlsSettings;
use dlms_bridge::broker::{self, BrokerHandle, Tuning};
use dlms_bridge::config::{BrokerConfig, Secret};
use dlms_bridge::sources::SourceEvent;
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use v4_client::{v4_options, V4Client};

/// Upper bound for anything that should happen promptly.
const WAIT: Duration = Duration::from_secs(10);

// ---------- certificates ----------

/// A client configuration trusting `ca`, presenting `identity` (certificate, key PEM) if given.
fn client_tls(ca: &Ca, identity: Option<&(String, String)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(ca.roots());
    let config = match identity {
        Some((cert, key)) => {
            let chain = vec![
                rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes())
                    .expect("client cert PEM"),
            ];
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())
                .expect("client key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client identity")
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// A directory holding the broker's certificate and key (issued by `ca`).
struct ServerFiles {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl ServerFiles {
    fn new(ca: &Ca) -> ServerFiles {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = ca.issue(&["127.0.0.1"], false, false);
        let cert = write_pem(dir.path(), "server.pem", &cert);
        let key = write_pem(dir.path(), "server.key", &key);
        ServerFiles { dir, cert, key }
    }

    /// Replace the certificate and key in place with ones issued by `ca`.
    fn reissue(&self, ca: &Ca) {
        let (cert, key) = ca.issue(&["127.0.0.1"], false, false);
        write_pem(self.dir.path(), "server.pem", &cert);
        write_pem(self.dir.path(), "server.key", &key);
    }

    fn config(&self) -> BrokerConfig {
        BrokerConfig {
            tls_listen: Some("127.0.0.1:0".into()),
            tls_cert_file: Some(self.cert.clone()),
            tls_key_file: Some(self.key.clone()),
            ..BrokerConfig::default()
        }
    }
}

// ---------- the broker ----------

struct TestBroker {
    handle: BrokerHandle,
    events_rx: mpsc::Receiver<SourceEvent>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl TestBroker {
    /// Events pass through a stand-in router that commits instantly (QoS 1/2 publishers get
    /// their acknowledgement at once).
    async fn start(cfg: BrokerConfig, tuning: Tuning) -> TestBroker {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let (events_tx, mut raw_rx) = mpsc::channel(64);
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        let handle = broker::start_with(&cfg, listen, events_tx, &tracker, cancel.clone(), tuning)
            .await
            .expect("broker starts");
        let (tx, events_rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Some(mut ev) = raw_rx.recv().await {
                if let SourceEvent::Local(p) = &mut ev {
                    drop(p.ack.take());
                }
                if tx.send(ev).await.is_err() {
                    break;
                }
            }
        });
        TestBroker {
            handle,
            events_rx,
            cancel,
            tracker,
        }
    }

    fn plain(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    fn tls(&self) -> SocketAddr {
        self.handle.tls_local_addr().expect("TLS listener bound")
    }

    /// The next message the router would get: `(client id, topic, payload)`.
    async fn next_local(&mut self) -> (String, String, Vec<u8>) {
        match timeout(WAIT, self.events_rx.recv()).await {
            Ok(Some(SourceEvent::Local(p))) => (p.client_id, p.topic, p.payload.to_vec()),
            Ok(other) => panic!("expected a local publish, got {other:?}"),
            Err(_) => panic!("no local publish within {WAIT:?}"),
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        timeout(WAIT, self.tracker.wait())
            .await
            .expect("broker tasks end in time");
    }
}

// ---------- clients ----------

/// Wait until the peer closes `stream` (ignoring what it sends first); panics after [`WAIT`].
async fn closed_by_peer(stream: &mut (impl AsyncRead + Unpin)) {
    timeout(WAIT, async {
        let mut scratch = [0u8; 256];
        loop {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("broker closes the connection in time");
}

fn v4_connect_bytes(id: &str) -> BytesMut {
    let mut b = BytesMut::new();
    v4::Packet::Connect(v4::Connect::new(id))
        .write(&mut b, usize::MAX)
        .expect("serialise CONNECT");
    b
}

/// A TLS client and the broker's own subscriber both see a plain publish and a TLS publish.
async fn assert_round_trip(b: &mut TestBroker, tls: Arc<rustls::ClientConfig>, id: &str) {
    let mut over_tls = V4Client::connect(v4_options(b.tls(), id, Some(tls))).await;
    over_tls.subscribe("from/plain", QoS::AtLeastOnce).await;
    let mut plain = V4Client::connect(v4_options(b.plain(), &format!("{id}-plain"), None)).await;
    plain.subscribe("from/tls", QoS::AtLeastOnce).await;

    over_tls.publish("from/tls", b"secret").await;
    let p = plain.next_publish().await;
    assert_eq!(
        (p.topic.as_ref(), p.payload.as_ref()),
        (&b"from/tls"[..], &b"secret"[..])
    );
    assert_eq!(
        b.next_local().await,
        (id.to_owned(), "from/tls".to_owned(), b"secret".to_vec())
    );

    plain.publish("from/plain", b"hello").await;
    let p = over_tls.next_publish().await;
    assert_eq!(
        (p.topic.as_ref(), p.payload.as_ref()),
        (&b"from/plain"[..], &b"hello"[..])
    );
    b.next_local().await;
}

// ---------- tests ----------

#[tokio::test]
async fn tls_and_plain_clients_exchange_messages_both_ways() {
    let ca = Ca::new("Broker CA");
    let files = ServerFiles::new(&ca);
    let mut b = TestBroker::start(files.config(), Tuning::default()).await;
    assert_ne!(b.plain(), b.tls());
    assert_round_trip(&mut b, client_tls(&ca, None), "tls-a").await;
    assert_eq!(b.handle.client_count(), 2);
    b.stop().await;
}

#[tokio::test]
async fn mqtt5_over_tls() {
    let ca = Ca::new("Broker CA");
    let files = ServerFiles::new(&ca);
    let mut b = TestBroker::start(files.config(), Tuning::default()).await;
    let mut o = rumqttc::v5::MqttOptions::new("tls-v5", "127.0.0.1", b.tls().port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(client_tls(&ca, None)),
    ));
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(o, 32);
    let mut plain = V4Client::connect(v4_options(b.plain(), "v5-peer", None)).await;
    plain.subscribe("v5/out", QoS::AtLeastOnce).await;
    client
        .subscribe("v5/in", QoS5::AtLeastOnce)
        .await
        .expect("subscribe queued");
    client
        .publish("v5/out", QoS5::AtLeastOnce, false, &b"five"[..])
        .await
        .expect("publish queued");
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::Event;
    // Drive the v5 client until it has its CONNACK (MQTT 5), SUBACK and PUBACK.
    let (mut connack, mut suback, mut puback) = (false, false, false);
    timeout(WAIT, async {
        while !(connack && suback && puback) {
            match eventloop.poll().await.expect("v5 over TLS") {
                Event::Incoming(Packet::ConnAck(a)) => {
                    assert_eq!(
                        a.code,
                        rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
                    );
                    connack = true;
                }
                Event::Incoming(Packet::SubAck(_)) => suback = true,
                Event::Incoming(Packet::PubAck(_)) => puback = true,
                _ => {}
            }
        }
    })
    .await
    .expect("v5 handshake, SUBACK and PUBACK in time");
    let p = plain.next_publish().await;
    assert_eq!(p.payload.as_ref(), b"five");
    assert_eq!(
        b.next_local().await,
        ("tls-v5".to_owned(), "v5/out".to_owned(), b"five".to_vec())
    );
    let info = b
        .handle
        .clients()
        .into_iter()
        .find(|c| c.client_id == "tls-v5")
        .expect("v5 TLS client listed");
    assert_eq!(info.protocol, "MQTT 5.0");

    plain.publish("v5/in", b"back").await;
    b.next_local().await;
    let got = timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = eventloop.poll().await.expect("v5 poll") {
                return p;
            }
        }
    })
    .await
    .expect("publish to the v5 TLS client in time");
    assert_eq!(got.payload.as_ref(), b"back");
    b.stop().await;
}

#[tokio::test]
async fn a_client_trusting_another_ca_fails_the_handshake_and_others_are_served() {
    let ca = Ca::new("Broker CA");
    let other = Ca::new("Some other CA");
    let files = ServerFiles::new(&ca);
    let mut b = TestBroker::start(files.config(), Tuning::default()).await;
    let mut wrong = V4Client::start(v4_options(
        b.tls(),
        "wrong-ca",
        Some(client_tls(&other, None)),
    ));
    let e = wrong.error().await;
    assert!(e.contains("UnknownIssuer"), "{e}");
    assert_eq!(b.handle.client_count(), 0);
    assert_round_trip(&mut b, client_tls(&ca, None), "right-ca").await;
    b.stop().await;
}

#[tokio::test]
async fn plain_mqtt_on_the_tls_port_is_closed_and_the_broker_carries_on() {
    let ca = Ca::new("Broker CA");
    let files = ServerFiles::new(&ca);
    let mut b = TestBroker::start(files.config(), Tuning::default()).await;
    let mut raw = TcpStream::connect(b.tls()).await.expect("tcp connect");
    raw.write_all(&v4_connect_bytes("not-tls"))
        .await
        .expect("write");
    closed_by_peer(&mut raw).await;
    assert_eq!(b.handle.client_count(), 0);
    assert_round_trip(&mut b, client_tls(&ca, None), "after-garbage").await;
    b.stop().await;
}

#[tokio::test]
async fn silent_clients_are_closed_after_the_connect_timeout_handshake_included() {
    let ca = Ca::new("Broker CA");
    let files = ServerFiles::new(&ca);
    let tuning = Tuning {
        connect_timeout: Duration::from_millis(300),
        ..Tuning::default()
    };
    let mut b = TestBroker::start(files.config(), tuning).await;
    // Opens TCP, never starts the TLS handshake.
    let mut silent = TcpStream::connect(b.tls()).await.expect("tcp connect");
    closed_by_peer(&mut silent).await;
    // Completes the handshake, never sends CONNECT.
    let connector = tokio_rustls::TlsConnector::from(client_tls(&ca, None));
    let tcp = TcpStream::connect(b.tls()).await.expect("tcp connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("IP server name");
    let mut tls = timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake succeeds");
    closed_by_peer(&mut tls).await;
    assert_round_trip(&mut b, client_tls(&ca, None), "after-silence").await;
    b.stop().await;
}

#[tokio::test]
async fn max_connections_counts_both_listeners() {
    let ca = Ca::new("Broker CA");
    let files = ServerFiles::new(&ca);
    let cfg = BrokerConfig {
        max_connections: 1,
        ..files.config()
    };
    let b = TestBroker::start(cfg, Tuning::default()).await;
    let _plain = V4Client::connect(v4_options(b.plain(), "holds-the-slot", None)).await;
    let mut over_tls = V4Client::start(v4_options(
        b.tls(),
        "one-too-many",
        Some(client_tls(&ca, None)),
    ));
    over_tls.error().await;
    assert_eq!(b.handle.client_count(), 1);
    b.stop().await;
}

#[tokio::test]
async fn credentials_are_enforced_over_tls() {
    let ca = Ca::new("Broker CA");
    let files = ServerFiles::new(&ca);
    let cfg = BrokerConfig {
        username: Some("meter-gw".into()),
        password: Some(Secret::new("s3cret")),
        ..files.config()
    };
    let b = TestBroker::start(cfg, Tuning::default()).await;
    let mut o = v4_options(b.tls(), "wrong-pass", Some(client_tls(&ca, None)));
    o.set_credentials("meter-gw", "nope");
    let e = V4Client::start(o).error().await;
    assert!(
        e.contains("NotAuthorized") || e.contains("BadUserNamePassword"),
        "{e}"
    );
    let o = v4_options(b.tls(), "anonymous", Some(client_tls(&ca, None)));
    V4Client::start(o).error().await;
    let mut o = v4_options(b.tls(), "right-pass", Some(client_tls(&ca, None)));
    o.set_credentials("meter-gw", "s3cret");
    V4Client::connect(o).await;
    assert_eq!(b.handle.client_count(), 1);
    b.stop().await;
}

#[tokio::test]
async fn reload_serves_the_new_certificate_to_new_connections_and_keeps_it_on_a_bad_file() {
    let first = Ca::new("First CA");
    let second = Ca::new("Second CA");
    let files = ServerFiles::new(&first);
    let cfg = files.config();
    let mut b = TestBroker::start(cfg.clone(), Tuning::default()).await;
    let mut before = V4Client::connect(v4_options(
        b.tls(),
        "before",
        Some(client_tls(&first, None)),
    ))
    .await;

    files.reissue(&second);
    let settings = TlsSettings::from_config(&cfg);
    assert!(b.handle.reload_tls(settings.clone()).expect("reload"));
    let e = V4Client::start(v4_options(
        b.tls(),
        "old-trust",
        Some(client_tls(&first, None)),
    ))
    .error()
    .await;
    assert!(e.contains("UnknownIssuer"), "{e}");
    assert_round_trip(&mut b, client_tls(&second, None), "new-trust").await;
    // The connection made before the reload keeps working.
    before.publish("still/here", b"yes").await;
    assert_eq!(b.next_local().await.1, "still/here");

    // A broken certificate file on reload: an error, and the second certificate stays.
    std::fs::write(&files.cert, "garbage\n").expect("overwrite");
    assert!(b.handle.reload_tls(settings.clone()).is_err());
    V4Client::connect(v4_options(b.tls(), "kept", Some(client_tls(&second, None)))).await;
    // A key others may read is refused on reload too.
    {
        use std::os::unix::fs::PermissionsExt;
        files.reissue(&first);
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let e = b
            .handle
            .reload_tls(settings)
            .expect_err("world-readable key");
        assert!(e.to_string().contains("readable by group or others"), "{e}");
    }
    V4Client::connect(v4_options(
        b.tls(),
        "kept-2",
        Some(client_tls(&second, None)),
    ))
    .await;
    b.stop().await;
}

#[tokio::test]
async fn client_certificates_are_verified_and_required_when_configured() {
    let ca = Ca::new("Broker CA");
    let clients = Ca::new("Client CA");
    let rogue = Ca::new("Rogue CA");
    let files = ServerFiles::new(&ca);
    let client_ca = write_pem(files.dir.path(), "clients.pem", &clients.pem());
    let cfg = BrokerConfig {
        tls_ca_file: Some(client_ca),
        tls_require_client_cert: true,
        ..files.config()
    };
    let mut b = TestBroker::start(cfg.clone(), Tuning::default()).await;
    let good = clients.issue(&["127.0.0.1"], true, false);
    assert_round_trip(&mut b, client_tls(&ca, Some(&good)), "with-cert").await;

    let no_cert = V4Client::start(v4_options(b.tls(), "no-cert", Some(client_tls(&ca, None))))
        .error()
        .await;
    assert!(no_cert.contains("CertificateRequired"), "{no_cert}");
    let bad = rogue.issue(&["127.0.0.1"], true, false);
    let rogue_cert = V4Client::start(v4_options(
        b.tls(),
        "rogue-cert",
        Some(client_tls(&ca, Some(&bad))),
    ))
    .error()
    .await;
    assert!(
        rogue_cert.contains("UnknownCA") || rogue_cert.contains("BadCertificate"),
        "{rogue_cert}"
    );
    assert_eq!(b.handle.client_count(), 2, "only the round trip's clients");
    b.stop().await;

    // Client CA without the requirement: a certificate is checked when presented, and clients
    // without one are served.
    let cfg = BrokerConfig {
        tls_require_client_cert: false,
        ..cfg
    };
    let mut b = TestBroker::start(cfg, Tuning::default()).await;
    assert_round_trip(&mut b, client_tls(&ca, None), "optional-none").await;
    assert_round_trip(&mut b, client_tls(&ca, Some(&good)), "optional-good").await;
    V4Client::start(v4_options(
        b.tls(),
        "optional-rogue",
        Some(client_tls(&ca, Some(&bad))),
    ))
    .error()
    .await;
    b.stop().await;
}

#[tokio::test]
async fn shutdown_closes_tls_clients() {
    let ca = Ca::new("Broker CA");
    let files = ServerFiles::new(&ca);
    let b = TestBroker::start(files.config(), Tuning::default()).await;
    let mut over_tls = V4Client::connect(v4_options(
        b.tls(),
        "until-shutdown",
        Some(client_tls(&ca, None)),
    ))
    .await;
    // A client mid-handshake (TCP only) must not hold the shutdown up either.
    let _half_open = TcpStream::connect(b.tls()).await.expect("tcp connect");
    b.stop().await;
    over_tls.error().await;
}

#[tokio::test]
async fn a_broker_with_an_unusable_certificate_does_not_start() {
    let ca = Ca::new("Broker CA");
    let files = ServerFiles::new(&ca);
    std::fs::write(&files.cert, "no certificate here\n").expect("overwrite");
    let (events_tx, _events_rx) = mpsc::channel(1);
    let tracker = TaskTracker::new();
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let r = broker::start_with(
        &files.config(),
        listen,
        events_tx,
        &tracker,
        CancellationToken::new(),
        Tuning::default(),
    )
    .await;
    let e = r.expect_err("unusable certificate");
    assert!(matches!(e, broker::Error::Tls(_)), "{e:?}");
}

/// The whole bridge: the listener is started by `app::start`, shown in `/api/status`, and
/// `Running::reload` (what SIGHUP calls) gives new connections the new certificate.
#[tokio::test]
async fn the_bridge_opens_reports_and_reloads_the_tls_listener() {
    let first = Ca::new("First CA");
    let second = Ca::new("Second CA");
    let files = ServerFiles::new(&first);
    // ThingsBoard is not needed here: port 1 refuses, the uplink just retries.
    let mut cfg = bridge_config::test_config(files.dir.path(), 1, "token", "");
    cfg.broker.tls_listen = Some("127.0.0.1:0".into());
    cfg.broker.tls_cert_file = Some(files.cert.clone());
    cfg.broker.tls_key_file = Some(files.key.clone());
    let mut running = dlms_bridge::app::start(cfg.clone())
        .await
        .expect("bridge starts");
    let broker = running.broker.clone().expect("broker on");
    let tls_addr = broker.tls_local_addr().expect("TLS listener");

    let http = running.http_addr.expect("HTTP on");
    let status: serde_json::Value = timeout(WAIT, async {
        reqwest::get(format!("http://{http}/api/status"))
            .await
            .expect("GET /api/status")
            .json()
            .await
            .expect("status JSON")
    })
    .await
    .expect("status in time");
    assert_eq!(
        status["broker"]["tls_listen"],
        serde_json::json!(tls_addr.to_string())
    );
    assert_eq!(
        status["broker"]["listen"],
        serde_json::json!(broker.local_addr().to_string())
    );

    V4Client::connect(v4_options(
        tls_addr,
        "app-first",
        Some(client_tls(&first, None)),
    ))
    .await;
    files.reissue(&second);
    running.reload(&cfg).await.expect("reload");
    V4Client::connect(v4_options(
        tls_addr,
        "app-second",
        Some(client_tls(&second, None)),
    ))
    .await;
    let e = V4Client::start(v4_options(
        tls_addr,
        "app-old",
        Some(client_tls(&first, None)),
    ))
    .error()
    .await;
    assert!(e.contains("UnknownIssuer"), "{e}");
    assert!(
        timeout(WAIT, running.shutdown())
            .await
            .expect("shutdown in time")
            .expect("shutdown"),
        "clean shutdown"
    );
}
