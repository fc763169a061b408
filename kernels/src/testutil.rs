//! Test helpers: a GPU context (lavapipe in CI), seeded random inputs and a relative-error check.

use crate::{AdapterChoice, GpuContext};

/// Open the first adapter; tests fail loudly when none exists rather than passing vacuously.
pub fn ctx() -> GpuContext {
    match GpuContext::new(&AdapterChoice::default()) {
        Ok(c) => c,
        Err(e) => {
            panic!("GPU tests need an adapter (lavapipe: apt-get install mesa-vulkan-drivers): {e}")
        }
    }
}

/// Values in [-1, 1) from a small LCG, reproducible per seed.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// Normwise relative error max|got - want| / max(max|want|, tiny), asserted ≤ tol.
pub fn assert_close(got: &[f32], want: &[f32], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want
        .iter()
        .fold(0f64, |m, v| m.max(f64::from(v.abs())))
        .max(1e-30);
    let (mut worst, mut at) = (0f64, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (f64::from(*g) - f64::from(*w)).abs();
        if e.is_nan() || e > worst {
            worst = if e.is_nan() { f64::INFINITY } else { e };
            at = i;
        }
    }
    let rel = worst / scale;
    assert!(
        rel <= tol,
        "{what}: relative error {rel:.3e} > {tol:.0e} at {at}: got {} want {}",
        got[at],
        want[at]
    );
}
