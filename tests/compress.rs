//! `dptrain::distributed::codec` driven through its public API the way the exchange would drive it around
//! MPI: the buffers of an all-to-all and an allgather built by hand, and PowerSGD's two
//! allreduces with the training totals appended to the first buffer.

use dptrain::distributed::codec::{
    ExchangeState, PowerSgd, Round, WireFormat, decode, segments, simulate_exchange,
    weight_matrices,
};
use dptrain::model::{Activation, ModelKind, ModelSpec};
use dptrain::rng::Rng;

fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The 16-bit exchange with the buffers MPI_Alltoallv and MPI_Allgatherv would see (counts and
/// displacements in u16 words from `segments` and `wire_range`), against `simulate_exchange`.
#[test]
fn the_exchange_wired_as_alltoallv_and_allgatherv_matches_the_simulation() {
    let mut rng = Rng::new(1);
    for fmt in [WireFormat::Bf16, WireFormat::F16, WireFormat::F32] {
        let (n, len) = (3, 10_007);
        let mut wired: Vec<ExchangeState> = (0..n).map(|j| ExchangeState::new(len, j, n)).collect();
        let mut simulated = wired.clone();
        let segs = segments(len, n);
        let counts: Vec<usize> = segs.iter().map(|s| s.len() * fmt.words()).collect();
        for _step in 0..5 {
            let grads: Vec<Vec<f32>> = (0..n).map(|_| randn(&mut rng, len)).collect();
            // each rank encodes its whole gradient
            let wires: Vec<Vec<u16>> = grads
                .iter()
                .zip(&mut wired)
                .map(|(g, s)| {
                    let mut w = Vec::new();
                    s.encode(g, fmt, &mut w);
                    w
                })
                .collect();
            // all-to-all: rank j receives, from every rank i in order, i's words of segment j
            let mut gathered = Vec::new();
            for (j, s) in wired.iter_mut().enumerate() {
                let mut recv = Vec::with_capacity(n * counts[j]);
                for w in &wires {
                    recv.extend_from_slice(&w[fmt.wire_range(&segs[j])]);
                }
                let mut owned = Vec::new();
                s.reduce_owned(&recv, fmt, &mut owned);
                assert_eq!(owned.len(), counts[j]);
                // allgather: the owned words, concatenated in rank order
                gathered.extend_from_slice(&owned);
            }
            let mut mine = vec![0f32; len];
            decode(fmt, &gathered, &mut mine);
            let sim = simulate_exchange(&grads, fmt, &mut simulated);
            assert_eq!(bits(&mine), bits(&sim[0]), "{fmt:?}");
            assert_eq!(wired, simulated);
        }
    }
}

/// PowerSGD on the MNIST MLP's layout over 2 simulated ranks, with 4 words of totals appended to
/// the P buffer as the exchange appends its loss, correct, count and stop words.
#[test]
fn powersgd_on_the_mnist_layout_carries_appended_totals() {
    let spec = ModelSpec::new(ModelKind::Mlp, 784, 10, vec![256], Activation::Relu).unwrap();
    let layout = spec.layout();
    let (len, ranks) = (layout.total, 2);
    let mats = weight_matrices(&layout);
    let mut ps: Vec<PowerSgd> = (0..ranks)
        .map(|_| PowerSgd::new(4, &mats, len, 1, 7).unwrap())
        .collect();
    let (compressed, plain) = ps[0].bytes_per_step();
    assert!(plain > 30 * compressed, "{compressed} vs {plain}");
    let mut rng = Rng::new(2);
    for step in 0..4 {
        let grads: Vec<Vec<f32>> = (0..ranks).map(|_| randn(&mut rng, len)).collect();
        let mut sends = Vec::new();
        let mut round = Round::Plain;
        for (w, (p, g)) in ps.iter_mut().zip(&grads).enumerate() {
            let mut buf = Vec::new();
            round = p.begin(g, &mut buf);
            buf.extend_from_slice(&[0.5, 1.0, 64.0, w as f32]);
            sends.push(buf);
        }
        assert_eq!(round == Round::Plain, step == 0);
        let mut sum = sends[0].clone();
        sum.iter_mut().zip(&sends[1]).for_each(|(s, b)| *s += b);
        let totals = sum[sum.len() - 4..].to_vec();
        assert_eq!(totals, [1.0, 2.0, 128.0, 1.0]);
        let outs: Vec<Vec<f32>> = if round == Round::Plain {
            vec![sum[..len].to_vec(); ranks]
        } else {
            let qs: Vec<Vec<f32>> = ps
                .iter_mut()
                .map(|p| {
                    let mut q = Vec::new();
                    p.project(&sum, &mut q);
                    q
                })
                .collect();
            let mut q_sum = qs[0].clone();
            q_sum.iter_mut().zip(&qs[1]).for_each(|(s, b)| *s += b);
            ps.iter_mut()
                .map(|p| {
                    let mut out = vec![0f32; len];
                    p.finish(&q_sum, ranks, &mut out);
                    out
                })
                .collect()
        };
        assert_eq!(bits(&outs[0]), bits(&outs[1]));
        // the biases are the exact sums
        for range in ps[0].uncompressed() {
            for i in range.clone() {
                assert_eq!(outs[0][i], grads[0][i] + grads[1][i]);
            }
        }
    }
}

/// Host time of one PowerSGD step's arithmetic (begin, project, finish on one rank) on the MNIST
/// MLP and on wide-mlp's layout, at rank 4. Prints; run with `-- --ignored --nocapture`.
#[test]
#[ignore]
fn powersgd_host_cost() {
    for (name, inputs, hidden, classes) in [
        ("mnist-mlp", 784, vec![256], 10),
        ("wide-mlp", 4096, vec![4096, 4096], 1000),
    ] {
        let spec =
            ModelSpec::new(ModelKind::Mlp, inputs, classes, hidden, Activation::Relu).unwrap();
        let layout = spec.layout();
        let len = layout.total;
        let mut p = PowerSgd::new(4, &weight_matrices(&layout), len, 0, 1).unwrap();
        let g = randn(&mut Rng::new(3), len);
        let (mut pb, mut qb, mut out) = (Vec::new(), Vec::new(), vec![0f32; len]);
        let steps = 3;
        let t = std::time::Instant::now();
        for _ in 0..steps {
            p.begin(&g, &mut pb);
            p.project(&pb, &mut qb);
            p.finish(&qb, 1, &mut out);
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
        let (c, u) = p.bytes_per_step();
        println!(
            "{name}: {len} parameters, {ms:.1} ms per step on the host, {c} bytes instead of {u} ({:.0}×)",
            u as f64 / c as f64
        );
    }
}
