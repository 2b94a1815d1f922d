//! The compiled-component cache: `<data_dir>/cache/<sha256(component)>-<engine hash>.cwasm`,
//! each artifact beside a `.sha256` of itself.
//!
//! - Only files this host wrote, with a matching checksum, are deserialised
//!   (a truncated or foreign file is ignored and compiled again).
//! - It stays bounded: after start-up and after each reload that replaced a
//!   component, [`ComponentCache::prune`] keeps the artifacts of the
//!   components running and the [`SPARE`] others used most recently (a
//!   rollback, or another manifest sharing the data folder, still starts
//!   without compiling), and removes the rest. Without it, every build a
//!   watched handler reloaded would stay on disk for good. An artifact's
//!   modification time is its last use: set when written, and again when
//!   loaded.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Artifacts kept besides the running ones.
pub const SPARE: usize = 16;

/// Leftovers of an interrupted write (a temporary file, a checksum without
/// its artifact) older than this are removed; younger ones may belong to a
/// write under way (`wharf check` shares the folder).
const STRAY_AGE: Duration = Duration::from_secs(3600);

const ARTIFACT: &str = "cwasm";
const CHECKSUM: &str = "sha256";

/// The cache folder of one engine's settings.
pub struct ComponentCache {
    dir: PathBuf,
    engine: Engine,
    /// Hash of the engine's settings that decide whether an artifact can be
    /// loaded (`Engine::precompile_compatibility_hash`).
    engine_tag: String,
}

impl ComponentCache {
    /// The cache in `dir` (created if missing) for `engine`.
    pub fn open(dir: PathBuf, engine: &Engine) -> Result<Self> {
        use std::hash::{Hash, Hasher};
        std::fs::create_dir_all(&dir).with_context(|| format!("creating the component cache {}", dir.display()))?;
        let mut hash = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hash);
        Ok(Self {
            dir,
            engine: engine.clone(),
            engine_tag: format!("{:016x}", hash.finish()),
        })
    }

    /// Where the artifact of the component with `digest` lives.
    fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}-{}.{ARTIFACT}", self.engine_tag))
    }

    /// The cached artifact of the component with `digest`, if it is one
    /// this host wrote: its checksum file must match (guarding against
    /// truncation and against files put there by anyone else). Marks it
    /// used.
    pub fn read(&self, digest: &str) -> Option<Component> {
        let path = &self.path(digest);
        let artifact = std::fs::read(path).ok()?;
        let recorded = std::fs::read_to_string(path.with_extension(CHECKSUM)).ok()?;
        if recorded.trim() != hex::encode(Sha256::digest(&artifact)) {
            tracing::warn!(path = %path.display(), "ignoring a cached component whose checksum does not match");
            return None;
        }
        // SAFETY: the artifact was written by `write` of a host with the
        // same engine settings (both are in the file name) and is unchanged
        // since (checksum). Deserialising trusts it to be well-formed code.
        match unsafe { Component::deserialize(&self.engine, &artifact) } {
            Ok(c) => {
                tracing::debug!(cache = %path.display(), "loaded compiled component from cache");
                // Its last use, for `prune`. A folder that cannot be written
                // to only makes the order less exact.
                let _ = std::fs::File::options()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_modified(SystemTime::now()));
                Some(c)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unusable cached component");
                None
            }
        }
    }

    /// Store `compiled`, the artifact of the component with `digest`: the
    /// checksum first, then the artifact renamed into place, so a reader
    /// never sees half of one.
    pub fn write(&self, digest: &str, compiled: &[u8]) -> Result<()> {
        let path = &self.path(digest);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, compiled).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::write(path.with_extension(CHECKSUM), hex::encode(Sha256::digest(compiled)))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Remove every artifact but those of the `running` digests and the
    /// [`SPARE`] others used last, and the leftovers of interrupted writes.
    /// Logs what it removed; a file that cannot be removed is logged and
    /// left.
    pub fn prune(&self, running: &[String]) {
        let keep: HashSet<PathBuf> = running.iter().map(|d| self.path(d)).collect();
        match prune(&self.dir, &keep, SPARE, SystemTime::now()) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(removed = n, cache = %self.dir.display(), "removed compiled components no handler runs")
            }
            Err(e) => {
                tracing::warn!(cache = %self.dir.display(), error = %format!("{e:#}"), "could not prune the component cache")
            }
        }
    }
}

