//! `dlms-bridge`: CLI, config loading and checking, logging set-up, then `app`. Exit codes:
//! 0 ok, 1 runtime failure, 2 configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::{error, info, warn};

use dlms_bridge::config::{self, preflight, Config, RawConfig};
use dlms_bridge::logging::{self, FilterHandle};
use dlms_bridge::shutdown::{self, Signal};
use dlms_bridge::sim::SimulateArgs;
use dlms_bridge::sources::meters::cli::ReadArgs;
use dlms_bridge::systemd;

#[derive(Parser, Debug)]
#[command(
    name = "dlms-bridge",
    version,
    about = "DLMS/COSEM meters and local MQTT to ThingsBoard, in one binary"
)]
struct Cli {
    /// Configuration file (default /etc/dlms-bridge/config.toml); it must exist.
    #[arg(long, global = true, env = "DLMS_BRIDGE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the bridge (the default).
    Run,
    /// Check everything `run` needs and exit (2 on errors, all listed, each naming its key).
    CheckConfig {
        /// Check as this user: the files must be readable by the user the service runs as.
        /// Default when run as root: dlms-bridge, if that user exists.
        #[arg(long, value_name = "USER")]
        as_user: Option<String>,
    },
    /// Print the effective configuration (file + environment) with secrets masked.
    PrintConfig,
    /// Ask the running bridge (its HTTP API) whether it is healthy; exit 0 only when it is.
    Status,
    /// Read a meter once and print each value with its unit.
    Read(ReadArgs),
    /// Serve built-in simulated meters (demos, tests, benchmarks).
    Simulate(SimulateArgs),
    /// Turn an existing setup into a dlms-bridge config.toml.
    Import {
        #[command(subcommand)]
        what: ImportWhat,
    },
}

#[derive(Subcommand, Debug)]
enum ImportWhat {
    /// From a ThingsBoard IoT Gateway config directory (e.g. /etc/thingsboard-gateway/config).
    TbGateway {
        dir: PathBuf,
        /// Mosquitto config whose listener/credentials become the [broker] section.
        #[arg(long)]
        mosquitto: Option<PathBuf>,
        /// Print the result instead of writing it.
        #[arg(long)]
        dry_run: bool,
        /// Where to write (default: the --config path, or /etc/dlms-bridge/config.toml).
        /// Connector files are copied into `tb-gateway/` beside it.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Replace a config that was changed since installation (a timestamped backup is kept).
        #[arg(long)]
        force: bool,
    },
}

