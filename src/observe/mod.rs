//! What a run emits: metric records (JSONL/CSV), the progress bar, TensorBoard event files and the
//! Chrome-trace timeline.
pub mod events;
pub mod metrics;
pub mod progress;
pub mod record;
pub mod tensorboard;
pub mod trace;
