//! The ready rule: where a case sits in the watched folder, what its id is, and when it is
//! ready. One predicate for the startup rescan, notify events and polling alike (the
//! original's startup scan skipped the marker check, lineage C6).

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::config::pipeline::ScannerConfig;
use crate::protocol::{CaseId, NewCase};

/// The ready cases under `root` right now, sorted by id: the same walk and predicate the
/// running scanner uses.
pub fn scan_once(config: &ScannerConfig, root: &Path) -> Vec<NewCase> {
    let root = absolute(root);
    let rule = ReadyRule::new(config);
    let now = SystemTime::now();
    let mut ready: Vec<NewCase> = rule
        .case_dirs_under(&root, &root)
        .into_iter()
        .filter_map(|dir| {
            let case = rule.describe(&root, &dir)?;
            (rule.readiness(&dir, now) == Readiness::Ready).then_some(case)
        })
        .collect();
    ready.sort_by(|a, b| a.case_id.0.cmp(&b.case_id.0));
    ready
}

/// Whether `case_dir` is a case under `root` and ready now.
pub fn is_ready(config: &ScannerConfig, root: &Path, case_dir: &Path) -> bool {
    ReadyRule::new(config).is_ready(&absolute(root), &absolute(case_dir))
}

/// `path` made absolute against the working directory (symlinks kept, so the announced
/// path is the one the lab configured).
pub(super) fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The case layout and the readiness predicate, taken once from [`ScannerConfig`].
#[derive(Debug, Clone)]
pub struct ReadyRule {
    /// How many levels below the root a case directory sits.
    depth: usize,
    /// The file whose presence inside the case directory makes it ready; empty: none.
    marker: String,
    /// Readiness without the marker after this long with no writes; zero: marker only.
    quiet: Duration,
    /// Name patterns (`*` = any run) of temporaries: a path part that matches is no case,
    /// a file inside a case that matches means the case is still being written.
    ignore: Vec<String>,
}

/// What a look at one case directory found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Readiness {
    Ready,
    /// Exists, but not ready yet: look again later.
    Waiting,
    /// No longer a directory.
    Gone,
}

/// Where a path an event names sits in the layout.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Located {
    /// At or inside this case directory.
    Case(PathBuf),
    /// Shallower than a case (a room or patient directory): its subtree holds cases.
    Above(PathBuf),
    /// The root itself, outside the root, under an ignored name, or not UTF-8.
    Nowhere,
}

/// What a walk of one case's tree saw.
#[derive(Debug)]
struct Survey {
    /// Entries inside the case directory, at any depth.
    entries: usize,
    /// Whether some entry is named like a temporary (still being written or unpacked).
    temporaries: bool,
    /// The latest modification time in the tree, the case directory's own included.
    newest: SystemTime,
}

impl ReadyRule {
    pub fn new(config: &ScannerConfig) -> ReadyRule {
        ReadyRule {
            depth: config.case_depth.max(1),
            marker: config.ready_marker.clone(),
            quiet: Duration::from_secs(config.quiet_period_secs),
            ignore: config.ignore.clone(),
        }
    }

    /// Whether a file or directory name matches an ignore pattern.
    pub fn ignores(&self, name: &str) -> bool {
        self.ignore.iter().any(|p| wildcard_match(p, name))
    }

    /// Whether `case_dir` (absolute, under the absolute `root`) is a case and ready now.
    pub fn is_ready(&self, root: &Path, case_dir: &Path) -> bool {
        self.describe(root, case_dir).is_some()
            && self.readiness(case_dir, SystemTime::now()) == Readiness::Ready
    }

    /// The announcement for `case_dir` when it sits where a case sits: exactly `depth`
    /// levels below `root`, no part ignored, every part UTF-8. Readiness is not checked.
    pub fn describe(&self, root: &Path, case_dir: &Path) -> Option<NewCase> {
        let parts = self.parts(root, case_dir)?;
        if parts.len() != self.depth {
            return None;
        }
        let room = (self.depth >= 2 && is_room(parts[0])).then(|| parts[0].to_string());
        Some(NewCase {
            case_id: CaseId(parts.join("__")),
            case_path: case_dir.to_str()?.to_string(),
            workflow: None,
            room,
        })
    }

