//! End-to-end tests: the real `wharf` binary, real handler components built
//! from `tests/programs`, the embedded broker on a temporary data folder.

mod amqp;
mod engine;
mod harness;
mod nats;
mod redis;
mod reload;

use std::collections::BTreeMap;
use std::time::Duration;

use harness::*;

/// Every program in tests/programs/src/bin must be run by some test here.
#[test]
fn every_test_program_is_used() {
    let sources = [
        include_str!("main.rs"),
        include_str!("redis.rs"),
        include_str!("nats.rs"),
        include_str!("reload.rs"),
    ]
    .concat();
    let bin = workspace().join("tests/programs/src/bin");
    for entry in std::fs::read_dir(&bin).expect("programs folder") {
        let name = entry
            .expect("entry")
            .path()
            .file_stem()
            .expect("stem")
            .to_string_lossy()
            .into_owned();
        assert!(
            sources.contains(&format!("\"{name}\"")),
            "test program {name} is not used by any test in tests/e2e/"
        );
    }
}

#[tokio::test]
async fn success_acks_every_message_once() -> Result {
    let setup = Setup::new(&handler("count", "ok", "jobs", ""))?;
    let host = setup.start().await?;
    for i in 0..20 {
        host.publish("jobs", "{}", Some(&format!("j{i}"))).await?;
    }
    // The CLI publishes through the same endpoint.
    let (code, out, err) = wharf(&["publish", "--url", &host.url, "jobs", "{}", "--id", "cli", "-H", "k=v"])?;
    assert_eq!(code, 0, "{out}{err}");
    host.wait_drained(LONG).await?;
    assert_eq!(host.outcome_count("count", "acked").await?, 21);
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    for i in 0..20 {
        assert_eq!(db.counter("default", &format!("runs:j{i}")), 1);
    }
    assert_eq!(db.counter("default", "runs:cli"), 1);
    assert!(db.stats().is_empty(), "{:?}", db.stats());
    Ok(())
}

#[tokio::test]
async fn worker_threads_sets_the_threads_that_run_the_handlers() -> Result {
    // Two counts, so that neither can be tokio's default on this machine.
    for threads in [1, 3] {
        let setup = Setup::with_host(
            &format!("worker_threads = {threads}"),
            &handler("count", "ok", "jobs", "concurrency = 8"),
        )?;
        let host = setup.start().await?;
        host.publish_many("jobs", 50).await?;
        host.wait_drained(LONG).await?;
        assert_eq!(host.outcome_count("count", "acked").await?, 50);
        // tokio's own count of the runtime's workers, logged at the start.
        let logs = host.logs();
        assert!(
            logs.lines()
                .any(|l| l.contains("wharf running") && l.contains(&format!("worker_threads={threads}"))),
            "{logs}"
        );
        assert_eq!(host.terminate()?, 0);
    }
    Ok(())
}

#[tokio::test]
async fn retry_then_success_counts_attempts() -> Result {
    let setup = Setup::new(&handler(
        "flaky",
        "flaky",
        "jobs",
        "config = { succeed_on_attempt = \"3\" }\n[handlers.flaky.retry]\nmax_attempts = 5\ninitial_delay_ms = 10\nmax_delay_ms = 100\n",
    ))?;
    let host = setup.start().await?;
    host.publish("jobs", "{}", Some("f1")).await?;
    host.wait_for("the success", LONG, || async {
        Ok(host.outcome_count("flaky", "acked").await? == 1)
    })
    .await?;
    assert_eq!(host.outcome_count("flaky", "retried").await?, 2);
    assert!(host.dead_letters("jobs").await?.is_empty());
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    assert_eq!(db.counter("default", "done:f1"), 3, "succeeded on the third attempt");
    assert_eq!(db.counter("default", "runs:f1"), 3);
    Ok(())
}

#[tokio::test]
async fn retries_exhausted_dead_letter_with_the_last_reason() -> Result {
    let setup = Setup::new(&handler(
        "flaky",
        "flaky",
        "jobs",
        "config = { succeed_on_attempt = \"99\" }\ndead_letter = \"jobs.failed\"\n[handlers.flaky.retry]\nmax_attempts = 3\ninitial_delay_ms = 10\nmax_delay_ms = 50\n",
    ))?;
    let host = setup.start().await?;
    host.publish("jobs", "{}", Some("never")).await?;
    host.wait_for("the dead letter", LONG, || async {
        Ok(host.dead_letters("jobs.failed").await?.len() == 1)
    })
    .await?;
    let dead = host.dead_letters("jobs.failed").await?;
    let h = &dead[0].headers;
    assert_eq!(header(h, "wharf-dead-letter-reason"), "retry");
    assert_eq!(header(h, "wharf-dead-letter-attempts"), "3");
    assert_eq!(header(h, "wharf-dead-letter-error"), "not yet (attempt 3)");
    assert_eq!(host.terminate()?, 0);
    Ok(())
}

