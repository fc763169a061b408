//! IDX files (the MNIST format): big-endian u8 image and label files, plain or gzipped, and the MNIST directory layout.
//!
//! Only unsigned-byte IDX is supported: images with magic 0x00000803 (n, rows, cols) and labels with
//! 0x00000801 (n). Gzip is recognised by its first two bytes, not the file name, so renamed files still work.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::bufread::MultiGzDecoder;

use super::{DataError, Dataset, Features};

pub const IMAGES_MAGIC: u32 = 0x0000_0803;
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Largest payload a header may claim (16 GiB): far above any real IDX file, and low enough that a
/// corrupt header is reported instead of driving an allocation.
const MAX_PAYLOAD: u64 = 1 << 34;

/// A decoded IDX file: its dimensions (after the magic) and the raw bytes they describe.
struct Idx {
    dims: Vec<u32>,
    data: Vec<u8>,
}

/// Reads `buf.len()` bytes unless the stream ends first; returns how many it got. Unlike `read_exact`
/// this tells a short file (our "truncated" error) apart from a failing stream (I/O or gzip error).
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn shape_text(dims: &[u32]) -> String {
    dims.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join("×")
}

/// Reads one u8 IDX file with `n_dims` dimensions and the given magic.
fn read_idx(path: &Path, magic: u32, kind: &'static str, n_dims: usize) -> Result<Idx, DataError> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|source| DataError::Read {
        path: name.clone(),
        source,
    })?;
    let file_len = file.metadata().map(|m| m.len()).ok();
    parse_idx_from(BufReader::new(file), file_len, name, magic, kind, n_dims)
}

/// Parse an IDX file held in memory (gzip or raw): `images` picks the image layout (3 dimensions,
/// magic 0x803) or the label layout (1 dimension, magic 0x801). Returns the dimensions and bytes.
/// For fuzzing and for callers that already hold the bytes.
pub fn parse_idx(bytes: &[u8], name: &str, images: bool) -> Result<(Vec<u32>, Vec<u8>), DataError> {
    let (magic, kind, n_dims) = if images {
        (IMAGES_MAGIC, "images", 3)
    } else {
        (LABELS_MAGIC, "labels", 1)
    };
    let idx = parse_idx_from(
        BufReader::new(bytes),
        Some(bytes.len() as u64),
        name.to_string(),
        magic,
        kind,
        n_dims,
    )?;
    Ok((idx.dims, idx.data))
}

