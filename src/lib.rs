//! dptrain: data-parallel training with WGSL gradients on every GPU and an MPI allreduce between ranks.
pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod comm;
pub mod consistency;
pub mod data;
pub mod fault;
pub mod limits;
pub mod model;
pub mod modelfile;
pub mod optim;
pub mod outputs;
pub mod rng;
pub mod stop;
pub mod train;
