//! The autotuner. For each distinct product of a training plan, every eligible variant runs on the
//! real shape on this device; its output is compared on the device with the reference kernel's
//! (64-tile, fp32, unsplit) through `max_diff`; a variant that cannot be built on this adapter or
//! gives wrong numbers is rejected with its reason; the ones that pass are timed with timestamp
//! queries, and the fastest is kept. (cubecl's matmul autotuner and llm.c's dev/cuda kernels, each
//! validated before it is timed, work the same way.)

use std::time::Instant;

use crate::matmul::{At, Choice, Epilogue, Matmul, MatmulArgs, Variant};
use crate::max_diff::MaxDiff;
use crate::{Dispatch, F32, GpuContext, KernelError};

/// One distinct product of a plan: shape, form, epilogue and precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Product {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub trans_a: bool,
    pub trans_b: bool,
    pub epilogue: Epilogue,
    /// Inputs rounded to f16 (`--precision f16`).
    pub f16: bool,
}

impl Product {
    /// "1024x1024x784 NT BiasRelu f32": the key of caches, logs and checkpoints.
    pub fn name(&self) -> String {
        format!(
            "{}x{}x{} {}{} {:?} {}",
            self.m,
            self.n,
            self.k,
            if self.trans_a { 'T' } else { 'N' },
            if self.trans_b { 'T' } else { 'N' },
            self.epilogue,
            if self.f16 { "f16" } else { "f32" }
        )
    }

    /// The product a `name` wrote.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split(' ');
        let dims: Vec<u64> = it
            .next()?
            .split('x')
            .map(|d| d.parse().ok())
            .collect::<Option<_>>()?;
        let form = it.next()?.as_bytes();
        let ep = it.next()?;
        let precision = it.next()?;
        if dims.len() != 3 || form.len() != 2 || it.next().is_some() {
            return None;
        }
        Some(Product {
            m: dims[0],
            n: dims[1],
            k: dims[2],
            trans_a: form[0] == b'T',
            trans_b: form[1] == b'T',
            epilogue: Epilogue::ALL.into_iter().find(|e| format!("{e:?}") == ep)?,
            f16: match precision {
                "f16" => true,
                "f32" => false,
                _ => return None,
            },
        })
    }

    /// The product whose tuned choice this one shares: accumulating into C costs what writing it
    /// does, so both tune as one.
    pub fn tuned_as(&self) -> Product {
        Product {
            epilogue: match self.epilogue {
                Epilogue::Accumulate => Epilogue::None,
                e => e,
            },
            ..*self
        }
    }

    /// The choice without tuning.
    pub fn default_choice(&self) -> Choice {
        let mut c = Choice::default_for(self.m, self.n, self.f16);
        // few output tiles and a long K leave most of a large GPU idle: split K, and use the
        // skinny tiles for outputs of a few rows or columns
        if !self.f16 && self.m.min(self.n) <= 16 {
            c.variant = Variant::Skinny;
        }
        let tiles = self.m.div_ceil(64) * self.n.div_ceil(64);
        if tiles < 64 && self.k >= 2048 {
            c.splits = (self.k / 1024).min(64 / tiles.max(1)).max(1) as u32;
        }
        c
    }

    /// The tolerance of the on-device check: max |x − y| / max |y|.
    pub fn tolerance(&self) -> f32 {
        if self.f16 { 2e-2 } else { 1e-4 }
    }
}

/// The variants and splits worth trying for `p` on this adapter.
pub fn candidates(ctx: &GpuContext, p: &Product) -> Vec<Choice> {
    let variants: &[Variant] = if p.f16 {
        &[Variant::Half, Variant::Coop]
    } else if p.m.min(p.n) <= 64 {
        &[Variant::Tile64, Variant::Skinny]
    } else {
        &[Variant::Tile64, Variant::Tile128]
    };
    let mut out = Vec::new();
    for &v in variants {
        if p.f16 && !ctx.features.contains(v.features()) {
            // still a candidate: the tuner reports why it was rejected
            out.push(Choice::new(v, 1));
            continue;
        }
        let (tm, tn) = match v {
            Variant::Tile64 => (64, 64),
            Variant::Skinny if p.n <= p.m => (64, 16),
            Variant::Skinny => (16, 64),
            _ => (128, 128),
        };
        let tiles = p.m.div_ceil(tm) * p.n.div_ceil(tn);
        out.push(Choice::new(v, 1));
        // split K only where the output alone cannot fill a large GPU
        let mut s = 2u64;
        while tiles * s <= 2048 && p.k / s >= 128 && s <= 256 {
            out.push(Choice::new(v, s as u32));
            s *= 2;
        }
    }
    out
}

