//! Delimited-text datasets: reading CSV/TSV/semicolon files (one label column, numeric features) and writing them back.
//!
//! The reader is deliberately strict: ragged rows, empty cells, NaN/inf and non-numbers are errors with the line
//! and column, because silently skipping or imputing them would train on data the user did not mean.
//! Quoting is limited to one pair of double quotes around a whole cell (enough for quoted header names).

use std::io::Write;
use std::path::Path;

use super::{DataError, Dataset, Features};

/// Which column holds the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelColumn {
    /// 0-based column index.
    Index(usize),
    /// Column name from the header row (requires one).
    Name(String),
}

impl Default for LabelColumn {
    fn default() -> Self {
        LabelColumn::Index(0)
    }
}

impl std::str::FromStr for LabelColumn {
    type Err = std::convert::Infallible;
    /// All digits → a 0-based index; anything else → a header name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse::<usize>() {
            Ok(i) => LabelColumn::Index(i),
            Err(_) => LabelColumn::Name(s.to_string()),
        })
    }
}

/// Whether the first row is a header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeaderMode {
    /// A header iff at least one of its non-empty cells is not a number.
    #[default]
    Auto,
    Yes,
    No,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CsvOptions {
    pub label: LabelColumn,
    pub header: HeaderMode,
    /// None = auto among `,` `\t` `;` (whichever occurs most in the first non-empty line; ties go to comma).
    pub delimiter: Option<u8>,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One cell as written, minus surrounding spaces and one pair of enclosing double quotes.
fn clean(cell: &str) -> &str {
    let t = cell.trim();
    if t.len() >= 2 && t.starts_with('"') && t.ends_with('"') {
        t[1..t.len() - 1].trim()
    } else {
        t
    }
}

fn detect_delimiter(line: &str) -> u8 {
    let mut best = b',';
    let mut best_count = line.bytes().filter(|&b| b == b',').count();
    for d in [b'\t', b';'] {
        let c = line.bytes().filter(|&b| b == d).count();
        if c > best_count {
            best = d;
            best_count = c;
        }
    }
    best
}

/// Parses one numeric cell, mapping every failure to the error that names its line and 1-based column.
fn parse_cell(path: &str, line: usize, column: usize, raw: &str) -> Result<f32, DataError> {
    let text = clean(raw);
    if text.is_empty() {
        return Err(DataError::Missing {
            path: path.to_string(),
            line,
            column,
        });
    }
    let v: f32 = text.parse().map_err(|_| DataError::Parse {
        path: path.to_string(),
        line,
        column,
        text: text.to_string(),
    })?;
    if v.is_finite() {
        return Ok(v);
    }
    // Distinguish "1e39" (a finite number that f32 cannot hold) from NaN, inf and 1e999.
    match text.parse::<f64>() {
        Ok(w) if w.is_finite() => Err(DataError::OutOfRange {
            path: path.to_string(),
            line,
            column,
            text: text.to_string(),
        }),
        _ => Err(DataError::NonFinite {
            path: path.to_string(),
            line,
            column,
        }),
    }
}

/// Reads a delimited text file: one label column (see `opts.label`), every other column a feature.
/// The result has F32 storage and `pixels = false`; the trainer decides whether to compact it.
pub fn load_csv(path: &Path, opts: &CsvOptions) -> Result<Dataset, DataError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| DataError::Read {
        path: name.clone(),
        source,
    })?;
    parse_csv(&bytes, &name, opts)
}

