//! Commands that never train a model: benchmarks, the scaling model, plots, and applying a saved
//! model (predict, eval, show).
pub mod apply;
pub mod bench;
pub mod plot;
pub mod scaling;
