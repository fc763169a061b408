//! Delimited-text datasets: reading CSV/TSV/semicolon files (one label column, numeric features) and writing them back.
//!
//! The reader is deliberately strict: ragged rows, empty cells, NaN/inf and non-numbers are errors with the line
//! and column, because silently skipping or imputing them would train on data the user did not mean.
//!
//! Records come from the `csv` crate (RFC 4180 quoting: a quoted cell may hold the delimiter, `""` and line
//! breaks), read one at a time from the file, so memory holds the parsed numbers (4 bytes a value) and never the
//! text. On top of the crate: a UTF-8 BOM is skipped, spaces around a cell and one pair of quotes left inside them
//! (`a, "class" ,b`) are removed, whitespace-only lines are skipped like empty ones, and each record's line is
//! computed exactly (the crate's own record position can point at a blank line or the end of the line before).
//!
//! The label column may hold numbers (class indices or regression targets) or text (class names). Text labels
//! become class indices 0..K-1 in sorted order of the names, recorded in `Dataset::labels`; when a column mixes
//! numbers and text, every label is taken as a name (a number by its shortest text: `1.0` is "1").

mod cells;
mod columns;
mod records;

use std::io::{Read, Write};
use std::path::Path;

use super::{DataError, Dataset, Features};
use cells::{Labels, clean, parse_cell, shown};
use columns::Layout;
use records::{Records, cells};

/// Which column holds the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelColumn {
    /// 0-based column index.
    Index(usize),
    /// Column name from the header row (requires one).
    Name(String),
    /// The last column.
    Last,
}

impl Default for LabelColumn {
    fn default() -> Self {
        LabelColumn::Index(0)
    }
}

impl std::str::FromStr for LabelColumn {
    type Err = std::convert::Infallible;
    /// `last` → the last column; all digits → a 0-based index; anything else → a header name. A negative
    /// number such as `-1` is not an index: it is a name, which the file's header will not hold.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "last" {
            return Ok(LabelColumn::Last);
        }
        Ok(match s.parse::<usize>() {
            Ok(i) => LabelColumn::Index(i),
            Err(_) => LabelColumn::Name(s.to_string()),
        })
    }
}

/// Whether the first row is a header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeaderMode {
    /// A header iff at least one of its non-empty cells is not a number. One exception, for class names in the
    /// label column: when the label cell is the only text and the next row's label is text too, the first row
    /// is data (before class names were read, such a file failed on its second row).
    #[default]
    Auto,
    Yes,
    No,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CsvOptions {
    pub label: LabelColumn,
    pub header: HeaderMode,
    /// None = auto among `,` `\t` `;` (whichever occurs most, outside quotes, in the first non-empty line; ties
    /// go to comma).
    pub delimiter: Option<u8>,
}

/// Reads a delimited text file: one label column (see `opts.label`), every other column a feature.
/// The file is streamed record by record; nothing but the parsed values is kept. The result has F32 storage
/// and `pixels = false`; the trainer decides whether to compact it.
pub fn load_csv(path: &Path, opts: &CsvOptions) -> Result<Dataset, DataError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| DataError::Read {
        path: name.clone(),
        source,
    })?;
    let size = file.metadata().ok().map(|m| m.len());
    parse_reader(file, &name, opts, size)
}

/// The parser behind `load_csv`, on bytes already read; `name` is used in messages and as the source.
pub fn parse_csv(bytes: &[u8], name: &str, opts: &CsvOptions) -> Result<Dataset, DataError> {
    parse_reader(bytes, name, opts, Some(bytes.len() as u64))
}

/// Reads delimited text from any reader, streaming record by record (see `load_csv`). `size` (the input's
/// length, when known) lets the feature buffer be sized once instead of grown by doubling.
pub fn parse_reader<R: Read>(
    reader: R,
    name: &str,
    opts: &CsvOptions,
    size: Option<u64>,
) -> Result<Dataset, DataError> {
    parse_columns(reader, name, opts, size, true, None).map(|(ds, _)| ds)
}

