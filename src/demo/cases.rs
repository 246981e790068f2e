//! Synthetic treatment-log cases: a study directory shaped like the ones the treatment control
//! system exports (delivery folders, `PlanInfo.txt`, `PlanRange.txt`, binary `.ptn`/`.mgn`
//! logs), generated deterministically from a seed and holding no patient data.
//!
//! The layout follows the reference sample: one delivery folder per treatment beam, named by a
//! 16-digit timestamp `YYYYMMDDhhmmssff`; raw DICOM beam numbers start at 2 because beam 1 is
//! the setup field; `.ptn` records are 8 big-endian u16 (16 bytes) and `.mgn` records are a
//! big-endian u32 time plus 5 big-endian u16 (14 bytes). No RTPLAN `.dcm` is written: nothing
//! here can produce valid DICOM, and a fake one would mislead any reader that checks it.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::ops::RangeInclusive;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The readiness marker; written last so a watcher never sees a half-written case as ready.
pub const READY_MARKER: &str = "_CASE_READY";

/// UID root of every synthetic study: clearly not issued to any real device.
pub const UID_ROOT: &str = "1.2.826.0.1.3680043.10.1234.";

/// The room code that starts every log file name (`02` = gantry 2 in the reference sample).
const ROOM_CODE: &str = "02";

/// The TCSC plan number; the reference sample only ever has plan 1.
const PLAN_NUMBER: u32 = 1;

/// A fake UNC share, so paths in `PlanInfo.txt` have the real shape but point nowhere.
const SHARE_DIR: &str = r"\\TCSC-DEMO\share";

/// Header of `PlanRange.txt`, as the treatment control system writes it.
pub const PLAN_RANGE_HEADER: &str = "RESULT_ID,LAYER_NO,LAYER_ENERGY,PATIENT_ID,FLD_NO,\
DOSE1_RANGE,DOSE2_RANGE,PLAN_DOSE1_RANGE,PLAN_DOSE2_RANGE,SCAN_OUT_FL_NM,PLAN_SCAN_OUT_FL_NM";

/// Bytes in one `.ptn` record (8 x u16).
pub const PTN_RECORD_BYTES: usize = 16;

/// Bytes in one `.mgn` record (u32 + 5 x u16).
pub const MGN_RECORD_BYTES: usize = 14;

/// Column of `LayerNum` within a `.ptn` record, counted in u16 words.
pub const PTN_LAYER_COLUMN: usize = 6;

/// Spot counts are drawn as `min + (max - min) * u^SKEW`: most layers are small and a few
/// (distal) ones large, which puts the mean about 30 % into the range as in the sample.
const RECORD_SKEW: f64 = 2.3;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseSpec {
    /// The synthetic DICOM patient id (`DEMO0001`); also used in `.mgn` file names, so it is
    /// limited to ASCII letters, digits, `-` and `_`.
    pub patient_id: String,
    /// Treatment beams, one delivery folder each (1 to 99).
    pub beams: u32,
    /// Energy layers per beam, drawn per beam (each 1 to 999, the `LLL` field of file names).
    pub layers_per_beam: RangeInclusive<u32>,
    /// Spot records per `.ptn` file, drawn per layer; sets the size of the case.
    pub records_per_layer: RangeInclusive<u32>,
    /// The only source of randomness: the same spec writes byte-identical files.
    pub seed: u64,
}

impl CaseSpec {
    /// A small case (a few KB), for tests and the demo: 2 beams of 3 to 5 layers.
    pub fn tiny(n: u32) -> Self {
        Self {
            patient_id: demo_patient_id(n),
            beams: 2,
            layers_per_beam: 3..=5,
            records_per_layer: 16..=48,
            seed: u64::from(n),
        }
    }

    /// A case the size of the reference sample: 3 beams of 30 to 45 layers, `.ptn` files of
    /// 30 KB to 1.3 MB, about 45 MB in about 220 files. Exercises streaming, hashing and
    /// transfer progress.
    pub fn realistic(n: u32) -> Self {
        Self {
            patient_id: demo_patient_id(n),
            beams: 3,
            layers_per_beam: 30..=45,
            records_per_layer: 1_875..=81_250,
            // Another stream than `tiny(n)`, so the two profiles never share a study UID.
            seed: u64::from(n) ^ 0x5245_414c_0000_0000,
        }
    }

