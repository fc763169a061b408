//! Criterion benchmarks of every kernel and of one whole training step, on whatever adapter wgpu finds.
//!
//! Napkin math is printed beside each: a matmul of m×n×k does 2mnk FLOPs; a training step of an MLP
//! does about 6 × batch × Σ fan_in·fan_out FLOPs.

use criterion::{Criterion, criterion_group, criterion_main};
use dptrain::backend::gpu::GpuBackend;
use dptrain::backend::{Backend, BackendInit, Batch};
use dptrain::data::{NormKind, synth};
use dptrain::model::{Activation, ModelKind};
use dptrain::optim::OptimConfig;
use dptrain::train::{self, TrainConfig};
use dptrain_kernels::matmul::{At, Epilogue, Matmul, MatmulArgs};
use dptrain_kernels::{AdapterChoice, F32, GpuContext};

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
    let out = ctx.array("c", F32, n * n).expect("c");
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
                dptrain_kernels::run(&ctx, &d.dispatches.iter().collect::<Vec<_>>());
                ctx.wait().expect("wait");
            })
        });
    }
}

/// The other kernels at the shapes of an mnist-mlp step at batch 1024 (1024 hidden units, 10 classes).
fn kernels(c: &mut Criterion) {
    use dptrain_kernels::gather::{DeviceData, Gather};
    use dptrain_kernels::loss::{Loss, LossArgs, LossKind};
    use dptrain_kernels::reduce_stats::ReduceStats;
    use dptrain_kernels::sgd::{Sgd, SgdStep};
    let Ok(ctx) = GpuContext::new(&AdapterChoice::default()) else {
        return;
    };
    let (rows, feats, hidden, classes) = (1024u64, 784u64, 1024u64, 10u64);
    let bytes: Vec<u8> = (0..rows * feats).map(|i| (i % 251) as u8).collect();
    let targets: Vec<f32> = (0..rows).map(|i| (i % classes) as f32).collect();
    let data = DeviceData::from_u8(
        &ctx,
        &bytes,
        &targets,
        &vec![0.0; feats as usize],
        &vec![1.0 / 255.0; feats as usize],
    )
    .expect("data");
    let index = ctx
        .upload("index", &(0..rows as u32).collect::<Vec<_>>())
        .expect("index");
    let x = ctx.array("x", F32, rows * feats).expect("x");
    let t = ctx.array("t", F32, rows).expect("t");
    let z = ctx
        .upload("z", &vec![0.1f32; (rows * classes) as usize])
        .expect("z");
    let dz = ctx.array("dz", F32, rows * hidden).expect("dz");
    let stats = ctx.array("stats", F32, rows * 2).expect("stats");
    let totals = ReduceStats::total_buffer(&ctx).expect("totals");
    let history = ctx.array("history", F32, 16).expect("history");
    let n_params = 1_863_690u64;
    let theta = ctx.array("theta", F32, n_params).expect("theta");
    let grads = ctx.array("grads", F32, n_params).expect("grads");
    let vel = ctx.array("vel", F32, n_params).expect("vel");
    let clip = ctx.upload("clip", &[1.0f32, 0.0, 0.0]).expect("clip");
    let calls = [
        (
            format!(
                "gather u8 {rows}x{feats}: {:.1} MB written",
                (rows * feats * 4) as f64 / 1e6
            ),
            Gather::new(&ctx)
                .prepare(&ctx, &data, &index, rows, &x, &t)
                .expect("gather")
                .dispatch,
        ),
        (
            format!("softmax_xent {rows}x{classes}"),
            Loss::new(&ctx, LossKind::SoftmaxXent)
                .prepare(
                    &ctx,
                    &LossArgs {
                        rows,
                        classes,
                        z: &z,
                        t: &t,
                        dz: &dz,
                        stats: &stats,
                        scaler: &clip,
                    },
                )
                .expect("loss"),
        ),
        (
            format!("reduce_stats {rows}"),
            ReduceStats::new(&ctx)
                .prepare(&ctx, rows, &stats, &totals, &history)
                .expect("reduce")
                .dispatch,
        ),
        (
            format!(
                "bias gradient (dZᵀ·1) {rows}x{hidden}: {:.1} MB read",
                (rows * hidden * 4) as f64 / 1e6
            ),
            {
                // the trainer's bias gradient: dZᵀ·1, on the default kernel for its shape
                let ones = ctx
                    .upload("ones", &vec![1.0f32; rows as usize])
                    .expect("ones");
                let p = dptrain_kernels::tune::Product {
                    m: hidden,
                    n: 1,
                    k: rows,
                    trans_a: true,
                    trans_b: false,
                    epilogue: Epilogue::None,
                    f16: false,
                };
                let call = Matmul::new(&ctx)
                    .expect("matmul")
                    .prepare_with(
                        &ctx,
                        &MatmulArgs {
                            m: hidden,
                            n: 1,
                            k: rows,
                            trans_a: true,
                            trans_b: false,
                            epilogue: Epilogue::None,
                            a: At::start(&dz),
                            b: At::start(&ones),
                            c: At::start(&grads),
                            bias: None,
                            aux: None,
                        },
                        p.default_choice(),
                    )
                    .expect("bias gradient");
                call.dispatches[0].clone()
            },
        ),
        ({
            let call = Sgd::new(&ctx)
                .prepare(&ctx, n_params, &theta, &grads, &vel, &clip)
                .expect("sgd");
            call.set(
                &ctx,
                &SgdStep {
                    lr: 0.01,
                    momentum: 0.9,
                    weight_decay: 0.0,
                    nesterov: false,
                    grad_scale: 1.0 / rows as f32,
                },
            )
            .expect("sgd params");
            (
                format!(
                    "sgd {n_params} parameters: {:.1} MB moved",
                    (n_params * 4 * 5) as f64 / 1e6
                ),
                call.dispatch,
            )
        }),
    ];
    for (name, d) in &calls {
        eprintln!("{name}");
        c.bench_function(name.split(':').next().unwrap_or(name), |bench| {
            bench.iter(|| {
                dptrain_kernels::run(&ctx, &[d]);
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
        rule: cfg.optim.rule(),
        seed: 0,
        sample_base: 0,
        precision: cfg.precision,
        average_buffers: false,
        augment: Default::default(),
    };
    let Ok(mut gpu) = GpuBackend::new(&init, &AdapterChoice::default()) else {
        return;
    };
    let theta = setup.spec.init(1);
    gpu.set_params(&theta).expect("params");
    let order: Vec<u32> = (0..4096).collect();
    gpu.set_order(&order).expect("order");
    let sgd = OptimConfig {
        momentum: 0.9,
        ..OptimConfig::default()
    };
    let batch = Batch {
        offset: 0,
        rows: 256,
        step: 0,
        accumulate: false,
    };
    let flops = 6.0 * 256.0 * setup.spec.macs_per_sample() as f64;
    eprintln!("mlp 784-256-10 step, batch 256: {:.3} GFLOP", flops / 1e9);
    c.bench_function("mlp_step_b256", |bench| {
        bench.iter(|| {
            gpu.gather(&batch).expect("gather");
            gpu.forward().expect("forward");
            gpu.loss().expect("loss");
            gpu.backward().expect("backward");
            gpu.update(&sgd.update(0.01, 0, 256)).expect("update");
            gpu.take_train_totals().expect("sync");
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = matmul, kernels, step
}
criterion_main!(benches);