/// Exit code for configuration errors.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.config),
        Command::CheckConfig { as_user } => check_config(cli.config.as_deref(), as_user),
        Command::PrintConfig => match config::load(cli.config.as_deref()) {
            Ok(raw) => match toml::to_string_pretty(&raw) {
                Ok(s) => {
                    print!("{s}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("error: {}", chain(&e));
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Status => status(cli.config),
        Command::Read(args) => block_on(async move {
            dlms_bridge::sources::meters::cli::read(args)
                .await
                .map_err(anyhow::Error::from)
        }),
        Command::Simulate(args) => {
            logging::init("info", logging::LogFormat::Text);
            block_on(simulate(args))
        }
        Command::Import { what } => import(what, cli.config),
    }
}

fn block_on(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes: `cannot read config file x: permission denied (os error 13)`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s += &format!(": {c}");
        src = c.source();
    }
    s
}

/// Load, validate and preflight, printing every error; `Err` carries exit code 2.
fn load(path: Option<&std::path::Path>) -> Result<(RawConfig, Config), ExitCode> {
    preflight::load_and_check(path).map_err(|e| {
        eprintln!("error: {}", chain(&e));
        ExitCode::from(EXIT_CONFIG)
    })
}

/// `check-config`: as the service user when root (so file permissions are the service's).
fn check_config(path: Option<&std::path::Path>, as_user: Option<String>) -> ExitCode {
    let is_root = nix::unistd::geteuid().is_root();
    let user = as_user.or_else(|| {
        let service_user_exists = nix::unistd::User::from_name(preflight::SERVICE_USER)
            .ok()
            .flatten()
            .is_some();
        (is_root && service_user_exists).then(|| preflight::SERVICE_USER.to_string())
    });
    if let Some(u) = &user {
        if let Err(e) = preflight::switch_user(u) {
            eprintln!("error: {}", chain(&e));
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let file = path.unwrap_or(std::path::Path::new(config::DEFAULT_CONFIG_PATH));
    match load(path) {
        Ok(_) => {
            println!(
                "configuration ok: {} (checked as user {})",
                file.display(),
                preflight::current_user()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// glibc keeps what the process frees in its arenas; `malloc_trim(0)` returns the free pages of
/// every arena to the system. The broker calls it once it has shrunk (src/broker/memory.rs), so
/// RSS comes back down after a flood or a crowd of clients has gone.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_freed_memory() -> bool {
    // SAFETY: malloc_trim takes no pointers and is thread-safe (glibc locks each arena in turn).
    unsafe { libc::malloc_trim(0) == 1 }
}

fn run(path: Option<PathBuf>) -> ExitCode {
    let (raw, cfg) = match load(path.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    dlms_bridge::broker::memory::set_release(release_freed_memory);
    let filter = logging::init(&cfg.log_level, cfg.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "Cannot start the async runtime.");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(raw, cfg, path, filter)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            error!(error = format!("{e:#}"), "Bridge failed.");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    started: RawConfig,
    cfg: Config,
    path: Option<PathBuf>,
    filter: Option<FilterHandle>,
) -> anyhow::Result<bool> {
    info!(version = env!("CARGO_PKG_VERSION"), "Starting dlms-bridge.");
    // Installed before anything starts, and kept for the whole run: a SIGHUP during start-up
    // must not kill the process (the default action), and one that arrives while a reload
    // runs is delivered when it ends, not lost between two registrations.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing signal handlers")?;
    let mut int = signal(SignalKind::interrupt()).context("installing signal handlers")?;
    let mut hup = signal(SignalKind::hangup()).context("installing signal handlers")?;
    let mut last = started.clone();
    let mut running = dlms_bridge::app::start(cfg).await?;
    // READY once the broker listens and every task is spawned (Type=notify).
    systemd::notify_ready();
    // The watchdog is fed only while the store worker answers and the uplink task is alive: a
    // wedged runtime, a dead queue or a dead uplink stops the pings and systemd restarts the
    // service. ThingsBoard being unreachable is not unhealthy: a restart cannot fix it and the
    // queue covers it.
    let watchdog_cancel = tokio_util::sync::CancellationToken::new();
    let store = running.store.clone();
    let uplink = running.uplink_status.clone();
    tokio::spawn(systemd::watchdog(
        move || {
            let store = store.clone();
            let uplink_alive = uplink.has_changed().is_ok();
            async move { uplink_alive && store.stats().await.is_ok() }
        },
        watchdog_cancel.clone(),
    ));
    loop {
        let sig = tokio::select! {
            _ = term.recv() => Signal::Terminate,
            _ = int.recv() => Signal::Terminate,
            _ = hup.recv() => Signal::Reload,
        };
        match sig {
            Signal::Terminate => break,
            Signal::Reload => {
                systemd::notify_reloading();
                reload(
                    path.as_deref(),
                    filter.as_ref(),
                    &started,
                    &mut last,
                    &mut running,
                )
                .await;
                systemd::notify_ready();
            }
        }
    }
    systemd::notify_stopping();
    watchdog_cancel.cancel();
    running.shutdown().await
}

/// SIGHUP: re-read and check the configuration like a start would; apply the log level,
/// meters and mappings; name what changed and which of those changes need a restart. An
/// invalid configuration changes nothing.
///
/// Live keys are compared with the previous load; the others with the configuration the
/// process started with, so a change still waiting for a restart is named at every reload.
async fn reload(
    path: Option<&std::path::Path>,
    filter: Option<&FilterHandle>,
    started: &RawConfig,
    last: &mut RawConfig,
    running: &mut dlms_bridge::app::Running,
) {
    let (raw, cfg) = match preflight::load_and_check(path) {
        Ok(c) => c,
        Err(e) => {
            error!(
                error = chain(&e),
                "Reload: configuration not applied; keeping the running one."
            );
            return;
        }
    };
    let (live, _) = config::diff::split_live(&config::diff::changed_keys(last, &raw));
    let (_, restart) = config::diff::split_live(&config::diff::changed_keys(started, &raw));
    if live.iter().any(|k| k == "log.level") {
        if let Some(h) = filter {
            if std::env::var_os("RUST_LOG").is_some() {
                info!("Reload: log.level changed but RUST_LOG is set and wins; not applied.");
            } else {
                match logging::filter_for(&cfg.log_level) {
                    Ok(f) => {
                        let _ = h.reload(f);
                    }
                    Err(e) => warn!(error = %e, "Reload: bad log level."),
                }
            }
        }
    }
    // Meters are always re-applied: a `database` entry's registry may change without the file.
    if let Err(e) = running.reload(&cfg).await {
        error!(
            error = format!("{e:#}"),
            "Reload: meters/mappings not applied."
        );
        return;
    }
    if live.is_empty() && restart.is_empty() {
        info!("Reload: configuration unchanged.");
    } else if !live.is_empty() {
        info!(applied = live.join(", "), "Reload: changes applied.");
    }
    if !restart.is_empty() {
        warn!(
            keys = restart.join(", "),
            "Reload: these changes need a restart (systemctl restart dlms-bridge); running with the values it started with."
        );
    }
    *last = raw;
}

/// `dlms-bridge status`: 0 healthy, 1 unhealthy or unreachable, 2 configuration error.
fn status(path: Option<PathBuf>) -> ExitCode {
    // Only where the bridge listens is needed: no preflight (token, writable queue), so an
    // operator's shell can ask a bridge whatever its own rights.
    let cfg = match config::load(path.as_deref())
        .and_then(|raw| config::validate(raw).map_err(config::Error::Invalid))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let fetched = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(dlms_bridge::http::client::fetch_status(&cfg)),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match fetched {
        Ok(doc) => {
            let (text, healthy) = dlms_bridge::http::client::summarize(&doc);
            print!("{text}");
            println!("{}", if healthy { "healthy" } else { "UNHEALTHY" });
            if healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            println!("[FAIL] bridge not reachable");
            eprintln!("error: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let cancel = tokio_util::sync::CancellationToken::new();
    shutdown::cancel_on_terminate(cancel.clone());
    dlms_bridge::sim::simulate(args, cancel)
        .await
        .context("running simulated meters")
}

fn import(what: ImportWhat, config_path: Option<PathBuf>) -> ExitCode {
    use dlms_bridge::import;
    let ImportWhat::TbGateway {
        dir,
        mosquitto,
        dry_run,
        output,
        force,
    } = what;
    let out = output
        .or(config_path)
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG_PATH));
    // Connector files are copied beside the config, so purging tb-gateway breaks nothing.
    // An absolute path: the service does not run in the directory the import ran in.
    let out_abs = std::path::absolute(&out).unwrap_or_else(|_| out.clone());
    let connectors_dir = match out_abs.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join("tb-gateway"),
        _ => PathBuf::from("tb-gateway"),
    };
    let res = match import::import_tb_gateway_into(&dir, mosquitto.as_deref(), &connectors_dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for n in &res.not_carried {
        eprintln!("not carried over: {n}");
    }
    if dry_run {
        // The written file needs the token; a dry run goes to a terminal or a log, so mask it.
        for line in res.toml.lines() {
            if line.trim_start().starts_with("access_token") && line.contains('"') {
                println!(
                    "access_token = \"***\"  # masked in --dry-run; written in full without it"
                );
            } else {
                println!("{line}");
            }
        }
        for (src, dest) in &res.copies {
            eprintln!("would copy {} to {}", src.display(), dest.display());
        }
        return ExitCode::SUCCESS;
    }
    let opts = import::WriteOptions {
        force,
        group: Some(preflight::SERVICE_USER.to_string()),
    };
    match import::write(&res, &out, config::PACKAGED_DEFAULT, &opts) {
        Ok(report) => {
            for c in &report.copied {
                println!("copied {}", c.display());
            }
            if let Some(b) = &report.backup {
                println!("kept the previous config as {}", b.display());
            }
            if let Some(w) = &report.group_warning {
                eprintln!("warning: {w}; the files are readable by their owner only");
            }
            let group = report.group.as_deref().unwrap_or("unchanged");
            println!("wrote {} (mode 0640, group {group})", out.display());
            println!(
                "next: review it, then: dlms-bridge --config {} check-config",
                out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e @ import::Error::Modified { .. }) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}