/// One candidate's fate.
#[derive(Clone, Debug, PartialEq)]
pub struct Trial {
    pub choice: Choice,
    /// Seconds per product, or why the candidate was rejected.
    pub result: Result<f64, String>,
}

/// What tuning one product found.
#[derive(Clone, Debug, PartialEq)]
pub struct Tuned {
    pub product: Product,
    pub best: Choice,
    pub trials: Vec<Trial>,
}

/// Buffers and kernels reused across products.
pub struct Tuner {
    mm: Matmul,
    md: MaxDiff,
    noise: Option<wgpu::Buffer>,
    c_ref: Option<wgpu::Buffer>,
    c_try: Option<wgpu::Buffer>,
    /// Timed runs of each candidate (the fastest counts).
    pub repeats: usize,
}

fn grow(
    ctx: &GpuContext,
    slot: &mut Option<wgpu::Buffer>,
    label: &str,
    elems: u64,
) -> Result<wgpu::Buffer, KernelError> {
    match slot {
        Some(b) if b.size() >= F32.bytes(elems) => Ok(b.clone()),
        _ => {
            let b = ctx.array(label, F32, elems)?;
            *slot = Some(b.clone());
            Ok(b)
        }
    }
}

impl Tuner {
    pub fn new(ctx: &GpuContext) -> Result<Self, KernelError> {
        Ok(Self {
            mm: Matmul::new(ctx)?,
            md: MaxDiff::new(ctx)?,
            noise: None,
            c_ref: None,
            c_try: None,
            repeats: 3,
        })
    }

