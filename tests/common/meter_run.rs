//! One meter actor as the bridge runs it (`spawn_meter`), feeding a channel the test reads in
//! place of the router.

use std::time::Duration;

use dlms_bridge::config::MeterConfig;
use dlms_bridge::model::Record;
use dlms_bridge::sources::meters::spawn_meter;
use dlms_bridge::sources::SourceEvent;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct MeterRun {
    rx: mpsc::Receiver<SourceEvent>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl MeterRun {
    pub fn start(cfg: MeterConfig) -> MeterRun {
        let (tx, rx) = mpsc::channel(64);
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let _h = spawn_meter(cfg, tx, &tracker, cancel.clone());
        MeterRun {
            rx,
            cancel,
            tracker,
        }
    }

    /// The records of the actor's next batch; `None` when none came within `within`.
    pub async fn next_records(&mut self, within: Duration) -> Option<Vec<Record>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .ok()?
                .expect("events open");
            if let SourceEvent::Records(records) = ev {
                return Some(records);
            }
        }
    }

    /// Cancel and wait (at most `within`) for the actor to release the association and end.
    pub async fn stop(self, within: Duration) {
        self.cancel.cancel();
        self.tracker.close();
        timeout(within, self.tracker.wait())
            .await
            .expect("meter actor stopped in time");
    }
}
