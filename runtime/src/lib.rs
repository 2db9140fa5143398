//! weft-runtime: the process plumbing every weft daemon and tool shares.
//!
//! - [`serve`]: the one accept loop behind every TCP listener (back-off on
//!   accept errors, TCP_NODELAY, a task per connection, drain, optional cap).
//! - [`workers`]: thread-per-core (connections spread over N current-thread runtimes).
//! - [`drain`]: graceful drain on shutdown (stop accepting, let connections finish).
//! - [`tls_accept`]: the TLS handshake of a server connection and what it
//!   proved about the peer (SPIFFE ID), or a refusal reason for metrics.
//! - [`signal`]: waiting for SIGTERM / Ctrl-C.
//! - [`logging`]: `tracing` set-up on stderr (human or JSON).
//! - [`exit`]: a fatal error becomes one message and an exit code.
//! - [`state_lock`]: one process per state directory.
//! - [`ports`]: loopback ports for child processes.
//! - [`process`]: a child weft process (spawn, wait until ready, stop).

pub mod drain;
pub mod exit;
pub mod logging;
pub mod ports;
pub mod process;
pub mod serve;
pub mod signal;
pub mod state_lock;
pub mod tls_accept;
pub mod workers;

pub use drain::{Drain, DrainTrigger};
pub use exit::exit_code;
pub use logging::init_logging;
pub use serve::serve;
pub use signal::shutdown_signal;
