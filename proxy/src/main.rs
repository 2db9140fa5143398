use clap::Parser;

// No `#[tokio::main]`: `--worker-threads` picks the runtime, and it is read
// before there is one (`command::main`).
fn main() -> std::process::ExitCode {
    weft_proxy::command::main(weft_proxy::command::Args::parse())
}
