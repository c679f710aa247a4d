//! What every source emits into the router: raw local MQTT publishes (mapped by the router) and
//! ready-made records (meters map their own registers to keys). No I/O here.

pub mod meters;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::model::{Record, TimestampMs};

/// Capacity of the sources → router channel. A full channel is backpressure: the broker front
/// stops reading the publisher's socket, a meter actor waits before its next poll.
pub const EVENTS_CAPACITY: usize = 4096;

/// One event from a source to the router.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// A PUBLISH a local client sent to the embedded broker.
    Local(LocalPublish),
    /// Records already mapped to ThingsBoard devices (meter readings, health, connect/disconnect).
    Records(Vec<Record>),
}

/// A PUBLISH a local client sent to the embedded broker, with the identity of the client that
/// sent it (the device-API rule needs it).
#[derive(Debug, Clone)]
pub struct LocalPublish {
    pub client_id: String,
    /// MQTT username of the connection, if any.
    pub username: Option<String>,
    pub topic: String,
    pub payload: Bytes,
    /// When the bridge received it (used when the payload carries no `ts`).
    pub received_ms: TimestampMs,
    /// For a QoS 1/2 PUBLISH: the broker sends the client its PUBACK/PUBREC only once this
    /// fires, i.e. once the router has committed the records the message produced (or decided
    /// it produces none). `None` for QoS 0 and for events not from the broker.
    pub ack: Option<Durable>,
}

/// Completion handle of one local QoS 1/2 message. Fires (success) when the last clone is
/// dropped, unless [`Durable::fail`] was called first: then the publisher gets no
/// acknowledgement and is disconnected, so it resends. Success on drop means a consumer that
/// simply discards the event (e.g. a test reading the channel) acknowledges it; the router
/// keeps the handle until its store commit returns.
#[derive(Debug, Clone)]
pub struct Durable(Arc<DurableInner>);

#[derive(Debug)]
struct DurableInner {
    tx: parking_lot::Mutex<Option<oneshot::Sender<()>>>,
}

impl Drop for DurableInner {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.get_mut().take() {
            let _ = tx.send(());
        }
    }
}

impl Durable {
    /// A handle and the receiver the broker connection waits on (`Err` = failed).
    pub fn new() -> (Durable, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (
            Durable(Arc::new(DurableInner {
                tx: parking_lot::Mutex::new(Some(tx)),
            })),
            rx,
        )
    }

    /// The message could not be made durable: withhold the acknowledgement.
    pub fn fail(&self) {
        self.0.tx.lock().take();
    }
}
