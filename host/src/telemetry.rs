//! Logging (human or JSON, filtered by `RUST_LOG`) and the Prometheus recorder.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Install the global logger. `RUST_LOG` overrides the default `info`.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: in a file or a pipe escapes are noise (and
    // would hide a guest that tries to smuggle its own).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The process-wide Prometheus recorder, installed on first use, which must
/// come before the first message is settled ([`crate::app::App::run`] sees to
/// it): counts made before it exists are lost.
pub fn prometheus() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| match prometheus_builder().install_recorder() {
            Ok(handle) => {
                spawn_upkeep(handle.clone());
                Some(handle)
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics disabled: could not install the recorder");
                None
            }
        })
        .clone()
}

/// How often the recorder folds histogram samples into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The recorder keeps every histogram sample (one per attempt) until it is
/// rendered or upkept, and `install_recorder` leaves upkeep to its caller:
/// with nothing scraping `/metrics`, a host's memory grew by every attempt
/// it ran, for as long as it ran. A thread of its own, since the recorder
/// can be installed before (or without) a Tokio runtime.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("wharf-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the metrics upkeep thread; histogram samples wait for a scrape of /metrics");
    }
}

/// `wharf_attempt_seconds` bucket bounds: 50 µs (a reused instance) to 30 s
/// (a long handler budget).
const ATTEMPT_SECONDS_BUCKETS: [f64; 18] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

/// `wharf_amqp_acks_per_frame` bucket bounds: powers of two up to a full
/// prefetch window.
const ACKS_PER_FRAME_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// The recorder's settings: wharf's histograms are exported as Prometheus
/// histograms (`_bucket{le=...}`), which add up across hosts, rather than
/// the exporter's default summaries, which are per process.
fn prometheus_builder() -> PrometheusBuilder {
    let builder = PrometheusBuilder::new();
    let buckets = [
        ("wharf_attempt_seconds", &ATTEMPT_SECONDS_BUCKETS[..]),
        ("wharf_amqp_acks_per_frame", &ACKS_PER_FRAME_BUCKETS[..]),
    ];
    buckets.into_iter().fold(builder, |b, (name, bounds)| {
        // Fails only for an empty list of bounds, which these are not.
        b.set_buckets_for_metric(Matcher::Full(name.into()), bounds)
            .expect("non-empty bucket bounds")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_exported_with_buckets() {
        let recorder = prometheus_builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!("wharf_attempt_seconds", "handler" => "h").record(0.003);
            metrics::histogram!("wharf_amqp_acks_per_frame").record(20.0);
        });
        // Upkeep (what the upkeep thread runs) folds the samples into their
        // buckets; it must not lose them.
        handle.run_upkeep();
        let text = handle.render();
        for line in [
            "wharf_attempt_seconds_bucket{handler=\"h\",le=\"0.0025\"} 0",
            "wharf_attempt_seconds_bucket{handler=\"h\",le=\"0.005\"} 1",
            "wharf_attempt_seconds_count{handler=\"h\"} 1",
            "wharf_amqp_acks_per_frame_bucket{le=\"16\"} 0",
            "wharf_amqp_acks_per_frame_bucket{le=\"32\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in:\n{text}");
        }
        assert!(!text.contains("quantile="), "{text}");
    }
}
