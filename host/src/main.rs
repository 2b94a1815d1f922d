use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = wharf::cli::Cli::parse();
    wharf::telemetry::init_logging(cli.log_format);
    wharf::cli::run(cli)
}
