//! dptrain: data-parallel training with WGSL gradients on every GPU and an MPI allreduce between ranks.
//!
//! One folder per concern. The dependency order, from the top down (a module imports only modules
//! to its right; `docs/ARCHITECTURE.md` explains it and `tests/architecture.rs` keeps it true):
//!
//! cli → tools → train → distributed → observe → store → backend → model → optim → data → limits → rng

/// The compute behind the step's phases: CPU (ndarray) and GPU (wgpu).
pub mod backend;
/// Arguments → calls, one file per command.
pub mod cli;
/// Datasets: CSV, IDX, synthetic; splits, normalisers, fingerprints.
pub mod data;
/// What crosses ranks: the communicator, the exchange and its codecs, agreement, gather, stop, faults.
pub mod distributed;
/// Sizes and values checked before anything is allocated.
pub mod limits;
/// Model specs, layers and their CPU mathematics, the parameter layout.
pub mod model;
/// What a run emits: records, progress, TensorBoard, the metrics reader, the trace.
pub mod observe;
/// Optimizer kinds, settings and schedules.
pub mod optim;
/// The seeded counter-based random numbers every rank draws alike.
pub mod rng;
/// Files that outlive the run: atomic writes, model files, checkpoints, output checks, the lock.
pub mod store;
/// Commands that never train: bench, scaling, plot, predict/eval/show.
pub mod tools;
/// The training application, the loop and the step.
pub mod train;
