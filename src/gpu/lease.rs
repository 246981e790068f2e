//! The lease rule: which unleased GPUs the conductor may hand to a step. A GPU is refused
//! when it was removed from config, is missing from its host's last sample (or that sample
//! is older than the sample window), is in error, has less free memory than its host's
//! `min_free_memory_mib`, or runs a compute process (on an unleased GPU every process is
//! someone else's: mqic's own steps hold a lease while they run).
//!
//! Without monitoring data (no NVML and no nvidia-smi on the host, as in CI and `mqic
//! demo`, or the curator turned off) GPUs from config are leasable as they are: the curator
//! says so once per host, and nothing here guesses.

use std::collections::BTreeMap;

use crate::store::records::{GpuHealth, GpuRecord};

/// What the rule needs from the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeasePolicy {
    /// Whether monitoring data counts (the curator runs). Off: every configured GPU is
    /// leasable, whatever an older run stored.
    pub monitored: bool,
    /// A state sampled longer ago than this is stale: the GPU counts as missing.
    pub stale_after_ms: u64,
    /// Host name -> the free memory a GPU there needs to be leased.
    pub min_free_mib: BTreeMap<String, u64>,
}

/// Why a GPU is not leased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotConfigured,
    Missing,
    Stale { age_ms: u64 },
    Error(String),
    LowMemory { free_mib: u64, need_mib: u64 },
    MemoryUnknown { need_mib: u64 },
    Occupied { pids: Vec<u32> },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotConfigured => write!(f, "not in the configuration"),
            Refusal::Missing => write!(f, "missing from the last sample"),
            Refusal::Stale { age_ms } => {
                write!(f, "not seen for {}s (no recent sample)", age_ms / 1000)
            }
            Refusal::Error(why) => write!(f, "in error: {why}"),
            Refusal::LowMemory { free_mib, need_mib } => {
                write!(f, "{free_mib} MiB free, {need_mib} MiB needed")
            }
            Refusal::MemoryUnknown { need_mib } => {
                write!(f, "free memory unknown, {need_mib} MiB needed")
            }
            Refusal::Occupied { pids } => {
                let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
                write!(f, "running another process (pid {})", pids.join(", "))
            }
        }
    }
}

impl LeasePolicy {
    /// The policy a configuration sets: monitoring counts when the curator runs.
    pub fn from_config(config: &crate::config::Config) -> LeasePolicy {
        LeasePolicy {
            monitored: config.workers.curator,
            stale_after_ms: config.curator.stale_after_ms(),
            min_free_mib: config
                .hosts
                .iter()
                .map(|h| (h.name.clone(), h.min_free_memory_mib))
                .collect(),
        }
    }