/// The parser behind `load_csv`, on bytes already read; `name` is used in messages and as the source.
pub fn parse_csv(bytes: &[u8], name: &str, opts: &CsvOptions) -> Result<Dataset, DataError> {
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    let err_path = || name.to_string();

    // Non-blank lines with their 1-based line numbers; `\r\n` endings lose the `\r`.
    let mut lines = bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter_map(|(i, raw)| {
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            match std::str::from_utf8(raw) {
                Ok(s) if s.trim().is_empty() => None,
                Ok(s) => Some(Ok((i + 1, s))),
                Err(_) => Some(Err(DataError::Utf8 {
                    path: err_path(),
                    line: i + 1,
                })),
            }
        });

    let Some(first) = lines.next() else {
        return Err(DataError::Empty { path: err_path() });
    };
    let (first_line, first_text) = first?;
    let delim = opts
        .delimiter
        .unwrap_or_else(|| detect_delimiter(first_text)) as char;
    let first_cells: Vec<&str> = first_text.split(delim).collect();
    let n_cols = first_cells.len();
    if n_cols < 2 {
        return Err(DataError::TooFewColumns {
            path: err_path(),
            line: first_line,
            found: n_cols,
        });
    }

    let has_header = match opts.header {
        HeaderMode::Yes => true,
        HeaderMode::No => false,
        HeaderMode::Auto => first_cells.iter().any(|c| {
            let t = clean(c);
            !t.is_empty() && t.parse::<f64>().is_err()
        }),
    };

    let label = match &opts.label {
        LabelColumn::Index(i) => {
            if *i >= n_cols {
                return Err(DataError::LabelOutOfRange {
                    path: err_path(),
                    index: *i,
                    columns: n_cols,
                });
            }
            *i
        }
        LabelColumn::Name(want) => {
            if !has_header {
                return Err(DataError::LabelNeedsHeader {
                    path: err_path(),
                    name: want.clone(),
                });
            }
            match first_cells.iter().position(|c| clean(c) == want.as_str()) {
                Some(i) => i,
                None => {
                    let columns: Vec<&str> = first_cells.iter().map(|c| clean(c)).collect();
                    return Err(DataError::LabelNotFound {
                        path: err_path(),
                        name: want.clone(),
                        columns: columns.join(", "),
                    });
                }
            }
        }
    };

    let n_features = n_cols - 1;
    let mut x: Vec<f32> = Vec::new();
    let mut y: Vec<f32> = Vec::new();
    let mut parse_row = |line: usize, text: &str| -> Result<(), DataError> {
        // Width is checked before parsing so that a short row reports "expected N columns", not a
        // misleading parse error in whichever cell shifted.
        let found = text.split(delim).count();
        if found != n_cols {
            return Err(DataError::Ragged {
                path: name.to_string(),
                line,
                expected: n_cols,
                found,
            });
        }
        for (col, cell) in text.split(delim).enumerate() {
            let v = parse_cell(name, line, col + 1, cell)?;
            if col == label {
                y.push(v);
            } else {
                x.push(v);
            }
        }
        Ok(())
    };

    if !has_header {
        parse_row(first_line, first_text)?;
    }
    for item in lines {
        let (line, text) = item?;
        parse_row(line, text)?;
    }

    if y.is_empty() {
        return Err(DataError::NoRows { path: err_path() });
    }
    Ok(Dataset {
        n_samples: y.len(),
        n_features,
        x: Features::F32(x),
        y,
        pixels: false,
        source: name.to_string(),
    })
}

