//! `nvidia-smi` as a data source: the two queries the curator runs and their parser.
//!
//! The parser reads columns BY HEADER NAME, never by position (the original broke when the
//! production command printed 8 fields and the parser expected 6, lineage B9). It accepts
//! units in headers (`memory.used [MiB]`) and values (`81559 MiB`, `37 %`), the placeholders
//! nvidia-smi prints for unknown values (`[N/A]`, `[Not Supported]`, `[Unknown Error]`,
//! `N/A`), columns in any order, extra columns, blank lines and CRLF. A row that cannot be
//! read is skipped with a reason (the GPU then counts as missing, which is safe); a header
//! without a required column is an error.

use super::{GpuReading, ProcessReading};

/// The GPU query: one row per GPU.
pub const QUERY_GPU: &str =
    "--query-gpu=index,uuid,name,utilization.gpu,memory.used,memory.total,temperature.gpu";
/// The compute-process query: one row per process holding a GPU context.
pub const QUERY_APPS: &str = "--query-compute-apps=gpu_uuid,pid,process_name,used_memory";
/// The output format both queries use: CSV with a header line.
pub const FORMAT: &str = "--format=csv";

/// What was wrong with an output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmiError {
    #[error("nvidia-smi printed no header line")]
    NoHeader,
    #[error("nvidia-smi output has no `{0}` column (header: {1})")]
    MissingColumn(&'static str, String),
}

/// One parsed output: a header and rows of cells, with the rows that were skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Table {
    /// Normalised column names: lower case, unit suffix (`[MiB]`) removed.
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

/// The column name without its unit: `memory.used [MiB]` -> `memory.used`.
fn column_name(raw: &str) -> String {
    let raw = raw.trim();
    let name = match raw.find('[') {
        Some(i) => &raw[..i],
        None => raw,
    };
    name.trim().to_ascii_lowercase()
}

/// Splits CSV text into a header and rows. `free_text` names the column that may itself
/// contain commas (nvidia-smi does not quote): a row with more cells than the header has its
/// surplus joined back into that column.
fn table(text: &str, free_text: &[&str]) -> Result<Table, SmiError> {
    let mut lines = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty());
    let header: Vec<String> = lines
        .next()
        .ok_or(SmiError::NoHeader)?
        .split(',')
        .map(column_name)
        .collect();
    let text_col = header.iter().position(|h| free_text.contains(&h.as_str()));
    let mut rows = Vec::new();
    for line in lines {
        let mut cells: Vec<String> = line.split(',').map(|c| c.trim().to_string()).collect();
        if cells.len() > header.len() {
            if let Some(t) = text_col {
                let surplus = cells.len() - header.len();
                let joined = cells[t..=t + surplus].join(",");
                cells.splice(t..=t + surplus, [joined]);
            }
        }
        if cells.len() != header.len() {
            tracing::debug!(
                "nvidia-smi row skipped (expected {} cells): {line}",
                header.len()
            );
            continue;
        }
        rows.push(cells);
    }
    Ok(Table { header, rows })
}

impl Table {
    /// The index of the first column named any of `names`.
    fn column(&self, names: &[&str]) -> Option<usize> {
        self.header
            .iter()
            .position(|h| names.iter().any(|n| h == n))
    }

