//! Wiring only: build the channels, start every task on one tracker, and stop them in order.
//!
//! Start: store → broker (front + rumqttd) → simulated meters → meter actors → router → uplink.
//! Stop (STYLE.md §5): sources are cancelled first (pollers finish their request and release the
//! association; the broker front stops reading), the router drains the events channel and exits
//! when its last sender is gone, then the uplink is cancelled and waits for outstanding PUBACKs,
//! then the store checkpoints. Unacknowledged rows simply stay for the next start.
//! Reload (SIGHUP): meters are diffed by name (removed/changed ones stopped, new/changed ones
//! started) and the mapping set is swapped in the router; everything else needs a restart.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::broker::{self, BrokerHandle};
use crate::config::{Config, MeterConfig};
use crate::router::mapping::MappingSet;
use crate::router::{MeterMap, Router, RouterInputs, RELOAD_CAPACITY};
use crate::shutdown::Tasks;
use crate::sources::dlms;
use crate::sources::{SourceEvent, EVENTS_CAPACITY};
use crate::store::{self, StoreHandle};
use crate::uplink::{Uplink, UplinkStatus};

/// Capacity of uplink → router downlink messages (RPCs, attribute updates). The uplink never
/// blocks on it: when full, the uplink drops and counts (its event loop must keep polling).
pub const DOWNLINK_CAPACITY: usize = 1024;

/// One running meter actor and what is needed to stop or compare it on reload.
struct MeterSlot {
    cfg: MeterConfig,
    /// Stops this meter alone (a child of the sources token).
    cancel: CancellationToken,
}

