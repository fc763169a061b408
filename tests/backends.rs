//! The GPU backend against the CPU reference over whole training runs, and regression recovering its weights.

use dptrain::backend::cpu::CpuBackend;
use dptrain::backend::gpu::GpuBackend;
use dptrain::backend::{self, Backend, Split};
use dptrain::data::{self, CsvOptions, NormKind, synth};
use dptrain::distributed::comm::SingleProcess;
use dptrain::model::{Activation, ModelKind};
use dptrain::train::{self, DeviceKind, StepPlan, TrainConfig};

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        .sqrt();
    let den = b.iter().map(|y| f64::from(*y).powi(2)).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

fn gpu_and_cpu_agree(
    model: ModelKind,
    hidden: Vec<usize>,
    act: Activation,
    ds: data::Dataset,
    bs: usize,
) {
    let mut cfg = TrainConfig::new(model);
    cfg.hidden = hidden;
    cfg.activation = act;
    cfg.steps = Some(100);
    cfg.batch_size = bs;
    cfg.lr = 0.05;
    cfg.optim.momentum = 0.9;
    cfg.optim.weight_decay = 1e-4;
    cfg.seed = 5;
    let setup = train::setup(&cfg, ds, None).unwrap();
    let plan = StepPlan::of(&cfg, setup.total_train, 0, 1);
    let init = setup.backend_init(&cfg, &plan);
    let mut gpu = GpuBackend::new(&init, &Default::default()).unwrap();
    let mut cpu = CpuBackend::new(&init).unwrap();
    let g = train::train(&cfg, &setup, &mut gpu, &SingleProcess).unwrap();
    let c = train::train(&cfg, &setup, &mut cpu, &SingleProcess).unwrap();
    assert_eq!(g.steps, 100);
    let initial = setup.spec.init(cfg.seed);
    assert!(
        rel(&c.params, &initial) > 1e-2,
        "training moved the parameters"
    );
    let e = rel(&g.params, &c.params);
    assert!(
        e <= 1e-4,
        "{model:?}: GPU and CPU parameters differ by {e:e} after 100 steps"
    );
    let (ge, ce) = (
        gpu.evaluate(Split::Train, 0..setup.train.n_samples)
            .unwrap(),
        cpu.evaluate(Split::Train, 0..setup.train.n_samples)
            .unwrap(),
    );
    assert_eq!(ge.count, ce.count);
    assert!(
        (ge.loss_sum - ce.loss_sum).abs() <= 1e-4 * ce.loss_sum.abs().max(1.0),
        "{ge:?} {ce:?}"
    );
}

fn digits() -> data::Dataset {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/digits.csv");
    data::load_csv(std::path::Path::new(p), &CsvOptions::default()).unwrap()
}

#[test]
fn gpu_and_cpu_mlps_agree_to_1e4_after_100_steps() {
    // 1797 samples, batch 50: the last batch of each epoch is short (47 rows)
    gpu_and_cpu_agree(ModelKind::Mlp, vec![40, 24], Activation::Tanh, digits(), 50);
    gpu_and_cpu_agree(ModelKind::Mlp, vec![33], Activation::Relu, digits(), 64);
}

#[test]
fn gpu_and_cpu_linear_models_agree_to_1e4_after_100_steps() {
    gpu_and_cpu_agree(ModelKind::Softmax, vec![], Activation::Relu, digits(), 37);
    gpu_and_cpu_agree(
        ModelKind::Logreg,
        vec![],
        Activation::Relu,
        synth::seed_example(700, 1),
        30,
    );
    gpu_and_cpu_agree(
        ModelKind::Linreg,
        vec![],
        Activation::Relu,
        synth::linear(500, 7, 0.1, 2).0,
        25,
    );
}

