//! The records of a delimited file, each with its exact 1-based line. The first non-blank line is
//! read ahead to pick the delimiter (a UTF-8 BOM skipped), then the `csv` crate reads every record
//! from those bytes and the rest of the input; blank and whitespace-only lines are skipped, and a
//! record's line is computed from the bytes and line breaks the crate consumed.

use std::io::{BufRead, BufReader, Read};

use crate::data::DataError;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Counts `,` `\t` `;` outside double-quoted cells (a quote opens a cell only right after a candidate
/// delimiter or at the start, as in the `csv` crate) and picks the most frequent; ties go to comma.
fn detect_delimiter(line: &[u8]) -> u8 {
    const CANDIDATES: [u8; 3] = [b',', b'\t', b';'];
    let mut counts = [0usize; 3];
    let mut quoted = false;
    let mut prev: Option<u8> = None;
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        if quoted {
            if b == b'"' {
                if line.get(i + 1) == Some(&b'"') {
                    i += 1;
                } else {
                    quoted = false;
                }
            }
        } else if b == b'"' && prev.is_none_or(|p| CANDIDATES.contains(&p)) {
            quoted = true;
        } else if let Some(k) = CANDIDATES.iter().position(|&d| d == b) {
            counts[k] += 1;
        }
        prev = Some(b);
        i += 1;
    }
    let mut best = 0;
    for k in 1..3 {
        if counts[k] > counts[best] {
            best = k;
        }
    }
    CANDIDATES[best]
}

/// The bytes handed to the `csv` reader: the lines read ahead to detect the delimiter, then the rest. It
/// counts what it hands over and keeps the last byte, from which a record's line is computed exactly.
struct Source<R> {
    head: Vec<u8>,
    at: usize,
    rest: R,
    total: u64,
    last: Option<u8>,
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = if self.at < self.head.len() {
            let n = (self.head.len() - self.at).min(buf.len());
            buf[..n].copy_from_slice(&self.head[self.at..self.at + n]);
            self.at += n;
            n
        } else {
            self.rest.read(buf)?
        };
        if n > 0 {
            self.total += n as u64;
            self.last = Some(buf[n - 1]);
        }
        Ok(n)
    }
}

/// The non-blank records of a file, each with its 1-based line (where the record starts).
pub(super) struct Records<R: Read> {
    rdr: ::csv::Reader<Source<BufReader<R>>>,
    /// The record `next` read last.
    pub rec: ::csv::ByteRecord,
    path: String,
}

impl<R: Read> Records<R> {
    /// Reads up to the first non-blank line (skipping a BOM) to pick the delimiter, then opens the `csv`
    /// reader on everything. None when the file holds nothing but blank lines.
    pub fn open(reader: R, path: &str, delimiter: Option<u8>) -> Result<Option<Self>, DataError> {
        let read_err = |source| DataError::Read {
            path: path.to_string(),
            source,
        };
        let mut input = BufReader::with_capacity(1 << 16, reader);
        let mut head = Vec::new();
        let delim = loop {
            let start = head.len();
            if input.read_until(b'\n', &mut head).map_err(read_err)? == 0 {
                return Ok(None);
            }
            if start == 0 && head.starts_with(BOM) {
                head.drain(..BOM.len());
            }
            let line = &head[start..];
            let blank = std::str::from_utf8(line).is_ok_and(|s| s.trim().is_empty());
            if !blank {
                break delimiter.unwrap_or_else(|| detect_delimiter(line));
            }
        };
        let rdr = ::csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(delim)
            // Only `\n` ends a record (a `\r` before it is trimmed with the cell), so that the bytes the
            // crate skips between records are all line breaks and every record's line can be computed.
            .terminator(::csv::Terminator::Any(b'\n'))
            .buffer_capacity(1 << 16)
            .from_reader(Source {
                head,
                at: 0,
                rest: input,
                total: 0,
                last: None,
            });
        Ok(Some(Records {
            rdr,
            rec: ::csv::ByteRecord::new(),
            path: path.to_string(),
        }))
    }

    /// The next non-blank record into `self.rec`, and its line; None at the end.
    pub fn next(&mut self) -> Result<Option<usize>, DataError> {
        loop {
            let more = self.rdr.read_byte_record(&mut self.rec).map_err(|e| {
                let source = match e.into_kind() {
                    ::csv::ErrorKind::Io(io) => io,
                    other => std::io::Error::other(format!("{other:?}")),
                };
                DataError::Read {
                    path: self.path.clone(),
                    source,
                }
            })?;
            if !more {
                return Ok(None);
            }
            let end = self.rdr.position();
            let start = self.rec.position().unwrap_or(end);
            let src = self.rdr.get_ref();
            // The record ended with its `\n` unless it ran to the end of the input without one.
            let ended_by_newline = end.byte() < src.total || src.last == Some(b'\n');
            let term = u64::from(ended_by_newline);
            let inner = self.rec.as_slice().iter().filter(|&&b| b == b'\n').count() as u64;
            // The crate counted every `\n` it consumed: the blank lines it skipped, those inside quoted cells
            // and the terminator; the record starts after the skipped ones. (Saturating: an unterminated quote
            // that ends in a line break at the end of the file leaves `term` one too high.)
            let line = end
                .line()
                .saturating_sub(inner + term)
                .max(start.line())
                .max(1);
            let skipped = line - start.line().min(line);
            let raw_len = (end.byte() - start.byte()).saturating_sub(skipped + term);
            // A whitespace-only line is one unquoted cell of whitespace (`""` is a quoted empty cell).
            let blank = self.rec.len() == 1
                && raw_len == self.rec.as_slice().len() as u64
                && std::str::from_utf8(self.rec.as_slice()).is_ok_and(|s| s.trim().is_empty());
            if !blank {
                return Ok(Some(line as usize));
            }
        }
    }

    /// Bytes consumed so far.
    pub fn byte(&self) -> u64 {
        self.rdr.position().byte()
    }
}

/// The cells of a record as text, or the error naming its line when one is not UTF-8.
pub(super) fn cells<'a>(
    rec: &'a ::csv::ByteRecord,
    path: &str,
    line: usize,
) -> Result<Vec<&'a str>, DataError> {
    rec.iter()
        .map(|c| {
            std::str::from_utf8(c).map_err(|_| DataError::Utf8 {
                path: path.to_string(),
                line,
            })
        })
        .collect()
}
