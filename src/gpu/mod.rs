//! GPU monitoring: what the GPUs of a host look like right now, and which of them the
//! conductor may lease.
//!
//! - [`runner`]: the [`CommandRunner`] a sampling command runs through (this machine now; an
//!   SSH host plugs its exec channel in behind the same trait).
//! - [`smi`]: the `nvidia-smi` queries and their by-header CSV parser.
//! - [`nvml`]: this machine's GPUs through NVML, loaded lazily, once.
//! - [`procs`]: whose a GPU process is (the lease's step session, or someone else's).
//! - [`lease`]: the rule that keeps missing, failed, full or foreign-occupied GPUs from
//!   being leased.
//!
//! The curator worker ([`crate::workers::curator`]) samples and stores; the conductor reads
//! the store through [`lease`].

pub mod lease;
pub mod nvml;
pub mod procs;
pub mod runner;
pub mod smi;

use std::time::Duration;

pub use runner::{CommandOutput, CommandRunner, LocalCommandRunner, RunError};

/// One GPU as a sample saw it. Unknown values (`[N/A]`) are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuReading {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub utilization_pct: Option<u32>,
    pub memory_used_mib: Option<u64>,
    pub memory_total_mib: Option<u64>,
    pub temperature_c: Option<u32>,
}

/// One process holding a GPU context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessReading {
    /// The GPU it runs on, by uuid (indices are per host and may be renumbered).
    pub gpu_uuid: String,
    pub pid: u32,
    pub name: String,
    pub used_memory_mib: Option<u64>,
}

/// Everything one sample of a host saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostReading {
    pub gpus: Vec<GpuReading>,
    pub processes: Vec<ProcessReading>,
}

/// Why a host gave no reading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SampleError {
    /// There is no way to monitor GPUs there (no NVML, no nvidia-smi): GPUs from config
    /// stay leasable without checks.
    #[error("GPU monitoring unavailable: {0}")]
    Unavailable(String),
    /// Monitoring exists and failed (nvidia-smi exited non-zero, timed out, printed
    /// something else, or the host is unreachable): the host's GPUs are in error.
    #[error("{0}")]
    Failed(String),
}

/// Samples a host with `nvidia-smi` (`program`) through `runner`: the GPU query, then the
/// compute-process query.
pub async fn sample_smi(
    runner: &dyn CommandRunner,
    program: &str,
    timeout: Duration,
) -> Result<HostReading, SampleError> {
    let run = |query: &'static str| {
        let argv = vec![
            program.to_string(),
            query.to_string(),
            smi::FORMAT.to_string(),
        ];
        async move {
            match runner.run(&argv, timeout).await {
                Ok(out) if out.success() => Ok(out.stdout),
                // A shell on the host says 127 for a program it cannot find.
                Ok(out) if out.code == Some(127) => Err(SampleError::Unavailable(format!(
                    "{program} not found on {}",
                    runner.host()
                ))),
                Ok(out) => Err(SampleError::Failed(format!(
                    "{program} exited with {}: {}",
                    out.code
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "a signal".into()),
                    first_line(&out.stderr, &out.stdout)
                ))),
                Err(RunError::NotFound(p)) => Err(SampleError::Unavailable(format!(
                    "{p} not found on {}",
                    runner.host()
                ))),
                Err(e) => Err(SampleError::Failed(e.to_string())),
            }
        }
    };
    let gpus = smi::parse_gpus(&run(smi::QUERY_GPU).await?)
        .map_err(|e| SampleError::Failed(e.to_string()))?;
    let processes = smi::parse_processes(&run(smi::QUERY_APPS).await?)
        .map_err(|e| SampleError::Failed(e.to_string()))?;
    Ok(HostReading { gpus, processes })
}

