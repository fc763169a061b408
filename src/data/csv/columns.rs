//! Which column is which, decided from a file's first record (and, for a label that may be a class
//! name, its second): whether the first row is a header (`HeaderMode`), the label column's index
//! from `LabelColumn`, and the id column's when prediction names one. Also spotted here: a first row
//! that looks like the header pandas writes for unnamed columns.

use std::io::Read;

use super::cells::{clean, numeric, shown};
use super::records::Records;
use super::{CsvOptions, HeaderMode, LabelColumn};
use crate::data::DataError;

/// Where a file's columns are, and what its first rows turned out to be.
pub(super) struct Layout {
    /// The first record is a header, not data.
    pub has_header: bool,
    /// The label column's index (`usize::MAX` when the rows are not labelled).
    pub label: usize,
    /// The id column's index, when one was named.
    pub id_col: Option<usize>,
    /// The second record with its line, when it was read early to decide about the header: data to
    /// parse before the rest.
    pub peeked: Option<(usize, ::csv::ByteRecord)>,
    /// The first row was taken as data because its label and the next row's are both text.
    pub text_label_first_row: bool,
    /// The first row reads `0,1,...,n-1` and was taken as data (worth a warning).
    pub pandas_header: bool,
}

/// The layout of a file whose first record's cells are `first_cells` (cleaned); `records` is just
/// past that record and may be advanced by one.
pub(super) fn layout<R: Read>(
    records: &mut Records<R>,
    first_cells: &[&str],
    name: &str,
    opts: &CsvOptions,
    labelled: bool,
    id: Option<&LabelColumn>,
) -> Result<Layout, DataError> {
    let n_cols = first_cells.len();
    // The label's index when it does not depend on the header.
    let position = |c: &LabelColumn| match c {
        LabelColumn::Index(i) => Some(*i),
        LabelColumn::Last => Some(n_cols - 1),
        LabelColumn::Name(_) => None,
    };
    let positional = if labelled {
        position(&opts.label)
    } else {
        None
    };
    // an id column's text says nothing about a header
    let id_positional = id.and_then(position);
    // A second record read early, to tell a header from a first row whose label is a class name.
    let mut peeked: Option<(usize, ::csv::ByteRecord)> = None;
    let mut text_label_first_row = false;
    let has_header = match opts.header {
        HeaderMode::Yes => true,
        HeaderMode::No => false,
        HeaderMode::Auto => match positional.filter(|&i| i < n_cols) {
            None => first_cells
                .iter()
                .enumerate()
                .any(|(j, c)| Some(j) != id_positional && !numeric(c)),
            Some(li) => {
                let others_text = first_cells
                    .iter()
                    .enumerate()
                    .any(|(j, c)| j != li && Some(j) != id_positional && !numeric(c));
                if others_text {
                    true
                } else if numeric(first_cells[li]) {
                    false
                } else if let Some(line) = records.next()? {
                    let rec = records.rec.clone();
                    let next_label_is_text = rec
                        .get(li)
                        .and_then(|c| std::str::from_utf8(c).ok())
                        .is_some_and(|c| !numeric(clean(c)));
                    peeked = Some((line, rec));
                    text_label_first_row = next_label_is_text;
                    !next_label_is_text
                } else {
                    true
                }
            }
        },
    };

    let id_col = match id {
        None => None,
        Some(LabelColumn::Index(i)) if *i >= n_cols => {
            return Err(DataError::Limit {
                msg: format!(
                    "{name}: --id-column {i} is out of range: rows have {n_cols} columns (indices 0..={})",
                    n_cols - 1
                ),
            });
        }
        Some(LabelColumn::Index(i)) => Some(*i),
        Some(LabelColumn::Last) => Some(n_cols - 1),
        Some(LabelColumn::Name(want)) => {
            let found = has_header
                .then(|| first_cells.iter().position(|c| *c == want.as_str()))
                .flatten();
            match found {
                Some(i) => Some(i),
                None if !has_header => {
                    return Err(DataError::Limit {
                        msg: format!(
                            "{name}: --id-column {} is a name, but the file has no header row",
                            shown(want)
                        ),
                    });
                }
                None => {
                    let columns: Vec<String> = first_cells.iter().map(|c| shown(c)).collect();
                    return Err(DataError::Limit {
                        msg: format!(
                            "{name}: --id-column {} is not in the header ({})",
                            shown(want),
                            columns.join(", ")
                        ),
                    });
                }
            }
        }
    };
    let label = match &opts.label {
        _ if !labelled => usize::MAX,
        LabelColumn::Index(i) => {
            if *i >= n_cols {
                return Err(DataError::LabelOutOfRange {
                    path: name.to_string(),
                    index: *i,
                    columns: n_cols,
                });
            }
            *i
        }
        LabelColumn::Last => n_cols - 1,
        LabelColumn::Name(want) => {
            if !has_header {
                return Err(DataError::LabelNeedsHeader {
                    path: name.to_string(),
                    name: shown(want),
                });
            }
            match first_cells.iter().position(|c| *c == want.as_str()) {
                Some(i) => i,
                None => {
                    let columns: Vec<String> = first_cells.iter().map(|c| shown(c)).collect();
                    return Err(DataError::LabelNotFound {
                        path: name.to_string(),
                        name: shown(want),
                        columns: columns.join(", "),
                    });
                }
            }
        }
    };

    // pandas writes a frame with default column names as a header `0,1,...,n-1`, which looks like data.
    // With 2 or 3 columns a first data row `0,1` or `0,1,2` is too plausible to warn about.
    let pandas_header = opts.header == HeaderMode::Auto
        && !has_header
        && n_cols >= 4
        && first_cells
            .iter()
            .enumerate()
            .all(|(j, c)| c.parse::<f64>() == Ok(j as f64));

    if labelled && id_col == Some(label) {
        return Err(DataError::Limit {
            msg: format!(
                "{name}: the id column is the label column (column {}); name another with --id-column or --label-column",
                label + 1
            ),
        });
    }
    Ok(Layout {
        has_header,
        label,
        id_col,
        peeked,
        text_label_first_row,
        pandas_header,
    })
}
