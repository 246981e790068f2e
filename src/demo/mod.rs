//! What `mqic demo` runs on: synthetic cases ([`cases`]), stand-ins for MOQUI and the
//! interpreter (shell scripts embedded in the binary), and the progress view ([`progress`]).
//!
//! The stand-ins are POSIX `sh` scripts so a laptop without a GPU shows the whole pipeline:
//! they print MOQUI's real log phrases, write clearly synthetic outputs, fail on request
//! (`MQIC_DEMO_FAIL`, or a file of that name in the case directory), and, when `MQIC_LEDGER`
//! names a file, append `<case_id> <step> <attempt>` to it after each successful run so tests
//! can prove every step ran exactly once.

pub mod cases;
pub mod progress;
pub mod run;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The MOQUI `tps_env` stand-in: `sh moqui-standin.sh <case_dir> <output_dir> <gpu_id>`.
pub const MOQUI_STANDIN: &str = include_str!("../../assets/demo/moqui-standin.sh");

/// The interpreter stand-in: `sh interpreter-standin.sh <case_dir> <out_dir> [gpu_id]`.
pub const INTERPRETER_STANDIN: &str = include_str!("../../assets/demo/interpreter-standin.sh");

/// Where [`write_standins`] put the scripts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standins {
    /// `<dir>/moqui-standin.sh`.
    pub moqui: PathBuf,
    /// `<dir>/interpreter-standin.sh`.
    pub interpreter: PathBuf,
}

/// Writes both stand-ins into `dir` (created if missing), executable, so step commands can
/// call them as `sh <path> ...` or directly. Blocking file I/O.
pub fn write_standins(dir: &Path) -> io::Result<Standins> {
    fs::create_dir_all(dir)?;
    let standins = Standins {
        moqui: dir.join("moqui-standin.sh"),
        interpreter: dir.join("interpreter-standin.sh"),
    };
    for (path, text) in [
        (&standins.moqui, MOQUI_STANDIN),
        (&standins.interpreter, INTERPRETER_STANDIN),
    ] {
        fs::write(path, text)?;
        make_executable(path)?;
    }
    Ok(standins)
}

#[cfg(unix)]
fn make_executable(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
}