/// A running bridge: what tests and `main` need to observe, reload and stop it.
pub struct Running {
    /// The embedded broker's bound address (useful when configured with port 0).
    pub broker_addr: Option<SocketAddr>,
    pub broker: Option<BrokerHandle>,
    pub store: StoreHandle,
    pub uplink_status: watch::Receiver<UplinkStatus>,
    /// Meter names → actor handles; shared with the router, which routes RPCs through them.
    pub meters: MeterMap,
    /// Addresses of the built-in simulated meters, if any.
    pub simulated_meters: Vec<SocketAddr>,
    /// Configured meters (the simulated ones excluded) and their own cancel tokens.
    slots: HashMap<String, MeterSlot>,
    /// Kept for meters started on reload; dropped at shutdown so the router can finish.
    events_tx: Option<mpsc::Sender<SourceEvent>>,
    /// New mapping sets for the router.
    reload_tx: mpsc::Sender<MappingSet>,
    default_device_type: String,
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

/// Expand `database` entries into the meters they list.
fn expand_meters(meters: &[MeterConfig]) -> anyhow::Result<Vec<MeterConfig>> {
    let mut out = Vec::new();
    for m in meters {
        if m.database.is_some() {
            out.extend(dlms::load_meter_registry(m).context("reading the meter registry")?);
        } else {
            out.push(m.clone());
        }
    }
    Ok(out)
}

fn mapping_set(cfg: &Config) -> anyhow::Result<MappingSet> {
    MappingSet::from_config(&cfg.mappings, &cfg.local.device_type).map_err(|errs| {
        anyhow::anyhow!(
            "invalid mappings:\n{}",
            errs.iter()
                .map(|e| format!("  - {e}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

/// Start everything; returns once the broker accepts connections and every task is spawned.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let tasks = Tasks::new();
    let mappings = mapping_set(&cfg)?;
    let configured = expand_meters(&cfg.meters)?;
    let store = store::open(&cfg.store)
        .with_context(|| format!("opening the queue {}", cfg.store.path.display()))?;

    let (events_tx, events_rx) = mpsc::channel(EVENTS_CAPACITY);
    let (downlink_tx, downlink_rx) = mpsc::channel(DOWNLINK_CAPACITY);
    let (reload_tx, reload_rx) = mpsc::channel(RELOAD_CAPACITY);
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
        Some(b)
    } else {
        None
    };

    let sim_cancel = CancellationToken::new();
    let mut simulated = Vec::new();
    let mut simulated_meters = Vec::new();
    if cfg.simulator.meters > 0 {
        let opts = dlms::simulator::SimOptions {
            transport: cfg.simulator.transport,
            ..Default::default()
        };
        let sims = dlms::simulator::spawn_meters(
            std::net::Ipv4Addr::LOCALHOST.into(),
            0,
            cfg.simulator.meters,
            &opts,
            tasks.tracker(),
            sim_cancel.clone(),
        )
        .await
        .context("starting the built-in simulated meters")?;
        for (i, addr) in sims.iter().enumerate() {
            simulated.push(MeterConfig {
                name: format!("sim-meter-{:04}", i + 1),
                host: addr.ip().to_string(),
                port: addr.port(),
                transport: cfg.simulator.transport,
                interval: cfg.simulator.interval,
                logical_address: opts.logical,
                physical_address: opts.physical,
                ..MeterConfig::default()
            });
        }
        info!(
            count = sims.len(),
            "Built-in simulated meters serving on loopback."
        );
        simulated_meters = sims;
    }

    let meters: MeterMap = Arc::new(RwLock::new(HashMap::new()));
    let mut slots = HashMap::new();
    for (m, is_sim) in configured
        .into_iter()
        .map(|m| (m, false))
        .chain(simulated.into_iter().map(|m| (m, true)))
    {
        let name = m.name.clone();
        if slots.contains_key(&name) || meters.read().is_ok_and(|g| g.contains_key(&name)) {
            warn!(meter = %name, "Duplicate meter name; the second definition is ignored.");
            continue;
        }
        let cancel = sources_cancel.child_token();
        let h = dlms::spawn_meter(
            m.clone(),
            events_tx.clone(),
            tasks.tracker(),
            cancel.clone(),
        );
        if let Ok(mut g) = meters.write() {
            g.insert(name.clone(), h);
        }
        if !is_sim {
            slots.insert(name, MeterSlot { cfg: m, cancel });
        }
    }

    let router = Router::new(
        RouterInputs {
            events_rx,
            downlink_rx,
            reload_rx,
        },
        store.clone(),
        mappings,
        cfg.local.clone(),
        broker.clone(),
        meters.clone(),
    )
    .with_max_packet_size(cfg.thingsboard.max_packet_size)
    .with_rpc_timeout(cfg.gateway.rpc_timeout);
    let router_stats = router.stats();
    let router_done = tasks.spawn("router", router.run());

    // The uplink's wait for outstanding PUBACKs gets half the shutdown grace: the other half is
    // for the sources and the router before it, and the store checkpoint after it.
    let (registry, names) = crate::store::devices::DeviceRegistry::open_beside(&cfg.store.path)
        .context("opening the device registry beside the queue")?;
    let uplink = Uplink::new(cfg.thingsboard.clone(), store.clone(), downlink_tx)
        .with_shutdown_grace(cfg.shutdown.grace / 2)
        .with_device_registry(registry, names)
        .with_gateway(
            cfg.gateway.clone(),
            gateway_info(router_stats, meters.clone(), broker.clone()),
        );
    let uplink_status = uplink.status();
    let uplink_cancel = CancellationToken::new();
    let uc = uplink_cancel.clone();
    tasks.spawn("uplink", async move {
        if let Err(e) = uplink.run(uc).await {
            error!(error = %e, "Uplink stopped.");
        }
    });

    Ok(Running {
        broker_addr: broker.as_ref().map(|b| b.local_addr()),
        broker,
        store,
        uplink_status,
        meters,
        simulated_meters,
        slots,
        events_tx: Some(events_tx),
        reload_tx,
        default_device_type: cfg.local.device_type.clone(),
        sources_cancel,
        uplink_cancel,
        sim_cancel,
        router_done,
        tasks,
        grace: cfg.shutdown.grace,
    })
}

/// What the uplink borrows for gateway RPCs and statistics: router counters, which devices are
/// meters.
fn gateway_info(
    router: Arc<crate::router::RouterStats>,
    meters: MeterMap,
    _broker: Option<BrokerHandle>,
) -> crate::uplink::gateway_rpc::GatewayInfo {
    let m2 = meters.clone();
    crate::uplink::gateway_rpc::GatewayInfo {
        extra_stats: Some(Arc::new(move || {
            let mut s = router.gateway_stats();
            s.insert(
                "meters".into(),
                meters.read().map(|m| m.len()).unwrap_or(0).into(),
            );
            // TODO(#10): broker clients once the broker core exposes `client_count()`.
            s
        })),
        source_of: Some(Arc::new(move |name: &str| {
            if m2.read().is_ok_and(|m| m.contains_key(name)) {
                "meter"
            } else {
                "local"
            }
        })),
    }
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub meters_started: Vec<String>,
    pub meters_stopped: Vec<String>,
    pub mappings_reloaded: bool,
}

impl Running {
    /// Apply a new configuration's meters and mappings. Errors leave the running set unchanged.
    pub async fn reload(&mut self, cfg: &Config) -> anyhow::Result<ReloadReport> {
        let mappings = mapping_set(cfg)?;
        let wanted = expand_meters(&cfg.meters)?;
        let Some(events_tx) = self.events_tx.clone() else {
            anyhow::bail!("shutting down");
        };
        let mut report = ReloadReport::default();
        let wanted_names: HashMap<&str, &MeterConfig> =
            wanted.iter().map(|m| (m.name.as_str(), m)).collect();
        // Stop meters that are gone or changed (serialised configs compare every field).
        let same = |a: &MeterConfig, b: &MeterConfig| {
            serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
                && a.password.as_ref().map(|p| p.expose().to_string())
                    == b.password.as_ref().map(|p| p.expose().to_string())
        };
        let stop: Vec<String> = self
            .slots
            .iter()
            .filter(|(n, s)| {
                wanted_names
                    .get(n.as_str())
                    .is_none_or(|w| !same(&s.cfg, w))
            })
            .map(|(n, _)| n.clone())
            .collect();
        for n in stop {
            if let Some(s) = self.slots.remove(&n) {
                s.cancel.cancel();
            }
            if let Ok(mut g) = self.meters.write() {
                g.remove(&n);
            }
            report.meters_stopped.push(n);
        }
        for m in wanted {
            if self.slots.contains_key(&m.name) {
                continue;
            }
            if self.meters.read().is_ok_and(|g| g.contains_key(&m.name)) {
                warn!(meter = %m.name, "Reload: name taken by a simulated meter; ignored.");
                continue;
            }
            let cancel = self.sources_cancel.child_token();
            let h = dlms::spawn_meter(
                m.clone(),
                events_tx.clone(),
                self.tasks.tracker(),
                cancel.clone(),
            );
            if let Ok(mut g) = self.meters.write() {
                g.insert(m.name.clone(), h);
            }
            report.meters_started.push(m.name.clone());
            self.slots
                .insert(m.name.clone(), MeterSlot { cfg: m, cancel });
        }
        report.mappings_reloaded = self.reload_tx.send(mappings).await.is_ok();
        if cfg.local.device_type != self.default_device_type {
            warn!("Reload: local.device_type changes need a restart.");
        }
        report.meters_started.sort();
        report.meters_stopped.sort();
        info!(
            started = ?report.meters_started,
            stopped = ?report.meters_stopped,
            "Reload applied to meters and mappings."
        );
        Ok(report)
    }

    /// Ordered shutdown within the grace period. `Ok(true)` when everything finished in time.
    pub async fn shutdown(mut self) -> anyhow::Result<bool> {
        let deadline = tokio::time::Instant::now() + self.grace;
        info!(grace = ?self.grace, "Shutting down.");
        self.events_tx = None;
        self.sources_cancel.cancel();
        if tokio::time::timeout_at(deadline, &mut self.router_done)
            .await
            .is_err()
        {
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

/// Names of the running meters (for tests and status).
pub fn meter_names(meters: &MeterMap) -> Vec<String> {
    let mut v: Vec<String> = meters
        .read()
        .map(|g| g.keys().cloned().collect())
        .unwrap_or_default();
    v.sort();
    v
}