/// [`ComponentCache::prune`] on `dir` at time `now`: the artifacts removed.
fn prune(dir: &Path, keep: &HashSet<PathBuf>, spare: usize, now: SystemTime) -> Result<usize> {
    let mut artifacts = Vec::new();
    let mut others = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if path.extension().is_some_and(|e| e == ARTIFACT) {
            if !keep.contains(&path) {
                artifacts.push((used, path));
            }
        } else {
            others.push((used, path));
        }
    }
    // Most recently used first; the spares are the head.
    artifacts.sort_by_key(|a| std::cmp::Reverse(a.0));
    let mut removed = 0;
    for (_, artifact) in artifacts.into_iter().skip(spare) {
        match std::fs::remove_file(&artifact) {
            Ok(()) => {
                removed += 1;
                tracing::debug!(path = %artifact.display(), "removed a compiled component");
                let _ = std::fs::remove_file(artifact.with_extension(CHECKSUM));
            }
            Err(e) => tracing::warn!(path = %artifact.display(), error = %e, "could not remove a compiled component"),
        }
    }
    // A checksum whose artifact is gone, or a temporary file, once old
    // enough not to be a write under way.
    for (written, path) in others {
        let orphan = path.extension().is_some_and(|e| e == CHECKSUM) && !path.with_extension(ARTIFACT).exists();
        let temporary = path.extension().is_some_and(|e| e.to_string_lossy().starts_with("tmp"));
        let old = now.duration_since(written).is_ok_and(|age| age >= STRAY_AGE);
        if (orphan || temporary) && old {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, age_secs: u64, now: SystemTime) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, name).unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(now - Duration::from_secs(age_secs)).unwrap();
        path
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn prune_keeps_the_running_and_the_most_recently_used_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let now = SystemTime::now();
        // `run` is the oldest of all, and kept because it runs.
        let run = file(d, "run-e.cwasm", 900, now);
        file(d, "run-e.sha256", 900, now);
        for (name, age) in [("a", 10), ("b", 20), ("c", 30), ("d", 40)] {
            file(d, &format!("{name}-e.cwasm"), age, now);
            file(d, &format!("{name}-e.sha256"), age, now);
        }
        // Leftovers: old ones go, a young one may be a write under way.
        file(d, "x-e.tmp123", 7200, now);
        file(d, "y-e.tmp456", 5, now);
        file(d, "z-e.sha256", 7200, now);
        file(d, "w-e.sha256", 5, now);

        let removed = prune(d, &HashSet::from([run]), 2, now).unwrap();
        assert_eq!(removed, 2, "c and d: beyond the two spares");
        assert_eq!(
            names(d),
            [
                "a-e.cwasm",
                "a-e.sha256",
                "b-e.cwasm",
                "b-e.sha256",
                "run-e.cwasm",
                "run-e.sha256",
                "w-e.sha256",
                "y-e.tmp456",
            ]
        );
        // Nothing more to do the second time.
        let keep = HashSet::from([d.join("run-e.cwasm")]);
        assert_eq!(prune(d, &keep, 2, now).unwrap(), 0);
    }

    #[test]
    fn a_cache_hit_counts_as_a_use() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let cache = ComponentCache::open(dir.path().to_path_buf(), &engine).unwrap();
        // The empty component, in binary (the `wat` feature is off).
        let component = Component::new(&engine, b"\0asm\x0d\0\x01\0").unwrap();
        cache.write("abc", &component.serialize().unwrap()).unwrap();
        let path = cache.path("abc");
        let long_ago = SystemTime::now() - Duration::from_secs(86_400);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        assert!(cache.read("abc").is_some());
        let used = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert!(
            used > long_ago + Duration::from_secs(3600),
            "the read did not mark it used"
        );
    }
}
