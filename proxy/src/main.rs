use clap::Parser;
// Defines `exp` and `pow`, so the sidecar does not load libm (its memory).
use weft_libm_shim as _;

// No `#[tokio::main]`: `--worker-threads` picks the runtime, and it is read
// before there is one (`command::main`).
fn main() -> std::process::ExitCode {
    // Before anything allocates: a tunnel's buffers are reused, not faulted back in.
    weft_proxy::heap::keep_freed_memory();
    weft_proxy::command::main(weft_proxy::command::Args::parse())
}
