use clap::Parser;

// No `#[tokio::main]`: `--worker-threads` picks the runtime, and it is read
// before there is one.
fn main() -> std::process::ExitCode {
    let args = weft_proxy::command::Args::parse();
    weft_runtime::init_logging(&args.log_format);
    let threads = args.worker_threads;
    let runtime = match threads.runtime() {
        Ok(rt) => rt,
        Err(e) => {
            let e = weft_proxy::command::RunError::Runtime { threads: threads.resolve(), source: e };
            return weft_runtime::exit_code(Err(e));
        }
    };
    let workers = runtime.handle().metrics().num_workers();
    let flavor = match runtime.handle().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => "current-thread",
        _ => "multi-thread",
    };
    tracing::info!(worker_threads = workers, "runtime: {flavor}, {workers} worker thread(s)");
    weft_runtime::exit_code(runtime.block_on(weft_proxy::command::run(args)))
}
