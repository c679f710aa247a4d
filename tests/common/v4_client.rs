//! A rumqttc MQTT 3.1.1 client of the embedded broker that hands every event loop result to the
//! test, for the broker's own tests (plain and TLS listener). Every wait is bounded by [`WAIT`].
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::mqttbytes::v4;
use rumqttc::{Event, Packet, QoS};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Upper bound of every wait on the client.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct V4Client {
    pub client: rumqttc::AsyncClient,
    /// Every event loop result; an error (as `{:?}`, which keeps TLS and CONNACK details) ends it.
    pub events: mpsc::UnboundedReceiver<Result<Event, String>>,
}

/// Options for client `id` at `addr`, over TLS when `tls` is given.
pub fn v4_options(
    addr: SocketAddr,
    id: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    if let Some(c) = tls {
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(c),
        ));
    }
    o
}

impl V4Client {
    /// Starts the event loop without waiting for anything.
    pub fn start(opts: rumqttc::MqttOptions) -> V4Client {
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 32);
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let r = eventloop.poll().await.map_err(|e| format!("{e:?}"));
                let stop = r.is_err();
                if tx.send(r).is_err() || stop {
                    break;
                }
            }
        });
        V4Client { client, events }
    }

    /// Starts and waits for the CONNACK.
    pub async fn connect(opts: rumqttc::MqttOptions) -> V4Client {
        let mut c = Self::start(opts);
        c.wait(|e| matches!(e, Event::Incoming(Packet::ConnAck(_))))
            .await;
        c
    }

    /// The next event `want` accepts; panics on a connection error or after [`WAIT`].
    pub async fn wait(&mut self, want: impl Fn(&Event) -> bool) -> Event {
        let found = timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(e)) if want(&e) => return e,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => panic!("v4 client failed: {e}"),
                    None => panic!("v4 client event loop ended"),
                }
            }
        })
        .await;
        found.expect("v4 client event in time")
    }

    /// The first connection error (a failed handshake, a refused CONNACK, a closed link).
    pub async fn error(&mut self) -> String {
        let found = timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(Event::Incoming(Packet::ConnAck(a)))) => {
                        panic!("connected, but should not have: {a:?}")
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return e,
                    None => panic!("event loop ended without error"),
                }
            }
        })
        .await;
        found.expect("v4 client error in time")
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("subscribe queued");
        self.wait(|e| matches!(e, Event::Incoming(Packet::SubAck(_))))
            .await;
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    pub async fn publish(&mut self, topic: &str, payload: &'static [u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish queued");
        self.wait(|e| matches!(e, Event::Incoming(Packet::PubAck(_))))
            .await;
    }

    /// The next PUBLISH delivered to this client.
    pub async fn next_publish(&mut self) -> v4::Publish {
        match self
            .wait(|e| matches!(e, Event::Incoming(Packet::Publish(_))))
            .await
        {
            Event::Incoming(Packet::Publish(p)) => p,
            _ => unreachable!("filtered above"),
        }
    }
}
