//! The workflows as the conductor uses them: config parsed once into steps with compiled
//! templates, plus where each host keeps its case directories. Everything the pure state
//! machine needs to turn a case into the next command.

use std::collections::BTreeMap;
use std::path::PathBuf;

use regex::Regex;

use super::template::Template;
use crate::config::{Config, StepConfig, StepKind};
use crate::store::records::CaseRecord;

/// One step, ready to render.
#[derive(Debug, Clone)]
pub struct StepDef {
    pub config: StepConfig,
    pub command: Option<Template>,
    pub workdir: Template,
    /// Transfer source and destination (upload: local -> host; download: host -> local).
    pub source: Template,
    pub dest: Template,
}

#[derive(Debug, Clone)]
pub struct WorkflowDef {
    pub name: String,
    pub steps: Vec<StepDef>,
}

/// The conductor's view of the configuration.
#[derive(Debug, Clone)]
pub struct Plan {
    pub workflows: BTreeMap<String, WorkflowDef>,
    pub default_workflow: String,
    /// Host name -> its work root (where `{remote_case_dir}` lives).
    pub work_roots: BTreeMap<String, PathBuf>,
    pub results_dir: PathBuf,
    /// Added to a step's timeout before its lease is reclaimed.
    pub lease_grace_ms: u64,
    /// Which GPUs may be leased, given what the curator saw.
    pub gpu_policy: crate::gpu::lease::LeasePolicy,
}

impl Plan {
    /// Builds the plan from a validated config (templates were checked at load).
    pub fn from_config(config: &Config) -> Plan {
        let workflows = config
            .workflows
            .iter()
            .map(|(name, w)| {
                let steps =
                    w.steps
                        .iter()
                        .map(|s| {
                            let (src, dst) = s.transfer_paths();
                            let parse = |t: &str| Template::parse(t).expect("validated at load");
                            StepDef {
                                config: s.clone(),
                                command: s.command.as_deref().map(|c| {
                                    Template::parse_command(c).expect("validated at load")
                                }),
                                // Local steps work on the case where it was found; steps on a
                                // host work in the case's directory there (made by the upload).
                                workdir: parse(s.workdir.as_deref().unwrap_or(match s.kind {
                                    StepKind::Local => "{case_dir}",
                                    _ => "{remote_case_dir}",
                                })),
                                source: parse(&src),
                                dest: parse(&dst),
                            }
                        })
                        .collect();
                (
                    name.clone(),
                    WorkflowDef {
                        name: name.clone(),
                        steps,
                    },
                )
            })
            .collect();
        Plan {
            workflows,
            default_workflow: config.conductor.default_workflow.clone(),
            work_roots: config
                .hosts
                .iter()
                .map(|h| (h.name.clone(), config.work_root(h)))
                .collect(),
            results_dir: config.results_dir(),
            lease_grace_ms: config.conductor.lease_grace_secs * 1000,
            gpu_policy: crate::gpu::lease::LeasePolicy::from_config(config),
        }
    }

    pub fn workflow(&self, name: &str) -> Option<&WorkflowDef> {
        self.workflows.get(name)
    }

    /// The placeholder values for one attempt of a step of a case.
    pub fn values(
        &self,
        case: &CaseRecord,
        step: &StepDef,
        attempt: u32,
        gpu: Option<u32>,
    ) -> BTreeMap<&'static str, String> {
        let host = &step.config.host;
        let root = self
            .work_roots
            .get(host)
            .cloned()
            .unwrap_or_else(|| PathBuf::from("/nonexistent-host-root"));
        let mut v = BTreeMap::new();
        v.insert("case_id", case.case_id.0.clone());
        v.insert("case_dir", case.case_path.clone());
        v.insert(
            "remote_case_dir",
            root.join(&case.case_id.0).display().to_string(),
        );
        v.insert(
            "result_dir",
            self.results_dir.join(&case.case_id.0).display().to_string(),
        );
        v.insert("gpu_id", gpu.map(|g| g.to_string()).unwrap_or_default());
        v.insert("step", step.config.name.clone());
        v.insert("attempt", attempt.to_string());
        v.insert("host", host.clone());
        v.insert("room", case.room.clone().unwrap_or_default());
        v.insert("workflow", case.workflow.clone());
        v
    }
}

impl StepDef {
    pub fn is_transfer(&self) -> bool {
        matches!(self.config.kind, StepKind::Upload | StepKind::Download)
    }

    /// Whether an output line matches one of the step's retryable patterns.
    pub fn retryable_output(&self, output: &str) -> bool {
        self.config
            .retryable_patterns
            .iter()
            .filter_map(|p| Regex::new(p).ok())
            .any(|r| output.lines().any(|l| r.is_match(l)))
    }
}
