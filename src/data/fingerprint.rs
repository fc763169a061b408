//! What identifies a training set: its size, shape and a hash of every parsed row. Resuming
//! compares it, so that a checkpoint is not continued on other data without a word.

use super::Dataset;

/// The training set's size, shape and a hash of every parsed row (features and targets).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataFingerprint {
    pub samples: usize,
    pub features: usize,
    /// CRC-32 of the features' bytes (u8 pixels, or f32 in little-endian), then of the targets.
    pub features_crc: String,
    pub targets_crc: String,
}

impl DataFingerprint {
    pub fn of(ds: &Dataset) -> Self {
        let crc = |b: &[u8]| format!("{:08x}", crc32fast::hash(b));
        let x = match &ds.x {
            super::Features::U8(v) => crc(v),
            super::Features::F32(v) => crc(bytemuck::cast_slice(v)),
        };
        Self {
            samples: ds.n_samples,
            features: ds.n_features,
            features_crc: x,
            targets_crc: crc(bytemuck::cast_slice(&ds.y)),
        }
    }
}