    /// Why `gpu` may not be leased at `now_ms`, or `None` when it may (leases are checked
    /// by the caller).
    pub fn refusal(&self, gpu: &GpuRecord, now_ms: u64) -> Option<Refusal> {
        if !gpu.usable {
            return Some(Refusal::NotConfigured);
        }
        let state = match (&gpu.state, self.monitored) {
            (Some(s), true) => s,
            _ => return None,
        };
        let age_ms = now_ms.saturating_sub(state.sampled_ms);
        if age_ms > self.stale_after_ms {
            return Some(Refusal::Stale { age_ms });
        }
        match state.health {
            GpuHealth::Missing => return Some(Refusal::Missing),
            GpuHealth::Error => {
                return Some(Refusal::Error(
                    state.error.clone().unwrap_or_else(|| "unknown".into()),
                ))
            }
            GpuHealth::Ok => {}
        }
        if !state.processes.is_empty() {
            return Some(Refusal::Occupied {
                pids: state.processes.iter().map(|p| p.pid).collect(),
            });
        }
        let need_mib = self.min_free_mib.get(&gpu.gpu.host).copied().unwrap_or(0);
        if need_mib > 0 {
            match state.memory_free_mib() {
                None => return Some(Refusal::MemoryUnknown { need_mib }),
                Some(free_mib) if free_mib < need_mib => {
                    return Some(Refusal::LowMemory { free_mib, need_mib })
                }
                Some(_) => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::{GpuKey, GpuProcess, GpuState};

    const NOW: u64 = 1_000_000;

    fn policy() -> LeasePolicy {
        LeasePolicy {
            monitored: true,
            stale_after_ms: 30_000,
            min_free_mib: [("gpu1".to_string(), 2048)].into_iter().collect(),
        }
    }

    fn healthy() -> GpuState {
        GpuState {
            health: GpuHealth::Ok,
            sampled_ms: NOW - 1_000,
            uuid: "GPU-a".into(),
            utilization_pct: Some(0),
            memory_used_mib: Some(500),
            memory_total_mib: Some(81_559),
            temperature_c: Some(30),
            processes: Vec::new(),
            error: None,
        }
    }

    fn gpu(host: &str, state: Option<GpuState>) -> GpuRecord {
        GpuRecord {
            gpu: GpuKey {
                host: host.into(),
                index: 0,
            },
            usable: true,
            name: String::new(),
            last_seen_ms: 0,
            state,
        }
    }

    #[test]
    fn a_healthy_idle_gpu_with_room_is_leasable() {
        assert_eq!(policy().refusal(&gpu("gpu1", Some(healthy())), NOW), None);
    }

    #[test]
    fn no_monitoring_data_leaves_configured_gpus_leasable() {
        assert_eq!(policy().refusal(&gpu("gpu1", None), NOW), None);
        // The curator is off: whatever an older run stored does not count.
        let mut s = healthy();
        s.health = GpuHealth::Error;
        let off = LeasePolicy {
            monitored: false,
            ..policy()
        };
        assert_eq!(off.refusal(&gpu("gpu1", Some(s)), NOW), None);
        let mut removed = gpu("gpu1", None);
        removed.usable = false;
        assert_eq!(off.refusal(&removed, NOW), Some(Refusal::NotConfigured));
    }

    #[test]
    fn missing_stale_and_failed_gpus_are_refused() {
        let p = policy();
        let mut s = healthy();
        s.health = GpuHealth::Missing;
        assert_eq!(
            p.refusal(&gpu("gpu1", Some(s)), NOW),
            Some(Refusal::Missing)
        );
        let mut s = healthy();
        s.sampled_ms = NOW - 30_001;
        assert_eq!(
            p.refusal(&gpu("gpu1", Some(s)), NOW),
            Some(Refusal::Stale { age_ms: 30_001 })
        );
        let mut s = healthy();
        s.health = GpuHealth::Error;
        s.error = Some("nvidia-smi timed out".into());
        let r = p.refusal(&gpu("gpu1", Some(s)), NOW).unwrap();
        assert_eq!(r.to_string(), "in error: nvidia-smi timed out");
    }

    #[test]
    fn a_gpu_running_a_process_is_refused() {
        let mut s = healthy();
        s.processes.push(GpuProcess {
            pid: 4242,
            name: "python".into(),
            used_memory_mib: Some(10),
            foreign: true,
        });
        let r = policy().refusal(&gpu("gpu1", Some(s)), NOW).unwrap();
        assert_eq!(r, Refusal::Occupied { pids: vec![4242] });
        assert_eq!(r.to_string(), "running another process (pid 4242)");
    }

    #[test]
    fn free_memory_is_checked_against_the_host_minimum() {
        let p = policy();
        let mut s = healthy();
        s.memory_used_mib = Some(81_559 - 2047);
        assert_eq!(
            p.refusal(&gpu("gpu1", Some(s.clone())), NOW),
            Some(Refusal::LowMemory {
                free_mib: 2047,
                need_mib: 2048
            })
        );
        s.memory_used_mib = Some(81_559 - 2048);
        assert_eq!(p.refusal(&gpu("gpu1", Some(s.clone())), NOW), None);
        // Another host without a minimum takes it as it is.
        s.memory_used_mib = Some(81_559);
        assert_eq!(p.refusal(&gpu("gpu2", Some(s.clone())), NOW), None);
        s.memory_total_mib = None;
        assert_eq!(
            p.refusal(&gpu("gpu1", Some(s.clone())), NOW),
            Some(Refusal::MemoryUnknown { need_mib: 2048 })
        );
        assert_eq!(p.refusal(&gpu("gpu2", Some(s)), NOW), None);
    }
}
