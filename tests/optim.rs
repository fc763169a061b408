//! The optimizers against independent float64 references of PyTorch's rules (torch.optim.Adam,
//! AdamW, SGD after torch.nn.utils.clip_grad_norm_), on the GPU (lavapipe) and the CPU backend;
//! gradient accumulation against one batch N× larger; resuming Adam exactly.

mod util;

use dptrain::backend::{self, Backend, DeviceKind};
use dptrain::data::synth;
use dptrain::model::ModelKind;
use dptrain::optim::{OptimConfig, OptimizerKind};
use dptrain::train::{self, StepPlan, TrainConfig};
use util::{dptrain, params, shared, tmpdir};

/// Normwise relative difference ‖a − b‖∞ / ‖b‖∞.
fn rel(a: &[f32], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - y).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Seeded values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// A backend for a small MLP (190 parameters) on `device`, with `optim`'s state.
fn backend_for(device: DeviceKind, optim: OptimConfig) -> (Box<dyn Backend>, usize) {
    let mut cfg = TrainConfig::new(ModelKind::Mlp);
    cfg.hidden = vec![17];
    cfg.batch_size = 8;
    cfg.optim = optim;
    let setup = train::setup(&cfg, synth::random(40, 7, 3, 1), None).unwrap();
    let plan = StepPlan::of(&cfg, setup.total_train, 0, 1);
    let n = setup.spec.layout().total;
    let be = backend::open(device, None, 0, &setup.backend_init(&cfg, &plan)).unwrap();
    (be, n)
}

/// Run `steps` updates of `optim` at rate `lr` from θ0 on a fixed stream of per-sample gradient
/// sums (each divided by `samples`), through the backend; return the parameters.
fn run_updates(
    device: DeviceKind,
    optim: OptimConfig,
    lr: f64,
    theta0: &[f32],
    grads: &[Vec<f32>],
    samples: u64,
) -> Vec<f32> {
    let (mut be, n) = backend_for(device, optim);
    assert_eq!(n, theta0.len());
    be.set_params(theta0).unwrap();
    for (t, g) in grads.iter().enumerate() {
        be.write_grads(0..n, g).unwrap();
        be.update(&optim.update(lr, t as u64, samples)).unwrap();
    }
    be.params().unwrap()
}

/// torch.nn.utils.clip_grad_norm_ in f64: the factor min(1, max_norm / (‖g‖ + 1e-6)).
fn clip_factor(g: &[f64], max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(c) => (c / (g.iter().map(|v| v * v).sum::<f64>().sqrt() + 1e-6)).min(1.0),
        None => 1.0,
    }
}

/// torch.optim.Adam / AdamW (single-tensor, non-capturable path) in f64.
fn adam_f64(
    decoupled: bool,
    lr: f64,
    wd: f64,
    theta0: &[f32],
    grads: &[Vec<f32>],
    samples: u64,
    max_norm: Option<f64>,
) -> Vec<f64> {
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let mut p: Vec<f64> = theta0.iter().map(|&v| f64::from(v)).collect();
    let mut m = vec![0f64; p.len()];
    let mut v = vec![0f64; p.len()];
    for (t, g32) in grads.iter().enumerate() {
        let step = (t + 1) as i32;
        let mut g: Vec<f64> = g32.iter().map(|&x| f64::from(x) / samples as f64).collect();
        let c = clip_factor(&g, max_norm);
        g.iter_mut().for_each(|x| *x *= c);
        for i in 0..p.len() {
            let mut gi = g[i];
            if decoupled {
                p[i] *= 1.0 - lr * wd;
            } else {
                gi += wd * p[i];
            }
            m[i] += (gi - m[i]) * (1.0 - b1);
            v[i] = v[i] * b2 + (1.0 - b2) * gi * gi;
            let bc1 = 1.0 - b1.powi(step);
            let bc2 = 1.0 - b2.powi(step);
            let denom = v[i].sqrt() / bc2.sqrt() + eps;
            p[i] -= lr / bc1 * m[i] / denom;
        }
    }
    p
}

