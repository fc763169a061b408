//! dptrain: data-parallel training with WGSL gradients on every GPU and an MPI allreduce between ranks.
pub mod data;
pub mod rng;
pub mod backend;
pub mod model;
pub mod optim;
pub mod modelfile;
pub mod comm;
pub mod train;
pub mod cli;
