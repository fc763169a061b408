//! The CIFAR-10 binary format: files of records of one label byte and 3 072 pixel bytes (the red,
//! green and blue 32×32 planes, each row-major), as `data_batch_1.bin` … `data_batch_5.bin` and
//! `test_batch.bin` in `cifar-10-batches-bin/`, with the class names one per line in
//! `batches.meta.txt`. A folder holding them gives the training set (the data batches, in order)
//! and the test set; a single `.bin` file gives a training set. Samples are 3×32×32 u8 pixels,
//! scaled to [0, 1] like MNIST's.

use std::path::{Path, PathBuf};

use super::{DataError, Dataset, Features};

/// Bytes of one record: the label, then the three planes.
pub const RECORD: usize = 1 + 3 * 32 * 32;
/// Classes of CIFAR-10.
pub const CLASSES: u8 = 10;

/// Whether `dir` looks like a CIFAR-10 binary folder (it holds `data_batch_1.bin`).
pub fn is_cifar_dir(dir: &Path) -> bool {
    dir.join("data_batch_1.bin").is_file()
}

fn bad(path: &Path, msg: String) -> DataError {
    DataError::Cifar {
        path: path.display().to_string(),
        msg,
    }
}

/// Read the records of one file into `pixels` and `labels`.
fn read_file(path: &Path, pixels: &mut Vec<u8>, labels: &mut Vec<f32>) -> Result<(), DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Read {
        path: path.display().to_string(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(bad(path, "no records".into()));
    }
    if bytes.len() % RECORD != 0 {
        return Err(bad(
            path,
            format!(
                "{} bytes is not a whole number of {RECORD}-byte records (one label byte and 3072 pixels); is it CIFAR-100 or truncated?",
                bytes.len()
            ),
        ));
    }
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] >= CLASSES {
            return Err(bad(
                path,
                format!(
                    "record {}: label {} is not a CIFAR-10 class (0-9)",
                    i + 1,
                    rec[0]
                ),
            ));
        }
        labels.push(f32::from(rec[0]));
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

/// A dataset from CIFAR-10 binary files, in order.
pub fn load_files(files: &[PathBuf], names: Option<Vec<String>>) -> Result<Dataset, DataError> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for f in files {
        read_file(f, &mut pixels, &mut labels)?;
    }
    Ok(Dataset {
        n_samples: labels.len(),
        n_features: RECORD - 1,
        x: Features::U8(pixels),
        y: labels,
        pixels: true,
        image: Some([3, 32, 32]),
        source: files
            .first()
            .map(|f| f.display().to_string())
            .unwrap_or_default(),
        labels: names,
    })
}

/// The class names of `batches.meta.txt`, when it is there and names exactly 10 classes.
pub fn class_names(dir: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(dir.join("batches.meta.txt")).ok()?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    (names.len() == usize::from(CLASSES)).then_some(names)
}

/// A CIFAR-10 folder: (training set from the data batches, test set from `test_batch.bin`).
pub fn load_dir(dir: &Path) -> Result<(Dataset, Option<Dataset>), DataError> {
    let mut files = Vec::new();
    for i in 1.. {
        let f = dir.join(format!("data_batch_{i}.bin"));
        if !f.is_file() {
            break;
        }
        files.push(f);
    }
    let names = class_names(dir);
    let train = load_files(&files, names.clone())?;
    let test = dir.join("test_batch.bin");
    let test = test
        .is_file()
        .then(|| load_files(&[test], names))
        .transpose()?;
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file in the exact format: `n` records with labels i mod 10 and pixels from a formula.
    fn write(path: &Path, n: usize, first: usize) {
        let mut b = Vec::new();
        for i in first..first + n {
            b.push((i % 10) as u8);
            b.extend((0..3072).map(|j| ((i * 7 + j * 3) % 256) as u8));
        }
        std::fs::write(path, b).unwrap();
    }

    #[test]
    fn a_folder_round_trips_labels_planes_and_class_names() {
        let dir = std::env::temp_dir().join(format!("dptrain-cifar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write(&dir.join("data_batch_1.bin"), 5, 0);
        write(&dir.join("data_batch_2.bin"), 4, 5);
        write(&dir.join("test_batch.bin"), 3, 100);
        let names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n";
        std::fs::write(dir.join("batches.meta.txt"), names).unwrap();
        assert!(is_cifar_dir(&dir));
        let (train, test) = load_dir(&dir).unwrap();
        let test = test.unwrap();
        assert_eq!((train.n_samples, train.n_features), (9, 3072));
        assert_eq!(train.image, Some([3, 32, 32]));
        assert!(train.pixels);
        assert_eq!(train.y, (0..9).map(|i| (i % 10) as f32).collect::<Vec<_>>());
        // sample 6 (file 2's second record): its green plane's first pixel is byte 1024
        assert_eq!(train.value(6, 1024), ((6 * 7 + 1024 * 3) % 256) as f32);
        assert_eq!(test.n_samples, 3);
        assert_eq!(test.y, vec![0.0, 1.0, 2.0]);
        assert_eq!(train.labels.as_ref().unwrap()[9], "truck");
        // a truncated file and a CIFAR-100-style label are named
        std::fs::write(dir.join("data_batch_3.bin"), vec![0u8; RECORD + 5]).unwrap();
        let e = load_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains("data_batch_3.bin") && e.contains("whole number"),
            "{e}"
        );
        let mut rec = vec![0u8; RECORD];
        rec[0] = 42;
        std::fs::write(dir.join("data_batch_3.bin"), rec).unwrap();
        let e = load_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("record 1: label 42"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