#[test]
fn linear_regression_recovers_the_true_weights() {
    for device in [DeviceKind::Gpu, DeviceKind::Cpu] {
        let (ds, w, b) = synth::linear(4000, 6, 0.05, 11);
        let mut cfg = TrainConfig::new(ModelKind::Linreg);
        cfg.normalize = NormKind::None;
        cfg.epochs = Some(20);
        cfg.batch_size = 32;
        cfg.lr = 0.05;
        cfg.device = device;
        let setup = train::setup(&cfg, ds, None).unwrap();
        let plan = StepPlan::of(&cfg, setup.total_train, 0, 1);
        let mut be = backend::open(device, None, 0, &setup.backend_init(&cfg, &plan)).unwrap();
        let out = train::train(&cfg, &setup, be.as_mut(), &SingleProcess).unwrap();
        // layout: weight [1, 6] then bias [1]
        for (j, (got, want)) in out.params.iter().zip(&w).enumerate() {
            assert!(
                (got - want).abs() < 0.02,
                "{device:?} w[{j}] {got} vs {want}"
            );
        }
        assert!(
            (out.params[6] - b).abs() < 0.02,
            "{device:?} b {} vs {b}",
            out.params[6]
        );
    }
}

/// Data that cannot fit the adapter's largest binding is fed from the host, batch by batch, and
/// trains exactly as gathered on the device (forced with a tiny DPTRAIN_DEVICE_DATA_LIMIT).
#[test]
fn host_fed_data_trains_like_device_resident_data() {
    let d = std::env::temp_dir().join(format!("dptrain-hostfed-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let run = |name: &str, limit: Option<&str>| {
        let out = d.join(name);
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_dptrain"));
        c.args([
            "train",
            "--data",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/digits.csv"),
        ])
        .args([
            "--model",
            "mlp",
            "--hidden",
            "20",
            "--epochs",
            "2",
            "--batch-size",
            "40",
            "--device",
            "gpu",
        ])
        .args(["--seed", "4", "--save", &out.display().to_string(), "-v"])
        .env("XDG_RUNTIME_DIR", std::env::temp_dir());
        if let Some(l) = limit {
            c.env("DPTRAIN_DEVICE_DATA_LIMIT", l);
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        let m = dptrain::store::modelfile::load(&out).unwrap();
        (m.flat_params(m.spec.as_ref().unwrap(), &out).unwrap(), err)
    };
    let (device, _) = run("device.safetensors", None);
    let (host, log) = run("host.safetensors", Some("1000"));
    assert!(log.contains("batches are fed from the host"), "{log}");
    let e = rel(&host, &device);
    assert!(
        e <= 1e-6,
        "host-fed and device-gathered training differ by {e:e}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// The fused small-model step (one dispatch for gather, forward, loss and gradient) trains as the
/// separate kernels do, for each loss it covers; `DPTRAIN_FUSED=off` selects the separate kernels.
#[test]
fn the_fused_small_model_step_trains_like_the_separate_kernels() {
    let d = std::env::temp_dir().join(format!("dptrain-fused-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let iris = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/iris.csv");
    for (name, data, model) in [
        ("logreg", "synth:seed:700", "logreg"),
        ("softmax", iris, "softmax"),
        ("linreg", "synth:linear:500:7", "linreg"),
    ] {
        let run = |fused: bool| {
            let out = d.join(format!("{name}-{fused}.safetensors"));
            let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_dptrain"));
            c.args(["train", "--data", data, "--model", model, "--device", "gpu"])
                .args(["--steps", "60", "--batch-size", "30", "--lr", "0.05"])
                .args(["--momentum", "0.9", "--accumulate", "2", "--seed", "3"])
                .args(["--save", &out.display().to_string()])
                .env("XDG_RUNTIME_DIR", std::env::temp_dir());
            if !fused {
                c.env("DPTRAIN_FUSED", "off");
            }
            let o = c.output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let m = dptrain::store::modelfile::load(&out).unwrap();
            m.flat_params(m.spec.as_ref().unwrap(), &out).unwrap()
        };
        let (f, s) = (run(true), run(false));
        let e = rel(&f, &s);
        assert!(
            e <= 1e-5,
            "{name}: fused and separate kernels differ by {e:e}"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}