/// torch.optim.SGD (momentum, no dampening, optional Nesterov) in f64.
fn sgd_f64(
    opt: &OptimConfig,
    lr: f64,
    theta0: &[f32],
    grads: &[Vec<f32>],
    samples: u64,
) -> Vec<f64> {
    let mut p: Vec<f64> = theta0.iter().map(|&v| f64::from(v)).collect();
    let mut buf = vec![0f64; p.len()];
    for (t, g32) in grads.iter().enumerate() {
        let mut g: Vec<f64> = g32.iter().map(|&x| f64::from(x) / samples as f64).collect();
        let c = clip_factor(&g, opt.clip_grad_norm);
        g.iter_mut().for_each(|x| *x *= c);
        for i in 0..p.len() {
            let gi = g[i] + opt.weight_decay * p[i];
            buf[i] = if t == 0 {
                gi
            } else {
                opt.momentum * buf[i] + gi
            };
            let d = if opt.nesterov {
                gi + opt.momentum * buf[i]
            } else {
                buf[i]
            };
            p[i] -= lr * d;
        }
    }
    p
}

fn stream(n: usize, steps: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
    // gradients of varying size, so that clipping acts on some steps and not on others
    let grads = (0..steps)
        .map(|t| {
            let scale = 0.5 + 3.0 * ((t % 5) as f32);
            noise(n, 100 + t as u64).iter().map(|v| v * scale).collect()
        })
        .collect();
    (noise(n, 7), grads)
}

#[test]
fn adam_and_adamw_follow_pytorchs_rule_in_f64_over_50_steps_on_both_backends() {
    let n = backend_for(DeviceKind::Cpu, OptimConfig::default()).1;
    let (theta0, grads) = stream(n, 50);
    for device in [DeviceKind::Gpu, DeviceKind::Cpu] {
        for kind in [OptimizerKind::Adam, OptimizerKind::Adamw] {
            for wd in [0.0, 0.05] {
                let opt = OptimConfig {
                    optimizer: kind,
                    weight_decay: wd,
                    ..OptimConfig::default()
                };
                let got = run_updates(device, opt, 1e-2, &theta0, &grads, 4);
                let want = adam_f64(
                    kind == OptimizerKind::Adamw,
                    1e-2,
                    wd,
                    &theta0,
                    &grads,
                    4,
                    None,
                );
                let e = rel(&got, &want);
                assert!(
                    e <= 1e-5,
                    "{device:?} {kind:?} wd {wd}: relative error {e:e}"
                );
                let moved = rel(&theta0, &want);
                assert!(moved > 1e-2, "the updates moved the parameters ({moved})");
            }
        }
    }
}

#[test]
fn clipping_scales_the_mean_gradient_to_the_global_norm_on_both_backends() {
    let n = backend_for(DeviceKind::Cpu, OptimConfig::default()).1;
    let (theta0, grads) = stream(n, 30);
    // per-sample sums of up to 13 per element over 190 parameters, divided by 4: norms of 5 to 90
    let max_norm = 10.0;
    for device in [DeviceKind::Gpu, DeviceKind::Cpu] {
        let sgd = OptimConfig {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-3,
            clip_grad_norm: Some(max_norm),
            ..OptimConfig::default()
        };
        let got = run_updates(device, sgd, 0.05, &theta0, &grads, 4);
        let want = sgd_f64(&sgd, 0.05, &theta0, &grads, 4);
        let e = rel(&got, &want);
        assert!(e <= 1e-5, "{device:?} clipped SGD: relative error {e:e}");
        let unclipped = sgd_f64(
            &OptimConfig {
                clip_grad_norm: None,
                ..sgd
            },
            0.05,
            &theta0,
            &grads,
            4,
        );
        let off = rel(&got, &unclipped);
        assert!(off > 1e-2, "clipping changed nothing ({off:e})");
        let adamw = OptimConfig {
            optimizer: OptimizerKind::Adamw,
            weight_decay: 0.01,
            clip_grad_norm: Some(max_norm),
            ..OptimConfig::default()
        };
        let got = run_updates(device, adamw, 1e-2, &theta0, &grads, 4);
        let want = adam_f64(true, 1e-2, 0.01, &theta0, &grads, 4, Some(max_norm));
        let e = rel(&got, &want);
        assert!(e <= 1e-5, "{device:?} clipped AdamW: relative error {e:e}");
    }
}

