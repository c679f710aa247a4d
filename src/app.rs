//! Wiring only: build the channels, start every task on one tracker, and stop them in order.
//!
//! Start: store → broker (front + rumqttd) → simulated meters → meter actors → router → uplink.
//! Stop (STYLE.md §5): sources are cancelled first (pollers finish their request and release the
//! association; the broker front stops reading), the router drains the events channel and exits
//! when its last sender is gone, then the uplink is cancelled and waits for outstanding PUBACKs,
//! then the store checkpoints. Unacknowledged rows simply stay for the next start.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::{self, BrokerHandle};
use crate::config::{Config, MeterConfig};
use crate::router::mapping::MappingSet;
use crate::router::Router;
use crate::shutdown::Tasks;
use crate::sources::dlms::{self, MeterHandle};
use crate::sources::EVENTS_CAPACITY;
use crate::store::{self, StoreHandle};
use crate::uplink::{Uplink, UplinkStatus};

/// Capacity of uplink → router downlink messages (RPCs, attribute updates). The uplink never
/// blocks on it: when full, the uplink drops and counts (its event loop must keep polling).
pub const DOWNLINK_CAPACITY: usize = 1024;

/// A running bridge: what tests and `main` need to observe and stop it.
pub struct Running {
    /// The embedded broker's bound address (useful when configured with port 0).
    pub broker_addr: Option<SocketAddr>,
    pub broker: Option<BrokerHandle>,
    pub store: StoreHandle,
    pub uplink_status: watch::Receiver<UplinkStatus>,
    /// Meter names → their actor handles (RPCs go through these).
    pub meters: HashMap<String, MeterHandle>,
    /// Addresses of the built-in simulated meters, if any.
    pub simulated_meters: Vec<SocketAddr>,
    /// Cancels pollers and the broker front: the first step of shutdown.
    sources_cancel: CancellationToken,
    /// Cancels the uplink after the router has drained.
    uplink_cancel: CancellationToken,
    /// Cancels the simulated meters last, so pollers can release their associations.
    sim_cancel: CancellationToken,
    router_done: tokio::task::JoinHandle<()>,
    tasks: Tasks,
    grace: Duration,
}

/// Start everything; returns once the broker accepts connections and every task is spawned.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let tasks = Tasks::new();
    let store = store::open(&cfg.store)
        .with_context(|| format!("opening the queue {}", cfg.store.path.display()))?;
    let mappings = MappingSet::from_config(&cfg.mappings, &cfg.local.device_type).map_err(|errs| {
        anyhow::anyhow!(
            "invalid mappings:\n{}",
            errs.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n")
        )
    })?;

    let (events_tx, events_rx) = mpsc::channel(EVENTS_CAPACITY);
    let (downlink_tx, downlink_rx) = mpsc::channel(DOWNLINK_CAPACITY);
    let sources_cancel = CancellationToken::new();

    let broker = if cfg.broker.enabled {
        let b = broker::start(
            &cfg.broker,
            cfg.broker_listen,
            events_tx.clone(),
            tasks.tracker(),
            sources_cancel.child_token(),
        )
        .await
        .with_context(|| format!("starting the local broker on {}", cfg.broker_listen))?;
        info!(listen = %b.local_addr(), "Local MQTT broker listening.");
        Some(b)
    } else {
        None
    };

    let sim_cancel = CancellationToken::new();
    let mut meter_cfgs: Vec<MeterConfig> = Vec::new();
    for m in &cfg.meters {
        if m.database.is_some() {
            let listed = dlms::load_meter_registry(m).context("reading the meter registry")?;
            meter_cfgs.extend(listed);
        } else {
            meter_cfgs.push(m.clone());
        }
    }
    let mut simulated_meters = Vec::new();
    if cfg.simulator.meters > 0 {
        let sims = dlms::simulator::start_many(
            cfg.simulator.meters,
            cfg.simulator.transport,
            tasks.tracker(),
            sim_cancel.clone(),
        )
        .await
        .context("starting the built-in simulated meters")?;
        for (i, addr) in sims.iter().enumerate() {
            meter_cfgs.push(MeterConfig {
                name: format!("sim-meter-{:04}", i + 1),
                host: addr.ip().to_string(),
                port: addr.port(),
                transport: cfg.simulator.transport,
                interval: cfg.simulator.interval,
                ..MeterConfig::default()
            });
        }
        info!(count = sims.len(), "Built-in simulated meters serving on loopback.");
        simulated_meters = sims;
    }
    let mut meters = HashMap::new();
    for m in meter_cfgs {
        let name = m.name.clone();
        if meters.contains_key(&name) {
            warn!(meter = %name, "Duplicate meter name; the second definition is ignored.");
            continue;
        }
        let h = dlms::spawn_meter(
            m,
            events_tx.clone(),
            tasks.tracker(),
            sources_cancel.child_token(),
        );
        meters.insert(name, h);
    }
    // The router ends when the last sender (broker front, pollers) is gone.
    drop(events_tx);

    let router = Router::new(
        events_rx,
        downlink_rx,
        store.clone(),
        mappings,
        cfg.local.clone(),
        broker.clone(),
        meters.clone(),
    );
    let router_done = tasks.spawn("router", router.run());

    let uplink = Uplink::new(cfg.thingsboard.clone(), store.clone(), downlink_tx);
    let uplink_status = uplink.status();
    let uplink_cancel = CancellationToken::new();
    let uc = uplink_cancel.clone();
    tasks.spawn("uplink", async move {
        if let Err(e) = uplink.run(uc).await {
            tracing::error!(error = %e, "Uplink stopped.");
        }
    });

    Ok(Running {
        broker_addr: broker.as_ref().map(|b| b.local_addr()),
        broker,
        store,
        uplink_status,
        meters,
        simulated_meters,
        sources_cancel,
        uplink_cancel,
        sim_cancel,
        router_done,
        tasks,
        grace: cfg.shutdown.grace,
    })
}

impl Running {
    /// Ordered shutdown within the grace period. `Ok(true)` when everything finished in time.
    pub async fn shutdown(self) -> anyhow::Result<bool> {
        let deadline = tokio::time::Instant::now() + self.grace;
        info!(grace = ?self.grace, "Shutting down.");
        self.sources_cancel.cancel();
        if tokio::time::timeout_at(deadline, self.router_done).await.is_err() {
            warn!("Router did not drain within the grace period.");
        }
        self.uplink_cancel.cancel();
        self.sim_cancel.cancel();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let clean = self.tasks.wait(left).await;
        if let Err(e) = self.store.close().await {
            warn!(error = %e, "Closing the queue failed; it will be recovered at next start.");
        }
        Ok(clean)
    }
}
