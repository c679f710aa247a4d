//! Shutdown plumbing: SIGTERM/SIGINT → cancel the root token; named tasks so the grace-period
//! wait can say which tasks are still running; the deadline after which they are abandoned.
//! Must not decide shutdown *order* — that is `app`'s job.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// How often the grace-period wait reports the tasks it is still waiting on.
const STILL_WAITING_EVERY: Duration = Duration::from_secs(2);

/// Tasks spawned through [`Tasks::spawn`], by name, so a slow shutdown can name the laggards.
#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    /// name → number of running tasks of that name.
    running: Arc<Mutex<BTreeMap<String, usize>>>,
}

struct Running {
    name: String,
    running: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut m) = self.running.lock() {
            if let Some(n) = m.get_mut(&self.name) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.name);
                }
            }
        }
    }
}

impl Tasks {
    pub fn new() -> Self {
        Self::default()
    }

    /// The tracker (for modules whose API takes one; their tasks are tracked but unnamed).
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Spawn a named, tracked task.
    pub fn spawn<F>(&self, name: impl Into<String>, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let name = name.into();
        if let Ok(mut m) = self.running.lock() {
            *m.entry(name.clone()).or_default() += 1;
        }
        let guard = Running {
            name,
            running: self.running.clone(),
        };
        self.tracker.spawn(async move {
            let _guard = guard;
            fut.await
        })
    }

    /// Names of named tasks still running (with counts above one).
    pub fn still_running(&self) -> Vec<String> {
        self.running
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(k, n)| {
                        if *n > 1 {
                            format!("{k} x{n}")
                        } else {
                            k.clone()
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Close the tracker and wait for every task, at most `grace`, logging what is still running.
    /// Returns false when the deadline passed.
    pub async fn wait(&self, grace: Duration) -> bool {
        self.tracker.close();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let tick = (tokio::time::Instant::now() + STILL_WAITING_EVERY).min(deadline);
            tokio::select! {
                _ = self.tracker.wait() => return true,
                _ = tokio::time::sleep_until(tick) => {
                    if tokio::time::Instant::now() >= deadline {
                        warn!(tasks = ?self.still_running(), "Shutdown grace period over; abandoning tasks.");
                        return false;
                    }
                    info!(tasks = ?self.still_running(), "Still waiting on tasks to finish.");
                }
            }
        }
    }
}

/// What the process was asked to do by a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM (systemd stop) or SIGINT (Ctrl-C): shut down.
    Terminate,
    /// SIGHUP (`systemctl reload`): re-read the configuration.
    Reload,
}

/// Wait for the next signal we act on.
pub async fn next_signal() -> std::io::Result<Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::select! {
        _ = term.recv() => Signal::Terminate,
        _ = int.recv() => Signal::Terminate,
        _ = hup.recv() => Signal::Reload,
    })
}

/// Cancel `cancel` on SIGTERM/SIGINT (for callers that do not handle reloads).
pub fn cancel_on_terminate(cancel: CancellationToken) {
    tokio::spawn(async move {
        loop {
            match next_signal().await {
                Ok(Signal::Terminate) | Err(_) => break,
                Ok(Signal::Reload) => continue,
            }
        }
        cancel.cancel();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_names_laggards_and_gives_up_at_deadline() {
        tokio::time::pause();
        let tasks = Tasks::new();
        let stop = CancellationToken::new();
        let s = stop.clone();
        tasks.spawn("quick", async move { s.cancelled().await });
        tasks.spawn("stuck", std::future::pending::<()>());
        stop.cancel();
        assert!(!tasks.wait(Duration::from_secs(5)).await);
        assert_eq!(tasks.still_running(), vec!["stuck".to_string()]);
    }

    #[tokio::test]
    async fn wait_returns_true_when_all_finish() {
        let tasks = Tasks::new();
        tasks.spawn("a", async {});
        tasks.spawn("a", async {});
        assert!(tasks.wait(Duration::from_secs(5)).await);
        assert!(tasks.still_running().is_empty());
    }
}
