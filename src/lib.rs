//! dptrain: data-parallel training with WGSL gradients on every GPU and an MPI allreduce between ranks.
//!
//! One folder per concern, listed from the top of the dependency order down: a module imports
//! only modules below it (`docs/ARCHITECTURE.md`; `tests/architecture.rs` keeps it true).
pub mod backend; // the compute behind the step's phases: CPU (ndarray) and GPU (wgpu)
pub mod cli; // arguments → calls, one file per command
pub mod data; // datasets: CSV, IDX, synthetic; splits, normalisers, fingerprints
pub mod distributed; // what crosses ranks: comm, exchange and codecs, agreement, gather, stop, fault
pub mod limits; // sizes and values checked before anything is allocated
pub mod model; // model specs, layers and their CPU mathematics, the parameter layout
pub mod observe; // what a run emits: records, progress, TensorBoard, metrics reader, trace
pub mod optim; // optimizer kinds, settings and schedules
pub mod rng;
pub mod store; // files that outlive the run: atomic writes, model files, checkpoints, output checks, lock
pub mod tools; // commands that never train: bench, scaling, plot, predict/eval/show
pub mod train; // the loop and the step // the seeded counter-based random numbers every rank draws alike