    /// The parts of `path` below `root`, when all are plain, UTF-8 and not ignored.
    fn parts<'p>(&self, root: &Path, path: &'p Path) -> Option<Vec<&'p str>> {
        let rel = path.strip_prefix(root).ok()?;
        let mut parts = Vec::new();
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return None;
            };
            let name = name.to_str()?;
            if self.ignores(name) {
                return None;
            }
            parts.push(name);
        }
        Some(parts)
    }

    pub(super) fn locate(&self, root: &Path, path: &Path) -> Located {
        let Ok(rel) = path.strip_prefix(root) else {
            return Located::Nowhere;
        };
        let head: PathBuf = rel.components().take(self.depth).collect();
        let dir = root.join(&head);
        match self.parts(root, &dir) {
            Some(parts) if parts.len() == self.depth => Located::Case(dir),
            Some(parts) if !parts.is_empty() => Located::Above(dir),
            _ => Located::Nowhere,
        }
    }

    /// The directories `depth` levels below `root` inside `start` (`root` itself or a
    /// shallower directory), skipping ignored names. Symlinked directories count: a lab
    /// may link a case in.
    pub(super) fn case_dirs_under(&self, root: &Path, start: &Path) -> Vec<PathBuf> {
        let Some(parts) = self.parts(root, start) else {
            return Vec::new();
        };
        if parts.len() > self.depth {
            return Vec::new();
        }
        let mut level = vec![start.to_path_buf()];
        for _ in parts.len()..self.depth {
            let mut next = Vec::new();
            for dir in &level {
                let Ok(entries) = fs::read_dir(dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    let Some(name) = name.to_str() else { continue };
                    if self.ignores(name) {
                        continue;
                    }
                    let path = entry.path();
                    if fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
                        next.push(path);
                    }
                }
            }
            level = next;
        }
        level.retain(|d| fs::metadata(d).is_ok_and(|m| m.is_dir()));
        level
    }

    /// The ready rule for a directory already known to sit where a case sits: the marker
    /// is inside it, or (with a quiet period) nothing in its non-empty tree changed for that
    /// long; and in both cases nothing inside is still named like a temporary.
    pub(super) fn readiness(&self, case_dir: &Path, now: SystemTime) -> Readiness {
        if !fs::metadata(case_dir).is_ok_and(|m| m.is_dir()) {
            return Readiness::Gone;
        }
        let marked = !self.marker.is_empty() && case_dir.join(&self.marker).is_file();
        if !marked && self.quiet.is_zero() {
            return Readiness::Waiting;
        }
        let survey = match self.survey(case_dir) {
            Ok(s) => s,
            Err(e) => {
                // A file vanishing mid-walk is activity; a permission problem stays visible
                // in the debug log rather than flooding the journal on every re-check.
                tracing::debug!(dir = %case_dir.display(), error = %e, "cannot walk a case");
                return Readiness::Waiting;
            }
        };
        if survey.temporaries {
            return Readiness::Waiting;
        }
        if marked {
            return Readiness::Ready;
        }
        match now.duration_since(survey.newest) {
            Ok(age) if survey.entries > 0 && age >= self.quiet => Readiness::Ready,
            _ => Readiness::Waiting,
        }
    }

    /// Walks a case's tree without following symlinks (no loops), stopping at the first
    /// temporary name.
    fn survey(&self, case_dir: &Path) -> io::Result<Survey> {
        let mut survey = Survey {
            entries: 0,
            temporaries: false,
            newest: fs::metadata(case_dir)?.modified()?,
        };
        let mut stack = vec![case_dir.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name != self.marker.as_str() && self.ignores(&name) {
                    survey.temporaries = true;
                    return Ok(survey);
                }
                let meta = entry.metadata()?;
                survey.entries += 1;
                survey.newest = survey.newest.max(meta.modified()?);
                if meta.is_dir() {
                    stack.push(entry.path());
                }
            }
        }
        Ok(survey)
    }
}