/// Writes `ds` as comma-separated text: label first, then the features, no header. f32 `Display` prints the
/// shortest text that parses back to the same value, so `load_csv` recovers the data exactly.
pub fn write_csv(ds: &Dataset, path: &Path) -> Result<(), DataError> {
    let werr = |source| DataError::Write {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::create(path).map_err(werr)?;
    let mut w = std::io::BufWriter::new(file);
    let nf = ds.n_features;
    for i in 0..ds.n_samples {
        write!(w, "{}", ds.y[i]).map_err(werr)?;
        match &ds.x {
            Features::F32(v) => {
                for a in &v[i * nf..(i + 1) * nf] {
                    write!(w, ",{a}").map_err(werr)?;
                }
            }
            Features::U8(v) => {
                for a in &v[i * nf..(i + 1) * nf] {
                    write!(w, ",{a}").map_err(werr)?;
                }
            }
        }
        w.write_all(b"\n").map_err(werr)?;
    }
    w.flush().map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    fn load_str(name: &str, text: &[u8], opts: &CsvOptions) -> Result<Dataset, DataError> {
        let p = temp_file(name, text);
        let r = load_csv(&p, opts);
        std::fs::remove_file(&p).unwrap();
        r
    }

    fn err(name: &str, text: &[u8], opts: &CsvOptions) -> String {
        let e = load_str(name, text, opts).unwrap_err().to_string();
        assert!(e.contains(name), "message does not name the file: {e}");
        assert!(!e.contains('\n'), "message is not one line: {e}");
        e
    }

    fn f32s(ds: &Dataset) -> &[f32] {
        match &ds.x {
            Features::F32(v) => v,
            Features::U8(_) => panic!("expected f32 storage"),
        }
    }

    #[test]
    fn label_defaults_to_first_column_without_header() {
        let ds = load_str("plain.csv", b"1,2.5,3\n0,4,5\n", &CsvOptions::default()).unwrap();
        assert_eq!((ds.n_samples, ds.n_features), (2, 2));
        assert_eq!(ds.y, vec![1.0, 0.0]);
        assert_eq!(f32s(&ds), &[2.5, 3.0, 4.0, 5.0]);
        assert!(!ds.pixels);
        assert!(ds.source.ends_with("plain.csv"));
    }

    #[test]
    fn label_can_be_chosen_by_index() {
        let opts = CsvOptions {
            label: LabelColumn::Index(2),
            ..Default::default()
        };
        let ds = load_str("byindex.csv", b"1,2,0\n3,4,1\n", &opts).unwrap();
        assert_eq!(ds.y, vec![0.0, 1.0]);
        assert_eq!(f32s(&ds), &[1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn label_can_be_chosen_by_header_name_and_header_is_auto_detected() {
        let opts = CsvOptions {
            label: LabelColumn::Name("class".into()),
            ..Default::default()
        };
        let ds = load_str("byname.csv", b"a, \"class\" ,b\n1,0,2\n3,1,4\n", &opts).unwrap();
        assert_eq!(ds.n_samples, 2);
        assert_eq!(ds.y, vec![0.0, 1.0]);
        assert_eq!(f32s(&ds), &[1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn label_name_not_in_header_is_an_error_naming_it() {
        let opts = CsvOptions {
            label: LabelColumn::Name("target".into()),
            ..Default::default()
        };
        let e = err("noname.csv", b"a,b\n1,2\n", &opts);
        assert!(
            e.contains("\"target\" not found") && e.contains("a, b"),
            "{e}"
        );
    }

    #[test]
    fn label_name_without_header_is_an_error() {
        let opts = CsvOptions {
            label: LabelColumn::Name("y".into()),
            ..Default::default()
        };
        let e = err("nohead.csv", b"1,2\n3,4\n", &opts);
        assert!(e.contains("no header row"), "{e}");
    }

    #[test]
    fn label_index_out_of_range_is_an_error() {
        let opts = CsvOptions {
            label: LabelColumn::Index(3),
            ..Default::default()
        };
        let e = err("range.csv", b"1,2,3\n", &opts);
        assert!(
            e.contains("index 3 is out of range") && e.contains("3 columns"),
            "{e}"
        );
    }

    #[test]
    fn label_column_parses_from_text() {
        assert_eq!("2".parse::<LabelColumn>(), Ok(LabelColumn::Index(2)));
        assert_eq!(
            "y".parse::<LabelColumn>(),
            Ok(LabelColumn::Name("y".into()))
        );
    }

    #[test]
    fn forced_header_skips_a_numeric_first_row() {
        let opts = CsvOptions {
            header: HeaderMode::Yes,
            ..Default::default()
        };
        let ds = load_str("forced.csv", b"9,9\n1,2\n", &opts).unwrap();
        assert_eq!((ds.n_samples, ds.y[0]), (1, 1.0));
    }

    #[test]
    fn forced_no_header_makes_a_text_first_row_a_parse_error() {
        let opts = CsvOptions {
            header: HeaderMode::No,
            ..Default::default()
        };
        let e = err("nohdr.csv", b"label,x\n1,2\n", &opts);
        assert!(
            e.contains("line 1, column 1: cannot parse \"label\""),
            "{e}"
        );
    }

    #[test]
    fn tab_and_semicolon_delimiters_are_detected() {
        let ds = load_str(
            "tabs.tsv",
            b"y\tx1\tx2\n1\t2.5\t3\n",
            &CsvOptions::default(),
        )
        .unwrap();
        assert_eq!((ds.n_samples, ds.n_features), (1, 2));
        let ds = load_str("semi.csv", b"0;1;2;3\n1;4;5;6\n", &CsvOptions::default()).unwrap();
        assert_eq!((ds.n_samples, ds.n_features), (2, 3));
        let opts = CsvOptions {
            delimiter: Some(b'|'),
            ..Default::default()
        };
        let ds = load_str("pipe.csv", b"0|1\n1|2\n", &opts).unwrap();
        assert_eq!(f32s(&ds), &[1.0, 2.0]);
    }

    #[test]
    fn bom_crlf_spaces_and_blank_lines_are_tolerated() {
        let text = b"\xEF\xBB\xBFlabel,x\r\n\r\n 1 , 2 \r\n0,3\r\n\r\n\n";
        let ds = load_str("bom.csv", text, &CsvOptions::default()).unwrap();
        assert_eq!(ds.y, vec![1.0, 0.0]);
        assert_eq!(f32s(&ds), &[2.0, 3.0]);
        let ds = load_str("bom2.csv", b"\xEF\xBB\xBF1,2\r\n", &CsvOptions::default()).unwrap();
        assert_eq!(ds.n_samples, 1);
    }

    #[test]
    fn empty_file_is_an_error() {
        let e = err("empty.csv", b"", &CsvOptions::default());
        assert!(e.ends_with("empty.csv: file is empty"), "{e}");
        let e = err("blank.csv", b"\n \r\n\n", &CsvOptions::default());
        assert!(e.contains("file is empty"), "{e}");
    }

    #[test]
    fn header_only_is_no_data_rows() {
        let e = err("header.csv", b"a,b\n\n", &CsvOptions::default());
        assert!(e.ends_with("header.csv: no data rows"), "{e}");
    }

    #[test]
    fn ragged_row_names_line_and_counts() {
        let e = err("ragged.csv", b"1,2,3\n\n4,5\n", &CsvOptions::default());
        assert!(
            e.ends_with("ragged.csv: line 3: expected 3 columns, found 2"),
            "{e}"
        );
        let e = err("wide.csv", b"1,2\n4,5,6\n", &CsvOptions::default());
        assert!(e.contains("line 2: expected 2 columns, found 3"), "{e}");
    }

    #[test]
    fn non_numeric_cell_names_line_and_column() {
        let e = err("text.csv", b"1,2,3\n4,abc,6\n", &CsvOptions::default());
        assert!(
            e.ends_with("text.csv: line 2, column 2: cannot parse \"abc\" as a number"),
            "{e}"
        );
    }

    #[test]
    fn missing_cell_names_line_and_column() {
        let e = err("missing.csv", b"1,2,3\n4,5,\n", &CsvOptions::default());
        assert!(
            e.ends_with("missing.csv: line 2, column 3: missing value"),
            "{e}"
        );
    }

    #[test]
    fn nan_and_infinity_name_line_and_column() {
        for (i, cell) in ["NaN", "inf", "-Infinity", "1e999"].iter().enumerate() {
            let name = format!("nonfinite{i}.csv");
            let text = format!("1,2\n\n3,{cell}\n");
            let e = err(&name, text.as_bytes(), &CsvOptions::default());
            assert!(
                e.contains("line 3, column 2: value is NaN or infinite"),
                "{e}"
            );
        }
        let e = err("big.csv", b"1,1e39\n", &CsvOptions::default());
        assert!(
            e.contains("line 1, column 2: value \"1e39\" is too large"),
            "{e}"
        );
    }

    #[test]
    fn non_utf8_bytes_name_the_line() {
        let e = err("latin1.csv", b"1,2\n3,4\n5,\xe9\n", &CsvOptions::default());
        assert!(e.ends_with("latin1.csv: not valid UTF-8 at line 3"), "{e}");
    }

    #[test]
    fn single_column_file_is_an_error() {
        let e = err("one.csv", b"1\n2\n", &CsvOptions::default());
        assert!(e.contains("line 1: found 1 column"), "{e}");
    }

    #[test]
    fn unreadable_path_is_an_error_naming_it() {
        let p = temp_path("nowhere.csv");
        let e = load_csv(&p, &CsvOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("nowhere.csv: cannot read: "), "{e}");
    }

    #[test]
    fn write_then_load_round_trips_exactly() {
        let mut rng = crate::rng::Rng::new(77);
        let n = 200;
        let nf = 5;
        let x: Vec<f32> = (0..n * nf)
            .map(|k| match k % 5 {
                0 => rng.normal() as f32 * 1e-30,
                1 => rng.normal() as f32 * 1e30,
                2 => -0.0,
                _ => rng.normal() as f32,
            })
            .collect();
        let y: Vec<f32> = (0..n).map(|_| rng.below(7) as f32).collect();
        let ds = Dataset {
            n_samples: n,
            n_features: nf,
            x: Features::F32(x),
            y,
            pixels: false,
            source: "mem".into(),
        };
        let p = temp_path("roundtrip.csv");
        write_csv(&ds, &p).unwrap();
        let back = load_csv(&p, &CsvOptions::default()).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert_eq!(back.y, ds.y);
        let (a, b) = (f32s(&back), f32s(&ds));
        assert!(a.iter().zip(b).all(|(u, v)| u.to_bits() == v.to_bits()));
        assert_eq!((back.n_samples, back.n_features), (n, nf));
    }

    #[test]
    fn u8_dataset_round_trips_through_csv() {
        let ds = crate::data::load_idx_pair(
            &shared("mnist/t10k-images-idx3-ubyte.gz"),
            &shared("mnist/t10k-labels-idx1-ubyte.gz"),
        )
        .unwrap()
        .subset(&[0, 1, 2, 9999]);
        let p = temp_path("pixels.csv");
        write_csv(&ds, &p).unwrap();
        let mut back = load_csv(&p, &CsvOptions::default()).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert!(back.compact_to_u8());
        assert_eq!((back.x, back.y), (ds.x, ds.y));
    }

    #[test]
    fn write_to_missing_directory_is_an_error() {
        let p = temp_path("nodir").join("out.csv");
        let ds = crate::data::synth::random(2, 2, 2, 0);
        let e = write_csv(&ds, &p).unwrap_err().to_string();
        assert!(e.contains("out.csv: cannot write: "), "{e}");
    }
}
