//! The live tail of a case's step log. The local executor writes each attempt's stdout and
//! stderr to `<data_dir>/attempts/<case>/<step>/<attempt>/output.log` (see
//! [`crate::hpc::local`]); `/ui/events/log/{id}` streams that file as it grows:
//!
//! - `attempt`: `{attempt: {step, attempt, running}, text}`, the tail of the attempt's log,
//!   sent first and whenever the case moves to another attempt (a retry, the next step);
//! - `append`: `{text}`, what was written since.
//!
//! Steps that ran elsewhere (an SSH host) have no local file: their failure record still
//! carries the output tail the executor kept.

use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use serde_json::{json, Value};

use super::Web;
use crate::hpc::local::LocalRunner;
use crate::protocol::{CaseId, StepRef};
use crate::store::records::CaseStatus;

/// How often a followed log is looked at.
const POLL: Duration = Duration::from_millis(300);
/// The most one event carries.
const CHUNK: u64 = 64 * 1024;
/// The tail sent when a stream starts or the attempt changes.
const TAIL: u64 = 16 * 1024;

/// The attempt whose log the page shows for a case (the running one, else the failed one,
/// else the last finished step), and its log file if it is on this machine.
pub fn locate(web: &Web, id: &str) -> Result<(Value, Option<PathBuf>), String> {
    let store = &web.conductor.store;
    let case_id = CaseId::from(id);
    let case = match store.case(&case_id).map_err(|e| e.to_string())? {
        Some(c) => c,
        None => match store.archived_case(&case_id).map_err(|e| e.to_string())? {
            Some((c, _)) => c,
            None => return Err(format!("no case `{id}`")),
        },
    };
    let running = case.status == CaseStatus::Processing;
    // Candidates, best first: the running step, the failed one, then finished steps from the
    // last (transfer steps keep no log here, so the last step with one is shown).
    let mut candidates: Vec<(String, u32)> = Vec::new();
    if let Some(r) = &case.step {
        candidates.push((r.name.clone(), r.attempt));
    }
    if let Some(f) = &case.failure {
        if let (Some(s), Some(a)) = (f.step.clone(), f.attempt) {
            candidates.push((s, a));
        }
    }
    candidates.extend(case.done.iter().rev().map(|d| (d.name.clone(), d.attempts)));
    let runner = LocalRunner::new(web.attempts_root.clone(), 0);
    let log_of = |step: &str, attempt: u32| {
        let step_ref = StepRef {
            case_id: case_id.clone(),
            step: step.to_string(),
            attempt,
        };
        // attempt_dir refuses ids that are not plain names: no path leaves the root.
        runner
            .attempt_dir(&step_ref)
            .ok()
            .map(|d| d.join("output.log"))
            .filter(|p| p.is_file())
    };
    let chosen = candidates
        .iter()
        .enumerate()
        .find_map(|(i, (s, a))| log_of(s, *a).map(|p| (i, p)));
    let (index, path) = match chosen {
        Some((i, p)) => (i, Some(p)),
        None if candidates.is_empty() => return Ok((Value::Null, None)),
        None => (0, None),
    };
    let (step, attempt) = &candidates[index];
    let running = running && index == 0 && case.step.is_some();
    let info = json!({"step": step, "attempt": attempt, "running": running});
    Ok((info, path))
}

/// The last `max` bytes of a file (from a line start when cut), and its size.
pub fn read_tail(path: &Path, max: u64) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    let start = size.saturating_sub(max);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if start > 0 {
        if let Some(nl) = text.find('\n') {
            text.drain(..=nl);
        }
    }
    Ok((text, start + buf.len() as u64))
}

fn read_range(path: &Path, from: u64, max: u64) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    // Stop at the last whole line (the rest comes next time), unless one line is too long.
    let cut = match buf.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None if buf.len() as u64 >= max => buf.len(),
        None => 0,
    };
    buf.truncate(cut);
    Ok((
        String::from_utf8_lossy(&buf).into_owned(),
        from + cut as u64,
    ))
}

struct Follow {
    web: Arc<Web>,
    id: String,
    attempt: Option<Value>,
    offset: u64,
    closed: tokio::sync::watch::Receiver<bool>,
    first: bool,
}

/// One look: an event when the attempt changed or the log grew.
fn look(f: &mut Follow) -> Option<SseEvent> {
    let (info, path) = match locate(&f.web, &f.id) {
        Ok(x) => x,
        Err(e) if f.first => {
            f.first = false;
            let data = json!({ "error": e }).to_string();
            return Some(SseEvent::default().event("problem").data(data));
        }
        Err(_) => return None,
    };
    let same_attempt = f
        .attempt
        .as_ref()
        .is_some_and(|a| a["step"] == info["step"] && a["attempt"] == info["attempt"]);
    if f.first || !same_attempt {
        f.first = false;
        let (text, size) = path
            .as_deref()
            .and_then(|p| read_tail(p, TAIL).ok())
            .unwrap_or_default();
        f.offset = size;
        f.attempt = Some(info.clone());
        let data = json!({"attempt": info, "text": text, "local": path.is_some()});
        return Some(SseEvent::default().event("attempt").data(data.to_string()));
    }
    if f.attempt.as_ref() != Some(&info) {
        // Same attempt, now finished: tell the page so it stops showing "running".
        f.attempt = Some(info.clone());
        let data = json!({"attempt": info});
        return Some(SseEvent::default().event("state").data(data.to_string()));
    }
    let path = path?;
    let size = std::fs::metadata(&path).ok()?.len();
    if size < f.offset {
        // Truncated: start over from its tail.
        f.first = true;
        return look(f);
    }
    if size == f.offset {
        return None;
    }
    let (text, next) = read_range(&path, f.offset, CHUNK).ok()?;
    if next == f.offset {
        return None;
    }
    f.offset = next;
    Some(
        SseEvent::default()
            .event("append")
            .data(json!({ "text": text }).to_string()),
    )
}

/// `GET /ui/events/log/{id}`.
pub async fn events(
    State(web): State<Arc<Web>>,
    UrlPath(id): UrlPath<String>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let follow = Follow {
        closed: web.hub.closed(),
        web,
        id,
        attempt: None,
        offset: 0,
        first: true,
    };
    let stream = futures_util::stream::unfold(follow, |mut f| async move {
        loop {
            if *f.closed.borrow() {
                return None;
            }
            let (event, back) = tokio::task::spawn_blocking(move || {
                let e = look(&mut f);
                (e, f)
            })
            .await
            .ok()?;
            f = back;
            if let Some(e) = event {
                return Some((Ok(e), f));
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = f.closed.changed() => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_start_at_a_line_and_ranges_end_at_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("output.log");
        std::fs::write(&p, "first line\nsecond line\nthird").unwrap();
        let (text, size) = read_tail(&p, 15).unwrap();
        assert_eq!(text, "third");
        assert_eq!(size, 28);
        let (text, next) = read_range(&p, 0, 1024).unwrap();
        assert_eq!(text, "first line\nsecond line\n");
        assert_eq!(next, 23);
        let (text, next) = read_range(&p, 23, 1024).unwrap();
        assert_eq!((text.as_str(), next), ("", 23));
    }
}
