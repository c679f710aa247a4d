//! systemd service-manager integration: the `sd_notify` protocol (`READY=1`, `RELOADING=1`,
//! `STOPPING=1`, `STATUS=`) and the watchdog keep-alive (`WATCHDOG=1`).
//!
//! Everything here is a no-op when the process was not started by systemd with a notify socket
//! (`NOTIFY_SOCKET` unset): `dlms-bridge run` from a shell, tests and containers behave exactly
//! as before. Sending is fire-and-forget: a failed notification is logged, never fatal, because
//! the bridge's job (moving readings) matters more than telling systemd about it.
//!
//! The watchdog is fed only while a caller-supplied health check answers `true` within a
//! deadline. A stuck runtime cannot run the watchdog task, and a failing bridge answers `false`,
//! so in both cases the pings stop and systemd (`WatchdogSec=`) kills and restarts the service.
//! This module must not decide what "healthy" means; that is `app`'s job.
//!
//! The datagram protocol itself is spoken by the `sd-notify` crate (safe API, handles abstract
//! socket addresses and `WATCHDOG_PID`), so this crate keeps `#![forbid(unsafe_code)]`.

use std::env;
use std::future::Future;
use std::io;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::{self, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Environment variable systemd sets to the notification socket's address.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Errors of this module. They are logged by the public `notify_*` functions, never returned to
/// the bridge, since a missing notification must not stop the data flow.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Sending a datagram to `NOTIFY_SOCKET` failed.
    #[error("sending {state} to the systemd notify socket failed")]
    Notify {
        /// The first state line of the datagram, e.g. `READY=1`.
        state: String,
        #[source]
        source: io::Error,
    },
    /// The monotonic clock could not be read for `MONOTONIC_USEC` (reload notification).
    #[error("reading the monotonic clock failed")]
    Clock(#[source] io::Error),
}

/// Sends one datagram made of `states` to the notify socket, if there is one.
fn send(states: &[NotifyState<'_>]) -> Result<(), Error> {
    sd_notify::notify(states).map_err(|source| Error::Notify {
        state: states.first().map(ToString::to_string).unwrap_or_default(),
        source,
    })
}

/// Sends and logs a failure instead of returning it.
fn send_logged(states: &[NotifyState<'_>]) {
    if let Err(error) = send(states) {
        warn!(error = %error, cause = %source_of(&error), "systemd notification failed.");
    }
}

/// The innermost cause of an error, for a one-line log field.
fn source_of(error: &Error) -> String {
    match error {
        Error::Notify { source, .. } | Error::Clock(source) => source.to_string(),
    }
}

/// True when a service manager asked for notifications (`NOTIFY_SOCKET` set and non-empty).
pub fn enabled() -> bool {
    env::var_os(NOTIFY_SOCKET).is_some_and(|s| !s.is_empty())
}

/// Tells systemd that start-up (or a reload) is complete: the configuration is loaded and the
/// local broker listens. Call it once after `app::start`, and again after each reload.
pub fn notify_ready() {
    send_logged(&[NotifyState::Ready, NotifyState::Status("Running.")]);
}

/// Tells systemd that the configuration is being reloaded (SIGHUP). Follow with
/// [`notify_ready`] when the reload is done, whether or not it succeeded.
///
/// Sends `RELOADING=1` with `MONOTONIC_USEC=`, which systemd ≥ 253 requires to accept the reload
/// notification. If the clock cannot be read, `RELOADING=1` is not sent at all (systemd would
/// reject it without the timestamp); the following `READY=1` is harmless either way.
pub fn notify_reloading() {
    match NotifyState::monotonic_usec_now().map_err(Error::Clock) {
        Ok(now) => send_logged(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("Reloading configuration."),
        ]),
        Err(error) => {
            warn!(error = %error, cause = %source_of(&error), "Not telling systemd about the reload.")
        }
    }
}

/// Tells systemd that shutdown has begun, so `systemctl status` shows "deactivating" while the
/// grace period runs. Call it when the root cancellation token is cancelled.
pub fn notify_stopping() {
    send_logged(&[NotifyState::Stopping, NotifyState::Status("Stopping.")]);
}

/// Sets the free-form status line shown by `systemctl status`. Must not contain secrets.
pub fn notify_status(status: &str) {
    // A newline would start a new, unintended state line in the datagram.
    let one_line = status.replace('\n', " ");
    send_logged(&[NotifyState::Status(&one_line)]);
}

/// The watchdog timeout systemd configured for this process (`WATCHDOG_USEC`, honouring
/// `WATCHDOG_PID`), or `None` when there is no watchdog or no notify socket to ping.
pub fn watchdog_timeout() -> Option<Duration> {
    if !enabled() {
        return None;
    }
    sd_notify::watchdog_enabled().filter(|t| !t.is_zero())
}

/// Feeds the systemd watchdog while `health` says the bridge is healthy, until `cancel`.
///
/// Returns at once when systemd set no watchdog for this process. Otherwise it runs a health
/// check every half timeout and sends `WATCHDOG=1` only when the check answered `true` within a
/// quarter of the timeout; so even a slow check keeps the gap between pings below the timeout,
/// and a check that hangs (a wedged task, a blocked runtime) counts as unhealthy. Pings resume
/// when the check passes again before systemd gave up.
///
/// `health` is called once per round and returns a future, for example
/// `|| { let h = handle.clone(); async move { h.is_healthy().await } }`.
pub async fn watchdog<F, Fut>(health: F, cancel: CancellationToken)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let Some(timeout) = watchdog_timeout() else {
        debug!("No systemd watchdog configured.");
        return;
    };
    info!(timeout = ?timeout, "Feeding the systemd watchdog.");
    run_watchdog(
        timeout,
        health,
        || send_logged(&[NotifyState::Watchdog]),
        cancel,
    )
    .await;
}

/// The watchdog loop with the ping made injectable, so the schedule and the health gating can be
/// tested on a paused clock without a socket.
pub(crate) async fn run_watchdog<F, Fut, P>(
    timeout: Duration,
    mut health: F,
    mut ping: P,
    cancel: CancellationToken,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
    P: FnMut(),
{
    let every = timeout / 2;
    let deadline = timeout / 4;
    let mut ticker = time::interval(every);
    // After a slow round, wait a full interval rather than bursting to catch up.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut healthy_before = true;
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let healthy = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            answer = time::timeout(deadline, health()) => answer.unwrap_or(false),
        };
        if healthy {
            ping();
            if !healthy_before {
                info!("Health check passes again; feeding the systemd watchdog.");
            }
        } else if healthy_before {
            warn!(
                timeout = ?timeout,
                "Health check failed or timed out; withholding watchdog pings, systemd restarts the service unless it recovers."
            );
        }
        healthy_before = healthy;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    const TIMEOUT: Duration = Duration::from_secs(30);

    /// Runs the loop on a paused clock for `run_for`, with `health` deciding each round.
    async fn pings_after<F, Fut>(run_for: Duration, health: F) -> usize
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        let pings = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let counter = pings.clone();
        let task = tokio::spawn(run_watchdog(
            TIMEOUT,
            health,
            move || {
                counter.fetch_add(1, Ordering::SeqCst);
            },
            cancel.clone(),
        ));
        time::sleep(run_for).await;
        cancel.cancel();
        task.await.expect("watchdog task does not panic");
        pings.load(Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn healthy_pings_every_half_timeout() {
        // Ticks at 0, 15, 30, 45, 60 s: five pings in 61 s.
        let n = pings_after(Duration::from_secs(61), || async { true }).await;
        assert_eq!(n, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn unhealthy_never_pings() {
        let n = pings_after(Duration::from_secs(120), || async { false }).await;
        assert_eq!(n, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn hanging_health_check_counts_as_unhealthy() {
        let n = pings_after(Duration::from_secs(120), std::future::pending::<bool>).await;
        assert_eq!(n, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_but_timely_health_check_still_pings() {
        let n = pings_after(Duration::from_secs(61), || async {
            time::sleep(Duration::from_secs(5)).await;
            true
        })
        .await;
        assert!(n >= 3, "got {n} pings");
    }

    #[tokio::test(start_paused = true)]
    async fn pings_stop_and_resume_with_health() {
        let healthy = Arc::new(AtomicBool::new(true));
        let pings = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let (h, counter) = (healthy.clone(), pings.clone());
        let task = tokio::spawn(run_watchdog(
            TIMEOUT,
            move || {
                let h = h.clone();
                async move { h.load(Ordering::SeqCst) }
            },
            move || {
                counter.fetch_add(1, Ordering::SeqCst);
            },
            cancel.clone(),
        ));
        time::sleep(Duration::from_secs(1)).await;
        assert_eq!(pings.load(Ordering::SeqCst), 1, "first ping right away");
        healthy.store(false, Ordering::SeqCst);
        time::sleep(Duration::from_secs(60)).await;
        assert_eq!(pings.load(Ordering::SeqCst), 1, "no ping while unhealthy");
        healthy.store(true, Ordering::SeqCst);
        time::sleep(Duration::from_secs(15)).await;
        assert_eq!(pings.load(Ordering::SeqCst), 2, "pings resume");
        cancel.cancel();
        task.await.expect("watchdog task does not panic");
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_interrupts_a_hanging_check() {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run_watchdog(
            TIMEOUT,
            std::future::pending::<bool>,
            || {},
            cancel.clone(),
        ));
        time::sleep(Duration::from_secs(1)).await;
        cancel.cancel();
        time::timeout(Duration::from_secs(1), task)
            .await
            .expect("watchdog returns promptly on cancel")
            .expect("watchdog task does not panic");
    }
}