fn parse_idx_from<R: Read>(
    mut buffered: BufReader<R>,
    file_len: Option<u64>,
    name: String,
    magic: u32,
    kind: &'static str,
    n_dims: usize,
) -> Result<Idx, DataError> {
    let head = buffered.fill_buf().map_err(|source| DataError::Read {
        path: name.clone(),
        source,
    })?;
    let gzipped = head.starts_with(&[0x1f, 0x8b]);
    let mut reader: Box<dyn Read> = if gzipped {
        Box::new(MultiGzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };
    // Every failure of the stream after this point is a gzip error for gzipped files (flate2 reports bad
    // data as I/O errors) and a read error otherwise.
    let stream_err = |source: std::io::Error| {
        if gzipped {
            DataError::Gzip {
                path: name.clone(),
                source,
            }
        } else {
            DataError::Read {
                path: name.clone(),
                source,
            }
        }
    };

    let header_len = 4 * (1 + n_dims);
    let mut header = vec![0u8; header_len];
    let got = read_full(&mut reader, &mut header).map_err(stream_err)?;
    if got == 0 {
        return Err(DataError::Empty { path: name });
    }
    if got >= 4 {
        let found = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        if found != magic {
            return Err(DataError::NotIdx {
                path: name,
                kind,
                magic: found,
                expected: magic,
            });
        }
    }
    if got < header_len {
        return Err(DataError::TruncatedHeader {
            path: name,
            kind,
            need: header_len,
            held: got,
        });
    }
    let dims: Vec<u32> = header[4..]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let shape = shape_text(&dims);
    let payload = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(u64::from(d)))
        .filter(|&p| p <= MAX_PAYLOAD);
    let Some(payload) = payload else {
        return Err(DataError::ImplausibleHeader { path: name, shape });
    };
    // images: the features per image are checked before the pixels are read
    if let [_, rows, cols] = dims[..] {
        let features = u64::from(rows) * u64::from(cols);
        if features > crate::limits::MAX_FEATURES as u64 {
            return Err(DataError::Limit {
                msg: format!(
                    "{name}: the header claims images of {rows}×{cols} = {features} pixels, more than the {} features dptrain takes",
                    crate::limits::MAX_FEATURES
                ),
            });
        }
    }

    // Capacity is bounded by what the file could hold, so a lying header cannot force a huge allocation.
    let cap = if gzipped {
        payload.min(1 << 26)
    } else {
        payload.min(file_len.unwrap_or(0))
    };
    let mut data = Vec::with_capacity(usize::try_from(cap).unwrap_or(0));
    // One byte more than the header promises tells us whether there is trailing data.
    reader
        .by_ref()
        .take(payload + 1)
        .read_to_end(&mut data)
        .map_err(stream_err)?;
    let held = data.len() as u64;
    if held < payload {
        return Err(DataError::Truncated {
            path: name,
            shape,
            held,
        });
    }
    if held > payload {
        return Err(DataError::TrailingData { path: name, shape });
    }
    Ok(Idx { dims, data })
}

/// An image file and its label file → a dataset with U8 storage and `pixels = true`.
pub fn load_idx_pair(images: &Path, labels: &Path) -> Result<Dataset, DataError> {
    let img = read_idx(images, IMAGES_MAGIC, "images", 3)?;
    let lab = read_idx(labels, LABELS_MAGIC, "labels", 1)?;
    let n_images = img.dims[0] as usize;
    let n_labels = lab.dims[0] as usize;
    if n_images != n_labels {
        return Err(DataError::CountMismatch {
            images: images.display().to_string(),
            labels: labels.display().to_string(),
            n_images,
            n_labels,
        });
    }
    if n_images == 0 {
        return Err(DataError::NoRows {
            path: images.display().to_string(),
        });
    }
    Ok(Dataset {
        n_samples: n_images,
        n_features: img.dims[1] as usize * img.dims[2] as usize,
        x: Features::U8(img.data),
        y: lab.data.iter().map(|&l| f32::from(l)).collect(),
        pixels: true,
        image: Some([1, img.dims[1] as usize, img.dims[2] as usize]),
        source: images.display().to_string(),
        labels: None,
    })
}

/// `dir/name`, or `dir/name.gz` when only that exists.
fn find(dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    let plain = dir.join(name);
    if plain.is_file() {
        return Ok(plain);
    }
    let gz = dir.join(format!("{name}.gz"));
    if gz.is_file() {
        return Ok(gz);
    }
    Err(DataError::MnistFileMissing {
        dir: dir.display().to_string(),
        name: name.to_string(),
    })
}

