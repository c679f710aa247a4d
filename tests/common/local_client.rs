//! A local MQTT 3.1.1 client (rumqttc) of the bridge's embedded broker, as a third-party
//! publisher would connect: returned once its CONNACK has arrived; the publishes it receives go
//! to a channel, each turned into what the test wants by `map`.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Publish};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Connect `id` (with `user` as username, empty password) to the broker at `addr`; panics if no
/// CONNACK comes within `wait`.
pub async fn connect<T: Send + 'static>(
    addr: SocketAddr,
    id: &str,
    user: Option<&str>,
    wait: Duration,
    map: fn(Publish) -> T,
) -> (AsyncClient, UnboundedReceiver<T>) {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    if let Some(u) = user {
        opts.set_credentials(u, "");
    }
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(opts, 100);
    let (connack_tx, connack_rx) = tokio::sync::oneshot::channel();
    let (msg_tx, msg_rx) = unbounded_channel();
    tokio::spawn(async move {
        let mut connack_tx = Some(connack_tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    if let Some(t) = connack_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    let _ = msg_tx.send(map(p));
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    tokio::time::timeout(wait, connack_rx)
        .await
        .expect("local client connects in time")
        .expect("connack");
    (client, msg_rx)
}
