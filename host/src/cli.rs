//! The `wharf` command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::app::{App, HTTP_ADDR_FILE};
use crate::delivery::Shutdown;
use crate::manifest::Manifest;
use crate::server::HEADER_PREFIX;
use crate::telemetry::LogFormat;

/// A WebAssembly worker host: brokers, retries, dead-letters and dedup on the
/// host; your handlers in sandboxed components.
#[derive(Debug, Parser)]
#[command(name = "wharf", version)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "human", env = "WHARF_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Where a running host listens.
#[derive(Debug, clap::Args)]
struct Target {
    /// Base URL of the running host's HTTP server.
    #[arg(long, env = "WHARF_URL", conflicts_with = "manifest")]
    url: Option<String>,
    /// Find the host through its manifest (`host.http`, or the address it
    /// wrote to its data folder when the port is 0).
    #[arg(long, short = 'm')]
    manifest: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the handlers of a manifest until SIGTERM or SIGINT (twice: at
    /// once). SIGHUP reloads the handlers whose component file changed.
    Run {
        /// The manifest.
        manifest: PathBuf,
    },
    /// Validate a manifest and check that every component is a handler.
    Check {
        /// The manifest.
        manifest: PathBuf,
    },
    /// Publish one message to the embedded broker of a running host.
    Publish {
        #[command(flatten)]
        target: Target,
        /// Subject to publish to.
        subject: String,
        /// The payload; `-` reads standard input, `@file` reads a file.
        payload: String,
        /// Message id (the dedup key); the broker assigns one if absent.
        #[arg(long)]
        id: Option<String>,
        /// A header, `key=value`; repeatable.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Deliver no sooner than this many milliseconds from now.
        #[arg(long)]
        delay_ms: Option<u64>,
        /// MIME type of the payload.
        #[arg(long)]
        content_type: Option<String>,
    },
    /// List or replay dead-lettered messages of a running host.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Show the depth of every queue of a running host.
    Queues {
        #[command(flatten)]
        target: Target,
    },
    /// List the handlers of a running host with the digest of the component
    /// each runs.
    Handlers {
        #[command(flatten)]
        target: Target,
    },
    /// Load handlers' component files again in a running host; fails (and
    /// says why) if one is refused, which then keeps its component.
    Reload {
        #[command(flatten)]
        target: Target,
        /// The handlers to reload.
        #[arg(required = true)]
        handlers: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Print the dead letters of a queue as JSON.
    List {
        #[command(flatten)]
        target: Target,
        /// Dead-letter queue (by default a handler's source subject).
        queue: String,
    },
    /// Move dead letters back to the subject they came from.
    Replay {
        #[command(flatten)]
        target: Target,
        /// Dead-letter queue.
        queue: String,
        /// Replay only this message id.
        #[arg(long)]
        id: Option<String>,
    },
}

/// Run the parsed command; errors are printed, not returned.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Run { manifest } => run_host(&manifest),
        Command::Check { manifest } => check(&manifest),
        Command::Publish {
            target,
            subject,
            payload,
            id,
            headers,
            delay_ms,
            content_type,
        } => publish(&target, &subject, &payload, id, &headers, delay_ms, content_type),
        Command::Dlq {
            command: DlqCommand::List { target, queue },
        } => remote(&target, reqwest::Method::GET, &format!("/v1/dlq/{queue}"), &[]),
        Command::Dlq {
            command: DlqCommand::Replay { target, queue, id },
        } => {
            let query: Vec<(&str, String)> = id.into_iter().map(|id| ("id", id)).collect();
            remote(
                &target,
                reqwest::Method::POST,
                &format!("/v1/dlq/{queue}/replay"),
                &query,
            )
        }
        Command::Queues { target } => remote(&target, reqwest::Method::GET, "/v1/queues", &[]),
        Command::Handlers { target } => remote(&target, reqwest::Method::GET, "/v1/handlers", &[]),
        Command::Reload { target, handlers } => handlers
            .iter()
            .try_for_each(|h| remote(&target, reqwest::Method::POST, &format!("/v1/handlers/{h}/reload"), &[])),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_manifest(path: &Path) -> Result<Manifest> {
    Manifest::load(path).map_err(|e| anyhow::anyhow!("invalid manifest:\n{e}"))
}

/// The runtime the commands run on. `worker_threads`: the host's
/// `[host] worker_threads`; unset, tokio's default (one per CPU, or
/// `TOKIO_WORKER_THREADS`).
fn tokio_runtime(worker_threads: Option<u32>) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n as usize);
    }
    builder.enable_all().build().context("starting tokio")
}

