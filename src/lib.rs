//! dlms-bridge: DLMS/COSEM meters and local MQTT publishers to ThingsBoard, in one process.
//!
//! ```text
//!  meters ⇄ TCP ⇄ sources::meters::poller (1 task per meter) ───┐
//!  local publishers → broker (:1884) ─┬→ local subscribers        │
//!                                     └→ SourceEvent ────────────┴→ mpsc → router
//!    → store (SQLite WAL; Ok = durable) → uplink (rumqttc, QoS 1, one token) → ThingsBoard
//!  ThingsBoard RPC/attributes → uplink → mpsc<Downlink> → router → meter handle / local topic
//! ```
//!
//! | task | owns | talks to |
//! |---|---|---|
//! | `broker` connection, one per local client | the client socket | broker state (sessions, subscriptions, retained), router (`mpsc<SourceEvent>`; PUBACK once durable) |
//! | `broker` housekeeping | will delays, session expiry, `$SYS`, persistence | broker state, `broker.db` |
//! | `sources::meters::poller`, one per meter | the meter's TCP link and association | router; RPCs arrive through its `MeterHandle` |
//! | `router` | mapping state | store (`enqueue`), broker (downlink publishes) |
//! | store worker (own thread) | the SQLite connection | everyone through `StoreHandle` |
//! | `uplink` | the ThingsBoard session | store (cursor, `ack`), router (`mpsc<Downlink>`) |
//!
//! Modules: [`app`] wiring and ordered shutdown; [`config`] loading and validation; [`model`]
//! shared types; [`broker`] the embedded Mosquitto-compatible broker (our core on rumqttc's codecs); [`dlms`] the pure
//! DLMS/COSEM protocol (no I/O); [`sources`] what feeds the router (DLMS meters, local
//! publishes); [`sim`] the built-in meter simulator; [`router`] mappings (built-in and
//! tb-gateway compatible); [`downlink`] RPC execution; [`store`] durable queue; [`uplink`]
//! ThingsBoard gateway session; [`shutdown`] signals and named tasks; [`import`] tb-gateway and
//! Mosquitto configuration import; [`logging`] journald, text or JSON output; [`tls`] PEM
//! certificate and key files for the uplink and the broker's TLS listener. See docs/ARCHITECTURE.md for the guarantees.
#![forbid(unsafe_code)]
pub mod app;
pub mod broker;
pub mod config;
pub mod dlms;
pub mod downlink;
pub mod http;
pub mod import;
pub mod logging;
pub mod model;
pub mod router;
pub mod shutdown;
pub mod sim;
pub mod sources;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod uplink;
