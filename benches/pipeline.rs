//! Pipeline benchmark: figures, not judgements. Run with `cargo bench --bench pipeline`.
//!
//! - Detection latency: from a case's ready marker appearing to the case being recorded
//!   with its first command queued (what `new_case_found` does), in notify mode and, as the
//!   reference, in poll mode (1 s interval), 20 cases each.
//! - Pipeline overhead: 100 cases through a workflow of two no-op local steps (`true`), on
//!   the embedded broker, in-process: cases per second and the per-case overhead, plus the
//!   mean time from found to completed.
//!
//! `MQIC_BENCH_CASES` changes the 100.

use std::path::Path;
use std::time::{Duration, Instant};

use mqic::app::App;
use mqic::config::Config;
use mqic::demo::cases::{mark_ready, write_case, write_case_files, CaseSpec};
use mqic::store::records::CaseStatus;

fn config(dir: &Path, mode: &str) -> Config {
    let text = format!(
        r#"
data_dir = "{data}"
[log]
level = "error"
[amqp]
listen = "127.0.0.1:0"
[management]
enabled = false
[prometheus]
enabled = false
[scanner]
mode = "{mode}"
[conductor]
default_workflow = "noop"
[archiver]
interval_secs = 0
[web]
listen = "127.0.0.1:0"
[[workflows.noop.steps]]
name = "first"
kind = "local"
command = "true"
[[workflows.noop.steps]]
name = "second"
kind = "local"
command = "true"
"#,
        data = dir.display()
    );
    Config::from_toml(&text, "bench").expect("bench config")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn detection(mode: &str) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(config(dir.path(), mode)).await.unwrap();
    let store = app.pipeline.conductor.store.clone();
    let scan = app.config.scan_dir();
    std::fs::create_dir_all(&scan).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut samples = Vec::new();
    for n in 1..=20u32 {
        let spec = CaseSpec::tiny(n);
        let case_dir = scan.join(&spec.patient_id);
        write_case_files(&case_dir, &spec).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t0 = Instant::now();
        mark_ready(&case_dir).unwrap();
        let id = spec.patient_id.as_str().into();
        loop {
            if store.case(&id).unwrap().is_some() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "case {n} not detected"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    app.shutdown().await;
    samples.sort_by(f64::total_cmp);
    samples
}

async fn overhead(cases: u32) -> (f64, f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(config(dir.path(), "notify")).await.unwrap();
    let store = app.pipeline.conductor.store.clone();
    let scan = app.config.scan_dir();
    std::fs::create_dir_all(&scan).unwrap();
    // Cases are written outside the watched folder and moved in at once, so the clock
    // measures the pipeline, not the writing.
    let staging = dir.path().join("staging");
    for n in 1..=cases {
        let spec = CaseSpec::tiny(n);
        write_case(&staging.join(&spec.patient_id), &spec).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    for n in 1..=cases {
        let id = CaseSpec::tiny(n).patient_id;
        std::fs::rename(staging.join(&id), scan.join(&id)).unwrap();
    }
    loop {
        let all = store.cases().unwrap();
        let done = all
            .iter()
            .filter(|c| c.status == CaseStatus::Completed)
            .count();
        if done == cases as usize {
            let mean_ms = all
                .iter()
                .map(|c| (c.updated_ms - c.created_ms) as f64)
                .sum::<f64>()
                / cases as f64;
            let secs = t0.elapsed().as_secs_f64();
            app.shutdown().await;
            return (cases as f64 / secs, secs * 1000.0 / cases as f64, mean_ms);
        }
        if let Some(failed) = all.iter().find(|c| c.status == CaseStatus::Failed) {
            panic!("a no-op case failed: {:?}", failed.failure);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "cases did not finish"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cases: u32 = std::env::var("MQIC_BENCH_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for mode in ["notify", "poll"] {
            let s = detection(mode).await;
            println!(
                "detection latency ({mode}, 20 cases): p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms",
                percentile(&s, 0.5),
                percentile(&s, 0.95),
                s[s.len() - 1]
            );
        }
        let (per_sec, overhead_ms, mean_ms) = overhead(cases).await;
        println!(
            "pipeline ({cases} cases, 2 no-op local steps each): {per_sec:.1} cases/s, {overhead_ms:.1} ms per case, found-to-completed mean {mean_ms:.0} ms"
        );
    });
}