fn run_host(path: &Path) -> Result<()> {
    let manifest = load_manifest(path)?;
    tokio_runtime(manifest.host.worker_threads)?.block_on(async {
        // SIGHUP reloads once the host runs; until then (components loading,
        // brokers connecting) its default action would end the process.
        // tokio keeps a signal's handler installed for the life of the
        // process once it is asked for, so asking now turns that off.
        let _ = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let app = App::new(manifest).await?;
        let shutdown = Shutdown::default();
        tokio::spawn(watch_signals(shutdown.clone()));
        app.run(shutdown).await
    })
}

/// First SIGTERM/SIGINT: graceful shutdown. Second: exit at once (leases
/// bring the in-flight messages back).
async fn watch_signals(shutdown: Shutdown) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the host with SIGKILL");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received: stopping (send it again to exit at once)");
    shutdown.stop.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting now; in-flight messages return when their leases expire");
    std::process::exit(130);
}

fn check(path: &Path) -> Result<()> {
    let manifest = load_manifest(path)?;
    for w in &manifest.warnings {
        println!("warning {w}");
    }
    let runtime = crate::app::runtime_for(&manifest)?;
    let mut failed = 0;
    for (name, h) in &manifest.handlers {
        match crate::runtime::check_component(&runtime, &h.component) {
            Ok(()) => println!("ok      handler {name}: {}", h.component.display()),
            Err(e) => {
                failed += 1;
                println!("FAILED  handler {name}: {e:#}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} handler(s) failed the check");
    }
    println!("{}: {} handler(s) ok", path.display(), manifest.handlers.len());
    Ok(())
}

fn base_url(target: &Target) -> Result<String> {
    if let Some(url) = &target.url {
        return Ok(url.trim_end_matches('/').to_string());
    }
    let Some(path) = &target.manifest else {
        return Ok("http://127.0.0.1:8480".to_string());
    };
    let manifest = load_manifest(path)?;
    let addr = if manifest.host.http.port() == 0 {
        let file = manifest.host.data_dir.join(HTTP_ADDR_FILE);
        std::fs::read_to_string(&file)
            .with_context(|| format!("reading {} (is the host running?)", file.display()))?
            .trim()
            .to_string()
    } else {
        manifest.host.http.to_string()
    };
    Ok(format!("http://{addr}"))
}

fn send(request: reqwest::RequestBuilder) -> Result<()> {
    tokio_runtime(None)?.block_on(async {
        let response = request
            .send()
            .await
            .context("cannot reach the wharf host (is it running?)")?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("{status}: {body}");
        }
        match serde_json::from_str::<serde_json::Value>(&body) {
            Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
            Err(_) => println!("{body}"),
        }
        Ok(())
    })
}

fn remote(target: &Target, method: reqwest::Method, path: &str, query: &[(&str, String)]) -> Result<()> {
    let url = format!("{}{path}", base_url(target)?);
    send(reqwest::Client::new().request(method, url).query(query))
}

fn publish(
    target: &Target,
    subject: &str,
    payload: &str,
    id: Option<String>,
    headers: &[String],
    delay_ms: Option<u64>,
    content_type: Option<String>,
) -> Result<()> {
    let body = if payload == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
        buf
    } else if let Some(file) = payload.strip_prefix('@') {
        std::fs::read(file).with_context(|| format!("reading {file}"))?
    } else {
        payload.as_bytes().to_vec()
    };
    let url = format!("{}/v1/publish/{subject}", base_url(target)?);
    let mut request = reqwest::Client::new().post(url).body(body);
    if let Some(id) = id {
        request = request.query(&[("id", id)]);
    }
    if let Some(delay) = delay_ms {
        request = request.query(&[("delay_ms", delay)]);
    }
    if let Some(ct) = content_type {
        request = request.header(reqwest::header::CONTENT_TYPE, ct);
    }
    for h in headers {
        let Some((k, v)) = h.split_once('=') else {
            bail!("--header {h:?}: expected key=value")
        };
        request = request.header(format!("{HEADER_PREFIX}{k}"), v);
    }
    send(request)
}