#[cfg(not(unix))]
fn make_executable(_path: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::cases::{write_case, CaseSpec};
    use super::*;
    use std::process::{Command, Output, Stdio};
    use std::time::{Duration, Instant};

    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        case: PathBuf,
        scripts: Standins,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let case = root.join("DEMO0001");
        write_case(&case, &CaseSpec::tiny(1)).unwrap();
        let scripts = write_standins(&root.join("bin")).unwrap();
        Fixture {
            _tmp: tmp,
            root,
            case,
            scripts,
        }
    }

    /// A command with none of the demo switches inherited from the test's environment.
    fn sh(script: &Path) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg(script);
        for var in [
            "MQIC_DEMO_FAIL",
            "MQIC_DEMO_BATCHES",
            "MQIC_DEMO_BATCH_SLEEP",
            "MQIC_LEDGER",
            "MQIC_CASE_ID",
            "MQIC_STEP",
            "MQIC_ATTEMPT",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("MQIC_DEMO_BATCH_SLEEP", "0");
        cmd
    }

    fn moqui(f: &Fixture, out: &Path, env: &[(&str, &str)]) -> Output {
        let mut cmd = sh(&f.scripts.moqui);
        cmd.arg(&f.case).arg(out).arg("0").envs(env.iter().copied());
        cmd.output().unwrap()
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    fn beam_numbers(f: &Fixture) -> Vec<String> {
        let mut beams: Vec<String> = fs::read_dir(&f.case)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .map(|d| {
                cases::read_plan_info(&d.join("PlanInfo.txt")).unwrap()["DICOM_BEAM_NUMBER"].clone()
            })
            .collect();
        beams.sort();
        beams
    }

    #[test]
    fn scripts_parse_with_sh_n() {
        let f = fixture();
        for script in [&f.scripts.moqui, &f.scripts.interpreter] {
            let out = Command::new("sh").arg("-n").arg(script).output().unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                script.display(),
                text(&out.stderr)
            );
        }
        // shellcheck is optional on build machines; when present it must be clean.
        if let Ok(out) = Command::new("shellcheck")
            .arg("-s")
            .arg("sh")
            .args([&f.scripts.moqui, &f.scripts.interpreter])
            .output()
        {
            assert!(out.status.success(), "{}", text(&out.stdout));
        }
    }

    #[test]
    fn moqui_success_prints_the_log_grammar_and_writes_one_dose_per_beam() {
        let f = fixture();
        let out_dir = f.root.join("out");
        let out = moqui(&f, &out_dir, &[("MQIC_DEMO_BATCHES", "4")]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        assert!(lines[0].contains("with 4 batches"), "{stdout}");
        let batches: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("Generating particles for"))
            .collect();
        assert_eq!(
            batches,
            (1..=4)
                .map(|i| format!("Generating particles for ({i} of 4 batches)"))
                .collect::<Vec<_>>()
        );
        let total = lines.last().unwrap();
        assert!(total.starts_with("Total execution time: "), "{stdout}");
        assert!(total.ends_with(" seconds"), "{stdout}");

        let beams = beam_numbers(&f);
        assert_eq!(beams, ["2", "3"]);
        let mut doses: Vec<String> = fs::read_dir(out_dir.join("Dose"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        doses.sort();
        assert_eq!(doses, ["RTDOSE_2.dcm", "RTDOSE_3.dcm"]);
        let dose = fs::read_to_string(out_dir.join("Dose/RTDOSE_2.dcm")).unwrap();
        assert!(dose.starts_with("SYNTHETIC"), "{dose}");
    }

    #[test]
    fn moqui_exit_fails_half_way_with_a_fatal_error() {
        let f = fixture();
        let out_dir = f.root.join("out");
        let ledger = f.root.join("ledger");
        let ledger_s = ledger.to_str().unwrap();
        let out = moqui(
            &f,
            &out_dir,
            &[
                ("MQIC_DEMO_BATCHES", "4"),
                ("MQIC_DEMO_FAIL", "exit"),
                ("MQIC_LEDGER", ledger_s),
            ],
        );
        assert_eq!(out.status.code(), Some(2));
        let stdout = text(&out.stdout);
        assert_eq!(
            stdout.matches("Generating particles for").count(),
            2,
            "{stdout}"
        );
        assert!(!stdout.contains("Total execution time"));
        assert!(text(&out.stderr).contains("FATAL ERROR: "));
        assert!(!out_dir.join("Dose").exists());
        assert!(!ledger.exists(), "a failed run must not count as done");
    }

    #[test]
    fn moqui_nogpu_reports_the_retryable_phrase() {
        let f = fixture();
        let out_dir = f.root.join("out");
        let out = moqui(&f, &out_dir, &[("MQIC_DEMO_FAIL", "nogpu")]);
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains("No free GPU remains after BeamLayerMultiGpu filtering"));
        assert!(!text(&out.stdout).contains("Generating particles"));
        assert!(!out_dir.exists());
    }

    #[test]
    fn moqui_nomarker_succeeds_without_the_total_line() {
        let f = fixture();
        let out_dir = f.root.join("out");
        let out = moqui(&f, &out_dir, &[("MQIC_DEMO_FAIL", "nomarker")]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert_eq!(stdout.matches("Generating particles for").count(), 10);
        assert!(!stdout.contains("Total execution time"));
        assert!(out_dir.join("Dose/RTDOSE_2.dcm").is_file());
    }

    #[test]
    fn moqui_fails_one_case_through_a_file_in_the_case() {
        let f = fixture();
        fs::write(f.case.join("MQIC_DEMO_FAIL"), "exit\n").unwrap();
        let out = moqui(&f, &f.root.join("out"), &[("MQIC_DEMO_BATCHES", "2")]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
        assert_eq!(text(&out.stdout).matches("Generating particles").count(), 1);
    }

    #[test]
    fn moqui_fails_before_any_batch_on_a_case_without_deliveries() {
        let f = fixture();
        let empty = f.root.join("empty");
        fs::create_dir(&empty).unwrap();
        let out = sh(&f.scripts.moqui)
            .arg(&empty)
            .arg(f.root.join("out"))
            .arg("0")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(text(&out.stderr).contains("FATAL ERROR: no delivery folder"));
        assert!(!text(&out.stdout).contains("Generating particles"));
    }

    #[test]
    fn moqui_hang_keeps_running_until_killed() {
        let f = fixture();
        let mut child = sh(&f.scripts.moqui)
            .arg(&f.case)
            .arg(f.root.join("out"))
            .arg("0")
            .env("MQIC_DEMO_FAIL", "hang")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // A hang cannot be proven, only given room to end: any exit within the window fails.
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            assert!(child.try_wait().unwrap().is_none(), "the hang mode exited");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn ledger_gets_one_line_per_successful_run() {
        let f = fixture();
        let ledger = f.root.join("ledger");
        let ledger_s = ledger.to_str().unwrap();
        for attempt in ["1", "2"] {
            let env = [
                ("MQIC_LEDGER", ledger_s),
                ("MQIC_CASE_ID", "DEMO0001"),
                ("MQIC_STEP", "simulate"),
                ("MQIC_ATTEMPT", attempt),
                ("MQIC_DEMO_BATCHES", "1"),
            ];
            let out = moqui(&f, &f.root.join("out"), &env);
            assert!(out.status.success(), "{}", text(&out.stderr));
        }
        let out = sh(&f.scripts.interpreter)
            .arg(&f.case)
            .arg(f.root.join("csv"))
            .env("MQIC_LEDGER", ledger_s)
            .env("MQIC_CASE_ID", "DEMO0001")
            .env("MQIC_STEP", "interpret")
            .env("MQIC_ATTEMPT", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(
            fs::read_to_string(&ledger).unwrap(),
            "DEMO0001 simulate 1\nDEMO0001 simulate 2\nDEMO0001 interpret 1\n"
        );
    }

    #[test]
    fn interpreter_writes_one_tps_file_per_beam() {
        let f = fixture();
        let out_dir = f.root.join("csv");
        let out = sh(&f.scripts.interpreter)
            .arg(&f.case)
            .arg(&out_dir)
            .arg("3")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert_eq!(stdout.lines().count(), 2, "{stdout}");
        for beam in beam_numbers(&f) {
            assert!(stdout.contains(&format!("beam {beam}: ")), "{stdout}");
            let tps = fs::read_to_string(out_dir.join(format!("moqui_tps_{beam}.in"))).unwrap();
            let keys: Vec<(&str, &str)> = tps
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.split_once(' ').unwrap())
                .collect();
            assert!(keys.contains(&("GPUID", "3")), "{tps}");
            assert!(keys.contains(&("GantryNum", "2")), "{tps}");
            assert!(keys.contains(&("BeamNumbers", beam.as_str())), "{tps}");
            assert!(keys.contains(&("OutputFormat", "dcm")), "{tps}");
            assert!(keys.iter().any(|(k, _)| *k == "OutputDir"), "{tps}");
        }
    }

    #[test]
    fn interpreter_refuses_a_delivery_without_plan_info() {
        let f = fixture();
        let delivery = fs::read_dir(&f.case)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.is_dir())
            .unwrap();
        fs::remove_file(delivery.join("PlanInfo.txt")).unwrap();
        let out_dir = f.root.join("csv");
        let out = sh(&f.scripts.interpreter)
            .arg(&f.case)
            .arg(&out_dir)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3));
        let stderr = text(&out.stderr);
        assert!(stderr.contains("without PlanInfo.txt"), "{stderr}");
        assert!(stderr.contains(delivery.to_str().unwrap()), "{stderr}");
        assert!(!out_dir.exists(), "nothing is written before the check");
    }
}