/// Train on digits with `extra` flags and return the saved parameters.
fn trained(name: &str, extra: &[&str]) -> Vec<f32> {
    let d = tmpdir(name);
    let out = d.join("m.safetensors").display().to_string();
    let digits = shared("digits.csv");
    let mut args = vec![
        "train", "--data", &digits, "--model", "mlp", "--hidden", "24", "--epochs", "2", "--seed",
        "3", "--save", &out,
    ];
    args.extend_from_slice(extra);
    dptrain(&args).ok();
    let p = params(std::path::Path::new(&out));
    let _ = std::fs::remove_dir_all(&d);
    p
}

fn rel32(a: &[f32], b: &[f32]) -> f64 {
    let b64: Vec<f64> = b.iter().map(|&v| f64::from(v)).collect();
    rel(a, &b64)
}

#[test]
fn accumulating_n_micro_batches_equals_one_batch_n_times_larger() {
    // 1437 training rows: 23 steps of 60 and a last one of 57, split 20 + 20 + 17
    for device in ["cpu", "gpu"] {
        for opt in [
            &[
                "--momentum",
                "0.9",
                "--lr",
                "0.05",
                "--clip-grad-norm",
                "0.5",
            ][..],
            &[
                "--optimizer",
                "adamw",
                "--lr",
                "0.003",
                "--weight-decay",
                "0.01",
            ][..],
        ] {
            let mut big = vec!["--device", device, "--batch-size", "60"];
            big.extend_from_slice(opt);
            let mut acc = vec![
                "--device",
                device,
                "--batch-size",
                "20",
                "--accumulate",
                "3",
            ];
            acc.extend_from_slice(opt);
            let one = trained(&format!("acc-big-{device}"), &big);
            let three = trained(&format!("acc-3-{device}"), &acc);
            let e = rel32(&three, &one);
            assert!(e <= 1e-5, "{device} {opt:?}: accumulate 3 differs by {e:e}");
        }
    }
}

#[test]
fn dropout_gives_the_same_training_on_the_gpu_and_the_cpu() {
    let args = [
        "--dropout",
        "0.3",
        "--batch-size",
        "50",
        "--lr",
        "0.05",
        "--momentum",
        "0.9",
    ];
    let mut gpu = vec!["--device", "gpu"];
    gpu.extend_from_slice(&args);
    let mut cpu = vec!["--device", "cpu"];
    cpu.extend_from_slice(&args);
    let g = trained("dropout-gpu", &gpu);
    let c = trained("dropout-cpu", &cpu);
    let e = rel32(&g, &c);
    assert!(e <= 1e-4, "dropout: GPU and CPU differ by {e:e}");
    let plain = trained(
        "dropout-none",
        &[
            "--device",
            "cpu",
            "--batch-size",
            "50",
            "--lr",
            "0.05",
            "--momentum",
            "0.9",
        ],
    );
    assert!(rel32(&plain, &c) > 1e-2, "dropout changed nothing");
}

