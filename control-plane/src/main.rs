use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = weft_control_plane::command::Args::parse();
    weft_runtime::init_logging(&args.log_format);
    weft_runtime::exit_code(weft_control_plane::command::run(args).await)
}
