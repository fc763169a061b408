//! Evaluation sharded over the ranks. What a run reports (each epoch's figures, the step and
//! validation records, the observer) are plain types of `observe/events.rs`.

use dptrain_kernels::reduce_stats::Totals;

use crate::backend::{Backend, Split};
use crate::distributed::comm::Communicator;
use crate::distributed::exchange::sum_totals;
pub use crate::observe::events::{
    EpochReport, EvalReport, Observer, Quiet, StepInfo, StepRecord, ValRecord,
};

/// Evaluate the backend's current parameters on a whole split, sharded across ranks.
pub fn evaluate(
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
    split: Split,
    n: usize,
    regression: bool,
) -> anyhow::Result<EvalReport> {
    evaluate_rows(backend, comm, split, 0..n, regression)
}

/// Evaluate the backend's current parameters on the rows `rows` of a split, sharded across ranks.
pub fn evaluate_rows(
    backend: &mut dyn Backend,
    comm: &dyn Communicator,
    split: Split,
    rows: std::ops::Range<usize>,
    regression: bool,
) -> anyhow::Result<EvalReport> {
    let (r, size) = (comm.rank(), comm.size());
    let n = rows.len();
    let range = (rows.start + n * r / size)..(rows.start + n * (r + 1) / size);
    let local = if range.is_empty() {
        Totals::default()
    } else {
        backend.evaluate(split, range)?
    };
    Ok(EvalReport::from_totals(
        &sum_totals(comm, &local)?,
        regression,
    ))
}