/// A directory with train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte
/// (each optionally with .gz) → (train, test). U8 storage, pixels = true.
pub fn load_mnist_dir(dir: &Path) -> Result<(Dataset, Dataset), DataError> {
    // Locate all four first so a missing file is reported before minutes of decompression.
    let paths = [
        find(dir, "train-images-idx3-ubyte")?,
        find(dir, "train-labels-idx1-ubyte")?,
        find(dir, "t10k-images-idx3-ubyte")?,
        find(dir, "t10k-labels-idx1-ubyte")?,
    ];
    let train = load_idx_pair(&paths[0], &paths[1])?;
    let test = load_idx_pair(&paths[2], &paths[3])?;
    if train.n_features != test.n_features {
        return Err(DataError::FeatureMismatch {
            train: train.source,
            test: test.source,
            train_features: train.n_features,
            test_features: test.n_features,
        });
    }
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use std::io::Write;

    fn images_bytes(n: u32, rows: u32, cols: u32, fill: impl Fn(usize) -> u8) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [IMAGES_MAGIC, n, rows, cols] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend((0..(n * rows * cols) as usize).map(fill));
        b
    }

    fn labels_bytes(labels: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [LABELS_MAGIC, labels.len() as u32] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(labels);
        b
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    /// Loads an image file against a valid 3-label file and returns the error message.
    fn image_error(name: &str, bytes: &[u8]) -> String {
        let img = temp_file(name, bytes);
        let lab = temp_file("labels-ok", &labels_bytes(&[0, 1, 2]));
        let e = load_idx_pair(&img, &lab).unwrap_err().to_string();
        std::fs::remove_file(img).unwrap();
        std::fs::remove_file(lab).unwrap();
        assert!(e.contains(name), "message does not name the file: {e}");
        assert!(!e.contains('\n'), "{e}");
        e
    }

    #[test]
    fn real_mnist_test_set_has_the_known_class_counts() {
        let ds = load_idx_pair(
            &shared("mnist/t10k-images-idx3-ubyte.gz"),
            &shared("mnist/t10k-labels-idx1-ubyte.gz"),
        )
        .unwrap();
        assert_eq!((ds.n_samples, ds.n_features), (10000, 784));
        assert!(ds.pixels);
        assert!(matches!(&ds.x, Features::U8(v) if v.len() == 10000 * 784));
        assert_eq!(
            ds.class_counts().unwrap(),
            vec![980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
        );
    }

    #[test]
    fn real_mnist_directory_gives_train_and_test() {
        let (train, test) = load_mnist_dir(&shared("mnist")).unwrap();
        assert_eq!((train.n_samples, train.n_features), (60000, 784));
        assert_eq!((test.n_samples, test.n_features), (10000, 784));
        assert_eq!(train.class_counts().unwrap().len(), 10);
        let r = crate::data::inspect(&train);
        assert_eq!((r.min, r.max, r.storage), (0.0, 255.0, "u8"));
    }

    #[test]
    fn raw_idx_files_load_like_gzipped_ones() {
        let img = images_bytes(3, 2, 2, |k| k as u8 * 10);
        let lab = labels_bytes(&[7, 0, 200]);
        let pi = temp_file("raw-images", &img);
        let pl = temp_file("raw-labels.gz", &lab); // a misleading extension must not matter
        let raw = load_idx_pair(&pi, &pl).unwrap();
        assert_eq!((raw.n_samples, raw.n_features), (3, 4));
        assert_eq!(raw.y, vec![7.0, 0.0, 200.0]);
        assert_eq!(raw.value(2, 3), 110.0);
        let gi = temp_file("gz-images", &gzip(&img));
        let gl = temp_file("gz-labels", &gzip(&lab));
        let gz = load_idx_pair(&gi, &gl).unwrap();
        assert_eq!((gz.x, gz.y), (raw.x, raw.y));
        for p in [pi, pl, gi, gl] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn mnist_directory_with_plain_files_and_a_missing_one() {
        let dir = temp_path("mnistdir");
        std::fs::create_dir(&dir).unwrap();
        let img = images_bytes(2, 3, 3, |k| k as u8);
        std::fs::write(dir.join("train-images-idx3-ubyte"), &img).unwrap();
        std::fs::write(
            dir.join("train-labels-idx1-ubyte.gz"),
            gzip(&labels_bytes(&[1, 2])),
        )
        .unwrap();
        std::fs::write(dir.join("t10k-images-idx3-ubyte"), &img).unwrap();
        let e = load_mnist_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains("mnistdir: no t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz"),
            "{e}"
        );
        std::fs::write(dir.join("t10k-labels-idx1-ubyte"), labels_bytes(&[3, 4])).unwrap();
        let (train, test) = load_mnist_dir(&dir).unwrap();
        assert_eq!((train.y, test.y), (vec![1.0, 2.0], vec![3.0, 4.0]));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn wrong_magic_is_reported_in_hex() {
        let e = image_error("wrongmagic", &labels_bytes(&[1, 2, 3]));
        assert!(
            e.contains("not an IDX images file (magic 0x00000801, expected 0x00000803)"),
            "{e}"
        );
        let doubly = gzip(&gzip(&images_bytes(3, 1, 1, |_| 0)));
        let e = image_error("double.gz", &doubly);
        assert!(
            e.contains("not an IDX images file (magic 0x1f8b0800"),
            "{e}"
        );
    }

    #[test]
    fn truncated_payload_says_what_header_promised() {
        let mut b = images_bytes(3, 28, 28, |_| 1);
        b.truncate(16 + 1234);
        let e = image_error("short", &b);
        assert!(
            e.ends_with("short: truncated: header says 3×28×28 bytes, file holds 1234"),
            "{e}"
        );
        let e = image_error("shortgz", &gzip(&b));
        assert!(
            e.contains("truncated: header says 3×28×28 bytes, file holds 1234"),
            "{e}"
        );
    }

    #[test]
    fn truncated_header_and_empty_file_are_errors() {
        let e = image_error("halfheader", &images_bytes(3, 1, 1, |_| 0)[..10]);
        assert!(
            e.contains("truncated: an IDX images header is 16 bytes, file holds 10"),
            "{e}"
        );
        let e = image_error("emptyidx", b"");
        assert!(e.contains("emptyidx: file is empty"), "{e}");
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut b = images_bytes(3, 2, 2, |_| 0);
        b.push(0);
        let e = image_error("trailing", &b);
        assert!(e.contains("trailing data: header says 3×2×2 bytes"), "{e}");
    }

    #[test]
    fn absurd_header_is_rejected_without_allocating() {
        let mut b = Vec::new();
        for v in [IMAGES_MAGIC, u32::MAX, u32::MAX, u32::MAX] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        let e = image_error("absurd", &b);
        assert!(
            e.contains("implausible IDX header: 4294967295×4294967295×4294967295"),
            "{e}"
        );
        // Within the limit but far beyond the file: truncated, and no 8 GB buffer.
        let b = images_bytes(1, 1, 1, |_| 0);
        let mut big = b[..16].to_vec();
        big[4..8].copy_from_slice(&(1u32 << 20).to_be_bytes());
        big[8..12].copy_from_slice(&(1u32 << 13).to_be_bytes());
        let e = image_error("liar", &big);
        assert!(e.contains("file holds 0"), "{e}");
    }

    #[test]
    fn corrupt_gzip_stream_is_an_error() {
        let mut g = gzip(&images_bytes(3, 8, 8, |k| (k * 7) as u8));
        let mid = g.len() / 2;
        for b in &mut g[12..mid] {
            *b ^= 0x5a;
        }
        let e = image_error("corrupt.gz", &g);
        assert!(e.contains("corrupt.gz: corrupt gzip stream: "), "{e}");
        let e = image_error("cut.gz", &g[..4]);
        assert!(e.contains("cut.gz: corrupt gzip stream: "), "{e}");
    }

    #[test]
    fn image_and_label_counts_must_match() {
        let img = temp_file("count-images", &images_bytes(2, 1, 1, |_| 0));
        let lab = temp_file("count-labels", &labels_bytes(&[0, 1, 2]));
        let e = load_idx_pair(&img, &lab).unwrap_err().to_string();
        assert!(
            e.contains("holds 2 images but") && e.contains("count-labels holds 3 labels"),
            "{e}"
        );
        std::fs::remove_file(img).unwrap();
        std::fs::remove_file(lab).unwrap();
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let e = load_idx_pair(&temp_path("nope-images"), &temp_path("nope-labels"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope-images: cannot read: "), "{e}");
    }
}
