//! The demo's terminal progress view as pure functions: rows in, text out. Nothing here
//! touches the terminal, so the caller decides when to redraw and where the text goes.

use std::fmt::Write as _;

/// One case as the demo shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseRow {
    /// The case id, as the store knows it.
    pub case_id: String,
    /// The case status word from the store (`pending`, `running`, `completed`, `failed`, ...).
    pub status: String,
    /// The step in progress, when there is one.
    pub step: Option<String>,
    /// Overall progress from 0 to 1; out-of-range values and NaN are clamped.
    pub progress: f64,
}

/// How a status word counts in the summary and which colour it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed,
    Cancelled,
    /// Anything not finished yet: pending, waiting for a GPU, running a step.
    InFlight,
}

impl Outcome {
    /// Classifies a status word, ignoring case.
    pub fn of(status: &str) -> Self {
        match status.to_ascii_lowercase().as_str() {
            "completed" | "complete" | "succeeded" | "done" => Self::Completed,
            "failed" | "error" => Self::Failed,
            "cancelled" | "canceled" => Self::Cancelled,
            _ => Self::InFlight,
        }
    }

    /// Whether the case will not change any more on its own.
    pub fn is_final(self) -> bool {
        self != Self::InFlight
    }

    fn color(self) -> &'static str {
        match self {
            Self::Completed => GREEN,
            Self::Failed => RED,
            Self::Cancelled => DIM,
            Self::InFlight => YELLOW,
        }
    }
}

const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// Longest id shown; longer ones are cut with an ellipsis.
const ID_MAX: usize = 20;
/// Longest status word shown.
const STATUS_MAX: usize = 12;
/// Bar width limits: narrower is unreadable, wider only stretches.
const BAR_MIN: usize = 10;
const BAR_MAX: usize = 40;
/// Characters on a line besides the id, bar, status and step: the space after the id, the
/// brackets, " 100%", and two spaces on both sides of the status.
const FIXED: usize = 1 + 2 + 5 + 2 + 2;

