//! Hot reload: a handler's component replaced under load (file watching),
//! and by SIGHUP, with bad files refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::*;

/// `program`'s component copied to `dir/handler.wasm`, the file the
/// manifest names and the tests replace.
fn own_copy(dir: &Path, program_name: &str) -> Result<PathBuf> {
    let path = dir.join("handler.wasm");
    std::fs::copy(program(program_name), &path)?;
    Ok(path)
}

/// Put `bytes` in place of `path` the way a deployment does: written beside
/// it, then renamed over it.
fn replace(path: &Path, bytes: &[u8]) -> Result {
    let tmp = path.with_extension("wasm.new");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn manifest(component: &Path, extra: &str) -> String {
    format!(
        "[handlers.h]\ncomponent = {:?}\nsource = {{ subject = \"jobs\" }}\n{extra}\n",
        component.display().to_string()
    )
}

async fn reloads(host: &Host, outcome: &str) -> Result<u64> {
    host.counter("wharf_reloads_total", &format!("handler=\"h\",outcome=\"{outcome}\""))
        .await
}

/// Send SIGHUP and wait until the reloads counted are `failed`, `replaced`
/// and `unchanged`.
async fn sighup(host: &Host, failed: u64, replaced: u64, unchanged: u64) -> Result {
    host.signal(libc::SIGHUP);
    host.wait_for("the reload", LONG, || async {
        Ok(reloads(host, "failed").await? == failed
            && reloads(host, "replaced").await? == replaced
            && reloads(host, "unchanged").await? == unchanged)
    })
    .await
}

/// A new build renamed over the component file while the handler drains a
/// backlog: the next attempts run it, and every message runs exactly once,
/// on the old code or on the new. With `instance_reuse`, so the old
/// component's warm instances are retired too.
#[tokio::test]
async fn a_component_replaced_under_load_runs_every_message_once() -> Result {
    replaced_under_load("").await
}

/// The same on two shards: the component is one for the handler, so one
/// reload swaps it for both shards' lanes.
#[tokio::test]
async fn a_component_replaced_under_load_on_shards_runs_every_message_once() -> Result {
    replaced_under_load("shards = 2").await
}

/// `host`: more `[host]` settings (shards).
async fn replaced_under_load(host: &str) -> Result {
    const MESSAGES: usize = 2000;
    const CONCURRENCY: u64 = 4;
    let dir = tempfile::tempdir()?;
    let component = own_copy(dir.path(), "ok")?;
    let setup = Setup::with_host(
        host,
        &manifest(
            &component,
            &format!("concurrency = {CONCURRENCY}\ninstance_reuse = 5\n"),
        ),
    )?;
    let shards = shards_in(host);
    let host = setup.start().await?;
    let publishers = host.publishing_many("jobs", MESSAGES);
    host.wait_for("some progress", LONG, || async {
        Ok(host.outcome_count("h", "acked").await? >= 50)
    })
    .await?;
    host.wait_every_shard_received("h", shards).await?;
    replace(&component, &std::fs::read(program("reloaded"))?)?;
    host.wait_for("the reload", LONG, || async {
        Ok(reloads(&host, "replaced").await? == 1)
    })
    .await?;
    let left: u64 = host.stats().await?.iter().map(|s| s.ready + s.pending).sum();
    // Up to twice the concurrency may be under way on the old build (running,
    // or handled and waiting for their ack).
    let old_at_most = 2 * CONCURRENCY;
    assert!(
        left > old_at_most,
        "only {left} messages were left when the reload came; the test proves nothing"
    );
    publishers.await??;
    host.wait_drained(LONG).await?;
    // Sent after the reload was reported: only the new build may run them.
    for i in 0..20 {
        host.publish("jobs", "{}", Some(&format!("after{i}"))).await?;
    }
    host.wait_drained(LONG).await?;
    assert_eq!(reloads(&host, "failed").await?, 0, "{}", host.logs());
    let logs = host.logs();
    assert_eq!(host.terminate()?, 0);

    let db = setup.open()?;
    assert!(db.stats().is_empty(), "{:?}", db.stats());
    let ids: Vec<String> = (0..MESSAGES)
        .map(|i| format!("m{i}"))
        .chain((0..20).map(|i| format!("after{i}")))
        .collect();
    // None lost, none run twice.
    db.assert_every_message_handled(ids.iter().cloned(), 0);
    for i in 0..20 {
        assert_eq!(
            db.counter("default", &format!("v2:after{i}")),
            1,
            "after{i} ran the old build"
        );
    }
    // What was left beyond the attempts under way ran on the new build.
    let on_new = (0..MESSAGES)
        .filter(|i| db.counter("default", &format!("v2:m{i}")) == 1)
        .count() as u64;
    assert!(
        on_new >= left - old_at_most && on_new < MESSAGES as u64,
        "{on_new} of {MESSAGES} ran on the new build; {left} were left at the reload"
    );
    assert_eq!(logs.matches("handler reloaded").count(), 1, "{logs}");
    Ok(())
}

/// With file watching off, SIGHUP and `wharf reload` reload. A file that is
/// not a component, or a component that is not a handler, is refused with
/// the handler, the file and the reason, and the handler keeps its code;
/// an unchanged file changes nothing; `wharf handlers` shows what runs.
#[tokio::test]
async fn sighup_and_wharf_reload_refuse_a_bad_component_with_its_reason() -> Result {
    use sha2::Digest;
    let dir = tempfile::tempdir()?;
    let component = own_copy(dir.path(), "ok")?;
    let setup = Setup::with_host("watch = false\n", &manifest(&component, ""))?;
    let host = setup.start().await?;
    let reload = |handler: &str| wharf(&["reload", "--url", &host.url, handler]);

    // Not watching: a change alone does nothing.
    replace(&component, b"not a component")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(reloads(&host, "failed").await?, 0, "reloaded without being asked");

    sighup(&host, 1, 0, 0).await?;
    replace(&component, &std::fs::read(program("no_handler"))?)?;
    let (code, out, err) = reload("h")?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("422") && err.contains("keeps its component") && err.contains("does not export"),
        "{err}"
    );
    assert_eq!(reloads(&host, "failed").await?, 2);
    for i in 0..5 {
        host.publish("jobs", "{}", Some(&format!("old{i}"))).await?;
    }
    host.wait_drained(LONG).await?;

    let new_build = std::fs::read(program("reloaded"))?;
    replace(&component, &new_build)?;
    sighup(&host, 2, 1, 0).await?;
    let (code, out, err) = reload("h")?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("\"unchanged\""), "{out}");
    assert_eq!(reloads(&host, "unchanged").await?, 1);
    let (code, out, err) = reload("nosuch")?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("404") && err.contains("no handler \\\"nosuch\\\""),
        "{err}"
    );
    let (code, out, err) = wharf(&["handlers", "--url", &host.url])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&hex::encode(sha2::Sha256::digest(&new_build))), "{out}");

    for i in 0..5 {
        host.publish("jobs", "{}", Some(&format!("new{i}"))).await?;
    }
    host.wait_drained(LONG).await?;
    let logs = host.logs();
    assert_eq!(host.terminate()?, 0, "{logs}");

    let failures: Vec<&str> = logs.lines().filter(|l| l.contains("reload failed")).collect();
    assert_eq!(failures.len(), 2, "{logs}");
    for line in &failures {
        assert!(line.contains("handler=\"h\"") || line.contains("handler=h"), "{line}");
        assert!(line.contains(&component.display().to_string()), "{line}");
    }
    assert!(
        failures[0].contains("not a valid WebAssembly component"),
        "{}",
        failures[0]
    );
    assert!(failures[1].contains("does not export"), "{}", failures[1]);

    let db = setup.open()?;
    for i in 0..5 {
        assert_eq!(db.counter("default", &format!("runs:old{i}")), 1);
        assert_eq!(
            db.counter("default", &format!("v2:old{i}")),
            0,
            "old{i} ran the refused file"
        );
        assert_eq!(db.counter("default", &format!("runs:new{i}")), 1);
        assert_eq!(
            db.counter("default", &format!("v2:new{i}")),
            1,
            "new{i} ran the old build"
        );
    }
    Ok(())
}

