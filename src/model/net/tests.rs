use super::layers::conv2d::Conv2d;
use super::layers::linear::Linear;
use super::layers::pool::{Pool2d, PoolOp};
use super::presets::{lenet5, resnet};
use super::*;

fn conv(out: usize, kernel: usize, stride: usize, padding: usize, bias: bool) -> Op {
    Op::Conv2d(Conv2d {
        out,
        kernel,
        stride,
        padding,
        bias,
    })
}

/// A small net with every layer type: odd channels, a 7×7 input, stride 2, padding 1, a residual
/// add whose skip path is a 1×1 convolution, max and average pooling, BatchNorm, and linear.
fn every_layer(input: Shape) -> Net {
    let mut b = Builder::new(input);
    let x = b.then("0", conv(3, 3, 2, 1, true)).unwrap();
    b.then("1", Op::BatchNorm2d).unwrap();
    b.then("2", Op::Relu).unwrap();
    let main = b.then("3", conv(5, 3, 1, 1, false)).unwrap();
    let skip = b.add("4", conv(5, 1, 1, 0, false), &[x]).unwrap();
    b.add("5", Op::Add, &[main, skip]).unwrap();
    b.then(
        "6",
        Op::Pool(PoolOp::Max(Pool2d {
            kernel: 2,
            stride: Some(1),
            padding: 1,
        })),
    )
    .unwrap();
    b.then(
        "7",
        Op::Pool(PoolOp::Avg(Pool2d {
            kernel: 2,
            stride: None,
            padding: 0,
        })),
    )
    .unwrap();
    b.then("8", Op::BatchNorm2d).unwrap();
    b.then("9", Op::Pool(PoolOp::Global)).unwrap();
    b.then("10", Op::Flatten).unwrap();
    b.then("11", Op::Linear(Linear::new(4))).unwrap();
    b.finish().unwrap()
}

fn randn(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.normal()).collect()
}

/// L = Σ w·z over the logits, for fixed random w: its gradient at the logits is w.
fn check_against_finite_differences(net: &Net, n: usize) {
    let mut rng = Rng::new(7);
    let x =
        Array2::from_shape_vec((n, net.input.len()), randn(&mut rng, n * net.input.len())).unwrap();
    let out = net.nodes.last().unwrap().out.len();
    let w = Array2::from_shape_vec((n, out), randn(&mut rng, n * out)).unwrap();
    let theta: Vec<f64> = net
        .init(3)
        .iter()
        .map(|&v| f64::from(v) + 0.1 * rng.normal())
        .collect();
    let loss = |p: &[f64]| {
        let t = net.forward(p, x.view(), Mode::Train(None)).unwrap();
        (t.outs.last().unwrap() * &w).sum()
    };
    let trace = net.forward(&theta, x.view(), Mode::Train(None)).unwrap();
    let mut g = vec![0.0; theta.len()];
    net.backward(&theta, x.view(), &trace, w.clone(), &mut g, None)
        .unwrap();
    let h = 1e-6;
    let mut worst: f64 = 0.0;
    for i in 0..net.trainable {
        let mut p = theta.clone();
        p[i] += h;
        let up = loss(&p);
        p[i] -= 2.0 * h;
        let down = loss(&p);
        let fd = (up - down) / (2.0 * h);
        worst = worst.max((fd - g[i]).abs() / (1.0 + fd.abs()));
    }
    assert!(worst < 1e-6, "worst relative gradient error {worst:e}");
    assert!(g[net.trainable..].iter().all(|&v| v == 0.0));
}

#[test]
fn every_layer_matches_central_finite_differences() {
    check_against_finite_differences(&every_layer(Shape::image(3, 7, 7)), 3);
    check_against_finite_differences(&every_layer(Shape::image(1, 13, 13)), 2);
}

#[test]
fn lenet5_and_resnet20_match_finite_differences_on_a_few_parameters() {
    // the whole nets are too large for every parameter; the small net above covers each layer,
    // this covers their wiring (a different seed each sample of parameters)
    for net in [
        lenet5(presets::LENET5_INPUT, 10).unwrap(),
        resnet(8, Shape::image(3, 8, 8), 3).unwrap(),
    ] {
        let mut rng = Rng::new(5);
        let n = 2;
        let x = Array2::from_shape_vec((n, net.input.len()), randn(&mut rng, n * net.input.len()))
            .unwrap();
        let out = net.nodes.last().unwrap().out.len();
        let w = Array2::from_shape_vec((n, out), randn(&mut rng, n * out)).unwrap();
        let theta: Vec<f64> = net.init(1).iter().map(|&v| f64::from(v)).collect();
        let loss = |p: &[f64]| {
            let t = net.forward(p, x.view(), Mode::Train(None)).unwrap();
            (t.outs.last().unwrap() * &w).sum()
        };
        let trace = net.forward(&theta, x.view(), Mode::Train(None)).unwrap();
        let mut g = vec![0.0; theta.len()];
        net.backward(&theta, x.view(), &trace, w.clone(), &mut g, None)
            .unwrap();
        for t in &net.layout.tensors {
            if t.offset >= net.trainable {
                continue;
            }
            // the first and last value of every trainable tensor
            for i in [t.offset, t.offset + t.len() - 1] {
                let mut p = theta.clone();
                p[i] += 1e-6;
                let up = loss(&p);
                p[i] -= 2e-6;
                let fd = (up - loss(&p)) / 2e-6;
                assert!(
                    (fd - g[i]).abs() <= 1e-5 * (1.0 + fd.abs()),
                    "{}[{}]: finite difference {fd}, backward {}",
                    t.name,
                    i - t.offset,
                    g[i]
                );
            }
        }
    }
}

