use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = weft_proxy::command::Args::parse();
    weft_runtime::init_logging(&args.log_format);
    weft_runtime::exit_code(weft_proxy::command::run(args).await)
}