/// Rows to predict: `ds` holds the features (and the labels when `labelled`; zeros otherwise), `ids`
/// the text of the id column when one was named.
pub struct Rows {
    pub ds: Dataset,
    pub labelled: bool,
    pub ids: Option<Vec<String>>,
}

/// Read a CSV file for prediction: with its label column (`opts.label`) when `labelled`, every
/// other column a feature but the `id` column, whose cells are kept as text.
pub fn load_rows(
    path: &Path,
    opts: &CsvOptions,
    labelled: bool,
    id: Option<&LabelColumn>,
) -> Result<Rows, DataError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| DataError::Read {
        path: name.clone(),
        source,
    })?;
    let size = file.metadata().ok().map(|m| m.len());
    let (ds, ids) = parse_columns(file, &name, opts, size, labelled, id)?;
    Ok(Rows { ds, labelled, ids })
}

/// The parser behind `load_rows`, on bytes already read; `name` is used in messages and as the source.
pub fn parse_rows(
    bytes: &[u8],
    name: &str,
    opts: &CsvOptions,
    labelled: bool,
    id: Option<&LabelColumn>,
) -> Result<Rows, DataError> {
    let (ds, ids) = parse_columns(bytes, name, opts, Some(bytes.len() as u64), labelled, id)?;
    Ok(Rows { ds, labelled, ids })
}

/// The parser: the label column read when `labelled` (else every row's target is 0), the `id`
/// column's cells kept apart as text.
fn parse_columns<R: Read>(
    reader: R,
    name: &str,
    opts: &CsvOptions,
    size: Option<u64>,
    labelled: bool,
    id: Option<&LabelColumn>,
) -> Result<(Dataset, Option<Vec<String>>), DataError> {
    let err_path = || name.to_string();
    let Some(mut records) = Records::open(reader, name, opts.delimiter)? else {
        return Err(DataError::Empty { path: err_path() });
    };
    let Some(first_line) = records.next()? else {
        return Err(DataError::Empty { path: err_path() });
    };
    let first = records.rec.clone();
    let first_cells: Vec<&str> = cells(&first, name, first_line)?
        .into_iter()
        .map(clean)
        .collect();
    let n_cols = first_cells.len();
    if n_cols < 1 + usize::from(labelled) + usize::from(id.is_some()) {
        return Err(DataError::TooFewColumns {
            path: err_path(),
            line: first_line,
            found: n_cols,
        });
    }

    let Layout {
        has_header,
        label,
        id_col,
        peeked,
        text_label_first_row,
        pandas_header,
    } = columns::layout(&mut records, &first_cells, name, opts, labelled, id)?;
    let n_features = n_cols - usize::from(labelled) - usize::from(id_col.is_some());
    let mut x: Vec<f32> = Vec::new();
    let mut labels = Labels::default();
    let mut ids: Option<Vec<String>> = id_col.map(|_| Vec::new());
    let mut parse_row = |x: &mut Vec<f32>,
                         labels: &mut Labels,
                         line: usize,
                         rec: &::csv::ByteRecord|
     -> Result<(), DataError> {
        let row = cells(rec, name, line)?;
        // Width is checked before parsing so that a short row reports "expected N columns", not a
        // misleading parse error in whichever cell shifted.
        if row.len() != n_cols {
            return Err(DataError::Ragged {
                path: name.to_string(),
                line,
                expected: n_cols,
                found: row.len(),
            });
        }
        for (col, cell) in row.into_iter().enumerate() {
            if col == label {
                labels.push(name, line, col + 1, clean(cell))?;
            } else if Some(col) == id_col {
                if let Some(ids) = ids.as_mut() {
                    ids.push(clean(cell).to_string());
                }
            } else {
                x.push(parse_cell(name, line, col + 1, cell)?);
            }
        }
        if !labelled {
            labels.push(name, line, 0, "0")?;
        }
        Ok(())
    };

    if !has_header {
        parse_row(&mut x, &mut labels, first_line, &first)?;
    }
    if let Some((line, rec)) = &peeked {
        parse_row(&mut x, &mut labels, *line, rec)?;
    }
    let mut rows = usize::from(!has_header) + usize::from(peeked.is_some());
    let mut sized = false;
    while let Some(line) = records.next()? {
        parse_row(&mut x, &mut labels, line, &records.rec)?;
        rows += 1;
        // After some rows, size the feature buffer for the whole input from the bytes per row so far.
        if !sized && rows == 1024 {
            sized = true;
            if let Some(total) = size {
                let per_row = records.byte().max(1) as f64 / rows as f64;
                let want = ((total as f64 / per_row) * 1.02) as usize * n_features;
                x.reserve_exact(want.saturating_sub(x.len()).min(isize::MAX as usize / 8));
            }
        }
    }
    let mixed = labels.first_text.clone().filter(|_| labels.any_number);
    let (y, names) = labels.finish();
    if y.is_empty() {
        return Err(DataError::NoRows { path: err_path() });
    }
    x.shrink_to_fit();

    if pandas_header {
        tracing::warn!(
            "{name}: the first row ({}) looks like the header pandas writes for unnamed columns but is read as data (--header auto); pass --header yes to skip it",
            first_cells.join(",")
        );
    }
    if let Some((line, text)) = &mixed {
        tracing::warn!(
            "{name}: the label column holds both numbers and text (\"{}\" at line {line}): every label is read as a class name",
            shown(text)
        );
    }
    if text_label_first_row {
        let first_class = y[0];
        if y.iter().filter(|&&v| v == first_class).count() == 1 {
            tracing::warn!(
                "{name}: line {first_line}: the first row was read as data, so its label \"{}\" is a class with one sample; if that row is a header, pass --header yes",
                shown(first_cells[label])
            );
        }
    }
    let ds = Dataset {
        n_samples: y.len(),
        n_features,
        x: Features::F32(x),
        y,
        pixels: false,
        image: None,
        source: name.to_string(),
        labels: names,
    };
    Ok((ds, ids))
}