#[test]
fn adam_resumes_bit_exactly_from_a_mid_run_checkpoint() {
    let digits = shared("digits.csv");
    for device in ["cpu", "gpu"] {
        let d = tmpdir(&format!("adam-resume-{device}"));
        let ck = d.join("ck").display().to_string();
        let (s, r) = (d.join("s.safetensors"), d.join("r.safetensors"));
        let (ss, rs) = (s.display().to_string(), r.display().to_string());
        let base = [
            "train",
            "--data",
            &digits,
            "--device",
            device,
            "--model",
            "mlp",
            "--hidden",
            "24",
            "--batch-size",
            "50",
            "--optimizer",
            "adam",
            "--lr",
            "0.003",
            "--weight-decay",
            "1e-3",
            "--dropout",
            "0.2",
            "--accumulate",
            "2",
            "--seed",
            "5",
        ];
        let run = |more: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(more);
            dptrain(&v).ok()
        };
        run(&["--steps", "30", "--save", &ss]);
        run(&[
            "--steps",
            "17",
            "--checkpoint-dir",
            &ck,
            "--checkpoint-unit",
            "step",
            "--checkpoint-every",
            "10",
        ]);
        let out = run(&[
            "--steps",
            "30",
            "--checkpoint-dir",
            &ck,
            "--resume",
            "auto",
            "--save",
            &rs,
        ])
        .stdout();
        assert!(out.contains("resuming from"), "{out}");
        assert_eq!(params(&r), params(&s), "{device}: resumed Adam run differs");
        // and an SGD run refuses the Adam checkpoint by name
        let mut sgd = base.to_vec();
        sgd.retain(|a| !["--optimizer", "adam"].contains(a));
        sgd.extend_from_slice(&["--steps", "30", "--checkpoint-dir", &ck, "--resume", "auto"]);
        dptrain(&sgd).fails_with(
            "holds the state of optimizer adam (exp_avg, exp_avg_sq); this run uses sgd",
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// `--autotune on` tunes on lavapipe too: the chosen kernels are recorded in the checkpoint, and a
/// resume runs them, ending bit for bit where the uninterrupted run ends.
#[test]
fn tuned_kernels_are_recorded_in_checkpoints_and_a_resume_reproduces_the_run() {
    let digits = shared("digits.csv");
    let d = tmpdir("autotune-resume");
    let ck = d.join("ck").display().to_string();
    let (s, r) = (d.join("s.safetensors"), d.join("r.safetensors"));
    let (ss, rs) = (s.display().to_string(), r.display().to_string());
    let cache = d.join("cache.json");
    let base = [
        "train",
        "--data",
        &digits,
        "--device",
        "gpu",
        "--model",
        "mlp",
        "--hidden",
        "24",
        "--batch-size",
        "50",
        "--lr",
        "0.05",
        "--momentum",
        "0.9",
        "--seed",
        "2",
        "--autotune",
        "on",
    ];
    let run = |more: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_dptrain"));
        c.args(base)
            .args(more)
            .env("XDG_RUNTIME_DIR", std::env::temp_dir());
        c.env("DPTRAIN_AUTOTUNE_CACHE", &cache);
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["--steps", "30", "--save", &ss]);
    run(&[
        "--steps",
        "17",
        "--checkpoint-dir",
        &ck,
        "--checkpoint-unit",
        "step",
        "--checkpoint-every",
        "10",
    ]);
    let newest = dptrain::store::checkpoint::list(std::path::Path::new(&ck));
    let state = dptrain::store::checkpoint::load(newest.last().unwrap())
        .unwrap()
        .state;
    assert!(
        state.kernels.len() >= 5,
        "the checkpoint names the kernel of every product: {:?}",
        state.kernels
    );
    let cached = std::fs::read_to_string(&cache).unwrap();
    assert!(cached.contains("NT BiasRelu f32"), "{cached}");
    run(&[
        "--steps",
        "30",
        "--checkpoint-dir",
        &ck,
        "--resume",
        "auto",
        "--save",
        &rs,
    ]);
    assert_eq!(params(&r), params(&s));
    let _ = std::fs::remove_dir_all(&d);
}