/// This machine: NVML when `use_nvml` and it loads, otherwise `nvidia-smi` through `runner`.
pub async fn sample_local(
    use_nvml: bool,
    runner: &dyn CommandRunner,
    program: &str,
    timeout: Duration,
) -> Result<HostReading, SampleError> {
    if use_nvml {
        match tokio::task::spawn_blocking(nvml::sample).await {
            Ok(Ok(reading)) => return Ok(reading),
            Ok(Err(SampleError::Unavailable(_))) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(SampleError::Failed(format!("NVML task failed: {e}"))),
        }
    }
    match sample_smi(runner, program, timeout).await {
        Err(SampleError::Unavailable(why)) if use_nvml => Err(SampleError::Unavailable(format!(
            "no loadable libnvidia-ml.so.1 and {why}"
        ))),
        other => other,
    }
}

/// The first non-empty line of `a`, else of `b`, at most 200 characters: enough to say what
/// went wrong in a status without copying a whole output into the store.
fn first_line(a: &str, b: &str) -> String {
    let line = a
        .lines()
        .chain(b.lines())
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no output)");
    line.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runner that answers from a script of outputs (the trait is the seam for SSH).
    struct Scripted(
        Vec<Result<CommandOutput, RunError>>,
        parking_lot::Mutex<usize>,
    );

    impl CommandRunner for Scripted {
        fn host(&self) -> &str {
            "gpu-server"
        }
        fn run<'a>(
            &'a self,
            _argv: &'a [String],
            _timeout: Duration,
        ) -> runner::BoxFuture<'a, Result<CommandOutput, RunError>> {
            let mut n = self.1.lock();
            let out = self.0[*n].clone();
            *n += 1;
            Box::pin(async move { out })
        }
    }

    fn ok(stdout: &str) -> Result<CommandOutput, RunError> {
        Ok(CommandOutput {
            code: Some(0),
            stdout: stdout.into(),
            stderr: String::new(),
        })
    }

    #[tokio::test]
    async fn smi_outcomes_map_to_readings_unavailable_and_failed() {
        let t = Duration::from_secs(1);
        let r = Scripted(
            vec![
                ok("index, uuid\n0, GPU-a\n"),
                ok("gpu_uuid, pid\nGPU-a, 12\n"),
            ],
            Default::default(),
        );
        let reading = sample_smi(&r, "nvidia-smi", t).await.unwrap();
        assert_eq!(reading.gpus.len(), 1);
        assert_eq!(reading.processes[0].pid, 12);

        let r = Scripted(
            vec![Ok(CommandOutput {
                code: Some(127),
                stdout: String::new(),
                stderr: "sh: nvidia-smi: not found".into(),
            })],
            Default::default(),
        );
        assert!(matches!(
            sample_smi(&r, "nvidia-smi", t).await,
            Err(SampleError::Unavailable(_))
        ));

        let r = Scripted(
            vec![Ok(CommandOutput {
                code: Some(9),
                stdout: "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n".into(),
                stderr: String::new(),
            })],
            Default::default(),
        );
        let err = sample_smi(&r, "nvidia-smi", t).await.unwrap_err();
        assert!(
            matches!(&err, SampleError::Failed(m) if m.contains("exited with 9") && m.contains("couldn't communicate")),
            "{err}"
        );

        let r = Scripted(vec![ok("garbage\n")], Default::default());
        assert!(matches!(
            sample_smi(&r, "nvidia-smi", t).await,
            Err(SampleError::Failed(_))
        ));

        let r = Scripted(
            vec![Err(RunError::Failed("host unreachable".into()))],
            Default::default(),
        );
        assert_eq!(
            sample_smi(&r, "nvidia-smi", t).await.unwrap_err(),
            SampleError::Failed("host unreachable".into())
        );
    }

    #[tokio::test]
    async fn no_nvml_and_no_nvidia_smi_is_unavailable_not_an_error() {
        let runner = LocalCommandRunner::new("local");
        let err = sample_local(
            true,
            &runner,
            "mqic-test-no-nvidia-smi",
            Duration::from_secs(5),
        )
        .await;
        // On a machine with a GPU, NVML answers; everywhere else neither source exists.
        if let Err(e) = err {
            assert!(matches!(e, SampleError::Unavailable(_)), "{e}");
        }
    }
}
