//! Files that outlive the run: the atomic writer, model files, checkpoints, output checks and the
//! checkpoint folder's lock.
pub mod atomic;
pub mod checkpoint;
pub mod modelfile;
pub mod outputs;
