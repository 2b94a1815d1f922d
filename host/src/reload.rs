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
//!   (written in place, or renamed over it, or a symbolic link on the way
//!   to it switched: to the file, or to a folder it is in, as in
//!   `current -> releases/42` or a Kubernetes ConfigMap volume), seen by
//!   watching the folders that hold the files and the links ([`Watch`]).
//!   Events are gathered for [`SETTLE`] after the last one, so a file
//!   being written is read once it is complete; if it is read too early it
//!   fails to load and the next event loads it.
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
    let watch = if app.manifest.host.watch {
        Watch::start(app.manifest.handlers.values().map(|h| h.component.as_path()), tx)
            .map_err(|e| tracing::warn!(error = %format!("{e:#}"), "cannot watch component files; reload with SIGHUP"))
            .ok()
    } else {
        None
    };
    // Dropping the watcher ends the watching: it lives as long as the loop.
    tokio::spawn(async move { run(&app, hangup, watch, changed, stop).await })
}

async fn run(
    app: &App,
    mut hangup: Option<tokio::signal::unix::Signal>,
    mut watch: Option<Watch>,
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
        // A switched link may have moved a component to another folder:
        // watch where the paths lead now, before the reloads read them.
        if let Some(Err(e)) = watch.as_mut().map(Watch::refresh) {
            tracing::warn!(error = %format!("{e:#}"), "cannot watch every component file; reload with SIGHUP");
        }
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

/// The file watcher, and what it watches for.
///
/// A component file is changed by writing it, renaming a file over it, or
/// switching a symbolic link on the way to it: one to the file itself, or
/// one to a folder it is in (`current -> releases/42`, or the `..data`
/// link that Kubernetes switches in a ConfigMap or Secret volume). So the
/// watcher watches the folder of each of those links and of the file the
/// path ends at ([`resolution`]; a file renamed over another is an event of
/// its folder, not of the old file), and matches events on those paths.
/// After links are switched the path may end in another folder: the run
/// loop calls [`Watch::refresh`] after each batch of changes, before the
/// reloads read the files, so a change made after the refresh is seen and
/// one made before it is read by the reload.
struct Watch {
    watcher: notify::RecommendedWatcher,
    /// The component files as the manifest names them.
    components: Vec<PathBuf>,
    /// Every path a component's [`resolution`] met, with the manifest's
    /// spellings of the components it leads to (two handlers may name one
    /// file two ways). Shared with the watcher's callback.
    wanted: Arc<std::sync::Mutex<BTreeMap<PathBuf, BTreeSet<PathBuf>>>>,
    /// The folders watched now.
    folders: BTreeSet<PathBuf>,
}

impl Watch {
    /// Watch `components`, sending the manifest's path of each one that
    /// changed to `tx`.
    fn start<'a>(components: impl IntoIterator<Item = &'a Path>, tx: mpsc::UnboundedSender<PathBuf>) -> Result<Self> {
        use notify::EventKind;
        let wanted: Arc<std::sync::Mutex<BTreeMap<PathBuf, BTreeSet<PathBuf>>>> = Arc::default();
        let matched = wanted.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) => {
                if matches!(event.kind, EventKind::Access(_)) {
                    return;
                }
                let wanted = matched.lock().unwrap_or_else(|p| p.into_inner());
                for path in event.paths.iter().filter_map(|p| wanted.get(p)).flatten() {
                    let _ = tx.send(path.clone());
                }
            }
            Err(e) => tracing::warn!(error = %e, "watching component files"),
        })
        .context("starting the file watcher")?;
        let mut watch = Self {
            watcher,
            components: components.into_iter().map(Path::to_path_buf).collect(),
            wanted,
            folders: BTreeSet::new(),
        };
        watch.refresh()?;
        tracing::debug!(
            files = watch.components.len(),
            folders = watch.folders.len(),
            "watching component files for changes"
        );
        Ok(watch)
    }

    /// Resolve every component's path again and watch what it meets now,
    /// no longer watching the folders it left. A path that cannot be
    /// resolved or a folder that cannot be watched is skipped (and named in
    /// the error); the others are still watched.
    fn refresh(&mut self) -> Result<()> {
        use notify::{RecursiveMode, Watcher};
        let mut failed = None;
        let mut wanted: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
        for component in &self.components {
            match resolution(component) {
                Ok(paths) => {
                    for path in paths {
                        wanted.entry(path).or_default().insert(component.clone());
                    }
                }
                Err(e) => {
                    failed.get_or_insert(e.context(format!("resolving {}", component.display())));
                }
            }
        }
        let folders: BTreeSet<PathBuf> = wanted
            .keys()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        for gone in self.folders.difference(&folders) {
            // It may be gone from the disk too; nothing to undo then.
            let _ = self.watcher.unwatch(gone);
        }
        let mut watched = BTreeSet::new();
        for folder in folders {
            if self.folders.contains(&folder) {
                watched.insert(folder);
                continue;
            }
            match self.watcher.watch(&folder, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(folder);
                }
                Err(e) => {
                    failed.get_or_insert(anyhow::Error::new(e).context(format!("watching {}", folder.display())));
                }
            }
        }
        self.folders = watched;
        *self.wanted.lock().unwrap_or_else(|p| p.into_inner()) = wanted;
        failed.map_or(Ok(()), Err)
    }
}

