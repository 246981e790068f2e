//! The memory high watermark: a sampler compares this process's resident memory with the
//! configured limit and raises the broker's memory alarm, which blocks publishing connections
//! (`connection.blocked`) until memory falls below the limit again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::amqp::Broker;

/// How often resident memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Resident set size of this process, in bytes (`VmRSS` in `/proc/self/status`, which is
/// already in kB whatever the page size).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Physical memory of the machine, in bytes (`/proc/meminfo`).
pub fn total_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The watermark in force; it can be changed while running (tests, and later the admin API).
#[derive(Debug)]
pub struct MemoryWatermark {
    limit: AtomicU64,
}

impl MemoryWatermark {
    pub fn new(limit_bytes: u64) -> Arc<MemoryWatermark> {
        Arc::new(MemoryWatermark {
            limit: AtomicU64::new(limit_bytes),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn set_limit(&self, bytes: u64) {
        self.limit.store(bytes, Ordering::Relaxed);
    }

    /// Samples memory until `shutdown`, raising and clearing the broker's alarm.
    pub async fn watch(self: Arc<Self>, broker: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut alarmed = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let Some(rss) = resident_bytes() else {
                tracing::warn!("cannot read resident memory; the memory watermark is not enforced");
                return;
            };
            let over = rss > self.limit();
            if over != alarmed {
                alarmed = over;
                if over {
                    tracing::warn!(
                        rss,
                        limit = self.limit(),
                        "memory high watermark reached: blocking publishers"
                    );
                } else {
                    tracing::info!(
                        rss,
                        limit = self.limit(),
                        "memory below the high watermark: unblocking publishers"
                    );
                }
                broker.set_memory_alarm(over);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process_memory() {
        let rss = super::resident_bytes().unwrap();
        assert!(rss > 0);
        assert!(super::total_memory_bytes().unwrap() > rss);
    }
}