/// One line per case: `<id> [#####.....]  45%  <status>  <step>`, ids and statuses padded
/// to a common width so the bars line up. The bar takes what `width` leaves after the
/// longest step, within 10 to 40 characters; a step that still does not fit is cut, so lines
/// stay within `width` unless it is too narrow for id, status and the shortest bar. With
/// `color`, the status and the filled part of the bar are coloured by [`Outcome`].
pub fn render(rows: &[CaseRow], width: usize, color: bool) -> String {
    let id_w = column_width(rows.iter().map(|r| r.case_id.as_str()), ID_MAX);
    let status_w = column_width(rows.iter().map(|r| r.status.as_str()), STATUS_MAX);
    let step_w = rows
        .iter()
        .filter_map(|r| r.step.as_deref())
        .map(|s| s.chars().count())
        .max()
        .unwrap_or(0);
    let before_step = id_w + status_w + FIXED;
    let bar_w = width
        .saturating_sub(before_step + step_w)
        .clamp(BAR_MIN, BAR_MAX);
    let step_room = width.saturating_sub(before_step + bar_w);

    let mut out = String::new();
    for row in rows {
        let progress = if row.progress.is_nan() {
            0.0
        } else {
            row.progress.clamp(0.0, 1.0)
        };
        // The epsilon keeps 0.29 at 29 % although 0.29 * 100 is 28.999... in binary.
        let filled = ((progress * bar_w as f64) + 1e-9).floor() as usize;
        let percent = ((progress * 100.0) + 1e-9).floor() as u32;
        let outcome = Outcome::of(&row.status);
        let (on, off) = if color {
            (outcome.color(), RESET)
        } else {
            ("", "")
        };
        let id = fit(&row.case_id, id_w);
        let status = fit(&row.status, status_w);
        let step = fit(row.step.as_deref().unwrap_or(""), step_room);
        let line = format!(
            "{id:<id_w$} [{on}{}{off}{}] {percent:>3}%  {on}{status:<status_w$}{off}  {step}",
            "#".repeat(filled),
            ".".repeat(bar_w - filled),
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// `5 cases: 4 completed, 1 failed, 0 running`; cancelled cases are added only when there
/// are some, and "running" counts every case not yet final.
pub fn summary(rows: &[CaseRow]) -> String {
    let count = |o: Outcome| rows.iter().filter(|r| Outcome::of(&r.status) == o).count();
    let noun = if rows.len() == 1 { "case" } else { "cases" };
    let mut text = format!(
        "{} {noun}: {} completed, {} failed, {} running",
        rows.len(),
        count(Outcome::Completed),
        count(Outcome::Failed),
        count(Outcome::InFlight),
    );
    let cancelled = count(Outcome::Cancelled);
    if cancelled > 0 {
        let _ = write!(text, ", {cancelled} cancelled");
    }
    text
}

/// Whether every case has reached a final status (an empty list counts as finished).
pub fn all_final(rows: &[CaseRow]) -> bool {
    rows.iter().all(|r| Outcome::of(&r.status).is_final())
}

fn column_width<'a>(values: impl Iterator<Item = &'a str>, max: usize) -> usize {
    values
        .map(|v| v.chars().count())
        .max()
        .unwrap_or(0)
        .min(max)
}

/// `text` cut to `width` characters, the last one an ellipsis when something was cut.
fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    if width == 0 {
        return String::new();
    }
    let mut cut: String = text.chars().take(width - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, status: &str, step: Option<&str>, progress: f64) -> CaseRow {
        CaseRow {
            case_id: id.into(),
            status: status.into(),
            step: step.map(Into::into),
            progress,
        }
    }

    #[test]
    fn rows_line_up_with_bars_percentages_and_steps() {
        let rows = [
            row("DEMO0001", "completed", None, 1.0),
            row("DEMO0002", "running", Some("simulate"), 0.45),
            row("DEMO10", "pending", None, 0.0),
        ];
        // id 8 + status 9 + fixed 12 + step 8 = 37, so a 57-wide terminal leaves 20 for the bar.
        let text = render(&rows, 57, false);
        assert_eq!(
            text,
            "DEMO0001 [####################] 100%  completed\n\
             DEMO0002 [#########...........]  45%  running    simulate\n\
             DEMO10   [....................]   0%  pending\n"
        );
        assert!(text.lines().all(|l| l.chars().count() <= 57));
    }

    #[test]
    fn long_ids_and_steps_are_cut_and_the_bar_stays_readable() {
        let rows = [
            row(
                "3f2b9c1e-0d5a-4c1e-9b7f-2a6d8e4c1b00",
                "failed",
                Some("download results"),
                0.999,
            ),
            row("short", "running", Some("upload"), -3.0),
            row("nan", "running", None, f64::NAN),
        ];
        let text = render(&rows, 52, false);
        assert_eq!(
            text,
            "3f2b9c1e-0d5a-4c1e-… [#########.]  99%  failed   do…\n\
             short                [..........]   0%  running  up…\n\
             nan                  [..........]   0%  running\n"
        );
        assert!(text.lines().all(|l| l.chars().count() <= 52), "{text}");
    }

    #[test]
    fn wide_terminals_cap_the_bar() {
        let text = render(&[row("a", "running", None, 0.5)], 200, false);
        assert_eq!(
            text,
            format!("a [{}{}]  50%  running\n", "#".repeat(20), ".".repeat(20))
        );
    }

    #[test]
    fn colour_wraps_status_and_filled_bar_only() {
        let text = render(&[row("a", "failed", None, 0.5)], 0, true);
        assert_eq!(
            text,
            "a [\x1b[31m#####\x1b[0m.....]  50%  \x1b[31mfailed\x1b[0m\n"
        );
        let text = render(&[row("b", "completed", None, 1.0)], 0, true);
        assert!(text.contains("\x1b[32mcompleted\x1b[0m"), "{text:?}");
    }

    #[test]
    fn summary_counts_by_outcome() {
        let rows = [
            row("a", "completed", None, 1.0),
            row("b", "Completed", None, 1.0),
            row("c", "completed", None, 1.0),
            row("d", "completed", None, 1.0),
            row("e", "failed", None, 0.3),
        ];
        assert_eq!(summary(&rows), "5 cases: 4 completed, 1 failed, 0 running");
        assert!(all_final(&rows));

        let rows = [
            row("a", "running", Some("simulate"), 0.5),
            row("b", "waiting_gpu", None, 0.1),
            row("c", "cancelled", None, 0.0),
        ];
        assert_eq!(
            summary(&rows),
            "3 cases: 0 completed, 0 failed, 2 running, 1 cancelled"
        );
        assert!(!all_final(&rows));
        assert_eq!(
            summary(&rows[..1]),
            "1 case: 0 completed, 0 failed, 1 running"
        );
        assert_eq!(summary(&[]), "0 cases: 0 completed, 0 failed, 0 running");
        assert_eq!(render(&[], 80, false), "");
    }
}
