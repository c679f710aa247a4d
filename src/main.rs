//! `dlms-bridge`: CLI, tracing setup, config loading and validation, then `app`. Exit codes:
//! 0 ok, 1 runtime failure, 2 configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::{error, info, warn};
use tracing_subscriber::{reload, EnvFilter};

use dlms_bridge::config::{self, Config};
use dlms_bridge::shutdown::{self, Signal};
use dlms_bridge::sources::dlms::cli::ReadArgs;
use dlms_bridge::sources::dlms::simulator::SimulateArgs;
use dlms_bridge::systemd;

#[derive(Parser, Debug)]
#[command(
    name = "dlms-bridge",
    version,
    about = "DLMS/COSEM meters and local MQTT to ThingsBoard, in one binary"
)]
struct Cli {
    /// Configuration file (default /etc/dlms-bridge/config.toml; absent = built-in defaults).
    #[arg(long, global = true, env = "DLMS_BRIDGE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the bridge (the default).
    Run,
    /// Validate the configuration and exit (2 on errors, each naming its key).
    CheckConfig,
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
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

/// Exit code for configuration errors.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.config),
        Command::CheckConfig => match load(cli.config.as_deref()) {
            Ok(_) => {
                println!("configuration ok");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
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
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Status => status(cli.config),
        Command::Read(args) => block_on(async move {
            dlms_bridge::sources::dlms::cli::read(args)
                .await
                .map_err(anyhow::Error::from)
        }),
        Command::Simulate(args) => {
            init_tracing("info");
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

/// Load and validate, printing every error; `Err` carries exit code 2.
fn load(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    let raw = config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    config::validate(raw).map_err(|errs| {
        eprintln!("error: invalid configuration:");
        for e in errs {
            eprintln!("  - {e}");
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

type FilterHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// rumqttd logs routine events (a client closing, our readiness probe) at ERROR; it stays quiet
/// unless the filter names it.
fn filter_for(level: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    if level.contains("rumqttd") {
        EnvFilter::try_new(level)
    } else {
        EnvFilter::try_new(format!("{level},rumqttd=off"))
    }
}

/// Logs to stdout (journald under systemd, which adds its own timestamps). `RUST_LOG`, when
/// set, wins over the configured level.
fn init_tracing(level: &str) -> Option<FilterHandle> {
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| filter_for(&s).ok())
        .or_else(|| filter_for(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt::layer().with_target(true);
    let res = if under_journald {
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt.without_time().with_ansi(false))
            .try_init()
    } else {
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init()
    };
    res.ok().map(|_| handle)
}

fn run(path: Option<PathBuf>) -> ExitCode {
    let cfg = match load(path.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let filter = init_tracing(&cfg.log_level);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "Cannot start the async runtime.");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(cfg, path, filter)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            error!(error = format!("{e:#}"), "Bridge failed.");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    cfg: Config,
    path: Option<PathBuf>,
    filter: Option<FilterHandle>,
) -> anyhow::Result<bool> {
    info!(version = env!("CARGO_PKG_VERSION"), "Starting dlms-bridge.");
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
        match shutdown::next_signal()
            .await
            .context("installing signal handlers")?
        {
            Signal::Terminate => break,
            Signal::Reload => {
                systemd::notify_reloading();
                reload(path.as_deref(), filter.as_ref(), &mut running).await;
                systemd::notify_ready();
            }
        }
    }
    systemd::notify_stopping();
    watchdog_cancel.cancel();
    running.shutdown().await
}

/// SIGHUP: re-read the configuration; apply the log level, meters and mappings; say what needs
/// a restart. An invalid configuration changes nothing.
async fn reload(
    path: Option<&std::path::Path>,
    filter: Option<&FilterHandle>,
    running: &mut dlms_bridge::app::Running,
) {
    let raw = match config::load(path) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "Reload: configuration not loaded; keeping the running one.");
            return;
        }
    };
    let cfg = match config::validate(raw) {
        Ok(c) => c,
        Err(errs) => {
            let errs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            warn!(errors = ?errs, "Reload: configuration invalid; keeping the running one.");
            return;
        }
    };
    if let Some(h) = filter {
        if std::env::var_os("RUST_LOG").is_none() {
            match filter_for(&cfg.log_level) {
                Ok(f) => {
                    let _ = h.reload(f);
                    info!(level = %cfg.log_level, "Reload: log level applied.");
                }
                Err(e) => warn!(error = %e, "Reload: bad log level."),
            }
        }
    }
    if let Err(e) = running.reload(&cfg).await {
        warn!(
            error = format!("{e:#}"),
            "Reload: meters/mappings not applied."
        );
    }
    info!(
        "Reload: [broker], [thingsboard], [store], [local] and [simulator] changes need a restart."
    );
}

/// `dlms-bridge status`: 0 healthy, 1 unhealthy or unreachable, 2 configuration error.
fn status(path: Option<PathBuf>) -> ExitCode {
    let cfg = match load(path.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
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
    dlms_bridge::sources::dlms::simulator::simulate(args, cancel)
        .await
        .context("running simulated meters")
}

fn import(what: ImportWhat, config_path: Option<PathBuf>) -> ExitCode {
    let ImportWhat::TbGateway {
        dir,
        mosquitto,
        dry_run,
        output,
    } = what;
    let res = match dlms_bridge::import::import_tb_gateway(&dir, mosquitto.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
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
        return ExitCode::SUCCESS;
    }
    let out = output
        .or(config_path)
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG_PATH));
    if out.exists() {
        eprintln!(
            "error: {} exists; write elsewhere with --output, or use --dry-run",
            out.display()
        );
        return ExitCode::FAILURE;
    }
    match std::fs::write(&out, &res.toml) {
        Ok(()) => {
            println!("wrote {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: writing {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}
