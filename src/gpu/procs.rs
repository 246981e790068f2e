//! Whose is a GPU process? mqic starts every step in its own session (the wrapper calls
//! `setsid`; the step's pid is the session id), so a compute process belongs to a lease when
//! it is the step's process, lives in its session or process group, or descends from it.
//! Everything else on a GPU is someone else's. The process table comes from
//! `/proc/<pid>/stat` on the GPU's host, read through the same [`CommandRunner`] as
//! nvidia-smi (no `ps`: a minimal server may lack procps).

use std::collections::HashMap;
use std::time::Duration;

use super::runner::CommandRunner;

/// One row of the process table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcEntry {
    pub ppid: u32,
    pub pgrp: u32,
    pub session: u32,
}

/// pid -> its parent, group and session.
pub type ProcTable = HashMap<u32, ProcEntry>;

/// The command that prints every `/proc/<pid>/stat` line. Processes that exit while it
/// runs make `cat` complain; those lines are dropped and the exit status ignored.
pub fn table_command() -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        "cat /proc/[0-9]*/stat 2>/dev/null; exit 0".into(),
    ]
}

/// Parses `/proc/<pid>/stat` lines: `pid (comm) state ppid pgrp session ...`. The command
/// name may hold spaces and parentheses, so fields are counted after the LAST `)`.
pub fn parse_table(text: &str) -> ProcTable {
    let mut out = ProcTable::new();
    for line in text.lines() {
        let Some(open) = line.find(" (") else {
            continue;
        };
        let Some(close) = line.rfind(')') else {
            continue;
        };
        let Ok(pid) = line[..open].trim().parse::<u32>() else {
            continue;
        };
        let rest: Vec<&str> = line[close + 1..].split_whitespace().collect();
        let field = |i: usize| rest.get(i).and_then(|v| v.parse::<u32>().ok());
        if let (Some(ppid), Some(pgrp), Some(session)) = (field(1), field(2), field(3)) {
            out.insert(
                pid,
                ProcEntry {
                    ppid,
                    pgrp,
                    session,
                },
            );
        }
    }
    out
}

/// Reads the process table of the runner's host; empty when it cannot be read.
pub async fn read_table(runner: &dyn CommandRunner, timeout: Duration) -> ProcTable {
    match runner.run(&table_command(), timeout).await {
        Ok(out) => parse_table(&out.stdout),
        Err(e) => {
            tracing::debug!(host = runner.host(), "cannot read the process table: {e}");
            ProcTable::new()
        }
    }
}

/// Whether `pid` belongs to the step whose session leader is `step_pid`.
pub fn belongs_to(pid: u32, step_pid: u32, table: &ProcTable) -> bool {
    if pid == step_pid {
        return true;
    }
    let mut current = pid;
    // Bounded: a table read while processes come and go may hold a cycle of reused pids.
    for _ in 0..64 {
        let Some(e) = table.get(&current) else {
            return false;
        };
        if e.session == step_pid || e.pgrp == step_pid || e.ppid == step_pid {
            return true;
        }
        if e.ppid <= 1 {
            return false;
        }
        current = e.ppid;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        let text = "\
1 (systemd) S 0 1 1 0 -1 4194560 50000 0 0 0
4100 (sh) S 1 4100 4100 0 -1 4194560 100 0 0 0
4101 (tps_env) R 4100 4100 4100 0 -1 4194560 100 0 0 0
4200 (python3 (train) x) S 1 4200 4200 0 -1 0 0 0 0 0
5000 (a)b) S 4101 4100 4100 0 -1 0 0 0 0 0
garbage
";
        let t = parse_table(text);
        assert_eq!(t.len(), 5);
        assert_eq!(
            t[&4200],
            ProcEntry {
                ppid: 1,
                pgrp: 4200,
                session: 4200
            }
        );
        assert_eq!(t[&5000].ppid, 4101);
    }

    #[test]
    fn a_process_belongs_to_the_step_through_its_session_or_ancestry() {
        let mut t = ProcTable::new();
        let e = |ppid, pgrp, session| ProcEntry {
            ppid,
            pgrp,
            session,
        };
        t.insert(4100, e(1, 4100, 4100)); // the step wrapper, a session leader
        t.insert(4101, e(4100, 4100, 4100)); // MOQUI in its session
        t.insert(4102, e(4101, 4102, 4102)); // a child that left the session: still a descendant
        t.insert(4200, e(1, 4200, 4200)); // someone else's python
        assert!(belongs_to(4100, 4100, &t));
        assert!(belongs_to(4101, 4100, &t));
        assert!(belongs_to(4102, 4100, &t));
        assert!(!belongs_to(4200, 4100, &t));
        assert!(!belongs_to(9999, 4100, &t), "unknown pids are not ours");
        t.insert(7, e(8, 7, 7));
        t.insert(8, e(7, 8, 8));
        assert!(!belongs_to(7, 4100, &t), "a cycle ends");
    }
}
