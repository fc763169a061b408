//! The step's totals as they travel beside the gradients: four f32 words after the first
//! bucket, summed over the ranks like the gradients, packed and unpacked here only.

use dptrain_kernels::reduce_stats::Totals;

/// What travels after the first bucket's gradients: the step's training totals and whether the
/// rank was asked to stop (summed over the ranks: how many were), so that all stop at the same
/// step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTotals {
    pub totals: Totals,
    pub stop: bool,
}

impl StepTotals {
    /// Words on the wire: loss sum, correct, count, stop requests.
    pub const WORDS: usize = 4;

    /// The words, in f32 (counts are exact below 2²⁴ per step, a batch's range).
    pub fn pack(&self) -> [f32; Self::WORDS] {
        [
            self.totals.loss_sum as f32,
            self.totals.correct as f32,
            self.totals.count as f32,
            f32::from(u8::from(self.stop)),
        ]
    }

    /// The totals of summed words (the first [`StepTotals::WORDS`] of `w`; zeros when short).
    pub fn unpack(w: &[f32]) -> Self {
        let at = |i: usize| w.get(i).copied().unwrap_or(0.0);
        Self {
            totals: Totals {
                loss_sum: f64::from(at(0)),
                correct: at(1) as u64,
                count: at(2) as u64,
            },
            stop: at(3) > 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_round_trip_and_sum_as_words() {
        let a = StepTotals {
            totals: Totals {
                loss_sum: 12.5,
                correct: 30,
                count: 64,
            },
            stop: true,
        };
        let b = StepTotals {
            totals: Totals {
                loss_sum: 2.25,
                correct: 7,
                count: 8,
            },
            stop: false,
        };
        assert_eq!(StepTotals::unpack(&a.pack()), a);
        let sum: Vec<f32> = a.pack().iter().zip(b.pack()).map(|(x, y)| x + y).collect();
        let s = StepTotals::unpack(&sum);
        assert_eq!(
            (s.totals.loss_sum, s.totals.correct, s.totals.count),
            (14.75, 37, 72)
        );
        assert!(s.stop);
    }
}
