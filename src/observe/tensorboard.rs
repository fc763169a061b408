//! TensorBoard event files without TensorFlow: TFRecord framing around hand-encoded
//! `tensorflow.Event` protobufs, enough for scalar curves (`tensorboard --logdir DIR`).
//!
//! A record is `u64 length (LE) | u32 masked CRC-32C of the length bytes | data | u32 masked
//! CRC-32C of the data`; the first record of a file holds `file_version = "brain.Event:2"`.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The CRC-32C (Castagnoli) table, reflected polynomial 0x82F63B78.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut k = 0;
        while k < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            k += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC-32C (Castagnoli) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The masked CRC-32C that TFRecord stores.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    // ((crc >> 15) | (crc << 17)) + 0xa282ead8
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the data, the data's masked CRC.
fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

// ---- protobuf encoding of the few fields used ----

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, ((field as u64) << 3) | wire as u64);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, WIRE_LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event { double wall_time = 1; int64 step = 2; oneof what { string file_version = 3;
/// Summary summary = 5; } }`
enum What<'a> {
    FileVersion(&'a str),
    /// `Summary { repeated Value value = 1; }`, `Value { string tag = 1; float simple_value = 2; }`
    Scalars(&'a [(&'a str, f32)]),
}

fn encode_event(wall_time: f64, step: u64, what: What<'_>) -> Vec<u8> {
    let mut ev = Vec::with_capacity(64);
    put_key(&mut ev, 1, WIRE_FIXED64);
    ev.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        // int64: steps beyond i64::MAX do not occur; the cast keeps the bits
        put_key(&mut ev, 2, WIRE_VARINT);
        put_varint(&mut ev, step as i64 as u64);
    }
    match what {
        What::FileVersion(v) => put_bytes(&mut ev, 3, v.as_bytes()),
        What::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, value) in values {
                let mut v = Vec::with_capacity(tag.len() + 8);
                put_bytes(&mut v, 1, tag.as_bytes());
                put_key(&mut v, 2, WIRE_FIXED32);
                v.extend_from_slice(&value.to_le_bytes());
                put_bytes(&mut summary, 1, &v);
            }
            put_bytes(&mut ev, 5, &summary);
        }
    }
    ev
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// This machine's host name, made safe for a file name; "localhost" when it cannot be had.
fn hostname() -> String {
    let raw = crate::store::outputs::host_name().unwrap_or_default();
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

/// Writes scalar summaries to `DIR/events.out.tfevents.<unix secs>.<hostname>.dptrain`, which
/// `tensorboard --logdir DIR` reads. Records are buffered: call [`EventWriter::flush`] to make
/// them visible (dropping the writer flushes too, ignoring errors).
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` (and its parents) and a new event file in it, and writes the file-version
    /// record. A file of the same name (same second, same host) is never overwritten: a numeric
    /// suffix is appended instead.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| with_path(dir, e))?;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let base = format!("events.out.tfevents.{secs}.{}.dptrain", hostname());
        let mut n = 0u32;
        let (path, file) = loop {
            let name = if n == 0 {
                base.clone()
            } else {
                format!("{base}.{n}")
            };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(with_path(&path, e)),
            }
        };
        let mut w = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        w.record(&encode_event(now(), 0, What::FileVersion("brain.Event:2")))?;
        w.flush()?;
        Ok(w)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One scalar `value` (stored as f32) for `tag` at `step`.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> io::Result<()> {
        self.scalars(step, &[(tag, value)])
    }

    /// Several scalars at one `step`, in one event.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> io::Result<()> {
        let values: Vec<(&str, f32)> = values.iter().map(|&(t, v)| (t, v as f32)).collect();
        self.record(&encode_event(now(), step, What::Scalars(&values)))
    }

    /// Writes the buffered records to the file.
    pub fn flush(&mut self) -> io::Result<()> {
        let path = &self.path;
        self.out.flush().map_err(|e| with_path(path, e))
    }

    fn record(&mut self, event: &[u8]) -> io::Result<()> {
        let path = &self.path;
        self.out
            .write_all(&frame(event))
            .map_err(|e| with_path(path, e))
    }
}

/// The error with the path in its message, so that the caller's one line says where.
fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dptrain-tb-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn crc32c_known_vectors() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // RFC 3720 B.4: 32 bytes of zeros
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    }

    #[test]
    #[allow(clippy::manual_rotate)] // the formula as TFRecord states it
    fn masked_crc_formula() {
        let crc = crc32c(b"123456789");
        assert_eq!(
            masked_crc32c(b"123456789"),
            ((crc >> 15) | (crc << 17)).wrapping_add(0xa282ead8)
        );
    }

    // ---- an independent reader: TFRecord framing and the protobuf wire format ----

    /// A bitwise CRC-32C, independent of the table above.
    fn crc_slow(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                let mask = (crc & 1).wrapping_neg();
                crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
            }
        }
        !crc
    }

    fn mask(crc: u32) -> u32 {
        crc.rotate_right(15).wrapping_add(0xa282_ead8)
    }

    fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            assert!(bytes.len() - i >= 12, "truncated header at {i}");
            let len_bytes = &bytes[i..i + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap());
            assert_eq!(len_crc, mask(crc_slow(len_bytes)), "length CRC at {i}");
            let data = &bytes[i + 12..i + 12 + len];
            let data_crc =
                u32::from_le_bytes(bytes[i + 12 + len..i + 16 + len].try_into().unwrap());
            assert_eq!(data_crc, mask(crc_slow(data)), "data CRC at {i}");
            out.push(data.to_vec());
            i += 16 + len;
        }
        out
    }

    #[derive(Debug)]
    enum Field {
        Varint(u64),
        Fixed64([u8; 8]),
        Bytes(Vec<u8>),
        Fixed32([u8; 4]),
    }

    fn varint(b: &[u8], i: &mut usize) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let byte = b[*i];
            *i += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }

    fn fields(b: &[u8]) -> Vec<(u64, Field)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let key = varint(b, &mut i);
            let f = match key & 7 {
                0 => Field::Varint(varint(b, &mut i)),
                1 => {
                    i += 8;
                    Field::Fixed64(b[i - 8..i].try_into().unwrap())
                }
                2 => {
                    let n = varint(b, &mut i) as usize;
                    i += n;
                    Field::Bytes(b[i - n..i].to_vec())
                }
                5 => {
                    i += 4;
                    Field::Fixed32(b[i - 4..i].try_into().unwrap())
                }
                w => panic!("unexpected wire type {w}"),
            };
            out.push((key >> 3, f));
        }
        out
    }

    #[derive(Debug, Default)]
    struct Event {
        wall_time: f64,
        step: i64,
        file_version: Option<String>,
        values: Vec<(String, f32)>,
    }

    fn decode(b: &[u8]) -> Event {
        let mut ev = Event::default();
        for (n, f) in fields(b) {
            match (n, f) {
                (1, Field::Fixed64(x)) => ev.wall_time = f64::from_le_bytes(x),
                (2, Field::Varint(x)) => ev.step = x as i64,
                (3, Field::Bytes(s)) => ev.file_version = Some(String::from_utf8(s).unwrap()),
                (5, Field::Bytes(summary)) => {
                    for (n, f) in fields(&summary) {
                        let (1, Field::Bytes(value)) = (n, f) else {
                            panic!("Summary field {n}")
                        };
                        let (mut tag, mut v) = (None, None);
                        for (n, f) in fields(&value) {
                            match (n, f) {
                                (1, Field::Bytes(t)) => tag = Some(String::from_utf8(t).unwrap()),
                                (2, Field::Fixed32(x)) => v = Some(f32::from_le_bytes(x)),
                                other => panic!("Value field {other:?}"),
                            }
                        }
                        ev.values.push((tag.unwrap(), v.unwrap()));
                    }
                }
                other => panic!("Event field {other:?}"),
            }
        }
        ev
    }

    #[test]
    fn writes_scalars_that_an_independent_reader_decodes() {
        let dir = tmp("scalars").join("nested");
        let before = now();
        let mut w = EventWriter::new(&dir).unwrap();
        let path = w.path().to_path_buf();
        assert_eq!(path.parent().unwrap(), dir);
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert!(name.ends_with(".dptrain"), "{name}");
        assert!(name.contains(&format!(".{}.", hostname())), "{name}");
        w.scalar("train/loss", 1, 2.5).unwrap();
        w.scalar("train/loss", 2, 1.25).unwrap();
        w.scalar("lr", 300, 1e-3).unwrap();
        w.scalar("big", 1 << 40, -7.0).unwrap();
        w.scalars(5, &[("test/loss", 0.5), ("test/accuracy", 0.875)])
            .unwrap();
        w.flush().unwrap();

        let evs: Vec<Event> = records(&std::fs::read(&path).unwrap())
            .iter()
            .map(|r| decode(r))
            .collect();
        assert_eq!(evs.len(), 6);
        assert_eq!(evs[0].file_version.as_deref(), Some("brain.Event:2"));
        assert!(evs[0].values.is_empty());
        for e in &evs {
            assert!(e.wall_time >= before.floor() && e.wall_time <= now() + 1.0);
        }
        let got: Vec<(i64, Vec<(String, f32)>)> = evs[1..]
            .iter()
            .map(|e| (e.step, e.values.clone()))
            .collect();
        let s = |t: &str, v: f32| (t.to_string(), v);
        assert_eq!(
            got,
            vec![
                (1, vec![s("train/loss", 2.5)]),
                (2, vec![s("train/loss", 1.25)]),
                (300, vec![s("lr", 1e-3)]),
                (1 << 40, vec![s("big", -7.0)]),
                (5, vec![s("test/loss", 0.5), s("test/accuracy", 0.875)]),
            ]
        );
        assert!(evs.iter().all(|e| e.file_version.is_none() || e.step == 0));
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    #[test]
    fn a_second_writer_in_the_same_second_gets_its_own_file() {
        let dir = tmp("twice");
        let a = EventWriter::new(&dir).unwrap();
        let b = EventWriter::new(&dir).unwrap();
        assert_ne!(a.path(), b.path());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn dropping_flushes() {
        let dir = tmp("drop");
        let path = {
            let mut w = EventWriter::new(&dir).unwrap();
            w.scalar("x", 3, 4.0).unwrap();
            w.path().to_path_buf()
        };
        let recs = records(&std::fs::read(&path).unwrap());
        assert_eq!(recs.len(), 2);
        assert_eq!(decode(&recs[1]).values, vec![("x".to_string(), 4.0)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unusable_dir_is_an_io_error_naming_it() {
        let dir = tmp("blocked");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let err = EventWriter::new(file.join("sub")).err().expect("must fail");
        assert!(err.to_string().contains("plain-file"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