/// `G` followed by digits: a treatment room.
fn is_room(part: &str) -> bool {
    part.strip_prefix('G')
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Matches `name` against `pattern`, where `*` stands for any run of characters (none
/// included) and everything else for itself.
fn wildcard_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was and which name position it currently absorbs up to.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(depth: usize) -> ScannerConfig {
        ScannerConfig {
            case_depth: depth,
            ..ScannerConfig::default()
        }
    }

    /// A case directory with a data file and, if asked, the marker.
    fn make_case(dir: &Path, marker: bool) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("PlanInfo.txt"), b"DICOM_BEAM_NUMBER,2\n").unwrap();
        if marker {
            fs::write(dir.join("_CASE_READY"), b"").unwrap();
        }
    }

    #[test]
    fn wildcard_patterns() {
        assert!(wildcard_match("*.extracting", "case1.extracting"));
        assert!(!wildcard_match("*.extracting", "case1.extracting.done"));
        assert!(wildcard_match("*.backup.*", "plan.backup.2024"));
        assert!(wildcard_match("extract_*.tmp", "extract_ab.tmp"));
        assert!(!wildcard_match("extract_*.tmp", "xextract_ab.tmp"));
        assert!(wildcard_match(".*", ".rsync-tmp"));
        assert!(!wildcard_match(".*", "case"));
        assert!(wildcard_match("a*b*c", "aXbYbZc"));
        assert!(wildcard_match("*", ""));
        assert!(!wildcard_match("abc", "ab"));
    }

    #[test]
    fn rooms_are_g_and_digits() {
        assert!(is_room("G1"));
        assert!(is_room("G12"));
        assert!(!is_room("G"));
        assert!(!is_room("G1a"));
        assert!(!is_room("P1"));
    }

    #[test]
    fn one_predicate_for_marker_ignores_and_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let cfg = config(1);
        make_case(&root.join("ready"), true);
        make_case(&root.join("unmarked"), false);
        make_case(&root.join("unpacking.extracting"), true);
        make_case(&root.join("writing"), true);
        fs::write(root.join("writing").join("beam.zip.tmp"), b"x").unwrap();
        make_case(&root.join("nested").join("deeper"), true);

        assert!(is_ready(&cfg, root, &root.join("ready")));
        assert!(!is_ready(&cfg, root, &root.join("unmarked")));
        assert!(!is_ready(&cfg, root, &root.join("unpacking.extracting")));
        assert!(!is_ready(&cfg, root, &root.join("writing")));
        assert!(!is_ready(&cfg, root, &root.join("nested").join("deeper")));
        assert!(!is_ready(&cfg, root, &root.join("missing")));

        let ids: Vec<String> = scan_once(&cfg, root)
            .into_iter()
            .map(|c| c.case_id.0)
            .collect();
        assert_eq!(ids, vec!["ready".to_string()]);

        fs::rename(
            root.join("writing").join("beam.zip.tmp"),
            root.join("writing").join("beam.zip"),
        )
        .unwrap();
        assert!(is_ready(&cfg, root, &root.join("writing")));
    }

    #[test]
    fn nested_layout_ids_and_rooms() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        make_case(&root.join("G1/P1/S1"), true);
        make_case(&root.join("G1/P2/S1"), true);
        make_case(&root.join("Other/P3/S9"), true);
        make_case(&root.join("G2.extracting/P4/S1"), true);
        fs::write(root.join("G1/stray.txt"), b"not a case").unwrap();

        let cases = scan_once(&config(3), root);
        let ids: Vec<&str> = cases.iter().map(|c| c.case_id.as_str()).collect();
        assert_eq!(ids, vec!["G1__P1__S1", "G1__P2__S1", "Other__P3__S9"]);
        assert_eq!(cases[0].room.as_deref(), Some("G1"));
        assert_eq!(cases[2].room, None);
        assert_eq!(cases[0].workflow, None);
        let path = Path::new(&cases[0].case_path);
        assert!(path.is_absolute(), "{path:?}");
        assert_eq!(path, absolute(&root.join("G1/P1/S1")));
    }

    #[test]
    fn quiet_period_needs_an_old_non_empty_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let rule = ReadyRule::new(&ScannerConfig {
            ready_marker: String::new(),
            quiet_period_secs: 1,
            ..config(1)
        });
        let case = root.join("c");
        make_case(&case, false);
        let empty = root.join("empty");
        fs::create_dir(&empty).unwrap();
        let now = SystemTime::now();
        assert_eq!(rule.readiness(&case, now), Readiness::Waiting);
        let later = now + Duration::from_secs(5);
        assert_eq!(rule.readiness(&case, later), Readiness::Ready);
        assert_eq!(rule.readiness(&empty, later), Readiness::Waiting);
        assert_eq!(rule.readiness(&root.join("gone"), later), Readiness::Gone);
    }
}
