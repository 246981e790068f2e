//! This machine's GPUs through NVML (`libnvidia-ml.so.1`, loaded at run time by
//! `nvml-wrapper`). The library is loaded once, lazily, on the first sample: a machine
//! without it (no driver, a container, CI, a musl build) gets one info line and is never
//! asked again, so there is no error loop. NVML calls block: callers use `spawn_blocking`.

use std::sync::OnceLock;

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

use super::{GpuReading, HostReading, ProcessReading, SampleError};

const MIB: u64 = 1024 * 1024;

/// The process-wide NVML handle: `None` once loading failed.
static NVML: OnceLock<Option<Nvml>> = OnceLock::new();

/// Whether an init error means "there is no NVIDIA stack here" rather than a fault.
fn is_absent(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::LibloadingError(_)
            | NvmlError::LibraryNotFound
            | NvmlError::DriverNotLoaded
            | NvmlError::FailedToLoadSymbol(_)
    )
}

fn handle() -> Option<&'static Nvml> {
    NVML.get_or_init(|| match Nvml::init() {
        Ok(n) => {
            tracing::info!("GPU monitoring: NVML loaded");
            Some(n)
        }
        Err(e) => {
            if is_absent(&e) {
                tracing::info!("GPU monitoring through NVML unavailable on this machine: {e}");
            } else {
                tracing::warn!("GPU monitoring through NVML failed to start: {e}");
            }
            None
        }
    })
    .as_ref()
}

/// Samples every GPU of this machine. [`SampleError::Unavailable`] when NVML cannot be
/// loaded (decided once per process). Blocking.
pub fn sample() -> Result<HostReading, SampleError> {
    let Some(nvml) = handle() else {
        return Err(SampleError::Unavailable(
            "the NVIDIA management library (libnvidia-ml.so.1) is not loadable".into(),
        ));
    };
    let count = nvml
        .device_count()
        .map_err(|e| SampleError::Failed(format!("NVML device count: {e}")))?;
    let mut out = HostReading::default();
    for index in 0..count {
        // A device that cannot be opened (fallen off the bus, needs a reset) is left out of
        // the reading: the curator then marks it missing and it is not leased.
        let device = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("NVML cannot open GPU {index}: {e}");
                continue;
            }
        };
        let Ok(uuid) = device.uuid() else {
            tracing::warn!("NVML gives no uuid for GPU {index}");
            continue;
        };
        let memory = device.memory_info().ok();
        out.gpus.push(GpuReading {
            index,
            uuid: uuid.clone(),
            name: device.name().unwrap_or_default(),
            utilization_pct: device.utilization_rates().ok().map(|u| u.gpu),
            memory_used_mib: memory.as_ref().map(|m| m.used / MIB),
            memory_total_mib: memory.as_ref().map(|m| m.total / MIB),
            temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
        });
        // A GPU that cannot list its processes shows none, as nvidia-smi does; any other
        // failure fails the sample (and the host's GPUs are not leased).
        let processes = match device.running_compute_processes() {
            Ok(p) => p,
            Err(NvmlError::NotSupported) => Vec::new(),
            Err(e) => {
                return Err(SampleError::Failed(format!(
                    "NVML processes of GPU {index}: {e}"
                )))
            }
        };
        for p in processes {
            out.processes.push(ProcessReading {
                gpu_uuid: uuid.clone(),
                pid: p.pid,
                name: nvml.sys_process_name(p.pid, 256).unwrap_or_default(),
                used_memory_mib: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => Some(b / MIB),
                    UsedGpuMemory::Unavailable => None,
                },
            });
        }
    }
    Ok(out)
}