/// `--log-format json` (here through `WHARF_LOG_FORMAT`): every line the host
/// writes is one JSON object, and a failed message's line carries the
/// handler, the message id and the reason as fields of their own.
#[tokio::test]
async fn json_logs_name_the_handler_message_and_reason() -> Result {
    let setup = Setup::new(&handler("validate", "reject", "input", ""))?;
    let host = Host::start_with_env(&setup.manifest, &setup.data_dir(), &[("WHARF_LOG_FORMAT", "json")]).await?;
    host.publish("input", r#"{"valid": false}"#, Some("bad")).await?;
    host.wait_drained(LONG).await?;
    let logs = host.logs();
    assert_eq!(host.terminate()?, 0);
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("not a JSON line ({e}): {l}")))
        .collect::<Result<_>>()?;
    assert!(lines.len() > 3, "{logs}");
    let dead = lines
        .iter()
        .find(|l| l["message"] == "message dead-lettered")
        .ok_or_else(|| anyhow::anyhow!("no dead-letter line in:\n{logs}"))?;
    assert_eq!(dead["level"], "ERROR");
    assert_eq!(dead["handler"], "validate");
    assert_eq!(dead["message_id"], "bad");
    assert_eq!(dead["reason"], "rejected");
    assert_eq!(dead["error"], "input is marked invalid");
    Ok(())
}

