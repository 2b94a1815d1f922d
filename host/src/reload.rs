//! Hot reload: a handler's component replaced while the host runs, with no
//! message lost or run twice.
//!
//! A reload reads the handler's component file again, loads it as at
//! start-up (compiled on a blocking thread, through the same cache; checked
//! to export the handler interface and to import nothing wharf does not
//! provide) and swaps it into the binding ([`Registry::swap_component`]).
//! Attempts already running finish on the component they started with; the
//! next attempt runs the new one. No delivery is touched by a reload, so
//! nothing is acked early, released or redelivered because of it: each
//! message runs once, on the old code or on the new.
//!
//! A file that does not load (half written, not a component, the wrong
//! interface, missing) is logged with the handler, the file and the reason,
//! counted, and the handler keeps running what it ran. A file whose bytes
//! did not change (a `touch`, a copy of the same build) changes nothing.
//!
//! What triggers a reload:
//! - SIGHUP: every handler whose file changed;
//! - with `[host] watch = true` (the default), a change to a component file
//!   (written in place, or renamed over it, or a symlink replaced), seen by
//!   watching the folders that hold them. Events are gathered for
//!   [`SETTLE`] after the last one, so a file being written is read once
//!   it is complete; if it is read too early it fails to load and the next
//!   event loads it.
//!
//! A reload replaces the code only. The manifest (limits, grants, config,
//! source) is read once, at start-up: changing it takes a restart, which
//! loses nothing either (graceful shutdown releases what is in flight).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::App;

/// How long the watcher waits after a file's last change before reading it.
pub const SETTLE: Duration = Duration::from_millis(300);

/// What a reload of one handler did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The file holds the component already running.
    Unchanged,
    /// The new component runs from the next attempt on.
    Replaced {
        /// Digest of the component it replaced.
        from: String,
        /// Digest of the new one.
        to: String,
    },
}

/// Load `handler`'s component file again and, if it changed and loads,
/// make it the one the handler runs. On an error the handler keeps its
/// component.
pub async fn reload(app: &App, handler: &str) -> Result<Reloaded> {
    let spec = app
        .manifest
        .handlers
        .get(handler)
        .with_context(|| format!("no handler {handler:?}"))?;
    let binding = app
        .registry
        .get(handler)
        .with_context(|| format!("no handler {handler:?}"))?;
    let (runtime, path) = (app.runtime.clone(), spec.component.clone());
    // Compiling a component takes CPU seconds: not on the async threads.
    let loaded = tokio::task::spawn_blocking(move || runtime.load(&path))
        .await
        .context("the loading thread failed")??;
    let from = binding.component.load().digest.clone();
    if loaded.digest == from {
        return Ok(Reloaded::Unchanged);
    }
    let to = loaded.digest.clone();
    app.registry.swap_component(handler, loaded);
    Ok(Reloaded::Replaced { from, to })
}

/// [`reload`], logged and counted (`wharf_reloads_total{handler,outcome}`).
async fn reload_logged(app: &App, handler: &str) {
    let component = app
        .manifest
        .handlers
        .get(handler)
        .map(|h| h.component.display().to_string());
    let component = component.unwrap_or_default();
    let outcome = match reload(app, handler).await {
        Ok(Reloaded::Unchanged) => {
            tracing::debug!(handler, %component, "component unchanged; nothing to reload");
            "unchanged"
        }
        Ok(Reloaded::Replaced { from, to }) => {
            tracing::info!(handler, %component, from = %&from[..12], to = %&to[..12], "handler reloaded: the next attempts run the new component");
            "replaced"
        }
        Err(e) => {
            tracing::error!(handler, %component, error = %format!("{e:#}"), "reload failed; the handler keeps running its current component");
            "failed"
        }
    };
    metrics::counter!("wharf_reloads_total", "handler" => handler.to_string(), "outcome" => outcome).increment(1);
}

/// Reload on SIGHUP, and on changes to component files when the manifest
/// asks for it, until `stop`. Both are listened for before this returns, so
/// a host that says it is ready already handles SIGHUP (whose default
/// action would end the process).
pub fn start(app: Arc<App>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let hangup = signal(SignalKind::hangup())
        .map_err(|e| tracing::warn!(error = %e, "cannot listen for SIGHUP; reloads come from file changes only"))
        .ok();
    let (tx, changed) = mpsc::unbounded_channel();
    let watcher = if app.manifest.host.watch {
        watch(&app, tx)
            .map_err(|e| tracing::warn!(error = %format!("{e:#}"), "cannot watch component files; reload with SIGHUP"))
            .ok()
    } else {
        None
    };
    tokio::spawn(async move {
        // Dropping the watcher ends the watching: it lives as long as the loop.
        let _watcher = watcher;
        run(&app, hangup, changed, stop).await;
    })
}

async fn run(
    app: &App,
    mut hangup: Option<tokio::signal::unix::Signal>,
    mut changed: mpsc::UnboundedReceiver<PathBuf>,
    stop: CancellationToken,
) {
    loop {
        let handlers: BTreeSet<String> = tokio::select! {
            _ = stop.cancelled() => return,
            Some(()) = async { hangup.as_mut()?.recv().await } => {
                tracing::info!("SIGHUP: reloading changed components");
                app.manifest.handlers.keys().cloned().collect()
            }
            Some(path) = changed.recv() => {
                let mut paths = BTreeSet::from([path]);
                // Let the writer finish: gather until SETTLE passes quietly.
                while let Ok(Some(p)) = tokio::time::timeout(SETTLE, changed.recv()).await {
                    paths.insert(p);
                }
                handlers_of(app, &paths)
            }
        };
        for handler in handlers {
            reload_logged(app, &handler).await;
        }
    }
}

/// The handlers whose component is one of `paths`.
fn handlers_of(app: &App, paths: &BTreeSet<PathBuf>) -> BTreeSet<String> {
    app.manifest
        .handlers
        .iter()
        .filter(|(_, h)| paths.contains(&h.component))
        .map(|(name, _)| name.clone())
        .collect()
}

/// Watch the folders holding the components (a file renamed over a
/// component is an event of its folder, not of the old file) and send the
/// path of every component file that changed.
fn watch(app: &App, tx: mpsc::UnboundedSender<PathBuf>) -> Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let components: BTreeSet<PathBuf> = app.manifest.handlers.values().map(|h| h.component.clone()).collect();
    let folders: BTreeSet<&Path> = components.iter().filter_map(|c| c.parent()).collect();
    let wanted = components.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(event) => {
            if matches!(event.kind, EventKind::Access(_)) {
                return;
            }
            for path in event.paths.into_iter().filter(|p| wanted.contains(p)) {
                let _ = tx.send(path);
            }
        }
        Err(e) => tracing::warn!(error = %e, "watching component files"),
    })
    .context("starting the file watcher")?;
    for folder in folders {
        watcher
            .watch(folder, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", folder.display()))?;
    }
    tracing::debug!(files = components.len(), "watching component files for changes");
    Ok(watcher)
}
