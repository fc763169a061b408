//! `dptrain::distributed::codec` driven through its public API the way the exchange would drive it around
//! MPI: the buffers of an all-to-all and an allgather built by hand, and PowerSGD's two
//! allreduces with the training totals appended to the first buffer.

use std::sync::{Arc, Barrier, Mutex};

use dptrain::distributed::codec::{
    BucketCodec, CodecKind, PowerSgd, Round, WireFeedback, WireFormat, decode, for_bucket,
    segments, simulate_exchange, simulate_powersgd, weight_matrices,
};
use dptrain::distributed::comm::Communicator;
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
        let mut wired: Vec<WireFeedback> = (0..n).map(|j| WireFeedback::new(len, j, n)).collect();
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

/// Ranks as threads of one process: every collective puts each rank's words on a shared board,
/// waits for all, and reads them in rank order (sums in f32, in rank order, as MPI's
/// deterministic reductions at these sizes).
struct Threads {
    rank: usize,
    size: usize,
    board: Arc<Mutex<Vec<Vec<u32>>>>,
    barrier: Arc<Barrier>,
}

impl Threads {
    fn world(size: usize) -> Vec<Self> {
        let board = Arc::new(Mutex::new(vec![Vec::new(); size]));
        let barrier = Arc::new(Barrier::new(size));
        (0..size)
            .map(|rank| Self {
                rank,
                size,
                board: board.clone(),
                barrier: barrier.clone(),
            })
            .collect()
    }

    /// Every rank's words, in rank order.
    fn exchange(&self, mine: Vec<u32>) -> Vec<Vec<u32>> {
        self.board.lock().unwrap()[self.rank] = mine;
        self.barrier.wait();
        let all = self.board.lock().unwrap().clone();
        self.barrier.wait();
        all
    }
}

impl Communicator for Threads {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.rank
    }
    fn allreduce_sum_f32_into(&self, send: &[f32], recv: &mut [f32]) -> anyhow::Result<()> {
        let all = self.exchange(send.iter().map(|v| v.to_bits()).collect());
        for (i, r) in recv.iter_mut().enumerate() {
            *r = f32::from_bits(all[0][i]);
            for other in &all[1..] {
                *r += f32::from_bits(other[i]);
            }
        }
        Ok(())
    }
    fn allreduce_sum_f64(&self, _: &mut [f64]) -> anyhow::Result<()> {
        unimplemented!()
    }
    fn allreduce_sum_u64(&self, _: &mut [u64]) -> anyhow::Result<()> {
        unimplemented!()
    }
    fn broadcast_f32(&self, _: &mut [f32]) -> anyhow::Result<()> {
        unimplemented!()
    }
    fn all_gather_bytes(&self, _: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        unimplemented!()
    }
    fn barrier(&self) -> anyhow::Result<()> {
        self.barrier.wait();
        Ok(())
    }
    fn all_to_all_u16(
        &self,
        send: &[u16],
        send_counts: &[usize],
        recv: &mut [u16],
        recv_counts: &[usize],
    ) -> anyhow::Result<()> {
        let all = self.exchange(send.iter().map(|&w| u32::from(w)).collect());
        let mut at = 0;
        for (k, words) in all.iter().enumerate() {
            // rank k's part for this rank follows its parts for the ranks before (every rank's
            // segments have the same lengths, so its counts are this rank's)
            let start: usize = send_counts[..self.rank].iter().sum();
            for i in 0..recv_counts[k] {
                recv[at + i] = words[start + i] as u16;
            }
            at += recv_counts[k];
        }
        Ok(())
    }
    fn all_gather_u16(
        &self,
        mine: &[u16],
        counts: &[usize],
        out: &mut [u16],
    ) -> anyhow::Result<()> {
        let all = self.exchange(mine.iter().map(|&w| u32::from(w)).collect());
        let mut at = 0;
        for (k, words) in all.iter().enumerate() {
            for i in 0..counts[k] {
                out[at + i] = words[i] as u16;
            }
            at += counts[k];
        }
        Ok(())
    }
    fn start_job(
        &self,
        _: &str,
        _: u32,
        job: dptrain::distributed::comm::Job,
    ) -> anyhow::Result<dptrain::distributed::comm::PendingJob> {
        Ok(dptrain::distributed::comm::run_here(self, job))
    }
    fn abort(&self, _: i32) {}
    fn describe(&self) -> String {
        "threads".into()
    }
}

