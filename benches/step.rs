//! Criterion benchmarks of the hot kernels and of one whole training step, on whatever adapter wgpu finds.
//!
//! Napkin math is printed beside each: a matmul of m×n×k does 2mnk FLOPs; a training step of an MLP
//! does about 6 × batch × Σ fan_in·fan_out FLOPs.

use criterion::{Criterion, criterion_group, criterion_main};
use dptrain::backend::gpu::GpuBackend;
use dptrain::backend::{Backend, BackendInit};
use dptrain::data::{NormKind, synth};
use dptrain::model::{Activation, ModelKind};
use dptrain::optim::{Schedule, SgdConfig};
use dptrain::train::{self, TrainConfig};
use dptrain_kernels::matmul::{At, Epilogue, Matmul, MatmulArgs};
use dptrain_kernels::{AdapterChoice, GpuContext};

fn matmul(c: &mut Criterion) {
    let Ok(ctx) = GpuContext::new(&AdapterChoice::default()) else {
        eprintln!("no adapter: skipping GPU benchmarks");
        return;
    };
    eprintln!("adapter: {}", ctx.describe());
    let n = 512u64;
    let a = ctx.upload("a", &vec![0.5f32; (n * n) as usize]).expect("a");
    let b = ctx
        .upload("b", &vec![0.25f32; (n * n) as usize])
        .expect("b");
    let out = ctx.storage("c", n * n * 4).expect("c");
    let mut mm = Matmul::new(&ctx).expect("matmul");
    for (name, ta, tb) in [
        ("nn", false, false),
        ("nt", false, true),
        ("tn", true, false),
    ] {
        let d = mm
            .prepare(
                &ctx,
                &MatmulArgs {
                    m: n,
                    n,
                    k: n,
                    trans_a: ta,
                    trans_b: tb,
                    epilogue: Epilogue::None,
                    a: At::start(&a),
                    b: At::start(&b),
                    c: At::start(&out),
                    bias: None,
                    aux: None,
                },
            )
            .expect("prepare");
        eprintln!(
            "matmul {name} {n}³: {:.2} GFLOP per call",
            2.0 * (n * n * n) as f64 / 1e9
        );
        c.bench_function(&format!("matmul_{name}_{n}"), |bench| {
            bench.iter(|| {
                dptrain_kernels::run(&ctx, &[&d]);
                ctx.wait().expect("wait");
            })
        });
    }
}

fn step(c: &mut Criterion) {
    let ds = synth::random(4096, 784, 10, 1);
    let mut cfg = TrainConfig::new(ModelKind::Mlp);
    cfg.hidden = vec![256];
    cfg.activation = Activation::Relu;
    cfg.batch_size = 256;
    cfg.normalize = NormKind::None;
    let Ok(setup) = train::setup(&cfg, ds, None) else {
        return;
    };
    let init = BackendInit {
        spec: &setup.spec,
        train: &setup.train,
        test: None,
        norm: &setup.norm,
        max_rows: cfg.batch_size,
    };
    let Ok(mut gpu) = GpuBackend::new(&init, &AdapterChoice::default()) else {
        return;
    };
    let theta = setup.spec.init(1);
    gpu.set_params(&theta).expect("params");
    let order: Vec<u32> = (0..4096).collect();
    gpu.set_order(&order).expect("order");
    let sgd = SgdConfig {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 0.0,
    };
    let sched = Schedule::constant(0.01);
    let flops = 6.0 * 256.0 * setup.spec.macs_per_sample() as f64;
    eprintln!("mlp 784-256-10 step, batch 256: {:.3} GFLOP", flops / 1e9);
    c.bench_function("mlp_step_b256", |bench| {
        bench.iter(|| {
            gpu.forward_backward(0, 256).expect("step");
            gpu.update(&sgd.step(&sched, 0, 256)).expect("update");
            gpu.take_train_totals().expect("sync");
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = matmul, step
}
criterion_main!(benches);
