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
//! - `POST /v1/handlers/{name}/reload` (`wharf reload <name>`): that
//!   handler, answering with what happened, so a deploy script learns that
//!   its build was refused and why;
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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::runtime::ComponentFile;

/// How long the watcher waits after a file's last change before reading it.
pub const SETTLE: Duration = Duration::from_millis(300);

/// What a reload of one handler did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The file holds the component already running (nothing was loaded).
    Unchanged {
        /// Its digest.
        digest: String,
    },
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
/// component. One reload at a time, whatever asked for it.
async fn reload(app: &App, handler: &str) -> Result<Reloaded> {
    let _one_at_a_time = app.reloading.lock().await;
    let spec = app
        .manifest
        .handlers
        .get(handler)
        .with_context(|| format!("no handler {handler:?}"))?;
    let binding = app
        .registry
        .get(handler)
        .with_context(|| format!("no handler {handler:?}"))?;
    let running = binding.component.load().digest.clone();
    let (runtime, path, same) = (app.runtime.clone(), spec.component.clone(), running.clone());
    // Compiling a component takes CPU seconds: not on the async threads.
    let loaded = tokio::task::spawn_blocking(move || {
        let file = ComponentFile::read(&path)?;
        if file.digest == same {
            return Ok(None);
        }
        runtime.load_file(file).map(Some)
    })
    .await
    .context("the loading thread failed")??;
    let Some(loaded) = loaded else {
        return Ok(Reloaded::Unchanged { digest: running });
    };
    let to = loaded.digest.clone();
    app.registry.swap_component(handler, loaded);
    let (runtime, running_now) = (app.runtime.clone(), app.registry.digests());
    // File system work: not on the async threads either. Awaited, so a
    // reload that answered has also tidied up after itself.
    let _ = tokio::task::spawn_blocking(move || runtime.prune_cache(&running_now)).await;
    Ok(Reloaded::Replaced { from: running, to })
}

/// Reload `handler` (see the module doc), logged and counted
/// (`wharf_reloads_total{handler,outcome}`): what SIGHUP, the file watcher
/// and `POST /v1/handlers/{name}/reload` all call.
pub async fn reload_logged(app: &App, handler: &str) -> Result<Reloaded> {
    let component = app
        .manifest
        .handlers
        .get(handler)
        .map(|h| h.component.display().to_string());
    let component = component.unwrap_or_default();
    let reloaded = reload(app, handler).await;
    let outcome = match &reloaded {
        Ok(Reloaded::Unchanged { .. }) => {
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
    reloaded
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
        watch(app.manifest.handlers.values().map(|h| h.component.as_path()), tx)
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
            // Logged and counted there; nothing more to do with the result.
            let _ = reload_logged(app, &handler).await;
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
/// manifest's path of every component file that changed.
///
/// Folders are watched by their canonical path, and events matched on it:
/// the manifest's paths may be relative or hold `..`, and the watcher
/// reports its own form of them. (So a folder that is itself a symlink
/// being switched to another is not seen; `wharf reload` or SIGHUP is.)
fn watch<'a>(
    components: impl IntoIterator<Item = &'a Path>,
    tx: mpsc::UnboundedSender<PathBuf>,
) -> Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    // The canonical path of each component file's place, with the manifest's
    // spellings of it (two handlers may name one file two ways).
    let mut wanted: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for component in components {
        let (Some(folder), Some(name)) = (component.parent(), component.file_name()) else {
            continue;
        };
        let folder = if folder.as_os_str().is_empty() {
            Path::new(".")
        } else {
            folder
        };
        let folder =
            std::fs::canonicalize(folder).with_context(|| format!("finding the folder of {}", component.display()))?;
        wanted
            .entry(folder.join(name))
            .or_default()
            .insert(component.to_path_buf());
    }
    let folders: BTreeSet<PathBuf> = wanted
        .keys()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    let files = wanted.len();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(event) => {
            if matches!(event.kind, EventKind::Access(_)) {
                return;
            }
            for path in event.paths.iter().filter_map(|p| wanted.get(p)).flatten() {
                let _ = tx.send(path.clone());
            }
        }
        Err(e) => tracing::warn!(error = %e, "watching component files"),
    })
    .context("starting the file watcher")?;
    for folder in &folders {
        watcher
            .watch(folder, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", folder.display()))?;
    }
    tracing::debug!(files, folders = folders.len(), "watching component files for changes");
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component named by a relative path with `..` in it (a manifest
    /// given as a relative path resolves to one): its changes are seen,
    /// and reported by the path the manifest has; by each path, when two
    /// handlers name the same file differently.
    #[tokio::test]
    async fn a_relative_path_with_dot_dots_and_a_second_spelling_are_watched() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("handler.wasm");
        std::fs::write(&file, b"v1")?;
        // From the working folder up to the root, then down to the file.
        let cwd = std::env::current_dir()?;
        let up = cwd.components().count() - 1;
        let mut relative: PathBuf = std::iter::repeat_n("..", up).collect();
        relative.push(file.strip_prefix("/")?);
        assert!(relative.is_relative());

        let (tx, mut rx) = mpsc::unbounded_channel();
        // The same file by its absolute path too, as a second handler might.
        let _watcher = watch([relative.as_path(), file.as_path()], tx)?;
        std::fs::write(dir.path().join("other.wasm"), b"not watched")?;
        std::fs::write(&file, b"v2")?;
        let mut seen = BTreeSet::new();
        while seen.len() < 2 {
            let path = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await?;
            seen.extend(path);
        }
        assert_eq!(seen, BTreeSet::from([relative, file]));
        Ok(())
    }
}
