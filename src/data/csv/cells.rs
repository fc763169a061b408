//! A cell's text and value, and the label column's values. Cells are cleaned (spaces and one pair of
//! quotes around them removed), numbers must be finite f32s, and failures become the error that
//! names the line and column; cell text in messages is escaped and cut short. The label column may
//! hold numbers or class names (`Labels`): from the first text label on, every label is a name, and
//! names become class indices in sorted order at the end.

use std::collections::HashMap;

use crate::data::DataError;
use crate::limits::MAX_CLASSES;

/// The longest cell text quoted in a message.
const SHOWN_CHARS: usize = 64;

/// One cell as written, minus surrounding spaces and one pair of enclosing double quotes.
pub(super) fn clean(cell: &str) -> &str {
    let t = cell.trim();
    if t.len() >= 2 && t.starts_with('"') && t.ends_with('"') {
        t[1..t.len() - 1].trim()
    } else {
        t
    }
}

/// Cell text for a one-line message: control characters (a line break inside a quoted cell) escaped, and
/// cut after `SHOWN_CHARS` characters (an unterminated quote can swallow the rest of the file).
pub(super) fn shown(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == SHOWN_CHARS {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Why a cell is not a usable number.
enum NumError {
    Missing,
    NotNumber,
    NonFinite,
    OutOfRange,
}

/// A cleaned cell as a finite f32.
fn number(text: &str) -> Result<f32, NumError> {
    if text.is_empty() {
        return Err(NumError::Missing);
    }
    let v: f32 = text.parse().map_err(|_| NumError::NotNumber)?;
    if v.is_finite() {
        return Ok(v);
    }
    // Distinguish "1e39" (a finite number that f32 cannot hold) from NaN, inf and 1e999.
    match text.parse::<f64>() {
        Ok(w) if w.is_finite() => Err(NumError::OutOfRange),
        _ => Err(NumError::NonFinite),
    }
}

fn number_error(e: NumError, path: &str, line: usize, column: usize, text: &str) -> DataError {
    let path = path.to_string();
    match e {
        NumError::Missing => DataError::Missing { path, line, column },
        NumError::NotNumber => DataError::Parse {
            path,
            line,
            column,
            text: shown(text),
        },
        NumError::NonFinite => DataError::NonFinite { path, line, column },
        NumError::OutOfRange => DataError::OutOfRange {
            path,
            line,
            column,
            text: shown(text),
        },
    }
}

/// Parses one numeric cell, mapping every failure to the error that names its line and 1-based column.
pub(super) fn parse_cell(
    path: &str,
    line: usize,
    column: usize,
    raw: &str,
) -> Result<f32, DataError> {
    let text = clean(raw);
    number(text).map_err(|e| number_error(e, path, line, column, text))
}

/// Whether a cleaned cell counts as a number for header detection (empty cells count).
pub(super) fn numeric(text: &str) -> bool {
    text.is_empty() || text.parse::<f64>().is_ok()
}

/// The label column's values as they are read: numbers until the first text label, then class names.
#[derive(Default)]
pub(super) struct Labels {
    /// Targets: numbers, or (once `names` exists) class ids in order of first appearance.
    y: Vec<f32>,
    /// Class name → id, from the first text label on.
    names: Option<HashMap<String, u32>>,
    /// Whether any label was a number, and the first text label with its line (for the mixed warning).
    pub any_number: bool,
    pub first_text: Option<(usize, String)>,
}

impl Labels {
    fn intern(
        names: &mut HashMap<String, u32>,
        name: String,
        path: &str,
        line: usize,
    ) -> Result<u32, DataError> {
        let next = names.len() as u32;
        if let Some(&id) = names.get(&name) {
            return Ok(id);
        }
        if names.len() >= MAX_CLASSES {
            return Err(DataError::Limit {
                msg: format!(
                    "{path}: line {line}: the label column holds more than {MAX_CLASSES} distinct class names (\"{}\" is one more); is it the right column?",
                    shown(&name)
                ),
            });
        }
        names.insert(name, next);
        Ok(next)
    }

    pub fn push(
        &mut self,
        path: &str,
        line: usize,
        column: usize,
        text: &str,
    ) -> Result<(), DataError> {
        match number(text) {
            Ok(v) => {
                self.any_number = true;
                match &mut self.names {
                    None => self.y.push(v),
                    Some(names) => {
                        let id = Self::intern(names, v.to_string(), path, line)?;
                        self.y.push(id as f32);
                    }
                }
            }
            Err(NumError::NotNumber) => {
                if self.names.is_none() {
                    // From now on every label is a name: the numbers so far become names too.
                    let mut names = HashMap::new();
                    for v in &mut self.y {
                        *v = Self::intern(&mut names, v.to_string(), path, line)? as f32;
                    }
                    self.names = Some(names);
                    self.first_text = Some((line, text.to_string()));
                }
                let names = self.names.as_mut().expect("set above");
                let id = Self::intern(names, text.to_string(), path, line)?;
                self.y.push(id as f32);
            }
            Err(e) => return Err(number_error(e, path, line, column, text)),
        }
        Ok(())
    }

    /// The targets, and the class names in sorted order with the targets renumbered to match.
    pub fn finish(self) -> (Vec<f32>, Option<Vec<String>>) {
        let Some(names) = self.names else {
            return (self.y, None);
        };
        let mut sorted: Vec<(String, u32)> = names.into_iter().collect();
        sorted.sort_unstable();
        let mut new_id = vec![0u32; sorted.len()];
        for (k, (_, old)) in sorted.iter().enumerate() {
            new_id[*old as usize] = k as u32;
        }
        let y = self
            .y
            .iter()
            .map(|&old| new_id[old as usize] as f32)
            .collect();
        (y, Some(sorted.into_iter().map(|(n, _)| n).collect()))
    }
}