/// The paths whose change changes which file, or which bytes, `path`
/// names: each symbolic link met while resolving it, as the kernel does
/// (to the file, or to a folder on the way, however many in a row), and
/// the file it ends at. All of them absolute, in folders free of links, so
/// they are spelt as the watcher reports its events. A path that ends in
/// nothing (a link to a missing file) ends where the file would be.
fn resolution(path: &Path) -> Result<Vec<PathBuf>> {
    use std::collections::VecDeque;
    use std::ffi::OsString;
    use std::path::Component;
    /// Linux's own limit on the links one lookup follows.
    const MAX_LINKS: usize = 40;
    enum Step {
        Root,
        Up,
        Name(OsString),
    }
    fn steps(path: &Path) -> impl DoubleEndedIterator<Item = Step> + '_ {
        path.components().filter_map(|c| match c {
            Component::RootDir | Component::Prefix(_) => Some(Step::Root),
            Component::ParentDir => Some(Step::Up),
            Component::CurDir => None,
            Component::Normal(name) => Some(Step::Name(name.to_os_string())),
        })
    }
    let absolute = std::path::absolute(path)?;
    let mut rest: VecDeque<Step> = steps(&absolute).collect();
    let mut at = PathBuf::from("/");
    let mut met = Vec::new();
    while let Some(step) = rest.pop_front() {
        match step {
            Step::Root => at = PathBuf::from("/"),
            Step::Up => {
                at.pop();
            }
            Step::Name(name) => {
                let next = at.join(name);
                let is_link = std::fs::symlink_metadata(&next).is_ok_and(|m| m.file_type().is_symlink());
                if !is_link {
                    at = next;
                    continue;
                }
                anyhow::ensure!(met.len() < MAX_LINKS, "more than {MAX_LINKS} symbolic links");
                let target = std::fs::read_link(&next)?;
                // Relative to the link's folder, `at`; an absolute target
                // starts again from the root.
                for step in steps(&target).rev() {
                    rest.push_front(step);
                }
                met.push(next);
            }
        }
    }
    met.push(at);
    Ok(met)
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
        let _watch = Watch::start([relative.as_path(), file.as_path()], tx)?;
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

    /// The next path the watcher reports, waiting at most 10 s.
    async fn next(rx: &mut mpsc::UnboundedReceiver<PathBuf>) -> Result<PathBuf> {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .context("no change reported in 10 s")?
            .context("the watcher stopped")
    }

    /// Make `link` point to `target` at once, as deployments do: a new link
    /// beside it, renamed over it.
    fn switch_link(target: &Path, link: &Path) -> Result<()> {
        let mut tmp = link.as_os_str().to_owned();
        tmp.push(".switching");
        std::os::unix::fs::symlink(target, &tmp)?;
        std::fs::rename(&tmp, link)?;
        Ok(())
    }

    /// Links are followed as the kernel follows them: relative to the
    /// link's folder, one after another, through `..`; every link met is
    /// listed, then the file the path ends at.
    #[test]
    fn resolution_lists_every_link_met_and_the_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let root = std::fs::canonicalize(dir.path())?;
        std::fs::create_dir_all(root.join("releases/2/bin"))?;
        std::fs::write(root.join("releases/2/bin/h.wasm"), b"v2")?;
        std::os::unix::fs::symlink("releases/2", root.join("current"))?;
        std::os::unix::fs::symlink("current", root.join("live"))?;
        std::os::unix::fs::symlink("../live/bin/h.wasm", root.join("releases/h.wasm"))?;
        assert_eq!(
            resolution(&root.join("releases/h.wasm"))?,
            [
                root.join("releases/h.wasm"),
                root.join("live"),
                root.join("current"),
                root.join("releases/2/bin/h.wasm"),
            ]
        );
        // No link on the way: the file alone.
        assert_eq!(
            resolution(&root.join("releases/2/./bin/h.wasm"))?,
            [root.join("releases/2/bin/h.wasm")]
        );
        // A loop is an error, not a hang.
        std::os::unix::fs::symlink("loop", root.join("loop"))?;
        assert!(resolution(&root.join("loop")).is_err());
        Ok(())
    }

    /// A component reached through a folder link (`current -> releases/1`):
    /// switching the link is a change; after the refresh, a change in the
    /// new release's folder is seen and one in the old release's is not.
    #[tokio::test]
    async fn a_switched_folder_link_is_a_change_and_is_followed() -> Result<()> {
        let dir = tempfile::tempdir()?;
        for release in ["releases/1", "releases/2"] {
            std::fs::create_dir_all(dir.path().join(release))?;
            std::fs::write(dir.path().join(release).join("handler.wasm"), release)?;
        }
        std::os::unix::fs::symlink("releases/1", dir.path().join("current"))?;
        let component = dir.path().join("current/handler.wasm");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut watch = Watch::start([component.as_path()], tx)?;

        switch_link(Path::new("releases/2"), &dir.path().join("current"))?;
        assert_eq!(next(&mut rx).await?, component);
        watch.refresh()?;
        while rx.try_recv().is_ok() {}
        // The old release is no longer what the component is: not watched.
        std::fs::write(dir.path().join("releases/1/handler.wasm"), b"old, changed")?;
        let stray = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
        assert!(
            stray.is_err(),
            "a change off the component's path was reported: {stray:?}"
        );
        // The new one is.
        std::fs::write(dir.path().join("releases/2/handler.wasm"), b"new, changed")?;
        assert_eq!(next(&mut rx).await?, component);
        Ok(())
    }

    /// The layout of a Kubernetes ConfigMap or Secret volume: the file is a
    /// link into `..data`, itself a link to a timestamped folder, and an
    /// update switches `..data` alone.
    #[tokio::test]
    async fn a_configmap_style_update_is_a_change() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        for version in ["..v1", "..v2"] {
            std::fs::create_dir(d.join(version))?;
            std::fs::write(d.join(version).join("handler.wasm"), version)?;
        }
        std::os::unix::fs::symlink("..v1", d.join("..data"))?;
        std::os::unix::fs::symlink("..data/handler.wasm", d.join("handler.wasm"))?;
        let component = d.join("handler.wasm");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _watch = Watch::start([component.as_path()], tx)?;
        switch_link(Path::new("..v2"), &d.join("..data"))?;
        assert_eq!(next(&mut rx).await?, component);
        Ok(())
    }
}