    fn validate(&self) -> io::Result<()> {
        let id_ok = !self.patient_id.is_empty()
            && self
                .patient_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        let problem = if !id_ok {
            Some(format!(
                "patient id {:?} must be ASCII letters, digits, - or _",
                self.patient_id
            ))
        } else if !(1..=99).contains(&self.beams) {
            Some(format!("beams must be 1 to 99, not {}", self.beams))
        } else if self.layers_per_beam.is_empty()
            || *self.layers_per_beam.start() < 1
            || *self.layers_per_beam.end() > 999
        {
            Some(format!(
                "layers_per_beam {:?} must lie within 1..=999",
                self.layers_per_beam
            ))
        } else if self.records_per_layer.is_empty() || *self.records_per_layer.start() < 1 {
            Some(format!(
                "records_per_layer {:?} must be non-empty and at least 1",
                self.records_per_layer
            ))
        } else {
            None
        };
        match problem {
            Some(p) => Err(io::Error::new(io::ErrorKind::InvalidInput, p)),
            None => Ok(()),
        }
    }
}

/// `DEMO0001` for case 1: obviously synthetic, and sorts in creation order.
pub fn demo_patient_id(n: u32) -> String {
    format!("DEMO{n:04}")
}

/// What [`write_case`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseSummary {
    /// Files written, the ready marker included when it was written.
    pub files: usize,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Delivery folders (one per treatment beam).
    pub beams: usize,
    /// Energy layers over all beams (one `.ptn` and one `.mgn` each).
    pub layers: usize,
    /// The synthetic study instance UID written into every `PlanInfo.txt`.
    pub study_uid: String,
}

/// Writes a complete case into `dir` (created if missing) and then, last, the
/// [`READY_MARKER`]. Blocking file I/O: call it from `spawn_blocking` in async code.
pub fn write_case(dir: &Path, spec: &CaseSpec) -> io::Result<CaseSummary> {
    let mut summary = write_case_files(dir, spec)?;
    mark_ready(dir)?;
    summary.files += 1;
    Ok(summary)
}

/// Writes the case's files without the ready marker: for tests of a marker that arrives
/// later, or never.
pub fn write_case_files(dir: &Path, spec: &CaseSpec) -> io::Result<CaseSummary> {
    spec.validate()?;
    fs::create_dir_all(dir)?;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let study_uid = format!(
        "{UID_ROOT}{}.{}",
        rng.random_range(1..=u32::MAX),
        rng.random_range(1..=u32::MAX)
    );
    let mut summary = CaseSummary {
        files: 0,
        bytes: 0,
        beams: 0,
        layers: 0,
        study_uid: study_uid.clone(),
    };
    let mut clock = DeliveryClock::new(&mut rng);
    for beam_index in 0..spec.beams {
        let delivery = Delivery {
            timestamp: clock.next(&mut rng),
            beam_number: beam_index + 2,
            tcsc_pid: rng.random_range(9_000_000..=9_999_999),
            layers: rng.random_range(spec.layers_per_beam.clone()),
        };
        delivery.write(dir, spec, &study_uid, &mut rng, &mut summary)?;
        summary.beams += 1;
        summary.layers += delivery.layers as usize;
    }
    Ok(summary)
}

/// Writes the empty [`READY_MARKER`] into `dir`. An empty file appears complete the moment
/// it exists, so readiness is atomic as long as it is written after everything else.
pub fn mark_ready(dir: &Path) -> io::Result<()> {
    fs::File::create(dir.join(READY_MARKER)).map(drop)
}

/// Parses a `PlanInfo.txt` (`KEY,value` per line; blank lines skipped, CR tolerated).
pub fn read_plan_info(path: &Path) -> io::Result<BTreeMap<String, String>> {
    let text = fs::read_to_string(path)?;
    let mut keys = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(',') else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}:{}: expected KEY,value, got {line:?}",
                    path.display(),
                    n + 1
                ),
            ));
        };
        keys.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    Ok(keys)
}

/// Irradiation times: one day, a start between 08:00 and 12:00, beams 3 to 7 minutes apart,
/// so every beam of the case falls into one fraction window.
struct DeliveryClock {
    date: (u32, u32, u32),
    seconds: u32,
}

