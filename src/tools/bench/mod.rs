//! `dptrain bench`: the allreduce (`comm`), whole training steps (`step`) and the product kernels
//! (`matmul`). The scaling model is `tools/scaling`; the start-up transport probe is
//! `distributed/probe.rs`.

pub mod comm;
pub mod matmul;
pub mod step;

pub use comm::*;
pub use matmul::*;
pub use step::*;