    fn require(&self, names: &[&'static str]) -> Result<usize, SmiError> {
        self.column(names)
            .ok_or_else(|| SmiError::MissingColumn(names[0], self.header.join(", ")))
    }
}

/// A value, or `None` for nvidia-smi's placeholders: `[N/A]`, `[Not Supported]`,
/// `[Unknown Error]`, `[GPU requires reset]`, `N/A`, and empty cells.
fn value(cell: &str) -> Option<&str> {
    let c = cell.trim();
    if c.is_empty() || c.starts_with('[') || c.eq_ignore_ascii_case("n/a") {
        None
    } else {
        Some(c)
    }
}

/// A number with an optional unit; memory units are converted to MiB.
fn number_mib(cell: &str) -> Option<u64> {
    let c = value(cell)?;
    let split = c
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .unwrap_or(c.len());
    let (num, unit) = c.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mib = match unit.trim() {
        "" | "MiB" | "MB" => n,
        "GiB" | "GB" => n * 1024.0,
        "KiB" | "KB" => n / 1024.0,
        "B" => n / (1024.0 * 1024.0),
        _ => return None,
    };
    Some(mib.round() as u64)
}

/// A plain number with an optional unit (`37 %`, `45 C`).
fn number(cell: &str) -> Option<u32> {
    let c = value(cell)?;
    let split = c
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .unwrap_or(c.len());
    let n: f64 = c[..split].parse().ok()?;
    Some(n.round() as u32)
}

/// Parses `nvidia-smi --query-gpu=... --format=csv`. `index` and `uuid` are required; every
/// other field is optional and `None` when absent or unknown.
pub fn parse_gpus(text: &str) -> Result<Vec<GpuReading>, SmiError> {
    let t = table(text, &["name"])?;
    let index = t.require(&["index"])?;
    let uuid = t.require(&["uuid", "gpu_uuid"])?;
    let name = t.column(&["name", "gpu_name"]);
    let util = t.column(&["utilization.gpu"]);
    let used = t.column(&["memory.used"]);
    let total = t.column(&["memory.total"]);
    let temp = t.column(&["temperature.gpu"]);
    let get = |row: &Vec<String>, col: Option<usize>| col.map(|c| row[c].clone());
    let mut out = Vec::new();
    for row in &t.rows {
        let (Some(i), Some(u)) = (
            value(&row[index]).and_then(|v| v.parse::<u32>().ok()),
            value(&row[uuid]),
        ) else {
            tracing::debug!("nvidia-smi GPU row without index or uuid skipped: {row:?}");
            continue;
        };
        out.push(GpuReading {
            index: i,
            uuid: u.to_string(),
            name: get(row, name)
                .as_deref()
                .and_then(value)
                .unwrap_or("")
                .to_string(),
            utilization_pct: get(row, util).as_deref().and_then(number),
            memory_used_mib: get(row, used).as_deref().and_then(number_mib),
            memory_total_mib: get(row, total).as_deref().and_then(number_mib),
            temperature_c: get(row, temp).as_deref().and_then(number),
        });
    }
    Ok(out)
}

/// Parses `nvidia-smi --query-compute-apps=... --format=csv`. `gpu_uuid` and `pid` are
/// required. nvidia-smi names the memory column `used_gpu_memory` whichever was asked.
pub fn parse_processes(text: &str) -> Result<Vec<ProcessReading>, SmiError> {
    let t = table(text, &["process_name", "name"])?;
    let uuid = t.require(&["gpu_uuid", "uuid"])?;
    let pid = t.require(&["pid"])?;
    let name = t.column(&["process_name", "name"]);
    let used = t.column(&["used_gpu_memory", "used_memory"]);
    let mut out = Vec::new();
    for row in &t.rows {
        let (Some(u), Some(p)) = (
            value(&row[uuid]),
            value(&row[pid]).and_then(|v| v.parse::<u32>().ok()),
        ) else {
            tracing::debug!("nvidia-smi process row without gpu_uuid or pid skipped: {row:?}");
            continue;
        };
        out.push(ProcessReading {
            gpu_uuid: u.to_string(),
            pid: p,
            name: name.and_then(|c| value(&row[c])).unwrap_or("").to_string(),
            used_memory_mib: used.and_then(|c| number_mib(&row[c])),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from an 8 x H100 SXM node (driver 550), `--format=csv`.
    const H100: &str = "\
index, uuid, name, utilization.gpu [%], memory.used [MiB], memory.total [MiB], temperature.gpu
0, GPU-4a8e3f5e-8b71-2f0c-9d3a-1c2b3d4e5f60, NVIDIA H100 80GB HBM3, 0 %, 0 MiB, 81559 MiB, 31
1, GPU-7d2c9a10-44b3-91e5-0a6f-2b3c4d5e6f70, NVIDIA H100 80GB HBM3, 100 %, 74213 MiB, 81559 MiB, 67
2, GPU-0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b, NVIDIA H100 80GB HBM3, 12 %, 1043 MiB, 81559 MiB, 38
";

    const H100_APPS: &str = "\
gpu_uuid, pid, process_name, used_gpu_memory [MiB]
GPU-7d2c9a10-44b3-91e5-0a6f-2b3c4d5e6f70, 182734, /opt/moqui/bin/tps_env, 74190 MiB
GPU-0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b, 99120, python3, 1020 MiB
";

    #[test]
    fn an_h100_node_parses() {
        let gpus = parse_gpus(H100).unwrap();
        assert_eq!(gpus.len(), 3);
        assert_eq!(
            gpus[1],
            GpuReading {
                index: 1,
                uuid: "GPU-7d2c9a10-44b3-91e5-0a6f-2b3c4d5e6f70".into(),
                name: "NVIDIA H100 80GB HBM3".into(),
                utilization_pct: Some(100),
                memory_used_mib: Some(74213),
                memory_total_mib: Some(81559),
                temperature_c: Some(67),
            }
        );
        let apps = parse_processes(H100_APPS).unwrap();
        assert_eq!(apps.len(), 2);
        assert_eq!(apps[0].pid, 182734);
        assert_eq!(apps[0].name, "/opt/moqui/bin/tps_env");
        assert_eq!(apps[0].used_memory_mib, Some(74190));
        assert_eq!(apps[1].gpu_uuid, "GPU-0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b");
    }

    #[test]
    fn placeholders_are_unknown_not_errors() {
        let text = "\
index, uuid, name, utilization.gpu [%], memory.used [MiB], memory.total [MiB], temperature.gpu
0, GPU-aaaa, NVIDIA A100-SXM4-40GB MIG 1g.5gb, [N/A], [N/A], [N/A], [Not Supported]
1, GPU-bbbb, Tesla K80, [Unknown Error], 15 MiB, 11441 MiB, N/A
2, GPU-cccc, [GPU requires reset], , , ,
";
        let gpus = parse_gpus(text).unwrap();
        assert_eq!(gpus.len(), 3);
        assert_eq!(gpus[0].utilization_pct, None);
        assert_eq!(gpus[0].memory_total_mib, None);
        assert_eq!(gpus[0].temperature_c, None);
        assert_eq!(gpus[1].utilization_pct, None);
        assert_eq!(gpus[1].memory_used_mib, Some(15));
        assert_eq!(gpus[1].temperature_c, None);
        assert_eq!(gpus[2].name, "");
        assert_eq!(gpus[2].memory_used_mib, None);
        let apps = parse_processes(
            "gpu_uuid, pid, process_name, used_gpu_memory [MiB]\nGPU-aaaa, 77, [Insufficient Permissions], [N/A]\n",
        )
        .unwrap();
        assert_eq!(apps[0].pid, 77);
        assert_eq!(apps[0].name, "");
        assert_eq!(apps[0].used_memory_mib, None);
    }

    #[test]
    fn columns_are_found_by_name_in_any_order_with_extras() {
        // The production command of the original printed 8 fields (clocks, power) in its
        // own order; a positional parser read the wrong values.
        let text = "\
timestamp, name, pci.bus_id, temperature.gpu, memory.total [MiB], uuid, power.draw [W], memory.used [MiB], index, clocks.gr [MHz], utilization.gpu [%]
2026/11/24 09:30:01.123, NVIDIA RTX A6000, 00000000:41:00.0, 44, 49140 MiB, GPU-dddd, 71.23 W, 2 MiB, 3, 210 MHz, 0 %
";
        let gpus = parse_gpus(text).unwrap();
        assert_eq!(gpus.len(), 1);
        let g = &gpus[0];
        assert_eq!(
            (g.index, g.uuid.as_str(), g.name.as_str()),
            (3, "GPU-dddd", "NVIDIA RTX A6000")
        );
        assert_eq!(
            (
                g.utilization_pct,
                g.memory_used_mib,
                g.memory_total_mib,
                g.temperature_c
            ),
            (Some(0), Some(2), Some(49140), Some(44))
        );
    }

    #[test]
    fn blank_lines_crlf_and_nounits_values_are_fine() {
        let text = "\r\n\r\nindex, uuid, memory.used [MiB], memory.total [MiB]\r\n\r\n0, GPU-x, 100, 200\r\n\r\n1, GPU-y, 1 GiB, 2 GiB\r\n";
        let gpus = parse_gpus(text).unwrap();
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].memory_used_mib, Some(100));
        assert_eq!(gpus[0].name, "");
        assert_eq!(gpus[1].memory_total_mib, Some(2048));
    }

    #[test]
    fn a_process_name_with_commas_is_kept_whole() {
        let text = "gpu_uuid, pid, process_name, used_gpu_memory [MiB]\nGPU-x, 5, python train.py --gpus 0,1, 300 MiB\n";
        let apps = parse_processes(text).unwrap();
        assert_eq!(apps.len(), 1);
        assert_eq!(apps[0].name, "python train.py --gpus 0,1");
        assert_eq!(apps[0].used_memory_mib, Some(300));
    }

    #[test]
    fn no_processes_is_a_header_or_a_message() {
        assert!(
            parse_processes("gpu_uuid, pid, process_name, used_gpu_memory [MiB]\n")
                .unwrap()
                .is_empty()
        );
        // Older drivers print a sentence instead of rows; it has the wrong cell count.
        assert!(parse_processes(
            "gpu_uuid, pid, process_name, used_gpu_memory [MiB]\nNo running processes found\n"
        )
        .unwrap()
        .is_empty());
    }

    #[test]
    fn bad_rows_are_skipped_and_a_bad_header_is_an_error() {
        let text = "index, uuid, name\nzero, GPU-x, A\n1, GPU-y, B\n2, [N/A], C\n3, GPU-z\n";
        let gpus = parse_gpus(text).unwrap();
        assert_eq!(
            gpus.iter().map(|g| g.index).collect::<Vec<_>>(),
            [1],
            "only the row with a numeric index, a uuid and every cell"
        );
        assert_eq!(parse_gpus("").unwrap_err(), SmiError::NoHeader);
        assert_eq!(parse_gpus("\n  \n").unwrap_err(), SmiError::NoHeader);
        let err = parse_gpus("uuid, name\nGPU-x, A\n").unwrap_err();
        assert!(matches!(err, SmiError::MissingColumn("index", _)), "{err}");
        assert!(parse_processes("pid, process_name\n1, x\n").is_err());
        // An error message where CSV was expected does not parse as GPUs.
        let err = parse_gpus(
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n",
        )
        .unwrap_err();
        assert!(matches!(err, SmiError::MissingColumn(..)));
    }

    #[test]
    fn units_convert_to_mib() {
        assert_eq!(number_mib("81559 MiB"), Some(81559));
        assert_eq!(number_mib("80 GiB"), Some(81920));
        assert_eq!(number_mib("2048 KiB"), Some(2));
        assert_eq!(number_mib("12 parsecs"), None);
        assert_eq!(number_mib("[N/A]"), None);
        assert_eq!(number("37 %"), Some(37));
        assert_eq!(number("45"), Some(45));
        assert_eq!(number("-"), None);
    }
}