/// Two "ranks" with half the batch each and their statistics summed equal one rank with the
/// whole batch: SyncBatchNorm's arithmetic, without MPI.
#[test]
fn batch_norm_statistics_summed_over_halves_equal_the_whole_batch() {
    struct Pair(
        std::sync::mpsc::Sender<Vec<f64>>,
        std::sync::mpsc::Receiver<Vec<f64>>,
    );
    impl StatSum for Pair {
        fn sum(&mut self, v: &mut [f64]) -> anyhow::Result<()> {
            self.0.send(v.to_vec())?;
            let other = self.1.recv()?;
            v.iter_mut().zip(other).for_each(|(a, b)| *a += b);
            Ok(())
        }
    }
    let net = resnet(8, Shape::image(3, 6, 5), 4).unwrap();
    let mut rng = Rng::new(11);
    let n = 6;
    let x =
        Array2::from_shape_vec((n, net.input.len()), randn(&mut rng, n * net.input.len())).unwrap();
    let w = Array2::from_shape_vec((n, 4), randn(&mut rng, n * 4)).unwrap();
    let theta: Vec<f64> = net.init(2).iter().map(|&v| f64::from(v)).collect();
    let whole = {
        let t = net.forward(&theta, x.view(), Mode::Train(None)).unwrap();
        let mut g = vec![0.0; theta.len()];
        net.backward(&theta, x.view(), &t, w.clone(), &mut g, None)
            .unwrap();
        let mut th = theta.clone();
        net.update_running(&mut th, &t);
        (t.outs.last().unwrap().clone(), g, th)
    };
    let (s0, r1) = std::sync::mpsc::channel();
    let (s1, r0) = std::sync::mpsc::channel();
    let halves = [(0..3, Pair(s0, r0)), (3..6, Pair(s1, r1))];
    let results: Vec<_> = std::thread::scope(|scope| {
        let hs: Vec<_> = halves
            .into_iter()
            .map(|(rows, mut pair)| {
                let (net, theta, x, w) = (&net, &theta, &x, &w);
                scope.spawn(move || {
                    let xs = x.slice(ndarray::s![rows.clone(), ..]);
                    let ws = w.slice(ndarray::s![rows, ..]).to_owned();
                    let t = net
                        .forward(theta, xs, Mode::Train(Some(&mut pair)))
                        .unwrap();
                    let mut g = vec![0.0; theta.len()];
                    net.backward(theta, xs, &t, ws, &mut g, Some(&mut pair))
                        .unwrap();
                    let mut th = theta.clone();
                    net.update_running(&mut th, &t);
                    (t.outs.last().unwrap().clone(), g, th)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * (1.0 + a.abs());
    for (k, (z, _, th)) in results.iter().enumerate() {
        for (a, b) in z
            .iter()
            .zip(whole.0.slice(ndarray::s![3 * k..3 * k + 3, ..]))
        {
            assert!(close(*a, *b), "logits {a} against {b}");
        }
        for (a, b) in th.iter().zip(&whole.2) {
            assert!(close(*a, *b), "running statistics {a} against {b}");
        }
    }
    for i in 0..net.trainable {
        let sum = results[0].1[i] + results[1].1[i];
        assert!(
            close(sum, whole.1[i]),
            "gradient {i}: {sum} against {}",
            whole.1[i]
        );
    }
}

#[test]
fn presets_have_pytorch_names_shapes_and_sizes() {
    let l = lenet5(presets::LENET5_INPUT, 10).unwrap();
    assert_eq!(
        l.trainable, 61_706,
        "LeNet-5's parameter count, as PyTorch counts it"
    );
    assert_eq!(l.layout.tensors[0].name, "0.weight");
    assert_eq!(l.layout.tensors[0].shape, vec![6, 1, 5, 5]);
    let r = resnet(20, Shape::image(3, 32, 32), 10).unwrap();
    assert_eq!(
        r.trainable, 272_474,
        "ResNet-20's parameter count, as PyTorch counts it"
    );
    let names: Vec<&str> = r.layout.tensors.iter().map(|t| t.name.as_str()).collect();
    assert!(names.contains(&"6.short.1.running_var"), "{names:?}");
    assert!(names.contains(&"14.weight"), "{names:?}");
    assert_eq!(r.nodes.last().unwrap().out, Shape::rows(10));
    let mut off = 0;
    for t in &r.layout.tensors {
        assert_eq!(t.offset, off, "{}", t.name);
        off += t.len();
    }
    assert_eq!(off, r.layout.total);
    assert!(resnet(21, Shape::image(3, 32, 32), 10).is_err());
    let e = lenet5(Shape::image(3, 32, 32), 10).unwrap_err();
    assert!(e.contains("takes 1×28×28"), "{e}");
}

#[test]
fn shapes_that_do_not_fit_are_named_by_layer() {
    let mut b = Builder::new(Shape::image(1, 4, 4));
    let e = b.then("0", conv(2, 5, 1, 0, true)).unwrap_err();
    assert!(e.starts_with("layer 0 (conv2d): a 5×5 kernel"), "{e}");
    let mut b = Builder::new(Shape::image(2, 4, 4));
    let e = b.then("0", Op::Linear(Linear::new(3))).unwrap_err();
    assert!(e.contains("add a flatten"), "{e}");
    let mut b = Builder::new(Shape::image(2, 4, 4));
    b.then("0", Op::Flatten).unwrap();
    let mut l = Linear::new(3);
    l.inputs = Some(30);
    let e = b.then("1", Op::Linear(l)).unwrap_err();
    assert!(e.contains("in = 30, but its input has 32 features"), "{e}");
}