#[tokio::test]
async fn reject_dead_letters_at_once_and_replay_returns_it() -> Result {
    let setup = Setup::new(&handler("validate", "reject", "input", ""))?;
    let host = setup.start().await?;
    host.publish("input", r#"{"valid": false}"#, Some("bad")).await?;
    host.publish("input", "not json", Some("garbage")).await?;
    host.publish("input", r#"{"valid": true}"#, Some("good")).await?;
    host.wait_drained(LONG).await?;
    let dead: BTreeMap<String, _> = host
        .dead_letters("input")
        .await?
        .into_iter()
        .map(|d| (d.id.clone(), d))
        .collect();
    assert_eq!(dead.keys().collect::<Vec<_>>(), ["bad", "garbage"]);
    for d in dead.values() {
        assert_eq!(header(&d.headers, "wharf-dead-letter-reason"), "rejected");
        assert_eq!(header(&d.headers, "wharf-dead-letter-attempts"), "1");
        assert_eq!(header(&d.headers, "wharf-dead-letter-handler"), "validate");
        assert_eq!(header(&d.headers, "wharf-dead-letter-subject"), "input");
        assert!(header(&d.headers, "wharf-dead-letter-first-seen-ms").parse::<u64>()? > 0);
    }
    assert_eq!(
        header(&dead["bad"].headers, "wharf-dead-letter-error"),
        "input is marked invalid"
    );
    assert!(header(&dead["garbage"].headers, "wharf-dead-letter-error").contains("not the expected JSON"));
    assert!(host.logs().contains("message dead-lettered"), "the failure is logged");

    // The CLI lists and replays; a replayed bad message is rejected again.
    let (code, out, _) = wharf(&["dlq", "list", "--url", &host.url, "input"])?;
    assert_eq!(code, 0);
    assert!(out.contains("\"garbage\""), "{out}");
    let (code, out, _) = wharf(&["dlq", "replay", "--url", &host.url, "input", "--id", "bad"])?;
    assert_eq!(code, 0);
    assert!(out.contains("\"replayed\": 1"), "{out}");
    host.wait_for("the replayed message to be rejected again", LONG, || async {
        Ok(host.outcome_count("validate", "dead_lettered").await? == 3)
    })
    .await?;
    assert_eq!(host.dead_letters("input").await?.len(), 2);
    assert_eq!(host.terminate()?, 0);
    Ok(())
}

#[tokio::test]
async fn infinite_loop_is_stopped_by_the_deadline_and_others_keep_running() -> Result {
    let manifest = format!(
        "{}{}",
        handler(
            "spin",
            "spin",
            "spin",
            "timeout_ms = 300\n[handlers.spin.retry]\nmax_attempts = 2\ninitial_delay_ms = 10\nmax_delay_ms = 10\n"
        ),
        handler("count", "ok", "jobs", "")
    );
    let setup = Setup::new(&manifest)?;
    let host = setup.start().await?;
    host.publish("spin", "{}", Some("loop")).await?;
    for i in 0..5 {
        host.publish("jobs", "{}", Some(&format!("j{i}"))).await?;
    }
    host.wait_for("the spinning message to be dead-lettered", LONG, || async {
        Ok(host.dead_letters("spin").await?.len() == 1)
    })
    .await?;
    let dead = host.dead_letters("spin").await?;
    assert_eq!(header(&dead[0].headers, "wharf-dead-letter-reason"), "timeout");
    assert_eq!(header(&dead[0].headers, "wharf-dead-letter-attempts"), "2");
    assert!(header(&dead[0].headers, "wharf-dead-letter-error").contains("CPU budget of 300 ms exhausted"));
    host.wait_drained(LONG).await?;
    assert_eq!(host.outcome_count("count", "acked").await?, 5);
    assert_eq!(host.terminate()?, 0);
    Ok(())
}

#[tokio::test]
async fn memory_bomb_is_stopped_by_the_cap() -> Result {
    let setup = Setup::new(&handler(
        "bomb",
        "memory_bomb",
        "bomb",
        "memory_mb = 16\n[handlers.bomb.retry]\nmax_attempts = 1\n",
    ))?;
    let host = setup.start().await?;
    host.publish("bomb", "{}", Some("b1")).await?;
    host.wait_for("the dead letter", LONG, || async {
        Ok(host.dead_letters("bomb").await?.len() == 1)
    })
    .await?;
    let dead = host.dead_letters("bomb").await?;
    assert_eq!(header(&dead[0].headers, "wharf-dead-letter-reason"), "memory");
    assert!(header(&dead[0].headers, "wharf-dead-letter-error").contains("cap of 16 MiB"));
    // The host is fine and serves on.
    host.publish("bomb", "{}", Some("b2")).await?;
    host.wait_for("the second dead letter", LONG, || async {
        Ok(host.dead_letters("bomb").await?.len() == 2)
    })
    .await?;
    assert_eq!(host.terminate()?, 0);
    Ok(())
}

#[tokio::test]
async fn trap_is_a_retried_failure_then_dead_letter() -> Result {
    let setup = Setup::new(&handler(
        "trap",
        "trap",
        "jobs",
        "[handlers.trap.retry]\nmax_attempts = 2\ninitial_delay_ms = 10\nmax_delay_ms = 10\n",
    ))?;
    let host = setup.start().await?;
    host.publish("jobs", "{}", Some("t1")).await?;
    host.wait_for("the dead letter", LONG, || async {
        Ok(host.dead_letters("jobs").await?.len() == 1)
    })
    .await?;
    let dead = host.dead_letters("jobs").await?;
    assert_eq!(header(&dead[0].headers, "wharf-dead-letter-reason"), "trap");
    assert_eq!(header(&dead[0].headers, "wharf-dead-letter-attempts"), "2");
    // The guest's panic message reached the host log, tagged with the handler.
    assert!(
        host.logs().contains("deliberate panic on message t1"),
        "{}",
        host.logs()
    );
    assert_eq!(host.terminate()?, 0);
    Ok(())
}

/// A lean handler (no_std, tests/programs-lean) imports no WASI, yet does
/// what a std one does: host calls, the outbox, a heap that grows past the
/// initial memory, a panic that traps with its message in the host log, and
/// an allocation past its memory cap reported as `memory`.
#[tokio::test]
async fn a_lean_handler_without_std_does_what_a_std_one_does() -> Result {
    let lean = lean_guests().join("lean.wasm");
    // Built without std it imports nothing but wharf's own interfaces (a std
    // build also imports wasi:io and wasi:cli, and would pass the rest).
    let engine = wasmtime::Engine::default();
    let component = wasmtime::component::Component::from_file(&engine, &lean).map_err(anyhow::Error::from)?;
    let imports: Vec<String> = component
        .component_type()
        .imports(&engine)
        .map(|(name, _)| name.to_string())
        .collect();
    assert!(
        !imports.is_empty() && imports.iter().all(|name| name.starts_with("wharf:handler/")),
        "{imports:?}"
    );
    let setup = Setup::new(&format!(
        "[handlers.lean]\ncomponent = {:?}\nsource = {{ subject = \"jobs\" }}\npublish = [\"out\"]\n\
         config = {{ forward_to = \"out\" }}\nmemory_mb = 16\n[handlers.lean.retry]\nmax_attempts = 1\n",
        lean.display().to_string()
    ))?;
    let host = setup.start().await?;
    for i in 0..5 {
        host.publish("jobs", "{}", Some(&format!("l{i}"))).await?;
    }
    // 4 MiB: the heap grows past the initial memory (just over 1 MiB).
    host.publish("jobs", r#"{"allocate_kib": 4096}"#, Some("big")).await?;
    host.publish("jobs", r#"{"panic": true}"#, Some("boom")).await?;
    host.publish("jobs", "not json", Some("bad")).await?;
    // 32 MiB, past the 16 MiB cap: the allocation fails, the SDK's panic
    // handler logs it and traps, and the host reports the cap.
    host.publish("jobs", r#"{"allocate_kib": 32768}"#, Some("huge")).await?;
    host.wait_for("three dead letters", LONG, || async {
        Ok(host.dead_letters("jobs").await?.len() == 3 && host.outcome_count("lean", "acked").await? == 6)
    })
    .await?;
    let mut dead: Vec<(String, String)> = host
        .dead_letters("jobs")
        .await?
        .iter()
        .map(|d| (d.id.clone(), header(&d.headers, "wharf-dead-letter-reason").to_string()))
        .collect();
    dead.sort();
    assert_eq!(
        dead,
        [
            ("bad".to_string(), "rejected".to_string()),
            ("boom".to_string(), "trap".to_string()),
            ("huge".to_string(), "memory".to_string())
        ]
    );
    // The panic message reached the host log through the SDK's panic handler.
    let logs = host.logs();
    assert!(logs.contains("deliberate panic on message boom"), "{logs}");
    assert!(logs.contains("memory allocation of 33554432 bytes failed"), "{logs}");
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    for i in 0..5 {
        assert_eq!(db.counter("default", &format!("runs:l{i}")), 1);
    }
    assert_eq!(db.counter("default", "allocated:big"), 4096);
    let out = db.broker.source("out").receive(20, Duration::from_secs(60)).await?;
    assert_eq!(out.len(), 6, "every acked message forwarded once");
    Ok(())
}

#[tokio::test]
async fn repeated_id_is_deduplicated() -> Result {
    let setup = Setup::new(&handler(
        "count",
        "ok",
        "jobs",
        "[handlers.count.dedup]\nttl_secs = 3600\n",
    ))?;
    let host = setup.start().await?;
    for _ in 0..3 {
        host.publish("jobs", "{}", Some("same")).await?;
        host.wait_drained(LONG).await?;
    }
    host.publish("jobs", "{}", Some("other")).await?;
    host.wait_drained(LONG).await?;
    assert_eq!(host.outcome_count("count", "acked").await?, 2);
    assert_eq!(host.outcome_count("count", "deduplicated").await?, 2);
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    assert_eq!(db.counter("default", "runs:same"), 1);
    assert_eq!(db.counter("default", "runs:other"), 1);
    assert_eq!(wharf::delivery::dedup::count(&db.store, "count")?, 2);
    Ok(())
}

#[tokio::test]
async fn outbox_is_discarded_on_failure_and_released_on_success() -> Result {
    let setup = Setup::new(&handler(
        "fanout",
        "outbox",
        "jobs",
        "publish = [\"out\"]\n[handlers.fanout.retry]\ninitial_delay_ms = 10\nmax_delay_ms = 10\n",
    ))?;
    let host = setup.start().await?;
    host.publish("jobs", "{}", Some("o1")).await?;
    host.wait_for("the success", LONG, || async {
        Ok(host.outcome_count("fanout", "acked").await? == 1)
    })
    .await?;
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    let out = db.broker.source("out").receive(10, Duration::from_secs(60)).await?;
    let mut seen: Vec<(String, String)> = out
        .iter()
        .map(|d| (d.id.clone(), header(&d.headers, "attempt").to_string()))
        .collect();
    seen.sort();
    // Only the second attempt's two publishes, with ids derived from the source id.
    assert_eq!(
        seen,
        [
            ("o1/0".to_string(), "2".to_string()),
            ("o1/1".to_string(), "2".to_string())
        ]
    );
    Ok(())
}

#[tokio::test]
async fn sandbox_denies_files_env_network_and_ungranted_publish() -> Result {
    let setup = Setup::new(&handler("probe", "sandbox", "jobs", "publish = [\"allowed\"]\n"))?;
    let host = setup.start().await?;
    host.publish("jobs", "{}", Some("s1")).await?;
    host.wait_drained(LONG).await?;
    let dead = host.dead_letters("jobs").await?;
    assert!(
        dead.is_empty(),
        "the guest got out: {:?}",
        dead.first().map(|d| &d.headers)
    );
    assert_eq!(host.outcome_count("probe", "acked").await?, 1);
    let logs = host.logs();
    assert!(logs.contains("stdout goes to the host log"), "{logs}");
    assert!(logs.contains("publish denied"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "a control character reached the log");
    assert_eq!(host.terminate()?, 0);
    Ok(())
}

#[tokio::test]
async fn payload_too_large_is_dead_lettered_unseen() -> Result {
    let setup = Setup::new(&handler("count", "ok", "jobs", "max_payload_bytes = 10\n"))?;
    let host = setup.start().await?;
    host.publish("jobs", "this payload is longer than ten bytes", Some("big"))
        .await?;
    host.wait_for("the dead letter", LONG, || async {
        Ok(host.dead_letters("jobs").await?.len() == 1)
    })
    .await?;
    let dead = host.dead_letters("jobs").await?;
    assert_eq!(
        header(&dead[0].headers, "wharf-dead-letter-reason"),
        "payload-too-large"
    );
    assert_eq!(host.terminate()?, 0);
    assert_eq!(setup.open()?.counter("default", "runs:big"), 0, "the handler never ran");
    Ok(())
}

#[tokio::test]
async fn sigkill_mid_load_then_restart_loses_nothing() -> Result {
    sigkill_mid_load("").await
}

/// On shards the embedded broker's queue has two consumers in one process.
#[tokio::test]
async fn sigkill_on_shards_loses_nothing() -> Result {
    sigkill_mid_load("shards = 2").await
}

/// `host`: more `[host]` settings (shards).
async fn sigkill_mid_load(host: &str) -> Result {
    const MESSAGES: usize = 1500;
    const CONCURRENCY: usize = 8;
    let setup = Setup::with_host(
        host,
        &handler(
            "count",
            "ok",
            "jobs",
            &format!("concurrency = {CONCURRENCY}\ntimeout_ms = 1000\n[handlers.count.dedup]\nttl_secs = 3600\n"),
        ),
    )?;
    let shards = shards_in(host);
    let host = setup.start().await?;
    host.publish_many("jobs", MESSAGES).await?;
    host.wait_for("some progress", LONG, || async {
        Ok(host.outcome_count("count", "acked").await? >= 200)
    })
    .await?;
    host.wait_every_shard_received("count", shards).await?;
    host.kill()?;
    let left: u64 = setup.open()?.stats().iter().map(|s| s.ready + s.pending).sum();
    assert!(
        left > 0,
        "the host finished everything before it was killed; the test proves nothing"
    );

    let host = setup.start().await?;
    // In-flight messages come back when their lease (2 × 1 s + 5 s) expires.
    host.wait_drained(LONG).await?;
    assert_eq!(host.terminate()?, 0);

    let db = setup.open()?;
    assert!(db.stats().is_empty(), "{:?}", db.stats());
    db.assert_every_message_handled((0..MESSAGES).map(|i| format!("m{i}")), CONCURRENCY);
    assert_eq!(wharf::delivery::dedup::count(&db.store, "count")?, MESSAGES);
    Ok(())
}

/// A host whose `slow` handler (4 s per message, 5 s timeout, 4 at once,
/// then the manifest text `more`) has four messages, `s0`..`s3`, in flight;
/// `shutdown_grace_ms = grace_ms`.
async fn four_slow_in_flight(grace_ms: u64, more: &str) -> Result<(Setup, Host)> {
    let setup = Setup::new(&handler(
        "slow",
        "slow",
        "jobs",
        &format!("concurrency = 4\ntimeout_ms = 5000\nconfig = {{ sleep_ms = \"4000\" }}\n{more}"),
    ))?;
    let text = std::fs::read_to_string(&setup.manifest)?
        .replace("shutdown_grace_ms = 5000", &format!("shutdown_grace_ms = {grace_ms}"));
    std::fs::write(&setup.manifest, text)?;
    let host = setup.start().await?;
    for i in 0..4 {
        host.publish("jobs", "{}", Some(&format!("s{i}"))).await?;
    }
    host.wait_for("four in flight", LONG, || async {
        Ok(host.stats().await?.iter().any(|s| s.name == "jobs" && s.pending == 4))
    })
    .await?;
    Ok((setup, host))
}

#[tokio::test]
async fn graceful_shutdown_releases_in_flight_without_counting_the_attempt() -> Result {
    let (setup, host) = four_slow_in_flight(300, "").await?;
    let started = std::time::Instant::now();
    assert_eq!(host.terminate()?, 0, "graceful shutdown exits 0");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "did not wait for the slow handlers"
    );
    let db = setup.open()?;
    let again = db.broker.source("jobs").receive(10, Duration::from_secs(60)).await?;
    assert_eq!(again.len(), 4, "every in-flight message was released");
    assert!(again.iter().all(|d| d.attempt == 1 && d.redelivered), "{again:?}");
    Ok(())
}

/// A message released by a shutdown that gave up on it drops its dedup
/// claim, so its redelivery runs at once instead of being deferred until
/// the claim expires with the lease (15 s here).
#[tokio::test]
async fn a_released_message_drops_its_dedup_claim() -> Result {
    let (setup, host) = four_slow_in_flight(300, "[handlers.slow.dedup]\nttl_secs = 3600\n").await?;
    assert_eq!(host.terminate()?, 0, "graceful shutdown exits 0");
    let db = setup.open()?;
    for i in 0..4 {
        let id = format!("s{i}");
        let claim = wharf::delivery::DedupStore::claim(&db.store, "slow", &id, Duration::from_secs(60)).await?;
        assert_eq!(claim, wharf::delivery::Claim::Acquired, "{id}'s claim was left behind");
    }
    Ok(())
}

#[tokio::test]
async fn second_signal_exits_at_once_and_leases_bring_the_messages_back() -> Result {
    // A long grace: the first SIGTERM alone would wait for the 4 s handlers.
    let (setup, mut host) = four_slow_in_flight(30_000, "").await?;
    let started = std::time::Instant::now();
    host.sigterm();
    host.wait_for("the first signal to be taken", LONG, || async {
        Ok(host.logs().contains("signal received: stopping"))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(host.exited()?, None, "the first signal waits for the handlers");
    host.sigterm();
    let code = loop {
        if let Some(code) = host.exited()? {
            break code;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the second signal did not stop the host"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, 130, "{}", host.logs());

    // Nothing was acked or released: all four are leased, and come back when
    // their leases (2 × timeout + 5 s) run out.
    let db = setup.open()?;
    let source = db.broker.source("jobs");
    let mut back = Vec::new();
    let deadline = std::time::Instant::now() + LONG;
    while back.len() < 4 && std::time::Instant::now() < deadline {
        back.extend(source.receive(10, Duration::from_secs(60)).await?);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut ids: Vec<_> = back.iter().map(|d| d.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["s0", "s1", "s2", "s3"]);
    assert!(back.iter().all(|d| d.redelivered), "{back:?}");
    Ok(())
}

#[tokio::test]
async fn quickstart_pipeline_runs_end_to_end() -> Result {
    let setup = example("quickstart", "127.0.0.1:8480", &[])?;
    let host = setup.start().await?;
    for i in 0..3 {
        let order =
            format!(r#"{{"id":"o{i}","customer":"c{i}","items":[{{"sku":"apple","qty":2,"price_cents":50}}]}}"#);
        host.publish("orders", &order, Some(&format!("o{i}"))).await?;
    }
    host.publish("orders", r#"{"id":"empty","customer":"c","items":[]}"#, Some("empty"))
        .await?;
    host.wait_for("three payments", LONG, || async {
        Ok(host.outcome_count("charge-payment", "acked").await? == 3)
    })
    .await?;
    host.wait_drained(LONG).await?;
    let dead = host.dead_letters("orders").await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(&dead[0].headers, "wharf-dead-letter-error"),
        "order empty has no items"
    );
    assert_eq!(
        host.outcome_count("charge-payment", "retried").await?,
        6,
        "two gateway failures per payment"
    );
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    assert_eq!(db.counter("shop", "payments:charged"), 3);
    assert_eq!(db.counter("shop", "orders:fulfilled"), 3);
    assert_eq!(db.counter("shop", "reserved:apple"), 6);
    assert_eq!(db.counter("shop", "paid:o1"), 100);
    Ok(())
}

#[test]
fn check_accepts_the_quickstart() -> Result {
    guests();
    let manifest = workspace().join("examples/quickstart/wharf.toml");
    let (code, out, err) = wharf(&["check", &manifest.display().to_string()])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("3 handler(s) ok"), "{out}");
    Ok(())
}

/// Bad manifests, each with the exact error `wharf check` must print.
#[test]
fn bad_manifests_report_file_line_and_field() -> Result {
    let ok = program("ok").display().to_string();
    let dir = tempfile::tempdir()?;
    let not_a_component = dir.path().join("core.wasm");
    std::fs::write(&not_a_component, b"\0asm\x01\0\0\0")?;
    let cases: Vec<(String, String)> = vec![
        (
            format!("[handlers.a]\ncomponent = {ok:?}\nsource = {{ subject = \"x\" }}\nconcurency = 2\n"),
            "wharf.toml:4: handlers.a.concurency: unknown field `concurency`".into(),
        ),
        (
            format!("[handlers.a]\ncomponent = {ok:?}\nsource = {{ subject = \"x\" }}\n\n[handlers.a.dedup]\nttl_secs = 5\n"),
            "wharf.toml:6: handlers.a.dedup.ttl_secs: dedup TTL 5s is shorter than the retry horizon".into(),
        ),
        (
            format!("[handlers.a]\ncomponent = {ok:?}\ntenant = \"acme\"\nsource = {{ subject = \"x\" }}\n"),
            "wharf.toml:3: handlers.a.tenant: unknown tenant \"acme\"".into(),
        ),
        (
            format!("[tenants.t]\nmax_memory_mb = 8\n[handlers.a]\ncomponent = {ok:?}\ntenant = \"t\"\nmemory_mb = 64\nsource = {{ subject = \"x\" }}\n"),
            "wharf.toml:6: handlers.a.memory_mb: 64 exceeds tenant \"t\"'s max_memory_mb 8".into(),
        ),
        (
            format!("[handlers.a]\ncomponent = {ok:?}\nsource = {{ subject = \"x.*\" }}\n"),
            "wharf.toml:3: handlers.a.source.subject: subject \"x.*\" may not contain wildcards".into(),
        ),
        (
            "[handlers.a]\ncomponent = \"missing.wasm\"\nsource = { subject = \"x\" }\n".into(),
            "wharf.toml:2: handlers.a.component: no component at".into(),
        ),
        (
            format!("[handlers.a]\ncomponent = {:?}\nsource = {{ subject = \"x\" }}\n", not_a_component.display().to_string()),
            "is not a valid WebAssembly component: failed to parse WebAssembly module: attempted to parse a wasm module with a component parser".into(),
        ),
        (
            format!("[handlers.a]\ncomponent = {:?}\nsource = {{ subject = \"x\" }}\n", program("no_handler").display().to_string()),
            "does not export `wharf:handler/handler@0.1.0` with `handle`".into(),
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let case = dir.path().join(format!("case{i}"));
        std::fs::create_dir_all(&case)?;
        let manifest = case.join("wharf.toml");
        std::fs::write(&manifest, text)?;
        let (code, out, err) = wharf(&["check", &manifest.display().to_string()])?;
        assert_eq!(code, 1, "case {i} should fail: {out}{err}");
        let shown = format!("{out}{err}");
        let want = expected.replace("wharf.toml:", &format!("{}:", manifest.display()));
        assert!(shown.contains(&want), "case {i}: expected {want:?} in:\n{shown}");
    }
    Ok(())
}

/// The fenced block of `lang` in the README that contains `marker`.
fn readme_block(lang: &str, marker: &str) -> String {
    let readme = std::fs::read_to_string(workspace().join("README.md")).expect("README.md");
    readme
        .split(&format!("```{lang}\n"))
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block.to_string()))
        .find(|block| block.contains(marker))
        .unwrap_or_else(|| panic!("no ```{lang} block containing {marker:?} in README.md"))
}

#[test]
fn readme_wit_listing_matches_the_wit_file() {
    let strip = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim_end)
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with("///"))
            .map(str::to_string)
            .collect()
    };
    let wit = std::fs::read_to_string(workspace().join("wit/handler.wit")).expect("wit file");
    assert_eq!(strip(&readme_block("wit", "package wharf:handler")), strip(&wit));
}

#[test]
fn readme_manifest_reference_parses_with_every_field() -> Result {
    let text = readme_block("toml", "[handlers.validate.rate_limit]").replace(
        "\"validator.wasm\"",
        &format!("{:?}", program("ok").display().to_string()),
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("wharf.toml");
    let m = wharf::manifest::Manifest::parse(&path, &text).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(m.host.worker_threads, Some(2));
    assert_eq!(m.host.shards, Some(2));
    let h = &m.handlers["validate"];
    assert_eq!(
        (h.concurrency, h.timeout_ms, h.memory_mb, h.instance_reuse),
        (8, 5000, 64, 1)
    );
    assert!(h.dedup.is_some() && h.rate_limit.is_some());
    assert_eq!(m.tenants["acme"].publish, [">"]);
    Ok(())
}

#[test]
fn readme_example_error_is_what_wharf_prints() -> Result {
    guests();
    let path = workspace().join("examples/quickstart/wharf.toml");
    let text = std::fs::read_to_string(&path)?.replacen("ttl_secs = 86400", "ttl_secs = 60", 1);
    let errors = wharf::manifest::Manifest::parse(&path, &text).expect_err("a 60 s TTL is too short");
    let readme = std::fs::read_to_string(workspace().join("README.md"))?;
    let first = errors.0[0]
        .to_string()
        .replace(&format!("{}/", workspace().display()), "");
    assert!(
        readme.contains(&first),
        "README.md should show the error as printed:\n{first}"
    );
    Ok(())
}

/// A backlog waiting when the host starts is counted in full on /metrics:
/// the recorder is installed before any consumer runs (it used to be
/// installed by the HTTP server's task, which could start after the first
/// few hundred messages were already settled and uncounted).
#[tokio::test]
async fn metrics_count_a_backlog_handled_right_at_start() -> Result {
    const MESSAGES: usize = 2000;
    let setup = Setup::new(&handler("count", "ok", "jobs", "concurrency = 64\n"))?;
    {
        let offline = setup.open()?;
        let batch = (0..MESSAGES)
            .map(|i| wharf::broker::OutboundMessage {
                id: Some(format!("b{i}")),
                subject: "jobs".into(),
                payload: bytes::Bytes::from_static(b"{}"),
                headers: vec![],
                content_type: None,
                reply_to: None,
                delay: Duration::ZERO,
            })
            .collect();
        offline.broker.publish(batch).await?;
    }
    let host = setup.start().await?;
    host.wait_drained(LONG).await?;
    assert_eq!(host.outcome_count("count", "acked").await?, MESSAGES as u64);
    Ok(())
}

/// `instance_reuse = 3`: one instance handles three messages, then a fresh
/// one takes over; an instance that trapped is never used again; each
/// message's stdout is logged once. Without the setting every message gets
/// a fresh instance.
#[tokio::test]
async fn instance_reuse_serves_a_few_messages_per_instance_and_drops_a_trapped_one() -> Result {
    let manifest = format!(
        "{}{}",
        handler(
            "warm",
            "reuse",
            "warm",
            "concurrency = 1\ninstance_reuse = 3\n[handlers.warm.retry]\nmax_attempts = 1\n"
        ),
        handler("cold", "reuse", "cold", "concurrency = 1\n"),
    );
    let setup = Setup::new(&manifest)?;
    let host = setup.start().await?;
    // One at a time, so the order (and so each instance's count) is known.
    let sequence = ["w0", "w1", "w2", "w3", "w4", "boom", "w5", "w6"];
    for (i, id) in sequence.iter().enumerate() {
        let body = if *id == "boom" { "trap" } else { "{}" };
        host.publish("warm", body, Some(id)).await?;
        host.publish("cold", "{}", Some(&format!("c{i}"))).await?;
        host.wait_for("the message", LONG, || async {
            let warm = host.outcome_count("warm", "acked").await? + host.outcome_count("warm", "dead_lettered").await?;
            Ok(warm == i as u64 + 1 && host.outcome_count("cold", "acked").await? == i as u64 + 1)
        })
        .await?;
    }
    let logs = host.logs();
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    let served: Vec<i64> = ["w0", "w1", "w2", "w3", "w4", "w5", "w6"]
        .iter()
        .map(|id| db.counter("default", &format!("served:{id}")))
        .collect();
    // w3 starts a new instance (three served); w4 shares it with the trap,
    // which retires it, so w5 is on a fresh one again.
    assert_eq!(served, [1, 2, 3, 1, 2, 1, 2]);
    for i in 0..sequence.len() {
        assert_eq!(
            db.counter("default", &format!("served:c{i}")),
            1,
            "no reuse unless asked"
        );
    }
    for id in ["w0", "w1", "w2", "w3", "w4", "w5", "w6"] {
        assert_eq!(
            logs.matches(&format!("handled {id}")).count(),
            1,
            "{id}'s stdout once:\n{logs}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn publish_and_log_caps_hold_per_attempt() -> Result {
    let setup = Setup::new(&handler(
        "limits",
        "limits",
        "jobs",
        "publish = [\"out\"]\nmax_publishes = 7\nmax_log_bytes = 5000\n",
    ))?;
    let host = setup.start().await?;
    host.publish("jobs", "{}", Some("l1")).await?;
    host.wait_for("the attempt", LONG, || async {
        Ok(host.outcome_count("limits", "acked").await? == 1)
    })
    .await?;
    let logs = host.logs();
    assert_eq!(
        logs.matches(&"y".repeat(1000)).count(),
        5,
        "only max_log_bytes of log lines are kept"
    );
    assert!(
        logs.contains("log lines dropped") && logs.contains("dropped=95"),
        "{logs}"
    );
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    assert_eq!(db.counter("default", "published:l1"), 7);
    assert_eq!(db.stats().iter().find(|s| s.name == "out").map(|s| s.ready), Some(7));
    Ok(())
}

#[tokio::test]
async fn compiled_components_are_cached_tampered_artifacts_refused_and_old_ones_pruned() -> Result {
    let setup = Setup::new(&handler("count", "ok", "jobs", ""))?;
    setup.start().await?.terminate()?;
    let cache = setup.data_dir().join("cache");
    let artifacts: Vec<_> = std::fs::read_dir(&cache)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(artifacts.len(), 1, "one compiled artifact per component");

    // A restart loads it instead of compiling.
    let host = setup.start().await?;
    assert!(
        host.logs().contains("loaded compiled component from cache"),
        "{}",
        host.logs()
    );
    assert!(!host.logs().contains("compiling component"));
    host.terminate()?;

    // An artifact changed behind the host's back is not deserialised.
    let mut bytes = std::fs::read(&artifacts[0])?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&artifacts[0], bytes)?;
    let host = setup.start().await?;
    let logs = host.logs();
    assert!(
        logs.contains("checksum does not match") && logs.contains("compiling component"),
        "{logs}"
    );
    host.publish("jobs", "{}", Some("after")).await?;
    host.wait_drained(LONG).await?;
    assert_eq!(host.outcome_count("count", "acked").await?, 1);
    host.terminate()?;

    // Builds no handler runs (reloaded away, or of an older wharf): the 16
    // used last are kept, older ones removed at start-up; the running one
    // stays however long ago it was last used.
    let set_used = |path: &std::path::Path, ago: Duration| -> std::io::Result<()> {
        let f = std::fs::File::options().write(true).open(path)?;
        f.set_modified(std::time::SystemTime::now() - ago)
    };
    let hour = Duration::from_secs(3600);
    for i in 0..20u32 {
        let artifact = cache.join(format!("{i:064x}-0000000000000000.cwasm"));
        std::fs::write(&artifact, "old build")?;
        std::fs::write(artifact.with_extension("sha256"), "checksum")?;
        set_used(&artifact, hour * (i + 1))?;
    }
    set_used(&artifacts[0], hour * 48)?;
    setup.start().await?.terminate()?;
    let mut left: Vec<_> = std::fs::read_dir(&cache)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    left.sort();
    let mut expected: Vec<_> = (0..16u32)
        .map(|i| cache.join(format!("{i:064x}-0000000000000000.cwasm")))
        .chain([artifacts[0].clone()])
        .collect();
    expected.sort();
    assert_eq!(left, expected);
    assert!(!cache.join(format!("{:064x}-0000000000000000.sha256", 19)).exists());
    Ok(())
}

#[tokio::test]
async fn delayed_publish_is_not_delivered_early() -> Result {
    let setup = Setup::new(&handler("count", "ok", "jobs", ""))?;
    let host = setup.start().await?;
    let published = std::time::Instant::now();
    host.publish_delayed("jobs", "{}", Some("later"), 1500).await?;
    host.publish("jobs", "{}", Some("now")).await?;
    host.wait_for("the immediate one", LONG, || async {
        Ok(host.outcome_count("count", "acked").await? >= 1)
    })
    .await?;
    let stats = host.stats().await?;
    if published.elapsed() < Duration::from_millis(1400) {
        assert_eq!(
            host.outcome_count("count", "acked").await?,
            1,
            "the delayed message ran early"
        );
        assert_eq!(
            stats.iter().find(|s| s.name == "jobs").map(|s| s.pending),
            Some(1),
            "{stats:?}"
        );
    }
    host.wait_for("the delayed one", LONG, || async {
        Ok(host.outcome_count("count", "acked").await? == 2)
    })
    .await?;
    assert!(
        published.elapsed() >= Duration::from_millis(1500),
        "delivered before its due time"
    );
    assert_eq!(host.terminate()?, 0);
    Ok(())
}

#[tokio::test]
async fn rate_limit_caps_messages_per_period() -> Result {
    let setup = Setup::new(&handler(
        "count",
        "ok",
        "jobs",
        "concurrency = 8\n[handlers.count.rate_limit]\nmessages = 4\nper_ms = 1000\n",
    ))?;
    let host = setup.start().await?;
    for i in 0..12 {
        host.publish("jobs", "{}", Some(&format!("r{i}"))).await?;
    }
    host.wait_for("the first burst", LONG, || async {
        Ok(host.outcome_count("count", "acked").await? >= 4)
    })
    .await?;
    let burst_done = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Within 400 ms of the burst at most the burst and two more (one per
    // 250 ms) can have gone through, however slow this machine is.
    let within = host.outcome_count("count", "acked").await?;
    let elapsed = burst_done.elapsed();
    let allowed = 4 + 1 + (elapsed.as_millis() / 250) as u64;
    assert!(
        within <= allowed,
        "{within} handled within {elapsed:?} of a 4-per-second burst"
    );
    host.wait_drained(LONG).await?;
    assert_eq!(host.outcome_count("count", "acked").await?, 12);
    assert_eq!(host.terminate()?, 0);
    Ok(())
}

#[tokio::test]
async fn tenant_concurrency_caps_its_handlers_together() -> Result {
    // Two handlers of tenant `acme` (cap 2) may each run 4 at once, as may a
    // handler of the default tenant; every attempt counts itself in its
    // tenant's key-value store while it sleeps.
    let track = "concurrency = 4\nconfig = { sleep_ms = \"150\", track_in_flight = \"1\" }\n";
    let acme = format!("tenant = \"acme\"\n{track}");
    let setup = Setup::new(&format!(
        "[tenants.acme]\nmax_concurrency = 2\n\n{}{}{}",
        handler("a", "slow", "acme.a", &acme),
        handler("b", "slow", "acme.b", &acme),
        handler("free", "slow", "free", track),
    ))?;
    let host = setup.start().await?;
    for i in 0..6 {
        host.publish("acme.a", "{}", Some(&format!("a{i}"))).await?;
        host.publish("acme.b", "{}", Some(&format!("b{i}"))).await?;
    }
    for i in 0..8 {
        host.publish("free", "{}", Some(&format!("f{i}"))).await?;
    }
    host.wait_drained(LONG).await?;
    for (handler, n) in [("a", 6), ("b", 6), ("free", 8)] {
        assert_eq!(host.outcome_count(handler, "acked").await?, n, "{handler}");
    }
    assert_eq!(host.terminate()?, 0);

    let offline = setup.open()?;
    let peak = |tenant: &str| {
        (1..=8)
            .filter(|n| offline.counter(tenant, &format!("in-flight-seen:{n}")) > 0)
            .max()
            .unwrap_or(0)
    };
    // Twelve 150 ms messages reach the cap; nothing ever runs past it.
    assert_eq!(peak("acme"), 2, "acme's handlers ran that many at once");
    // The default tenant's handler is not held to acme's budget.
    assert!(
        peak("default") > 2,
        "the default tenant ran {} at once",
        peak("default")
    );
    Ok(())
}