/// A class name as a CSV cell: quoted when it holds a delimiter, a quote, a line break or outer spaces.
fn quote_name(name: &str) -> String {
    let needs = name.contains([',', '\t', ';', '"', '\n', '\r']) || name.trim() != name;
    if needs {
        format!("\"{}\"", name.replace('"', "\"\""))
    } else {
        name.to_string()
    }
}

/// Writes `ds` as comma-separated text: label first, then the features, no header. f32 `Display` prints the
/// shortest text that parses back to the same value, so `load_csv` recovers the data exactly. Class names
/// (`ds.labels`) are written as names, quoted where needed, so they read back as the same classes.
pub fn write_csv(ds: &Dataset, path: &Path) -> Result<(), DataError> {
    let werr = |source| DataError::Write {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::create(path).map_err(werr)?;
    let mut w = std::io::BufWriter::new(file);
    let nf = ds.n_features;
    for i in 0..ds.n_samples {
        let name = ds.labels.as_ref().and_then(|names| {
            let v = ds.y[i];
            (v >= 0.0 && v.fract() == 0.0)
                .then(|| names.get(v as usize))
                .flatten()
        });
        match name {
            Some(n) => write!(w, "{}", quote_name(n)).map_err(werr)?,
            None => write!(w, "{}", ds.y[i]).map_err(werr)?,
        }
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
    use crate::limits::MAX_CLASSES;

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
        assert_eq!("last".parse::<LabelColumn>(), Ok(LabelColumn::Last));
        // not an index counted from the end: a name, which a file without that header refuses
        assert_eq!(
            "-1".parse::<LabelColumn>(),
            Ok(LabelColumn::Name("-1".into()))
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
        // Column 1 is the label column, which may hold class names, so the first cell that cannot be
        // read is column 2's.
        let e = err("nohdr.csv", b"label,x\n1,2\n", &opts);
        assert!(e.contains("line 1, column 2: cannot parse \"x\""), "{e}");
        let opts = CsvOptions {
            label: LabelColumn::Index(1),
            ..opts
        };
        let e = err("nohdr2.csv", b"a,label\n1,2\n", &opts);
        assert!(e.contains("line 1, column 1: cannot parse \"a\""), "{e}");
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
            image: None,
            source: "mem".into(),
            labels: None,
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

    fn opts_label(label: LabelColumn) -> CsvOptions {
        CsvOptions {
            label,
            ..Default::default()
        }
    }

    #[test]
    fn quoted_header_field_with_a_comma_and_quoted_values_parse() {
        let text = b"\"width, cm\",label,\"height\"\n\"1.5\",0,2\n3,\"1\", \"4\" \n";
        let ds = load_str(
            "quoted.csv",
            text,
            &opts_label(LabelColumn::Name("label".into())),
        )
        .unwrap();
        assert_eq!((ds.n_samples, ds.n_features), (2, 2));
        assert_eq!(ds.y, vec![0.0, 1.0]);
        assert_eq!(f32s(&ds), &[1.5, 2.0, 3.0, 4.0]);
        assert_eq!(ds.labels, None);
        // the quoted name holds the delimiter, and names the column
        let ds = load_str(
            "quoted2.csv",
            text,
            &opts_label(LabelColumn::Name("width, cm".into())),
        )
        .unwrap();
        assert_eq!(ds.y, vec![1.5, 3.0]);
        // `""` is a quote inside a quoted cell; the message shows the cell as read
        let e = err(
            "quoted3.csv",
            b"y,\"x\"\n1,\"say \"\"hi\"\"\"\n",
            &CsvOptions::default(),
        );
        assert!(
            e.ends_with("line 2, column 2: cannot parse \"say \"hi\"\" as a number"),
            "{e}"
        );
        // the delimiter inside quotes does not count when the delimiter is detected
        let ds = load_str(
            "quoted4.csv",
            b"\"a, b, c\";\"d, e\";f\n1;2;3\n",
            &CsvOptions::default(),
        )
        .unwrap();
        assert_eq!((ds.n_samples, ds.n_features), (1, 2));
    }

    #[test]
    fn crlf_bom_blank_lines_and_multiline_cells_keep_exact_line_numbers() {
        let ds = load_str(
            "crlf.csv",
            b"\xEF\xBB\xBF\"y\",\"x\"\r\n\"1\",\"2\"\r\n\r\n0,3\r\n",
            &CsvOptions::default(),
        )
        .unwrap();
        assert_eq!(
            (ds.y.clone(), f32s(&ds).to_vec()),
            (vec![1.0, 0.0], vec![2.0, 3.0])
        );
        let e = err(
            "crlf2.csv",
            b"\xEF\xBB\xBFy,x\r\n\r\n \r\n1,2\r\n0,abc\r\n",
            &CsvOptions::default(),
        );
        assert!(
            e.ends_with("line 5, column 2: cannot parse \"abc\" as a number"),
            "{e}"
        );
        // a quoted header cell spanning two lines: the next rows are lines 3 and 4
        let e = err(
            "multi.csv",
            b"y,\"x\ncm\"\n1,2\n\n\n0,\n",
            &CsvOptions::default(),
        );
        assert!(e.ends_with("line 6, column 2: missing value"), "{e}");
        let e = err("last.csv", b"y,x\n\n1,2\n\n0,", &CsvOptions::default());
        assert!(e.ends_with("line 5, column 2: missing value"), "{e}");
        // a line break inside a cell is shown escaped, so the message stays one line
        let e = err("nl.csv", b"y,x\n1,\"2\n3\"\n", &CsvOptions::default());
        assert!(
            e.contains("line 2, column 2: cannot parse \"2\\n3\""),
            "{e}"
        );
    }

    #[test]
    fn an_unterminated_quote_gives_one_short_line() {
        let mut text = b"0,1\n1,\"2\n".to_vec();
        for i in 0..1000 {
            text.extend_from_slice(format!("{i},{i}\n").as_bytes());
        }
        let e = err("open-quote.csv", &text, &CsvOptions::default());
        assert!(
            e.contains("line 2, column 2: cannot parse \"2\\n0,0\\n1,1"),
            "{e}"
        );
        assert!(e.len() < 200, "{e}");
    }

    /// Hands out at most `chunk` bytes a read, to move the reader's buffer boundaries.
    struct Trickle<'a> {
        bytes: &'a [u8],
        chunk: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.chunk.min(buf.len()).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    #[test]
    fn results_and_lines_do_not_depend_on_how_the_input_arrives() {
        let cases: [&[u8]; 8] = [
            b"y,x\r\n\r\n1,2\r\n\n0,abc\r\n",
            b"\xEF\xBB\xBF1,2\n\n\n3,4",
            b"\n \n\"a\nb\",c\n1,2\n3,\n",
            b"1,2\n3,4\n\n\n5\n",
            b"1;\"2\"\r\n\"3\";4\r\n",
            b"1,2\n3,\"4\n",
            b"\"\"\n1,2\n",
            b"a,b\n\"x\ny\",1\n\"z\",2\nw,3",
        ];
        for text in cases {
            let whole = parse_csv(text, "t.csv", &CsvOptions::default())
                .map(|d| (d.y, d.x, d.labels))
                .map_err(|e| e.to_string());
            for chunk in 1..8 {
                let got = parse_reader(
                    Trickle { bytes: text, chunk },
                    "t.csv",
                    &CsvOptions::default(),
                    None,
                )
                .map(|d| (d.y, d.x, d.labels))
                .map_err(|e| e.to_string());
                assert_eq!(
                    got,
                    whole,
                    "{:?} in chunks of {chunk}",
                    String::from_utf8_lossy(text)
                );
            }
        }
    }

    #[test]
    fn label_column_last_takes_the_last_column() {
        let ds = load_str(
            "last.csv",
            b"1,2,0\n3,4,1\n",
            &opts_label(LabelColumn::Last),
        )
        .unwrap();
        assert_eq!(ds.y, vec![0.0, 1.0]);
        assert_eq!(f32s(&ds), &[1.0, 2.0, 3.0, 4.0]);
        let ds = load_str("last2.csv", b"a,b\n7,8\n", &opts_label(LabelColumn::Last)).unwrap();
        assert_eq!((ds.y.clone(), f32s(&ds).to_vec()), (vec![8.0], vec![7.0]));
        let e = err("neg.csv", b"1,2\n", &opts_label("-1".parse().unwrap()));
        assert!(e.contains("label column \"-1\" is given by name"), "{e}");
    }

    #[test]
    fn string_labels_map_to_sorted_class_indices_and_keep_their_names() {
        // no header: the first row's label is text, and so is the next row's, so it is data
        let text = b"6.3,3.3,virginica\n5.1,3.5,setosa\n7.0,3.2,versicolor\n4.9,3.0,setosa\n";
        let ds = load_str("names.csv", text, &opts_label(LabelColumn::Last)).unwrap();
        assert_eq!(ds.n_samples, 4);
        assert_eq!(ds.y, vec![2.0, 0.0, 1.0, 0.0]);
        let names: Vec<String> = ["setosa", "versicolor", "virginica"]
            .map(String::from)
            .to_vec();
        assert_eq!(ds.labels.as_ref(), Some(&names));
        assert_eq!(ds.class_counts().unwrap(), vec![2, 1, 1]);
        // with a header, by name, rows in another order: the same mapping
        let text = b"a,b,species\n5.1,3.5,setosa\n6.3,3.3,\"virginica\"\n7.0,3.2,versicolor\n";
        let ds = load_str(
            "names2.csv",
            text,
            &opts_label(LabelColumn::Name("species".into())),
        )
        .unwrap();
        assert_eq!(ds.y, vec![0.0, 2.0, 1.0]);
        assert_eq!(ds.labels, Some(names));
        // a header whose label name is the only text, above numeric labels, is still a header
        let ds = load_str(
            "names3.csv",
            b"1,2,label\n1,2,0\n",
            &opts_label(LabelColumn::Last),
        )
        .unwrap();
        assert_eq!((ds.n_samples, ds.labels), (1, None));
        // the subset keeps the names
        let ds = load_str("names4.csv", b"b,1\na,2\n", &CsvOptions::default()).unwrap();
        assert_eq!(ds.subset(&[1]).labels, Some(vec!["a".into(), "b".into()]));
        // a text label still needs a value, and NaN is still refused
        let e = err("names5.csv", b"a,1\n,2\n", &CsvOptions::default());
        assert!(e.ends_with("line 2, column 1: missing value"), "{e}");
        let e = err("names6.csv", b"a,1\nNaN,2\n", &CsvOptions::default());
        assert!(
            e.ends_with("line 2, column 1: value is NaN or infinite"),
            "{e}"
        );
    }

    #[test]
    fn mixed_numeric_and_text_labels_are_all_names() {
        let ds = load_str(
            "mixed.csv",
            b"1,5\ncat,6\n2.0,7\n1,8\n",
            &CsvOptions::default(),
        )
        .unwrap();
        assert_eq!(ds.labels, Some(vec!["1".into(), "2".into(), "cat".into()]));
        assert_eq!(ds.y, vec![0.0, 2.0, 1.0, 0.0]);
        assert_eq!(f32s(&ds), &[5.0, 6.0, 7.0, 8.0]);
    }

    #[test]
    fn too_many_class_names_is_an_error() {
        let mut text = Vec::new();
        for i in 0..=MAX_CLASSES {
            text.extend_from_slice(format!("c{i},1\n").as_bytes());
        }
        let e = err("many.csv", &text, &CsvOptions::default());
        assert!(
            e.contains(&format!(
                "line {}: the label column holds more than {MAX_CLASSES}",
                MAX_CLASSES + 1
            )),
            "{e}"
        );
    }

    #[test]
    fn relabel_maps_onto_the_training_names_and_refuses_unknown_ones() {
        let train = load_str(
            "train.csv",
            b"setosa,1\nversicolor,2\nvirginica,3\n",
            &CsvOptions::default(),
        )
        .unwrap();
        let names = train.labels.clone().unwrap();
        let mut test = load_str(
            "test.csv",
            b"virginica,1\nsetosa,2\n",
            &CsvOptions::default(),
        )
        .unwrap();
        assert_eq!(test.y, vec![1.0, 0.0]);
        test.relabel(&names).unwrap();
        assert_eq!(test.y, vec![2.0, 0.0]);
        assert_eq!(test.labels.as_ref(), Some(&names));
        let mut bad = load_str("bad.csv", b"setosa,1\ndaisy,2\n", &CsvOptions::default()).unwrap();
        let before = bad.clone();
        let e = bad.relabel(&names).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "bad.csv: sample 2: class \"daisy\" is not one of the 3 known classes (setosa, versicolor, virginica)"
            ),
            "{e}"
        );
        assert_eq!(bad, before);
        // numeric labels are looked up by their text
        let mut nums = load_str("nums.csv", b"1,5\n0,6\n", &CsvOptions::default()).unwrap();
        nums.relabel(&["0".into(), "1".into(), "cat".into()])
            .unwrap();
        assert_eq!(nums.y, vec![1.0, 0.0]);
        let mut nums = load_str("nums2.csv", b"7,5\n", &CsvOptions::default()).unwrap();
        let e = nums.relabel(&names).unwrap_err().to_string();
        assert!(e.contains("sample 1: class \"7\""), "{e}");
        // a name holding a line break is shown escaped: one line
        let mut odd = load_str("odd.csv", b"\"a\nb\",1\nc,2\n", &CsvOptions::default()).unwrap();
        let e = odd.relabel(&names).unwrap_err().to_string();
        assert!(e.contains("sample 1: class \"a\\nb\""), "{e}");
    }

    #[test]
    fn class_names_round_trip_through_write_csv() {
        let ds = load_str(
            "w.csv",
            b"\"a, b\",1\n\"say \"\"x\"\"\",2\nplain,3\n",
            &CsvOptions::default(),
        )
        .unwrap();
        let p = temp_path("names-roundtrip.csv");
        write_csv(&ds, &p).unwrap();
        let back = load_csv(&p, &CsvOptions::default()).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert_eq!((back.y, back.labels), (ds.y, ds.labels));
    }

    /// The warnings `f` emits, as text.
    fn warnings(f: impl FnOnce()) -> String {
        use std::sync::{Arc, Mutex};
        #[derive(Clone)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf(Arc::new(Mutex::new(Vec::new())));
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_max_level(tracing::Level::WARN)
            .without_time()
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(sub, f);
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn a_pandas_index_header_is_read_as_data_with_a_warning() {
        let text = b"0,1,2,3,4\n1,5,6,7,8\n0,1,1,1,1\n";
        let mut ds = None;
        let w =
            warnings(|| ds = Some(load_str("pandas.csv", text, &CsvOptions::default()).unwrap()));
        let ds = ds.unwrap();
        assert_eq!(ds.n_samples, 3);
        assert_eq!(ds.y, vec![0.0, 1.0, 0.0]);
        assert!(
            w.contains("pandas.csv: the first row (0,1,2,3,4) looks like the header pandas writes"),
            "{w}"
        );
        assert!(w.contains("--header yes"), "{w}");
        let yes = CsvOptions {
            header: HeaderMode::Yes,
            ..Default::default()
        };
        let w = warnings(|| assert_eq!(load_str("pandas2.csv", text, &yes).unwrap().n_samples, 2));
        assert!(w.is_empty(), "{w}");
        // not for three columns (a first data row 0,1,2 is plausible), nor for other numbers
        for text in [
            &b"0,1,2\n1,2,3\n"[..],
            b"0,1,2,4\n1,2,3,4\n",
            b"1,0,2,3\n1,2,3,4\n",
        ] {
            let w = warnings(|| {
                load_str("plain.csv", text, &CsvOptions::default()).unwrap();
            });
            assert!(w.is_empty(), "{w}");
        }
    }

    #[test]
    fn doubtful_first_rows_and_mixed_labels_are_warned_about() {
        let w = warnings(|| {
            let ds = load_str(
                "doubt.csv",
                b"species,1,2\nsetosa,1,2\nvirginica,3,4\n",
                &CsvOptions::default(),
            )
            .unwrap();
            assert_eq!(ds.n_samples, 3);
        });
        assert!(
            w.contains(
                "doubt.csv: line 1: the first row was read as data, so its label \"species\""
            ),
            "{w}"
        );
        let w = warnings(|| {
            load_str("mixed.csv", b"1,5\ncat,6\n", &CsvOptions::default()).unwrap();
        });
        assert!(
            w.contains(
                "mixed.csv: the label column holds both numbers and text (\"cat\" at line 2)"
            ),
            "{w}"
        );
        let w = warnings(|| {
            load_str(
                "clean.csv",
                b"setosa,1\nsetosa,2\nvirginica,3\n",
                &CsvOptions::default(),
            )
            .unwrap();
        });
        assert!(w.is_empty(), "{w}");
    }

    #[test]
    fn a_large_file_streams_into_exactly_sized_features() {
        let (n, nf) = (200_000usize, 10usize);
        let p = temp_path("large.csv");
        {
            let mut w = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
            writeln!(
                w,
                "label,{}",
                (0..nf)
                    .map(|j| format!("f{j}"))
                    .collect::<Vec<_>>()
                    .join(",")
            )
            .unwrap();
            for i in 0..n {
                write!(w, "{}", i % 3).unwrap();
                for j in 0..nf {
                    write!(w, ",{}", ((i * nf + j) % 4096) as f32 / 8.0).unwrap();
                }
                w.write_all(b"\n").unwrap();
            }
            w.flush().unwrap();
        }
        let ds = load_csv(&p, &CsvOptions::default()).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert_eq!((ds.n_samples, ds.n_features), (n, nf));
        let Features::F32(v) = &ds.x else {
            panic!("f32 storage")
        };
        assert_eq!(v.len(), n * nf);
        // sized from the file, not grown by doubling (which could leave up to twice the values allocated)
        assert!(
            v.capacity() <= v.len() + v.len() / 50,
            "{} for {}",
            v.capacity(),
            v.len()
        );
        for i in [0, 1, 12_345, n - 1] {
            assert_eq!(ds.y[i], (i % 3) as f32);
            for j in 0..nf {
                assert_eq!(ds.value(i, j), ((i * nf + j) % 4096) as f32 / 8.0);
            }
        }
    }
}
