//! Element types: the one place that knows how wide each element is and what WGSL calls it.
//!
//! Buffer sizes, binding checks and host transfers all ask a [`DType`] for their byte counts, so a
//! storage type added here (f16 weights, u8 pixels) reaches every launcher through one seam. WGSL has
//! no bf16 type; where bf16 travels (the gradient wire), it is carried as 16-bit words.

/// How elements are stored in a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    U32,
    /// Bytes packed four to a 32-bit word (pixel data).
    U8,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> u64 {
        match self {
            Self::F32 | Self::U32 => 4,
            Self::F16 => 2,
            Self::U8 => 1,
        }
    }

    /// Bytes of `n` elements.
    pub const fn bytes(self, n: u64) -> u64 {
        n * self.size()
    }

    /// Whole elements that `bytes` holds.
    pub const fn count(self, bytes: u64) -> u64 {
        bytes / self.size()
    }

    /// The WGSL scalar type a kernel declares (u8 data is read as packed u32 words).
    pub const fn wgsl(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::U32 | Self::U8 => "u32",
        }
    }
}

/// A host element type and the [`DType`] it uploads as.
pub trait Element: bytemuck::Pod {
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}

impl Element for u32 {
    const DTYPE: DType = DType::U32;
}

impl Element for u8 {
    const DTYPE: DType = DType::U8;
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}

/// Shorthand for the type nearly every buffer holds today.
pub const F32: DType = DType::F32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_agree_with_the_host_types() {
        assert_eq!(DType::F32.size(), std::mem::size_of::<f32>() as u64);
        assert_eq!(DType::F16.size(), std::mem::size_of::<half::f16>() as u64);
        assert_eq!(<u32 as Element>::DTYPE.bytes(3), 12);
        assert_eq!(DType::F16.count(10), 5);
    }
}
