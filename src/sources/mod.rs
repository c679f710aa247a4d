//! What every source emits into the router: raw local MQTT publishes (mapped by the router) and
//! ready-made records (meters map their own registers to keys). No I/O here.

pub mod meters;

/// The former path of the meter source, the DLMS protocol and the simulator (before the
/// protocol / session / source / simulator split): kept so callers written against it still
/// build. New code uses [`crate::dlms`], [`meters`] and [`crate::sim`].
pub mod dlms {
    pub use crate::dlms::{apdu, clock, hdlc, obis, wrapper};
    pub use crate::sim as simulator;
    pub use crate::sources::meters::*;
}

use bytes::Bytes;

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

/// A PUBLISH seen by the broker front listener, with the identity of the client that sent it
/// (rumqttd alone cannot tell who published, which the device-API rule needs).
#[derive(Debug, Clone)]
pub struct LocalPublish {
    pub client_id: String,
    /// MQTT username of the connection, if any.
    pub username: Option<String>,
    pub topic: String,
    pub payload: Bytes,
    /// When the bridge received it (used when the payload carries no `ts`).
    pub received_ms: TimestampMs,
}