impl DeliveryClock {
    fn new(rng: &mut StdRng) -> Self {
        Self {
            date: (2025, rng.random_range(1..=12), rng.random_range(1..=28)),
            seconds: rng.random_range(8 * 3600..12 * 3600),
        }
    }

    /// The next delivery's 16-digit folder name. With at most 99 beams the day never rolls
    /// over: 12 h + 99 x 7 min < 24 h.
    fn next(&mut self, rng: &mut StdRng) -> String {
        self.seconds += rng.random_range(180..=420);
        let (y, mo, d) = self.date;
        let (h, mi, s) = (
            self.seconds / 3600,
            self.seconds / 60 % 60,
            self.seconds % 60,
        );
        let hundredths: u32 = rng.random_range(0..100);
        format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}{hundredths:02}")
    }
}

/// One delivery folder being written.
struct Delivery {
    timestamp: String,
    beam_number: u32,
    tcsc_pid: u32,
    layers: u32,
}

impl Delivery {
    fn write(
        &self,
        case_dir: &Path,
        spec: &CaseSpec,
        study_uid: &str,
        rng: &mut StdRng,
        summary: &mut CaseSummary,
    ) -> io::Result<()> {
        let dir = case_dir.join(&self.timestamp);
        fs::create_dir_all(&dir)?;
        let mut put = |name: &str, bytes: &[u8]| -> io::Result<()> {
            fs::write(dir.join(name), bytes)?;
            summary.files += 1;
            summary.bytes += bytes.len() as u64;
            Ok(())
        };
        put("PlanInfo.txt", self.plan_info(spec, study_uid).as_bytes())?;

        // Real plans step down 2-3 MeV per layer from about 170 MeV to about 70 MeV.
        let mut energy: f64 = rng.random_range(165.0..175.0);
        let span = (energy - 70.0) / f64::from(self.layers.saturating_sub(1).max(1));
        let step = span.clamp(2.0, 3.0);
        let mut range = String::from(PLAN_RANGE_HEADER);
        range.push('\n');
        for layer in 1..=self.layers {
            let ptn = self.file_name(&self.tcsc_pid.to_string(), layer, "ptn");
            let mgn = self.file_name(&spec.patient_id, layer, "mgn");
            let records = spot_count(rng, &spec.records_per_layer);
            put(&ptn, &ptn_bytes(rng, layer, records))?;
            put(&mgn, &mgn_bytes(rng, layer, mgn_count(records)))?;
            let codes: [u32; 4] = std::array::from_fn(|_| rng.random_range(1..=4));
            range.push_str(&format!(
                "{},{layer},{energy:.2},{},{},{},{},{},{},{ptn},{mgn}\n",
                self.timestamp,
                self.tcsc_pid,
                self.beam_number,
                codes[0],
                codes[1],
                codes[2],
                codes[3],
            ));
            // The floor keeps implausibly long synthetic beams above 60 MeV and still
            // strictly decreasing.
            let next = energy - step + rng.random_range(-0.2..0.2);
            energy = next.max(70.0 - f64::from(layer) * 0.01);
        }
        put("PlanRange.txt", range.as_bytes())
    }

    fn plan_info(&self, spec: &CaseSpec, study_uid: &str) -> String {
        let lines = [
            ("DICOM_PATIENT_ID", spec.patient_id.clone()),
            ("DICOM_STUDY_INS_UID", study_uid.to_owned()),
            ("DICOM_BEAM_NUMBER", self.beam_number.to_string()),
            ("TCSC_IRRAD_DATETIME", self.timestamp.clone()),
            ("TCSC_PATIENT_ID", self.tcsc_pid.to_string()),
            ("TCSC_PLAN_NUMBER", PLAN_NUMBER.to_string()),
            ("TCSC_FIELD_NUMBER", self.beam_number.to_string()),
            ("START_LAYER_NUMBER", "1".to_owned()),
            ("STOP_LAYER_NUMBER", self.layers.to_string()),
            ("SHARE_DIR", SHARE_DIR.to_owned()),
            (
                "ACTUAL_DIR",
                format!("{}\\{study_uid}\\{}", spec.patient_id, self.timestamp),
            ),
        ];
        lines.iter().map(|(k, v)| format!("{k},{v}\n")).collect()
    }