/// A deployment that switches a folder link (`current -> releases/2`)
/// rather than replacing the file: the watcher sees the switch, the next
/// messages run the new release, and a later rebuild inside the new
/// release's folder is seen too (the watch followed the link).
#[tokio::test]
async fn a_switched_release_folder_link_reloads_and_is_followed() -> Result {
    let dir = tempfile::tempdir()?;
    let releases = dir.path().join("releases");
    for release in ["1", "2"] {
        std::fs::create_dir_all(releases.join(release))?;
    }
    own_copy(&releases.join("1"), "ok")?;
    own_copy(&releases.join("2"), "reloaded")?;
    let current = dir.path().join("current");
    std::os::unix::fs::symlink("releases/1", &current)?;
    let component = current.join("handler.wasm");
    let setup = Setup::new(&manifest(&component, ""))?;
    let host = setup.start().await?;
    host.publish("jobs", "{}", Some("before")).await?;
    host.wait_drained(LONG).await?;

    // Switched at once, as `ln -s releases/2 current.new && mv -T current.new current` does.
    let switching = dir.path().join("current.new");
    std::os::unix::fs::symlink("releases/2", &switching)?;
    std::fs::rename(&switching, &current)?;
    host.wait_for("the reload", LONG, || async {
        Ok(reloads(&host, "replaced").await? == 1)
    })
    .await?;
    host.publish("jobs", "{}", Some("after")).await?;
    host.wait_drained(LONG).await?;

    // A rebuild in place in the release now live: seen as well (the first
    // build again, so its messages run without the `v2:` mark).
    replace(&releases.join("2/handler.wasm"), &std::fs::read(program("ok"))?)?;
    host.wait_for("the second reload", LONG, || async {
        Ok(reloads(&host, "replaced").await? == 2)
    })
    .await?;
    host.publish("jobs", "{}", Some("rebuilt")).await?;
    host.wait_drained(LONG).await?;
    assert_eq!(reloads(&host, "failed").await?, 0, "{}", host.logs());
    let logs = host.logs();
    assert_eq!(host.terminate()?, 0, "{logs}");

    let db = setup.open()?;
    for (id, on_v2) in [("before", 0), ("after", 1), ("rebuilt", 0)] {
        assert_eq!(db.counter("default", &format!("runs:{id}")), 1, "{id}");
        assert_eq!(
            db.counter("default", &format!("v2:{id}")),
            on_v2,
            "{id} ran the wrong build"
        );
    }
    Ok(())
}
