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
//! started), the mapping set is swapped in the router, the uplink re-reads its TLS
//! certificates (used from its next connection) and so does the broker's TLS listener (used for
//! new connections); everything else needs a restart.

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
use crate::http::{self, state::LiveState};
use crate::router::mapping::MappingSet;
use crate::router::{MeterMap, Router, RouterInputs, RELOAD_CAPACITY};
use crate::shutdown::Tasks;
use crate::sim;
use crate::sources::meters;
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
    origin: MeterOrigin,
    /// Stops this meter alone (a child of the sources token).
    cancel: CancellationToken,
}

/// Where a running meter was defined: what decides whether the HTTP API may change it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "database")]
pub enum MeterOrigin {
    /// A `[[meters]]` entry of the config file (changed only by editing the file).
    Config,
    /// A row of a registry database (`[[meters]] database = ...`), managed by the HTTP API.
    Registry(std::path::PathBuf),
    /// A built-in simulated meter (`[simulator]`).
    Simulator,
}

/// A running meter as the API and metrics show it.
#[derive(Debug, Clone)]
pub struct MeterInfo {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub interval: Duration,
    pub origin: MeterOrigin,
}

/// The running meter actors: started, diffed on reload and on registry changes, stopped. Shared
/// between `Running` (SIGHUP reload, shutdown) and the HTTP API (registry meters).
pub struct MeterSet {
    inner: tokio::sync::Mutex<MeterSetInner>,
}

struct MeterSetInner {
    /// Every running meter (simulated ones included) and its cancel token.
    slots: HashMap<String, MeterSlot>,
    /// The `[[meters]]` entries as configured (registry entries unexpanded), for re-expansion.
    entries: Vec<MeterConfig>,
    /// Kept for meters started later; dropped at shutdown so the router can finish.
    events_tx: Option<mpsc::Sender<SourceEvent>>,
    /// Parent of every meter's token: the sources token.
    sources_cancel: CancellationToken,
    tracker: tokio_util::task::TaskTracker,
    /// Meter names → actor handles, shared with the router for RPCs.
    meters: MeterMap,
}

