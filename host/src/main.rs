use clap::Parser;

/// mimalloc rather than the system allocator: every message allocates and
/// frees on tokio's worker threads, where glibc's malloc took ~12% of the
/// host's CPU in the stream drain profile (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = wharf::cli::Cli::parse();
    wharf::telemetry::init_logging(cli.log_format);
    wharf::cli::run(cli)
}
