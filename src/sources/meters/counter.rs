//! The client invocation counter of an HLS-GMAC meter: every ciphered APDU and every pass-3
//! answer we send carries a value from here, and no value is ever used twice for the same keys
//! and system title, across reconnects and restarts.
//!
//! Persistence reserves blocks: before a value of a new block is handed out, the block's end is
//! written to the counter file (temporary file, fsync, rename, like the profile position). After
//! a crash or restart counting resumes at the stored end, so values can only be skipped (at most
//! [`RESERVE_BLOCK`] per start), never reused. An unreadable file stops the meter (the operator
//! decides: deleting it would reuse counters) rather than starting again from zero.
//! It must not: hand out a value before the reservation covering it is durable.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Values reserved per write of the counter file.
pub const RESERVE_BLOCK: u32 = 1000;

/// Why no invocation counter value could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reservation could not be written (or the file read).
    #[error("cannot store the invocation counter in {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The counter file holds something else than a number.
    #[error("invocation counter file {path} is unreadable ({content:?}); it must hold one decimal number (do not delete it: counters would be reused)")]
    Corrupt { path: String, content: String },
    /// All 2^32 values are used: the keys must be changed.
    #[error("invocation counter exhausted: change the meter's keys (and remove the counter file)")]
    Exhausted,
}

/// A counter handed to each association of one meter (it outlives connections).
pub type SharedCounter = Arc<tokio::sync::Mutex<InvocationCounter>>;

/// Unique invocation counter values, reserved in blocks in `path`.
#[derive(Debug)]
pub struct InvocationCounter {
    /// The next value to hand out.
    next: u32,
    /// Values below this are covered by the stored reservation.
    reserved: u32,
    /// Where the reservation is stored; `None` keeps it in memory (one process only).
    path: Option<PathBuf>,
}

impl InvocationCounter {
    /// Open the counter stored at `path` (resuming above its reservation), or start at `start`
    /// when there is no file yet (or no path).
    pub async fn open(path: Option<PathBuf>, start: u32) -> Result<Self, Error> {
        let stored = match &path {
            Some(p) => load(p).await?,
            None => None,
        };
        let next = stored.map_or(start, |s| s.max(start));
        Ok(InvocationCounter {
            next,
            reserved: next,
            path,
        })
    }

    /// Open it and share it between the associations of one meter.
    pub async fn shared(path: Option<PathBuf>, start: u32) -> Result<SharedCounter, Error> {
        Ok(Arc::new(tokio::sync::Mutex::new(
            Self::open(path, start).await?,
        )))
    }

    /// The next value; reserves (durably) a new block first when the current one is used up.
    pub async fn take(&mut self) -> Result<u32, Error> {
        if self.next == u32::MAX {
            return Err(Error::Exhausted);
        }
        if self.next >= self.reserved {
            let end = self.next.saturating_add(RESERVE_BLOCK);
            if let Some(p) = &self.path {
                store(p, end).await?;
            }
            self.reserved = end;
        }
        let v = self.next;
        self.next += 1;
        Ok(v)
    }

    /// The value the next `take` returns (health and tests).
    pub fn peek(&self) -> u32 {
        self.next
    }
}

/// The counter file of meter `meter` in `dir`.
pub fn counter_path(dir: &Path, meter: &str) -> PathBuf {
    dir.join(format!("hls-{}.ic", super::profile::file_stem(meter)))
}

async fn load(path: &Path) -> Result<Option<u32>, Error> {
    match tokio::fs::read_to_string(path).await {
        Ok(s) => match s.trim().parse::<u32>() {
            Ok(v) => Ok(Some(v)),
            Err(_) => Err(Error::Corrupt {
                path: path.display().to_string(),
                content: s.chars().take(40).collect(),
            }),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Store `end` durably: temporary file, fsync, rename over the old one, fsync the directory.
async fn store(path: &Path, end: u32) -> Result<(), Error> {
    let err = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("ic.tmp");
    super::write_file_durably(path, &tmp, format!("{end}\n").as_bytes())
        .await
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn values_are_unique_across_reopen_and_reserved_before_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = counter_path(dir.path(), "Meter 1");
        assert!(p.to_string_lossy().ends_with("hls-4d657465722031.ic"));
        let mut c = InvocationCounter::open(Some(p.clone()), 1)
            .await
            .expect("open");
        assert_eq!(c.take().await.expect("take"), 1);
        // The reservation is on disk before the value was handed out.
        assert_eq!(
            std::fs::read_to_string(&p).expect("file").trim(),
            (1 + RESERVE_BLOCK).to_string()
        );
        let mut last = 1;
        for _ in 0..RESERVE_BLOCK + 5 {
            last = c.take().await.expect("take");
        }
        assert_eq!(last, RESERVE_BLOCK + 6);
        drop(c);
        // A restart (or a crash) resumes above everything reserved: skipped, never reused.
        let mut c = InvocationCounter::open(Some(p.clone()), 1)
            .await
            .expect("reopen");
        let first = c.take().await.expect("take");
        assert!(first > last, "{first} after {last}");
        assert_eq!(first, 2 * RESERVE_BLOCK + 1);
    }

    #[tokio::test]
    async fn corrupt_file_and_exhaustion_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("hls-x.ic");
        std::fs::write(&p, "garbage").expect("write");
        let e = InvocationCounter::open(Some(p.clone()), 1)
            .await
            .expect_err("corrupt");
        assert!(matches!(e, Error::Corrupt { .. }));
        std::fs::write(&p, format!("{}", u32::MAX - 1)).expect("write");
        let mut c = InvocationCounter::open(Some(p), 1).await.expect("open");
        assert_eq!(c.take().await.expect("last value"), u32::MAX - 1);
        assert!(matches!(c.take().await, Err(Error::Exhausted)));
        let mut m = InvocationCounter::open(None, 7).await.expect("memory");
        assert_eq!(m.take().await.expect("take"), 7);
        assert_eq!(m.peek(), 8);
    }
}