/// Each rank's codec over `grads[rank]` with `words` after it, for `steps` steps, on threads:
/// what each rank holds after each step.
fn run_codec(
    kind: CodecKind,
    matrices: &[(usize, usize, usize)],
    grads: &[Vec<Vec<f32>>],
    words: usize,
) -> Vec<Vec<Vec<f32>>> {
    let ranks = grads[0].len();
    let len = grads[0][0].len();
    let world = Threads::world(ranks);
    std::thread::scope(|s| {
        let handles: Vec<_> = world
            .into_iter()
            .map(|comm| {
                let matrices = matrices.to_vec();
                s.spawn(move || {
                    let mut codec: Box<dyn BucketCodec> =
                        for_bucket(kind, &(0..len), &matrices, comm.rank, ranks, 7, 0).unwrap();
                    grads
                        .iter()
                        .map(|step| {
                            let mut buf = step[comm.rank].clone();
                            buf.extend((0..words).map(|w| (w + comm.rank) as f32));
                            codec.encode(&buf, len);
                            codec.reduce(&comm, &mut buf, len).unwrap();
                            buf
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let per_rank: Vec<Vec<Vec<f32>>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        // by step, then rank
        (0..grads.len())
            .map(|t| per_rank.iter().map(|r| r[t].clone()).collect())
            .collect()
    })
}

/// A codec over one bucket of the whole gradient (`--bucket-mb 0`) computes exactly the
/// whole-gradient exchange the builds before the codecs ran: the 16-bit wire is
/// `simulate_exchange`, PowerSGD is `simulate_powersgd`, step after step (error feedback
/// included), bit for bit, and the totals' words after the gradient are their exact f32 sums.
#[test]
fn one_bucket_codecs_are_the_whole_gradient_exchange() {
    let spec = ModelSpec::new(ModelKind::Mlp, 64, 10, vec![32], Activation::Relu).unwrap();
    let layout = spec.layout();
    let (len, ranks, steps) = (layout.total, 3, 4);
    let mats = weight_matrices(&layout);
    let mut rng = Rng::new(5);
    let grads: Vec<Vec<Vec<f32>>> = (0..steps)
        .map(|_| (0..ranks).map(|_| randn(&mut rng, len)).collect())
        .collect();
    let words = 4;
    let check_words = |held: &[f32]| {
        for w in 0..words {
            let exact: f32 = (0..ranks).map(|r| (w + r) as f32).sum();
            assert_eq!(held[len + w], exact);
        }
    };
    for fmt in [WireFormat::Bf16, WireFormat::F16] {
        let got = run_codec(CodecKind::Wire(fmt), &mats, &grads, words);
        let mut states: Vec<WireFeedback> = (0..ranks)
            .map(|j| WireFeedback::new(len, j, ranks))
            .collect();
        for (t, step) in grads.iter().enumerate() {
            let want = simulate_exchange(step, fmt, &mut states);
            for r in 0..ranks {
                assert_eq!(
                    bits(&got[t][r][..len]),
                    bits(&want[r]),
                    "{fmt:?} step {t} rank {r}"
                );
                check_words(&got[t][r]);
            }
        }
    }
    for warmup in [0, 2] {
        let kind = CodecKind::PowerSgd { rank: 2, warmup };
        let got = run_codec(kind, &mats, &grads, words);
        let mut states: Vec<PowerSgd> = (0..ranks)
            .map(|_| PowerSgd::new(2, &mats, len, warmup, 7).unwrap())
            .collect();
        for (t, step) in grads.iter().enumerate() {
            let want = simulate_powersgd(step, &mut states);
            for r in 0..ranks {
                assert_eq!(
                    bits(&got[t][r][..len]),
                    bits(&want[r]),
                    "powersgd step {t} rank {r}"
                );
                check_words(&got[t][r]);
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
