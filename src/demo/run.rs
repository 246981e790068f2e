//! `mqic demo`: the whole product in one command. It starts mqic on embedded defaults in a
//! temp data dir with a realistic four-step workflow (upload, interpret, simulate on a
//! leased GPU, download) whose steps are the stand-in scripts, drops synthetic cases into the
//! watched folder one by one, shows each case's progress live, and ends with a summary.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::cases::{write_case, CaseSpec};
use super::progress::{all_final, render, summary, CaseRow, Outcome};
use crate::app::App;
use crate::cli::DemoArgs;
use crate::conductor::template::shell_quote;
use crate::config::Config;

/// The demo gives up after this long (something is wrong if cases take it).
const DEMO_DEADLINE: Duration = Duration::from_secs(600);

/// The demo's configuration: embedded defaults plus the demo workflow around the stand-ins
/// in `bin`, two simulated GPUs, and AMQP on a free loopback port. The curator is off: the
/// demo's GPUs are stand-ins, and a real GPU's state must not gate them.
pub fn demo_config(data_dir: &Path, bin: &Path) -> anyhow::Result<Config> {
    Ok(Config::from_toml(
        &demo_config_text(data_dir, bin),
        "demo config",
    )?)
}

/// [`demo_config`] as TOML text, for a `mqic serve --config` file.
pub fn demo_config_text(data_dir: &Path, bin: &Path) -> String {
    // A path inside a template is literal text: quote it for the shell, escape braces.
    let script = |name: &str| {
        shell_quote(&bin.join(name).display().to_string())
            .replace('{', "{{")
            .replace('}', "}}")
    };
    format!(
        r#"
data_dir = {data_dir:?}
[log]
level = "warn"
[amqp]
listen = "127.0.0.1:0"
[management]
listen = "127.0.0.1:0"
[prometheus]
listen = "127.0.0.1:0"
[conductor]
default_workflow = "demo"
[archiver]
interval_secs = 0
[workers]
curator = false
[web]
listen = "127.0.0.1:0"
[[hosts]]
name = "local"
gpus = [0, 1]
[[workflows.demo.steps]]
name = "upload"
kind = "upload"
timeout_secs = 120
[[workflows.demo.steps]]
name = "interpret"
kind = "local"
timeout_secs = 120
command = "sh {interp} {{remote_case_dir}}/input {{remote_case_dir}}/tps"
[[workflows.demo.steps]]
name = "simulate"
kind = "execute"
gpu = true
timeout_secs = 600
command = "MQIC_DEMO_BATCH_SLEEP=${{{{MQIC_DEMO_BATCH_SLEEP:-0.25}}}} sh {moqui} {{remote_case_dir}}/input {{remote_case_dir}}/output {{gpu_id}}"
progress = ['Generating particles for \((\d+) of (\d+) batches\)']
retryable_patterns = ['No free GPU remains']
retry = {{ max_attempts = 3, backoff_initial_secs = 1, backoff_max_secs = 10 }}
[[workflows.demo.steps]]
name = "download"
kind = "download"
timeout_secs = 120
"#,
        data_dir = data_dir.display().to_string(),
        interp = script("interpreter-standin.sh"),
        moqui = script("moqui-standin.sh"),
    )
}

/// Runs the demo; returns whether every case completed.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    let (data_dir, remove_after) = match &args.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("mqic-demo-{}", std::process::id())),
            !args.keep,
        ),
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&data_dir)?;
    let bin = standin_dir(&data_dir);
    super::write_standins(&bin).context("cannot write the stand-in scripts")?;
    let config = demo_config(&data_dir, &bin)?;
    let scan_dir = config.scan_dir();
    let app = App::start(config).await?;
    let out = std::io::stdout();
    let tty = out.is_terminal();
    println!(
        "mqic demo: {} synthetic cases, data in {}",
        args.cases,
        data_dir.display()
    );
    println!(
        "  broker: amqp://guest:guest@{}/ (RabbitMQ clients can watch: bind a queue to mqic.events with `case.#`)",
        app.amqp_addr
    );
    if let Some(addr) = app.web_addr {
        println!(
            "  dashboard: {} (watch the cases live; retry or cancel them there{})",
            crate::app::dashboard_url(addr),
            if args.keep {
                ""
            } else {
                "; --keep keeps it open after the cases finish"
            }
        );
    }
    println!("  workflow: upload -> interpret -> simulate (GPU 0 or 1, simulated) -> download");
    println!("  watched folder: {}", scan_dir.display());

    let cases = args.cases;
    let realistic = args.realistic;
    let scan = scan_dir.clone();
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        for n in 1..=cases as u32 {
            let spec = if realistic {
                CaseSpec::realistic(n)
            } else {
                CaseSpec::tiny(n)
            };
            write_case(&scan.join(&spec.patient_id), &spec)?;
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(())
    });

    let started = Instant::now();
    let mut shown_lines = 0usize;
    let mut last_status: BTreeMap<String, String> = BTreeMap::new();
    let rows = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let store = app.pipeline.conductor.store.clone();
        let records = tokio::task::spawn_blocking(move || store.cases()).await??;
        let mut rows: Vec<CaseRow> = records
            .iter()
            .map(|c| CaseRow {
                case_id: c.case_id.0.clone(),
                status: c.status.name().to_string(),
                step: c.step.as_ref().map(|r| r.name.clone()),
                progress: c.progress,
            })
            .collect();
        rows.sort_by(|a, b| a.case_id.cmp(&b.case_id));
        if tty {
            let text = render(&rows, 100, true);
            if shown_lines > 0 {
                print!("\x1b[{shown_lines}A\x1b[J");
            }
            print!("{text}");
            shown_lines = text.lines().count();
        } else {
            for r in &rows {
                let line = format!("{} {}", r.status, r.step.clone().unwrap_or_default());
                if last_status.get(&r.case_id) != Some(&line) {
                    println!(
                        "  {:<10} {:<16} {:>3.0}%  {}",
                        r.case_id,
                        r.status,
                        r.progress * 100.0,
                        r.step.as_deref().unwrap_or("")
                    );
                    last_status.insert(r.case_id.clone(), line);
                }
            }
        }
        let _ = out.lock().flush();
        if rows.len() >= cases && all_final(&rows) {
            break rows;
        }
        if started.elapsed() > DEMO_DEADLINE {
            println!("demo: gave up after {DEMO_DEADLINE:?}");
            break rows;
        }
    };
    writer.await??;
    let completed = rows
        .iter()
        .filter(|r| Outcome::of(&r.status) == Outcome::Completed)
        .count();
    println!("{}", summary(&rows));
    println!(
        "demo: {completed} of {cases} cases completed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    if args.keep {
        println!("serving until Ctrl-C (data kept in {})", data_dir.display());
        let _ = tokio::signal::ctrl_c().await;
    }
    app.shutdown().await;
    if remove_after {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    Ok(completed == cases)
}

/// Where the demo keeps its stand-in scripts in a data dir.
pub fn standin_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("demo-bin")
}
