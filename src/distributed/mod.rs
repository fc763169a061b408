//! What crosses ranks: the communicator (one process or MPI, with its watchdog and
//! communication thread), the gradient exchange and its codecs, agreement between ranks, the
//! stop signals every rank acts on together, and injected faults.
pub mod agree;
pub mod codec;
pub mod comm;
pub mod exchange;
pub mod fault;
pub mod gather;
pub mod probe;
pub mod stop;
