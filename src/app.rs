//! Wiring only: build the channels, start every task on one tracker, and stop them in order.
//!
//! Start: store → broker → simulated meters → meter actors → router → uplink.
//! Panics: a panic while serving one broker connection closes that connection only (release
//! builds unwind); the core tasks — router, uplink, and the store's worker thread — are
//! fail-fast: a panic there logs ERROR and exits the process non-zero, so systemd restarts the
//! unit instead of leaving a bridge that accepts data it can no longer store or send.
//! Stop (STYLE.md §5): sources are cancelled first (pollers finish their request and release the
//! association; the broker front stops reading), the router drains the events channel and exits
//! when its last sender is gone, then the uplink is cancelled and waits for outstanding PUBACKs,
//! then the store checkpoints. Unacknowledged rows simply stay for the next start.
//! Reload (SIGHUP): meters are diffed by name (removed/changed ones stopped, new/changed ones
//! started), the mapping set is swapped in the router and the uplink re-reads its TLS
//! certificates (used from its next connection); everything else needs a restart.

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
use crate::uplink::tls::TlsSettings;
use crate::uplink::{TlsReloader, Uplink, UplinkStatus};

/// Capacity of uplink → router downlink messages (RPCs, attribute updates). The uplink never
/// blocks on it: when full, the uplink drops and counts (its event loop must keep polling).
pub const DOWNLINK_CAPACITY: usize = 1024;

/// Exit status after a core task panicked (EX_SOFTWARE).
const PANIC_EXIT_CODE: i32 = 70;
/// Name of the store's worker thread (`store::open`), watched by the panic hook.
const STORE_THREAD: &str = "store";

/// Run a core task on its own tokio task; if it panics, log ERROR and exit non-zero.
fn fail_fast<F>(name: &'static str, fut: F) -> impl std::future::Future<Output = F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let inner = tokio::spawn(fut);
    async move {
        match inner.await {
            Ok(v) => v,
            Err(e) if e.is_panic() => {
                error!(
                    task = name,
                    "Core task panicked; exiting so the service is restarted."
                );
                std::process::exit(PANIC_EXIT_CODE);
            }
            // Cancelled: only when the runtime itself shuts down, dropping this task too.
            Err(_) => std::future::pending().await,
        }
    }
}

/// Make a panic on the store's worker thread fatal (a thread's panic is otherwise silent to
/// its owner: the handle would just start failing). Other panics keep the default behaviour.
fn install_store_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            if std::thread::current().name() == Some(STORE_THREAD) {
                error!("The store worker thread panicked; exiting so the service is restarted.");
                std::process::exit(PANIC_EXIT_CODE);
            }
        }));
    });
}

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
    /// Cancels pollers and the broker front: the first step of shutdown.
    sources_cancel: CancellationToken,
    /// Cancels the uplink after the router has drained.
    uplink_cancel: CancellationToken,
    /// Makes the uplink re-read its TLS certificates on reload.
    uplink_tls: TlsReloader,
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
    install_store_panic_hook();
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
    let router_done = tasks.spawn("router", fail_fast("router", router.run()));

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
    let uplink_tls = uplink.tls_reloader();
    let uplink_cancel = CancellationToken::new();
    let uc = uplink_cancel.clone();
    tasks.spawn(
        "uplink",
        fail_fast("uplink", async move {
            if let Err(e) = uplink.run(uc).await {
                error!(error = %e, "Uplink stopped.");
            }
        }),
    );

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
        sources_cancel,
        uplink_cancel,
        uplink_tls,
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
    broker: Option<BrokerHandle>,
) -> crate::uplink::gateway_rpc::GatewayInfo {
    let m2 = meters.clone();
    crate::uplink::gateway_rpc::GatewayInfo {
        extra_stats: Some(Arc::new(move || {
            let mut s = router.gateway_stats();
            s.insert(
                "meters".into(),
                meters.read().map(|m| m.len()).unwrap_or(0).into(),
            );
            if let Some(b) = &broker {
                s.insert("broker_clients".into(), b.client_count().into());
            }
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
        self.uplink_tls
            .reload(TlsSettings::from_config(&cfg.thingsboard));
        report.meters_started.sort();
        report.meters_stopped.sort();
        // The caller names the other changes (and what needs a restart); log only a change.
        if !report.meters_started.is_empty() || !report.meters_stopped.is_empty() {
            info!(
                started = ?report.meters_started,
                stopped = ?report.meters_stopped,
                "Reload: meters started and stopped."
            );
        }
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
