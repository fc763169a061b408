//! `bench matmul`: every verified product kernel of the adapter, timed.

use anyhow::ensure;
use serde::Serialize;

use super::step::{StepBenchConfig, WorkloadRun};
use crate::distributed::comm::Communicator;

/// One candidate kernel of one product in `bench matmul`.
#[derive(Clone, Debug, Serialize)]
pub struct MatmulRow {
    pub product: String,
    pub kernel: String,
    pub adapter: String,
    /// GPU time of one product (the fastest of the timed runs), when the kernel passed.
    pub ms: Option<f64>,
    pub tflops: Option<f64>,
    /// Why the tuner rejected it: it cannot be built on this adapter, or its numbers are wrong.
    pub rejected: Option<String>,
    /// The fastest correct kernel of its product.
    pub best: bool,
}

fn matmul_rows(adapter: &str, tuned: &[dptrain_kernels::tune::Tuned]) -> Vec<MatmulRow> {
    let mut rows = Vec::new();
    for t in tuned {
        let p = &t.product;
        let flops = 2.0 * (p.m * p.n * p.k) as f64;
        for trial in &t.trials {
            rows.push(MatmulRow {
                product: p.name(),
                kernel: trial.choice.name(),
                adapter: adapter.to_string(),
                ms: trial.result.as_ref().ok().map(|s| s * 1e3),
                tflops: trial.result.as_ref().ok().map(|s| flops / s / 1e12),
                rejected: trial.result.as_ref().err().cloned(),
                best: trial.choice == t.best,
            });
        }
    }
    rows
}

/// Every kernel the trainer can use on the products of `size`³ (the three forms plain, and each
/// with the epilogue training gives it: NT + bias + ReLU, TN, NN × ReLU'), in each precision:
/// verified against the fp32 reference, then timed.
pub fn matmul_bench_square(
    size: u64,
    precisions: &[crate::backend::Precision],
    gpu: Option<usize>,
    repeats: usize,
) -> anyhow::Result<Vec<MatmulRow>> {
    use dptrain_kernels::matmul::Epilogue;
    use dptrain_kernels::tune::{Product, Tuner, candidates};
    use dptrain_kernels::{AdapterChoice, GpuContext};
    ensure!(
        size >= 1 && repeats >= 1,
        "--size and --iters must be at least 1"
    );
    let ctx = GpuContext::new(&AdapterChoice {
        index: gpu,
        local_rank: 0,
    })?;
    let mut tuner = Tuner::new(&ctx)?;
    tuner.repeats = repeats;
    let mut tuned = Vec::new();
    for &precision in precisions {
        for (ta, tb, ep) in [
            (false, false, Epilogue::None),
            (false, true, Epilogue::None),
            (true, false, Epilogue::None),
            (false, true, Epilogue::BiasRelu),
            (false, false, Epilogue::DRelu),
        ] {
            let p = Product {
                m: size,
                n: size,
                k: size,
                trans_a: ta,
                trans_b: tb,
                epilogue: ep,
                f16: precision == crate::backend::Precision::F16,
            };
            tuned.push(tuner.tune(&ctx, &p, &candidates(&ctx, &p))?);
        }
    }
    Ok(matmul_rows(&ctx.describe(), &tuned))
}

/// Every kernel the trainer can use on the products of a workload's training step, as the
/// autotuner sees them (every candidate verified and timed) in the given precision.
pub fn matmul_bench_workload(
    cfg: &StepBenchConfig,
    comm: &dyn Communicator,
) -> anyhow::Result<Vec<MatmulRow>> {
    let mut run = WorkloadRun::open(cfg, comm)?;
    let tuned = run.backend.autotune(&Default::default())?;
    Ok(matmul_rows(&run.backend.describe(), &tuned))
}