impl MeterSet {
    /// Every running meter, sorted by name.
    pub async fn list(&self) -> Vec<MeterInfo> {
        let g = self.inner.lock().await;
        let mut v: Vec<MeterInfo> = g
            .slots
            .iter()
            .map(|(n, s)| MeterInfo {
                name: n.clone(),
                host: s.cfg.host.clone(),
                port: s.cfg.port,
                interval: s.cfg.interval,
                origin: s.origin.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The configured `[[meters]]` entries (registry entries not expanded).
    pub async fn entries(&self) -> Vec<MeterConfig> {
        self.inner.lock().await.entries.clone()
    }

    /// Re-read the registry databases and apply the result (after an API change).
    pub async fn reload_registries(&self) -> anyhow::Result<ReloadReport> {
        let entries = self.entries().await;
        let wanted = tokio::task::spawn_blocking(move || expand_meters(&entries))
            .await
            .context("registry reader panicked")??;
        let mut g = self.inner.lock().await;
        Ok(g.apply(wanted))
    }

    /// Replace the configured entries and apply them (SIGHUP).
    async fn reload(&self, entries: Vec<MeterConfig>) -> anyhow::Result<ReloadReport> {
        let wanted = expand_meters(&entries)?;
        let mut g = self.inner.lock().await;
        if g.events_tx.is_none() {
            anyhow::bail!("shutting down");
        }
        g.entries = entries;
        Ok(g.apply(wanted))
    }

    /// Stop accepting new meters: the router finishes once the running ones are gone.
    async fn close(&self) {
        self.inner.lock().await.events_tx = None;
    }
}

impl MeterSetInner {
    fn spawn(&mut self, m: MeterConfig, origin: MeterOrigin) -> bool {
        let Some(events_tx) = self.events_tx.clone() else {
            return false;
        };
        let name = m.name.clone();
        if self.slots.contains_key(&name) {
            warn!(meter = %name, "Duplicate meter name; the second definition is ignored.");
            return false;
        }
        let cancel = self.sources_cancel.child_token();
        let h = meters::spawn_meter(m.clone(), events_tx, &self.tracker, cancel.clone());
        if let Ok(mut g) = self.meters.write() {
            g.insert(name.clone(), h);
        }
        self.slots.insert(
            name,
            MeterSlot {
                cfg: m,
                origin,
                cancel,
            },
        );
        true
    }

    /// Diff the configured (non-simulated) meters against `wanted` by name and every setting.
    fn apply(&mut self, wanted: Vec<(MeterConfig, MeterOrigin)>) -> ReloadReport {
        let mut report = ReloadReport::default();
        let wanted_names: HashMap<&str, &MeterConfig> =
            wanted.iter().map(|(m, _)| (m.name.as_str(), m)).collect();
        // Stop meters that are gone or changed (serialised configs compare every field).
        let same = |a: &MeterConfig, b: &MeterConfig| {
            serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
                && a.password.as_ref().map(|p| p.expose().to_string())
                    == b.password.as_ref().map(|p| p.expose().to_string())
                // HLS keys as resolved (config or key_file), which serialising masks or skips.
                && a.hls == b.hls
        };
        let stop: Vec<String> = self
            .slots
            .iter()
            .filter(|(_, s)| s.origin != MeterOrigin::Simulator)
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
        for (m, origin) in wanted {
            if let Some(s) = self.slots.get_mut(&m.name) {
                if s.origin == MeterOrigin::Simulator {
                    warn!(meter = %m.name, "Reload: name taken by a simulated meter; ignored.");
                } else {
                    // Unchanged settings, maybe moved between the file and a registry.
                    s.origin = origin;
                }
                continue;
            }
            let name = m.name.clone();
            if self.spawn(m, origin) {
                report.meters_started.push(name);
            }
        }
        report.meters_started.sort();
        report.meters_stopped.sort();
        report
    }
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
    /// The HTTP server's bound address, when `[http] enabled`.
    pub http_addr: Option<SocketAddr>,
    /// The running meter actors (shared with the HTTP API).
    pub meter_set: Arc<MeterSet>,
    /// Stops the HTTP server (after the uplink, so `/readyz` reports the stop).
    http_cancel: CancellationToken,
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

/// Expand `database` entries into the meters they list. Blocking (SQLite).
fn expand_meters(meters: &[MeterConfig]) -> anyhow::Result<Vec<(MeterConfig, MeterOrigin)>> {
    let mut out = Vec::new();
    for m in meters {
        if let Some(db) = &m.database {
            let rows = meters::load_meter_registry(m).context("reading the meter registry")?;
            out.extend(
                rows.into_iter()
                    .map(|r| (r, MeterOrigin::Registry(db.clone()))),
            );
        } else {
            out.push((m.clone(), MeterOrigin::Config));
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

    // Bound before anything runs: a taken port then fails the start with nothing to clean up.
    let http_listener = if cfg.http.enabled {
        Some(
            http::bind(cfg.http_listen)
                .await
                .with_context(|| format!("starting the HTTP server on {}", cfg.http_listen))?,
        )
    } else {
        None
    };
    if http_listener.is_some() {
        // The recorder must exist before the first meter polls: counts made before it are lost.
        http::metrics::recorder();
    }
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
        let opts = sim::SimOptions {
            transport: cfg.simulator.transport,
            ..Default::default()
        };
        let sims = sim::spawn_meters(
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
    let mut set = MeterSetInner {
        slots: HashMap::new(),
        entries: cfg.meters.clone(),
        events_tx: Some(events_tx),
        sources_cancel: sources_cancel.clone(),
        tracker: tasks.tracker().clone(),
        meters: meters.clone(),
    };
    for (m, origin) in configured
        .into_iter()
        .chain(simulated.into_iter().map(|m| (m, MeterOrigin::Simulator)))
    {
        set.spawn(m, origin);
    }
    let meter_set = Arc::new(MeterSet {
        inner: tokio::sync::Mutex::new(set),
    });
    let live = Arc::new(LiveState::new(&cfg.http.sparkline_key));

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
    .with_rpc_timeout(cfg.gateway.rpc_timeout)
    .with_live(live.clone());
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
            gateway_info(router_stats.clone(), meters.clone(), broker.clone()),
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

    let broker_addr = broker.as_ref().map(|b| b.local_addr());
    let http_cancel = CancellationToken::new();
    let http_addr = match http_listener {
        Some(listener) => {
            let ctx = http::HttpContext {
                store: store.clone(),
                uplink_status: uplink_status.clone(),
                broker_addr,
                broker: broker.clone(),
                router_stats,
                live,
                meters: meter_set.clone(),
            };
            Some(
                http::start(&cfg.http, listener, ctx, &tasks, http_cancel.clone())
                    .context("starting the HTTP server")?,
            )
        }
        None => None,
    };

    Ok(Running {
        broker_addr,
        http_addr,
        broker,
        store,
        uplink_status,
        meters,
        simulated_meters,
        meter_set,
        http_cancel,
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
        let mut report = self.meter_set.reload(cfg.meters.clone()).await?;
        report.mappings_reloaded = self.reload_tx.send(mappings).await.is_ok();
        self.uplink_tls
            .reload(TlsSettings::from_config(&cfg.thingsboard));
        if let Some(b) = &self.broker {
            // Logged by the broker: INFO when re-read, ERROR (old certificate kept) otherwise.
            let _ = b.reload_tls(broker::tls::TlsSettings::from_config(&cfg.broker));
        }
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
        self.meter_set.close().await;
        self.sources_cancel.cancel();
        if tokio::time::timeout_at(deadline, &mut self.router_done)
            .await
            .is_err()
        {
            warn!("Router did not drain within the grace period.");
        }
        self.uplink_cancel.cancel();
        self.sim_cancel.cancel();
        self.http_cancel.cancel();
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