    /// `<GG>_<ID>_<PPP>_<FFF>_<LLL>.<ext>`: `.ptn` files carry the TCSC patient number,
    /// `.mgn` files the DICOM patient id, as in the reference sample.
    fn file_name(&self, id: &str, layer: u32, ext: &str) -> String {
        format!(
            "{ROOM_CODE}_{id}_{PLAN_NUMBER:03}_{:03}_{layer:03}.{ext}",
            self.beam_number
        )
    }
}

fn spot_count(rng: &mut StdRng, range: &RangeInclusive<u32>) -> u32 {
    let (lo, hi) = (*range.start(), *range.end());
    let u: f64 = rng.random();
    lo + (f64::from(hi - lo) * u.powf(RECORD_SKEW)).round() as u32
}

/// Magnet logs grow far more slowly than spot logs (0.8 to 6 KB against 30 KB to 1.3 MB in
/// the sample), roughly with the square root.
fn mgn_count(ptn_records: u32) -> u32 {
    2 * ptn_records.isqrt() + 2
}

/// A line scan around a random centre: RawX, RawY, RawXSize, RawYSize, Dose1, Dose2,
/// LayerNum, BeamOnOff, each big-endian u16. The beam is off for the first and last records.
fn ptn_bytes(rng: &mut StdRng, layer: u32, records: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(records as usize * PTN_RECORD_BYTES);
    let (cx, cy) = (
        rng.random_range(28_000..37_000u32),
        rng.random_range(28_000..37_000u32),
    );
    let line = rng.random_range(20..60u32);
    for k in 0..records {
        let noise: u64 = rng.random();
        let jitter = |shift: u32, span: u64| (noise >> shift) % span;
        let on = k >= 2 && k + 2 < records;
        let dose1 = if on {
            1_000 + jitter(0, 3_000) as u32
        } else {
            0
        };
        let words = [
            cx - line * 60 + (k % line) * 120 + jitter(12, 16) as u32,
            (cy - 3_000 + (k / line % 100) * 60 + jitter(16, 16) as u32).min(65_535),
            1_800 + jitter(20, 400) as u32,
            1_800 + jitter(29, 400) as u32,
            dose1,
            dose1 * 49 / 50,
            layer,
            u32::from(on),
        ];
        for w in words {
            out.extend_from_slice(&(w as u16).to_be_bytes());
        }
    }
    out
}