    /// Seeded values in [-1, 1) on the device, at least `elems` of them.
    fn noise(&mut self, ctx: &GpuContext, elems: u64) -> Result<wgpu::Buffer, KernelError> {
        if let Some(b) = &self.noise
            && b.size() >= F32.bytes(elems)
        {
            return Ok(b.clone());
        }
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let v: Vec<f32> = (0..elems)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
            })
            .collect();
        let b = ctx.upload("tuning noise", &v)?;
        self.noise = Some(b.clone());
        Ok(b)
    }

    /// Run `choice` on `p` into `c` (first reset to the noise, for the accumulating epilogue).
    fn run(
        &mut self,
        ctx: &GpuContext,
        p: &Product,
        choice: Choice,
        c: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>, KernelError> {
        let noise = self
            .noise
            .clone()
            .ok_or(KernelError::Device("no noise".into()))?;
        let call = self.mm.prepare_with(
            ctx,
            &MatmulArgs {
                m: p.m,
                n: p.n,
                k: p.k,
                trans_a: p.trans_a,
                trans_b: p.trans_b,
                epilogue: p.epilogue,
                a: At::start(&noise),
                b: At::start(&noise),
                c: At::start(c),
                bias: Some(At::start(&noise)),
                aux: Some(At::start(&noise)),
            },
            choice,
        )?;
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&noise, 0, c, 0, F32.bytes(p.m * p.n));
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            call.record(&mut pass);
        }
        ctx.queue.submit([enc.finish()]);
        ctx.wait()?;
        Ok(call.dispatches)
    }

    /// Seconds of one run of `ds` (the fastest of `repeats`): GPU timestamps where the adapter has
    /// them, else the wall clock around a submission and its wait.
    fn time(&self, ctx: &GpuContext, ds: &[Dispatch]) -> Result<f64, KernelError> {
        let mut best = f64::INFINITY;
        for _ in 0..self.repeats.max(1) {
            let list: Vec<(&Dispatch, u32)> = ds.iter().map(|d| (d, 0)).collect();
            let t = match ctx.time_dispatches(&list)? {
                Some(v) => v.iter().sum(),
                None => {
                    let t0 = Instant::now();
                    let refs: Vec<&Dispatch> = ds.iter().collect();
                    crate::run(ctx, &refs);
                    ctx.wait()?;
                    t0.elapsed().as_secs_f64()
                }
            };
            best = best.min(t);
        }
        Ok(best)
    }

    /// Verify and time every candidate on `p`; keep the fastest that is right.
    pub fn tune(
        &mut self,
        ctx: &GpuContext,
        p: &Product,
        candidates: &[Choice],
    ) -> Result<Tuned, KernelError> {
        let mn = p.m * p.n;
        let elems = (p.m * p.k).max(p.k * p.n).max(mn).max(p.n);
        self.noise(ctx, elems)?;
        let c_ref = grow(ctx, &mut self.c_ref, "tuning reference", mn)?;
        let c_try = grow(ctx, &mut self.c_try, "tuning candidate", mn)?;
        let reference = Choice::new(Variant::Tile64, 1);
        self.run(ctx, p, reference, &c_ref)?;
        let mut trials = Vec::new();
        for &choice in candidates {
            let result = match self.run(ctx, p, choice, &c_try) {
                Err(e) => Err(format!("cannot run here: {e}")),
                Ok(ds) => {
                    ctx.check()?;
                    let (diff, scale) = self.md.run(ctx, mn, (&c_try, 0), (&c_ref, 0))?;
                    let rel = diff / scale.max(f32::MIN_POSITIVE);
                    if rel <= p.tolerance() {
                        self.time(ctx, &ds).map_err(|e| format!("cannot time: {e}"))
                    } else {
                        Err(format!(
                            "wrong numbers: max |C − C_ref| / max |C_ref| = {rel:.2e} > {:.0e}",
                            p.tolerance()
                        ))
                    }
                }
            };
            match &result {
                // a variant this adapter lacks the features for was never eligible
                Err(why) if !ctx.features.contains(choice.variant.features()) => {
                    tracing::info!("autotune {}: {} skipped: {why}", p.name(), choice.name())
                }
                Err(why) => {
                    tracing::warn!("autotune {}: {} rejected: {why}", p.name(), choice.name())
                }
                Ok(_) => {}
            }
            trials.push(Trial { choice, result });
        }
        let best = trials
            .iter()
            .filter_map(|t| t.result.as_ref().ok().map(|s| (t.choice, *s)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or_else(|| p.default_choice(), |(c, _)| c);
        Ok(Tuned {
            product: *p,
            best,
            trials,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::ctx;

    fn product(m: u64, n: u64, k: u64, epilogue: Epilogue, f16: bool) -> Product {
        Product {
            m,
            n,
            k,
            trans_a: true,
            trans_b: false,
            epilogue,
            f16,
        }
    }

    #[test]
    fn every_candidate_runs_right_and_a_wrong_variant_is_rejected() {
        let ctx = ctx();
        let mut t = Tuner::new(&ctx).unwrap();
        t.repeats = 1;
        for p in [
            product(10, 70, 300, Epilogue::None, false),
            product(70, 130, 33, Epilogue::Accumulate, false),
        ] {
            let mut cands = candidates(&ctx, &p);
            assert!(cands.len() >= 2, "{cands:?}");
            cands.push(Choice::new(Variant::Wrong, 1));
            let tuned = t.tune(&ctx, &p, &cands).unwrap();
            for trial in &tuned.trials {
                match trial.choice.variant {
                    Variant::Wrong => {
                        let why = trial.result.as_ref().unwrap_err();
                        assert!(why.contains("wrong numbers"), "{why}");
                    }
                    _ => assert!(trial.result.is_ok(), "{}: {trial:?}", p.name()),
                }
            }
            assert_ne!(tuned.best.variant, Variant::Wrong);
        }
    }

    #[test]
    fn f16_candidates_pass_within_their_tolerance_or_say_why_not() {
        let ctx = ctx();
        let mut t = Tuner::new(&ctx).unwrap();
        t.repeats = 1;
        let p = product(130, 70, 200, Epilogue::BiasRelu, true);
        let tuned = t.tune(&ctx, &p, &candidates(&ctx, &p)).unwrap();
        for trial in &tuned.trials {
            let runs = ctx.features.contains(trial.choice.variant.features());
            match (&trial.result, runs) {
                (Ok(_), true) => {}
                // lavapipe has no cooperative matrices: refused before anything runs
                (Err(why), false) => assert!(why.contains("cannot run here"), "{why}"),
                other => panic!("{}: {other:?}", trial.choice.name()),
            }
        }
        assert!(tuned.best.variant.is_f16());
    }

    #[test]
    fn products_round_trip_through_their_names() {
        for ep in Epilogue::ALL {
            for f16 in [false, true] {
                let p = Product {
                    trans_b: true,
                    ..product(3, 70, 9, ep, f16)
                };
                assert_eq!(Product::parse(&p.name()), Some(p));
            }
        }
        assert_eq!(Product::parse("3x4 NN None f32"), None);
    }

    #[test]
    fn default_choices_split_long_k_over_few_tiles() {
        let logreg_weight_gradient = product(1, 2, 65536, Epilogue::None, false);
        let c = logreg_weight_gradient.default_choice();
        assert_eq!(c.variant, Variant::Skinny);
        assert!(c.splits >= 32, "{c:?}");
        let big = product(1024, 1024, 1024, Epilogue::None, false).default_choice();
        assert_eq!(big, Choice::new(Variant::Tile128, 1));
    }
}