/// Time in microseconds (big-endian u32) then five big-endian u16: two status words, X, Y and
/// beam on/off.
fn mgn_bytes(rng: &mut StdRng, layer: u32, records: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(records as usize * MGN_RECORD_BYTES);
    let step = rng.random_range(50..=200u32);
    let (cx, cy) = (
        rng.random_range(28_000..37_000u16),
        rng.random_range(28_000..37_000u16),
    );
    for k in 0..records {
        out.extend_from_slice(&(k * step).to_be_bytes());
        let on = u16::from(k > 0 && k + 1 < records);
        let words = [
            layer as u16,
            rng.random_range(0..16u16),
            cx.wrapping_add(rng.random_range(0..2_000u16)),
            cy.wrapping_add(rng.random_range(0..2_000u16)),
            on,
        ];
        for w in words {
            out.extend_from_slice(&w.to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn deliveries(dir: &Path) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .collect();
        out.sort();
        out
    }

    fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .collect();
        out.sort();
        out
    }

    /// Every file under `dir` with its bytes, relative paths sorted.
    fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push((
                        p.strip_prefix(dir).unwrap().to_path_buf(),
                        fs::read(&p).unwrap(),
                    ));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn tiny_case_has_the_real_shape() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("DEMO0007");
        let spec = CaseSpec::tiny(7);
        let summary = write_case(&dir, &spec).unwrap();

        let deliveries = deliveries(&dir);
        assert_eq!(deliveries.len(), 2);
        assert_eq!(summary.beams, 2);
        assert!(dir.join(READY_MARKER).is_file());
        let written = tree(&dir);
        assert_eq!(summary.files, written.len());
        assert_eq!(
            summary.bytes,
            written.iter().map(|(_, b)| b.len() as u64).sum::<u64>()
        );
        assert!(
            summary.bytes < 16 * 1024,
            "tiny case is {} bytes",
            summary.bytes
        );

        let mut layers_total = 0;
        let mut previous_stamp = String::new();
        for (i, delivery) in deliveries.iter().enumerate() {
            let name = delivery.file_name().unwrap().to_str().unwrap().to_owned();
            assert_eq!(name.len(), 16);
            assert!(name.bytes().all(|b| b.is_ascii_digit()), "{name}");
            assert!(name > previous_stamp);
            previous_stamp = name.clone();

            let info = read_plan_info(&delivery.join("PlanInfo.txt")).unwrap();
            assert_eq!(info.len(), 11, "{info:?}");
            assert_eq!(info["DICOM_PATIENT_ID"], "DEMO0007");
            assert_eq!(info["DICOM_STUDY_INS_UID"], summary.study_uid);
            assert!(summary.study_uid.starts_with(UID_ROOT));
            assert_eq!(info["DICOM_BEAM_NUMBER"], (i + 2).to_string());
            assert_eq!(info["TCSC_FIELD_NUMBER"], (i + 2).to_string());
            assert_eq!(info["TCSC_IRRAD_DATETIME"], name);
            assert_eq!(info["TCSC_PLAN_NUMBER"], "1");
            assert_eq!(info["START_LAYER_NUMBER"], "1");
            assert!(info["ACTUAL_DIR"].ends_with(&format!("\\{name}")));
            let layers: usize = info["STOP_LAYER_NUMBER"].parse().unwrap();
            assert!((3..=5).contains(&layers));
            layers_total += layers;

            let ptn = files_with_ext(delivery, "ptn");
            let mgn = files_with_ext(delivery, "mgn");
            assert_eq!((ptn.len(), mgn.len()), (layers, layers));
            for p in &ptn {
                let name = p.file_name().unwrap().to_str().unwrap();
                assert!(name.starts_with(&format!("02_{}_001_", info["TCSC_PATIENT_ID"])));
            }
            for m in &mgn {
                let name = m.file_name().unwrap().to_str().unwrap();
                assert!(name.starts_with("02_DEMO0007_001_"), "{name}");
            }
        }
        assert_eq!(summary.layers, layers_total);
        // Two text files per delivery, two logs per layer, and the marker.
        assert_eq!(summary.files, 2 * 2 + 2 * layers_total + 1);
    }

    #[test]
    fn plan_range_rows_match_layers_and_name_existing_logs() {
        let tmp = tempfile::tempdir().unwrap();
        write_case(tmp.path(), &CaseSpec::tiny(3)).unwrap();
        for delivery in deliveries(tmp.path()) {
            let info = read_plan_info(&delivery.join("PlanInfo.txt")).unwrap();
            let text = fs::read_to_string(delivery.join("PlanRange.txt")).unwrap();
            let mut lines = text.lines();
            assert_eq!(lines.next(), Some(PLAN_RANGE_HEADER));
            let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
            let stop: usize = info["STOP_LAYER_NUMBER"].parse().unwrap();
            assert_eq!(rows.len(), stop);

            let mut last_energy = f64::INFINITY;
            for (i, row) in rows.iter().enumerate() {
                assert_eq!(row.len(), 11, "{row:?}");
                assert_eq!(row[0], info["TCSC_IRRAD_DATETIME"]);
                assert_eq!(row[1], (i + 1).to_string());
                let energy: f64 = row[2].parse().unwrap();
                assert!(
                    (60.0..=180.0).contains(&energy) && energy < last_energy,
                    "{energy}"
                );
                last_energy = energy;
                assert_eq!(row[4], info["DICOM_BEAM_NUMBER"]);
                assert!(
                    row[9].ends_with(&format!("_{:03}.ptn", i + 1)),
                    "{}",
                    row[9]
                );
                assert!(
                    row[10].ends_with(&format!("_{:03}.mgn", i + 1)),
                    "{}",
                    row[10]
                );
                assert!(delivery.join(row[9]).is_file(), "{}", row[9]);
                assert!(delivery.join(row[10]).is_file(), "{}", row[10]);
            }
        }
    }

    #[test]
    fn logs_are_whole_records_and_layer_num_is_the_layer() {
        let tmp = tempfile::tempdir().unwrap();
        write_case(tmp.path(), &CaseSpec::tiny(5)).unwrap();
        for delivery in deliveries(tmp.path()) {
            for (i, ptn) in files_with_ext(&delivery, "ptn").iter().enumerate() {
                let bytes = fs::read(ptn).unwrap();
                assert!(!bytes.is_empty());
                assert_eq!(bytes.len() % PTN_RECORD_BYTES, 0, "{}", ptn.display());
                for record in bytes.chunks_exact(PTN_RECORD_BYTES) {
                    let at = PTN_LAYER_COLUMN * 2;
                    let layer = u16::from_be_bytes([record[at], record[at + 1]]);
                    assert_eq!(usize::from(layer), i + 1, "{}", ptn.display());
                }
            }
            for mgn in files_with_ext(&delivery, "mgn") {
                let len = fs::metadata(&mgn).unwrap().len() as usize;
                assert!(len > 0);
                assert_eq!(len % MGN_RECORD_BYTES, 0, "{}", mgn.display());
            }
        }
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("c"),
        );
        let first = write_case(&a, &CaseSpec::tiny(1)).unwrap();
        let second = write_case(&b, &CaseSpec::tiny(1)).unwrap();
        let other = write_case(&c, &CaseSpec::tiny(2)).unwrap();
        assert_eq!(first, second);
        assert_eq!(tree(&a), tree(&b));
        assert_ne!(first.study_uid, other.study_uid);
        assert_ne!(tree(&a), tree(&c));
    }

    #[test]
    fn files_without_marker_then_marker() {
        let tmp = tempfile::tempdir().unwrap();
        let summary = write_case_files(tmp.path(), &CaseSpec::tiny(4)).unwrap();
        assert!(!tmp.path().join(READY_MARKER).exists());
        assert_eq!(summary.files, tree(tmp.path()).len());
        mark_ready(tmp.path()).unwrap();
        assert_eq!(
            fs::metadata(tmp.path().join(READY_MARKER)).unwrap().len(),
            0
        );
    }

    #[test]
    fn invalid_specs_are_refused_before_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("never");
        let bad = [
            CaseSpec {
                patient_id: "../x".into(),
                ..CaseSpec::tiny(1)
            },
            CaseSpec {
                beams: 0,
                ..CaseSpec::tiny(1)
            },
            CaseSpec {
                beams: 100,
                ..CaseSpec::tiny(1)
            },
            CaseSpec {
                layers_per_beam: 0..=3,
                ..CaseSpec::tiny(1)
            },
            CaseSpec {
                layers_per_beam: 5..=1000,
                ..CaseSpec::tiny(1)
            },
            CaseSpec {
                records_per_layer: 0..=3,
                ..CaseSpec::tiny(1)
            },
        ];
        for spec in bad {
            let err = write_case(&dir, &spec).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{spec:?}");
            assert!(!dir.exists());
        }
    }

    #[test]
    fn plan_info_parser_tolerates_crlf_and_rejects_garbage() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("PlanInfo.txt");
        fs::write(&path, "A,1\r\n\r\nB, two,parts \r\n").unwrap();
        let info = read_plan_info(&path).unwrap();
        assert_eq!(info["A"], "1");
        assert_eq!(info["B"], "two,parts");
        fs::write(&path, "A,1\nno comma here\n").unwrap();
        assert_eq!(
            read_plan_info(&path).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn realistic_profile_is_about_the_size_of_the_sample() {
        let tmp = tempfile::tempdir().unwrap();
        let summary = write_case(tmp.path(), &CaseSpec::realistic(1)).unwrap();
        assert_eq!(summary.beams, 3);
        assert!((90..=135).contains(&summary.layers), "{summary:?}");
        assert!((180..=280).contains(&summary.files), "{summary:?}");
        let mb = summary.bytes as f64 / 1e6;
        assert!((30.0..=65.0).contains(&mb), "{mb} MB");
        let sizes: Vec<u64> = deliveries(tmp.path())
            .iter()
            .flat_map(|d| files_with_ext(d, "ptn"))
            .map(|p| fs::metadata(p).unwrap().len())
            .collect();
        assert!(
            sizes.iter().all(|s| (30_000..=1_300_000).contains(s)),
            "{sizes:?}"
        );
        // The skew makes most layers small and a few large, as in the sample.
        assert!(sizes.iter().any(|&s| s > 600_000) && sizes.iter().any(|&s| s < 100_000));
    }
}
