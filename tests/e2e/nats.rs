//! NATS end-to-end tests against a real NATS server with JetStream
//! (`WHARF_TEST_NATS_URL`, default `nats://127.0.0.1:4222`). With `CI=true` an
//! unreachable server fails them; elsewhere they are skipped, loudly.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures_util::StreamExt;

use crate::harness::*;

fn url() -> String {
    std::env::var("WHARF_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn connect(url: &str) -> Option<async_nats::Client> {
    reachable(
        &format!("NATS at {url}"),
        Duration::from_secs(3),
        async_nats::connect(url),
    )
    .await
}

/// A subject prefix and a stream-name prefix no other run uses.
fn prefix() -> (String, String) {
    let n = format!(
        "{:08x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos()
            ^ std::process::id()
    );
    (format!("wt{n}"), format!("WT{n}"))
}

fn with_id(id: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", id);
    h
}

fn broker(url: &str, streams: &str) -> String {
    format!("[brokers.n]\nkind = \"nats\"\nurl = {url:?}\n{streams}\n")
}

fn on(kind: &str, handler_toml: String) -> String {
    handler_toml.replace("source = {", &format!("source = {{ broker = \"n\", kind = \"{kind}\","))
}

#[tokio::test]
async fn nats_core_two_hosts_share_a_queue_group() -> Result {
    two_hosts_share_a_queue_group("").await
}

/// On shards each shard subscribes on a connection of its own, in the same
/// queue group: two hosts of two shards each are four members, and each
/// message is still handled once.
#[tokio::test]
async fn nats_core_shards_share_the_queue_group() -> Result {
    two_hosts_share_a_queue_group("shards = 2").await
}

/// `host`: more `[host]` settings of both hosts.
async fn two_hosts_share_a_queue_group(host: &str) -> Result {
    let url = url();
    let Some(client) = connect(&url).await else {
        return Ok(());
    };
    let (p, _) = prefix();
    let (jobs, out) = (format!("{p}.jobs"), format!("{p}.out"));
    let manifest = format!(
        "{}{}",
        broker(&url, ""),
        on(
            "core",
            handler(
                "fwd",
                "ok",
                &jobs,
                &format!("publish = [{out:?}]\nconfig = {{ forward_to = {out:?} }}\n")
            )
        )
    );
    let (one, two) = (Setup::with_host(host, &manifest)?, Setup::with_host(host, &manifest)?);
    let (h1, h2) = (one.start().await?, two.start().await?);
    let mut forwarded = client.subscribe(out.clone()).await?;
    // Core NATS keeps nothing for late subscribers: warm up until both hosts
    // have taken a message.
    let mut warmups = 0;
    h1.wait_for("both hosts subscribed", LONG, || {
        warmups += 1;
        let (client, jobs) = (client.clone(), jobs.clone());
        let (h1, h2) = (&h1, &h2);
        async move {
            client
                .publish_with_headers(jobs, with_id(&format!("warm{warmups}")), "{}".into())
                .await?;
            client.flush().await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(h1.outcome_count("fwd", "acked").await? > 0 && h2.outcome_count("fwd", "acked").await? > 0)
        }
    })
    .await?;
    const MESSAGES: usize = 300;
    for i in 0..MESSAGES {
        client
            .publish_with_headers(jobs.clone(), with_id(&format!("m{i}")), "{}".into())
            .await?;
    }
    client.flush().await?;
    let mut seen = BTreeSet::new();
    let mut copies = 0;
    while seen.len() < MESSAGES {
        let m = tokio::time::timeout(LONG, forwarded.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("subscription ended"))?;
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        if id.starts_with('m') {
            copies += 1;
            seen.insert(id);
        }
    }
    assert_eq!(copies, MESSAGES, "a message was handled by both hosts");
    assert!(seen.iter().all(|id| id.ends_with("/0")), "outbox ids");
    let (a, b) = (
        h1.outcome_count("fwd", "acked").await?,
        h2.outcome_count("fwd", "acked").await?,
    );
    assert!(a > 1 && b > 1, "both hosts should share the work: {a} and {b}");
    // Every shard of each host is a member: 300 messages over four reach
    // each of them (a member missing all has odds of (3/4)^300).
    h1.wait_every_shard_received("fwd", shards_in(host)).await?;
    h2.wait_every_shard_received("fwd", shards_in(host)).await?;
    assert_eq!(h1.terminate()?, 0);
    assert_eq!(h2.terminate()?, 0);
    Ok(())
}

#[tokio::test]
async fn nats_request_reply_through_a_handler_and_from_a_handler() -> Result {
    let url = url();
    let Some(client) = connect(&url).await else {
        return Ok(());
    };
    let (p, _) = prefix();
    let (svc, ask) = (format!("{p}.svc.upper"), format!("{p}.ask"));
    let manifest = format!(
        "{}{}{}",
        broker(&url, ""),
        on("core", handler("upper", "reply", &svc, "")),
        on(
            "core",
            handler(
                "asker",
                "requester",
                &ask,
                &format!("publish = [\"{p}.svc.>\"]\nconfig = {{ target = {svc:?} }}\n")
            )
        ),
    );
    let setup = Setup::new(&manifest)?;
    let (code, out, _) = wharf(&["check", &setup.manifest.display().to_string()])?;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("handlers.upper.source.kind: core NATS is at-most-once"),
        "{out}"
    );
    let host = setup.start().await?;
    // A client's request is answered by the handler.
    let mut answer = None;
    for _ in 0..100 {
        match client.request(svc.clone(), "hello".into()).await {
            Ok(reply) => {
                answer = Some(reply.payload);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(answer.as_deref(), Some(&b"HELLO"[..]));
    // A handler's own request reaches another handler and gets the answer.
    client
        .publish_with_headers(ask.clone(), with_id("q1"), "abc".into())
        .await?;
    client.flush().await?;
    host.wait_for("the asker", LONG, || async {
        Ok(host.outcome_count("asker", "acked").await? == 1)
    })
    .await?;
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    let kv = wharf::kv::Kv::new(
        db.store.clone(),
        "default",
        wharf::kv::KvQuota {
            max_keys: 10,
            max_value_bytes: 100,
        },
    );
    assert_eq!(kv.get("reply:q1")?, Some(b"ABC".to_vec()));
    Ok(())
}

/// `[[brokers.n.streams]]` tables for a work stream and a dead-letter stream.
fn streams(p: &str, s: &str, window_secs: u64) -> String {
    format!(
        "[[brokers.n.streams]]\nname = \"{s}_JOBS\"\nsubjects = [\"{p}.js.>\"]\nduplicate_window_secs = {window_secs}\n\n\
         [[brokers.n.streams]]\nname = \"{s}_DEAD\"\nsubjects = [\"{p}.dead.>\"]\n"
    )
}

fn jetstream_handler(name: &str, program: &str, p: &str, s: &str, sub: &str, extra: &str) -> String {
    handler(
        name,
        program,
        &format!("{p}.js.{sub}"),
        &format!("dead_letter = \"{p}.dead.{sub}\"\n{extra}"),
    )
    .replace(
        "source = {",
        &format!("source = {{ broker = \"n\", kind = \"jetstream\", stream = \"{s}_JOBS\","),
    )
}

/// Publish `n` messages `{}` with ids `<ids>0`, `<ids>1`, ... to `subject`
/// and wait until the stream has stored every one.
async fn publish_backlog(js: &jetstream::Context, subject: &str, ids: &str, n: usize) -> Result {
    publish_bodies(js, subject, ids, n, |_| "{}".to_string()).await
}

/// [`publish_backlog`] with the `i`th message's body `body(i)`.
async fn publish_bodies(
    js: &jetstream::Context,
    subject: &str,
    ids: &str,
    n: usize,
    body: impl Fn(usize) -> String,
) -> Result {
    let mut stored = Vec::new();
    for i in 0..n {
        stored.push(
            js.publish_with_headers(subject.to_string(), with_id(&format!("{ids}{i}")), body(i).into())
                .await?,
        );
    }
    for ack in stored {
        ack.await?;
    }
    Ok(())
}

/// The jobs stream of [`streams`] and a durable consumer `slow` on
/// `<p>.js.a` with the given ack wait, made before the host starts (which
/// binds to it and keeps its ack wait).
async fn slow_consumer(
    js: &jetstream::Context,
    p: &str,
    s: &str,
    ack_wait: Duration,
) -> Result<jetstream::stream::Stream> {
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: format!("{s}_JOBS"),
            subjects: vec![format!("{p}.js.>")],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
    stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("slow".into()),
            filter_subject: format!("{p}.js.a"),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait,
            max_deliver: -1,
            ..Default::default()
        })
        .await?;
    Ok(stream)
}

/// A handler of the `slow` test program on `<prefix>.js.a`, with `extra` in
/// its table, and its durable consumer, made with `ack_wait` before the
/// host starts (the host binds to it), so a test can watch it from the
/// first moment. `None` without NATS (outside CI).
struct SlowHandler {
    js: jetstream::Context,
    subject: String,
    manifest: String,
    stream: jetstream::stream::Stream,
}

async fn slow_handler(extra: &str, ack_wait: Duration) -> Result<Option<SlowHandler>> {
    let url = url();
    let Some(client) = connect(&url).await else {
        return Ok(None);
    };
    let js = jetstream::new(client);
    let (p, s) = prefix();
    let stream = slow_consumer(&js, &p, &s, ack_wait).await?;
    let manifest = format!(
        "{}{}",
        broker(&url, &streams(&p, &s, 120)),
        jetstream_handler("slow", "slow", &p, &s, "a", extra)
    );
    Ok(Some(SlowHandler {
        js,
        subject: format!("{p}.js.a"),
        manifest,
        stream,
    }))
}

/// Wait until durable `consumer` of `stream` has nothing pending or unacked.
async fn wait_drained(host: &Host, js: &jetstream::Context, stream: &str, consumer: &str) -> Result {
    host.wait_for("the consumer to drain", LONG, || {
        let (js, stream) = (js.clone(), stream.to_string());
        async move {
            let info = js.get_stream(stream).await?.consumer_info(consumer).await?;
            Ok(info.num_pending == 0 && info.num_ack_pending == 0)
        }
    })
    .await
}

#[tokio::test]
async fn nats_jetstream_success_retry_dead_letter_dedup() -> Result {
    let url = url();
    let Some(client) = connect(&url).await else {
        return Ok(());
    };
    let js = jetstream::new(client.clone());
    let (p, s) = prefix();
    let manifest = format!(
        "{}{}{}{}",
        broker(&url, &streams(&p, &s, 1)),
        // Double acks on this one: the server confirms each ack.
        jetstream_handler(
            "count",
            "ok",
            &p,
            &s,
            "a",
            "config = { count_meta = \"1\" }\n[handlers.count.dedup]\nttl_secs = 3600\n"
        )
        .replace("kind = \"jetstream\",", "kind = \"jetstream\", double_ack = true,"),
        jetstream_handler(
            "flaky",
            "flaky",
            &p,
            &s,
            "b",
            "[handlers.flaky.retry]\ninitial_delay_ms = 10\nmax_delay_ms = 50\n"
        ),
        jetstream_handler("validate", "reject", &p, &s, "c", ""),
    );
    let setup = Setup::new(&manifest)?;
    let (code, out, _) = wharf(&["check", &setup.manifest.display().to_string()])?;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");
    let host = setup.start().await?;
    let publish = |subject: String, id: &'static str, body: &'static str| {
        let js = js.clone();
        async move {
            js.publish_with_headers(subject, with_id(id), body.into())
                .await?
                .await
                .map(drop)
        }
    };
    publish(format!("{p}.js.a"), "a1", "{}").await?;
    publish(format!("{p}.js.a"), "a2", "{}").await?;
    publish(format!("{p}.js.b"), "f1", "{}").await?;
    let bad = js
        .publish_with_headers(format!("{p}.js.c"), with_id("bad"), r#"{"valid": false}"#.into())
        .await?
        .await?;
    // The same id again once the stream's 1 s duplicate window has passed:
    // only wharf's dedup can catch it now.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    publish(format!("{p}.js.a"), "a1", "{}").await?;
    host.wait_for("everything handled", LONG, || async {
        Ok(host.outcome_count("count", "acked").await? == 2
            && host.outcome_count("count", "deduplicated").await? == 1
            && host.outcome_count("flaky", "acked").await? == 1
            && host.outcome_count("validate", "dead_lettered").await? == 1)
    })
    .await?;
    assert_eq!(host.outcome_count("flaky", "retried").await?, 2);
    let dead = js.get_stream(format!("{s}_DEAD")).await?.get_raw_message(1).await?;
    let headers = dead.headers;
    assert_eq!(
        headers
            .get("wharf-dead-letter-reason")
            .map(|v| v.to_string())
            .as_deref(),
        Some("rejected")
    );
    assert_eq!(
        headers.get("Nats-Msg-Id").map(|v| v.to_string()).as_deref(),
        Some("bad:dead")
    );
    assert_eq!(&dead.payload[..], br#"{"valid": false}"#);
    // First seen is when the server stored the message, read from its ack
    // subject; the stream's own record of it says the same.
    let stored = js.get_stream(&bad.stream).await?.get_raw_message(bad.sequence).await?;
    let stored_ms = (stored.time.unix_timestamp_nanos() / 1_000_000).to_string();
    assert_eq!(
        headers.get("wharf-dead-letter-first-seen-ms").map(|v| v.to_string()),
        Some(stored_ms)
    );
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    assert_eq!(db.counter("default", "runs:a1"), 1);
    // The handler is given the message's headers (the id) and no content type.
    assert_eq!(db.counter("default", "header:Nats-Msg-Id=a2"), 1);
    assert_eq!(db.counter("default", "content-type:none"), 2);
    assert_eq!(db.counter("default", "done:f1"), 3, "the delivery count is the attempt");
    Ok(())
}

#[tokio::test]
async fn nats_jetstream_sigkill_mid_load_then_restart_loses_nothing() -> Result {
    jetstream_sigkill_mid_load("").await
}

/// On shards each shard pulls from the one durable consumer on a
/// connection of its own.
#[tokio::test]
async fn nats_jetstream_sigkill_on_shards_loses_nothing() -> Result {
    jetstream_sigkill_mid_load("shards = 2").await
}

/// `host`: more `[host]` settings (shards).
async fn jetstream_sigkill_mid_load(host: &str) -> Result {
    const MESSAGES: usize = 1500;
    const CONCURRENCY: usize = 8;
    let url = url();
    let Some(client) = connect(&url).await else {
        return Ok(());
    };
    let js = jetstream::new(client.clone());
    let (p, s) = prefix();
    let manifest = format!(
        "{}{}",
        broker(&url, &streams(&p, &s, 120)),
        jetstream_handler(
            "count",
            "ok",
            &p,
            &s,
            "a",
            &format!("concurrency = {CONCURRENCY}\ntimeout_ms = 1000\n[handlers.count.dedup]\nttl_secs = 3600\n")
        ),
    );
    let setup = Setup::with_host(host, &manifest)?;
    let shards = shards_in(host);
    let host = setup.start().await?;
    publish_backlog(&js, &format!("{p}.js.a"), "m", MESSAGES).await?;
    host.wait_for("some progress", LONG, || async {
        Ok(host.outcome_count("count", "acked").await? >= 200)
    })
    .await?;
    host.wait_every_shard_received("count", shards).await?;
    host.kill()?;
    let done = setup.open()?.handled((0..MESSAGES).map(|i| format!("m{i}")));
    assert!(
        done < MESSAGES,
        "everything was done before the kill; the test proves nothing"
    );
    // Same durable consumer: the restarted host resumes it; what the killed
    // one held comes back after the ack wait.
    let host = setup.start().await?;
    wait_drained(&host, &js, &format!("{s}_JOBS"), "count").await?;
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    db.assert_every_message_handled((0..MESSAGES).map(|i| format!("m{i}")), CONCURRENCY);
    Ok(())
}

/// A private nats-server with JetStream, its store in `dir`.
fn private_nats(dir: tempfile::TempDir, port: u16) -> Result<PrivateServer> {
    PrivateServer::start(dir, port, |port, dir| {
        let mut cmd = std::process::Command::new("nats-server");
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir);
        cmd
    })
}

/// A private nats-server with JetStream on a free port, with an empty
/// store: the server, its port and URL, and a client connected to it.
async fn private_nats_on_a_free_port() -> Result<(PrivateServer, u16, String, async_nats::Client)> {
    let port = free_port();
    let server = private_nats(tempfile::tempdir()?, port)?;
    let url = format!("nats://127.0.0.1:{port}");
    let client = wait_nats(&url).await?;
    Ok((server, port, url, client))
}

async fn wait_nats(url: &str) -> Result<async_nats::Client> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match async_nats::connect(url).await {
            Ok(c) => return Ok(c),
            Err(e) if std::time::Instant::now() > deadline => anyhow::bail!("NATS at {url} did not come up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The NATS server is killed (SIGKILL) while a JetStream backlog drains and
/// started again on its store: the host says it is not ready while the
/// server is away, then resumes the durable consumer (every message handled,
/// none dead-lettered, none run twice beyond what was in flight) and
/// subscribes its core subject again. Killed once more and started without
/// its data, the server gets the stream and the consumer declared again.
#[tokio::test]
async fn nats_server_restart_mid_load_the_host_recovers() -> Result {
    const MESSAGES: usize = 600;
    const CONCURRENCY: usize = 8;
    if !have_binary("nats-server") {
        return Ok(());
    }
    let (server, port, url, client) = private_nats_on_a_free_port().await?;
    let (p, s) = prefix();
    let live = format!("{p}.live");
    let manifest = format!(
        "{}{}{}",
        broker(&url, &streams(&p, &s, 120)),
        jetstream_handler(
            "count",
            "slow",
            &p,
            &s,
            "a",
            &format!(
                "concurrency = {CONCURRENCY}\ntimeout_ms = 1000\nconfig = {{ sleep_ms = \"20\" }}\n\
                 [handlers.count.dedup]\nttl_secs = 3600\n"
            )
        ),
        on("core", handler("live", "ok", &live, "")),
    );
    let setup = Setup::new(&manifest)?;
    let host = setup.start().await?;
    let js = jetstream::new(client.clone());
    publish_backlog(&js, &format!("{p}.js.a"), "m", MESSAGES).await?;
    host.wait_for("some progress", LONG, || async {
        Ok(host.outcome_count("count", "acked").await? >= 50)
    })
    .await?;
    drop((js, client));
    let dir = server.kill();
    host.wait_not_ready("not ready while NATS is down").await?;
    let handled_while_down = host.outcome_count("count", "acked").await?;
    assert!(
        handled_while_down < MESSAGES as u64,
        "everything was done before the kill; the test proves nothing"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _server = private_nats(dir, port)?;
    let client = wait_nats(&url).await?;
    host.wait_ready("ready once NATS is back").await?;
    let js = jetstream::new(client.clone());
    wait_drained(&host, &js, &format!("{s}_JOBS"), "count").await?;
    // Core NATS keeps nothing for a subscriber that is not there yet: publish
    // until the resubscribed handler takes one.
    let mut n = 0;
    host.wait_for("the core subscription back", LONG, || {
        n += 1;
        let (client, live, host) = (client.clone(), live.clone(), &host);
        async move {
            client
                .publish_with_headers(live, with_id(&format!("live{n}")), "{}".into())
                .await?;
            client.flush().await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(host.outcome_count("live", "acked").await? > 0)
        }
    })
    .await?;
    let dead = js.get_stream(format!("{s}_DEAD")).await?.info().await?.state.messages;
    assert_eq!(dead, 0, "nothing may be dead-lettered by a broker restart");

    // Once more, and this time the server comes back without its data: the
    // host declares the stream and the consumer again and carries on.
    drop((js, client));
    drop(_server.kill());
    host.wait_not_ready("not ready while NATS is down").await?;
    let _server = private_nats(tempfile::tempdir()?, port)?;
    let client = wait_nats(&url).await?;
    let js = jetstream::new(client.clone());
    host.wait_for("the stream declared again", LONG, || {
        let js = js.clone();
        let stream = format!("{s}_JOBS");
        async move { Ok(js.get_stream(stream).await.is_ok()) }
    })
    .await?;
    const AFTER: usize = 50;
    publish_backlog(&js, &format!("{p}.js.a"), "n", AFTER).await?;
    host.wait_for("the new messages handled", LONG, || async {
        Ok(host.outcome_count("count", "acked").await? >= (MESSAGES + AFTER) as u64)
    })
    .await?;
    host.wait_ready("ready again").await?;
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    db.assert_every_message_handled((0..MESSAGES).map(|i| format!("m{i}")), CONCURRENCY);
    db.assert_every_message_handled((0..AFTER).map(|i| format!("n{i}")), 0);
    Ok(())
}

/// The NATS server comes back without its data, and the host has no
/// JetStream source whose fetch would fail and notice: it says ready again
/// only once the manifest's streams are declared on the new server, so
/// nothing is published into a stream that is not there.
#[tokio::test]
async fn nats_server_back_without_its_data_is_ready_only_with_its_streams() -> Result {
    if !have_binary("nats-server") {
        return Ok(());
    }
    let (server, port, url, client) = private_nats_on_a_free_port().await?;
    let (p, s) = prefix();
    let manifest = format!(
        "{}{}",
        broker(&url, &streams(&p, &s, 120)),
        on("core", handler("live", "ok", &format!("{p}.live"), "")),
    );
    let setup = Setup::new(&manifest)?;
    let host = setup.start().await?;
    let stream_names = [format!("{s}_JOBS"), format!("{s}_DEAD")];
    let js = jetstream::new(client.clone());
    for name in &stream_names {
        js.get_stream(name)
            .await
            .map_err(|e| anyhow::anyhow!("{name} at start-up: {e}"))?;
    }
    drop((js, client));

    drop(server.kill());
    host.wait_not_ready("not ready while NATS is down").await?;
    let _server = private_nats(tempfile::tempdir()?, port)?;
    host.wait_ready("ready once NATS is back").await?;
    let js = jetstream::new(wait_nats(&url).await?);
    for name in &stream_names {
        js.get_stream(name)
            .await
            .map_err(|e| anyhow::anyhow!("the host said ready, but {name} is not on the new server: {e}"))?;
    }
    let logs = host.logs();
    assert!(
        logs.contains("lost the connection to NATS") && logs.contains("connected to NATS"),
        "{logs}"
    );
    assert_eq!(host.terminate()?, 0);
    Ok(())
}

/// A message held longer than the consumer's ack wait is kept alive by
/// `Progress` and never redelivered under its attempt. The durable consumer
/// exists before the host, with a 1 s ack wait (far shorter than the lease
/// the host would have given it), and every message takes 2.5 s.
#[tokio::test]
async fn nats_jetstream_progress_keeps_slow_messages_past_the_ack_wait() -> Result {
    const MESSAGES: usize = 6;
    let Some(h) = slow_handler(
        "concurrency = 8\ntimeout_ms = 5000\nconfig = { sleep_ms = \"2500\" }\n",
        Duration::from_secs(1),
    )
    .await?
    else {
        return Ok(());
    };
    let setup = Setup::new(&h.manifest)?;
    let host = setup.start().await?;
    for i in 0..MESSAGES {
        h.js.publish_with_headers(h.subject.clone(), with_id(&format!("m{i}")), "{}".into())
            .await?
            .await?;
    }
    host.wait_for("every message handled", LONG, || async {
        Ok(host.outcome_count("slow", "acked").await? == MESSAGES as u64)
    })
    .await?;
    let info = h.stream.consumer_info("slow").await?;
    assert_eq!(info.num_redelivered, 0, "a held message was redelivered: {info:?}");
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    for i in 0..MESSAGES {
        assert_eq!(db.counter("default", &format!("runs:m{i}")), 1, "m{i}");
    }
    Ok(())
}

/// While the stream has a backlog a JetStream source pulls the handler's
/// concurrency at a time and keeps what it could not hand out yet; at
/// shutdown that must go back to the server at once, not sit out the ack
/// wait (125 s here) invisible to every other consumer.
#[tokio::test]
async fn nats_jetstream_prefetched_messages_go_back_at_shutdown() -> Result {
    const MESSAGES: usize = 40;
    const CONCURRENCY: usize = 4;
    let Some(h) = slow_handler(
        &format!("concurrency = {CONCURRENCY}\ntimeout_ms = 60000\n"),
        Duration::from_secs(125),
    )
    .await?
    else {
        return Ok(());
    };
    let setup = Setup::new(&h.manifest)?;
    let host = setup.start().await?;
    // Attempts of 100 to 550 ms, so that slots free one at a time (in
    // lockstep, every pull would find every slot free and keep nothing).
    publish_bodies(&h.js, &h.subject, "m", MESSAGES, |i| {
        format!("{{\"sleep_ms\": {}}}", 100 + (i % 4) * 150)
    })
    .await?;
    // More unacked than can run at once: some are waiting in the source.
    host.wait_for("messages prefetched beyond the running ones", LONG, || async {
        Ok(h.stream.clone().consumer_info("slow").await?.num_ack_pending > CONCURRENCY)
    })
    .await?;
    assert_eq!(host.terminate()?, 0);
    let done = setup.open()?.handled((0..MESSAGES).map(|i| format!("m{i}")));
    assert!(
        done < MESSAGES,
        "everything ran before the stop; the test proves nothing"
    );
    // Given back, the prefetched messages are delivered again at once; kept,
    // they would come back only after the ack wait (125 s).
    let host = setup.start().await?;
    host.wait_for("every message handled", Duration::from_secs(60), || async {
        Ok(host.outcome_count("slow", "acked").await? + done as u64 == MESSAGES as u64)
    })
    .await?;
    assert_eq!(host.outcome_count("slow", "dead_lettered").await?, 0);
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    // A graceful stop lets running attempts finish: nothing ran twice.
    db.assert_every_message_handled((0..MESSAGES).map(|i| format!("m{i}")), 0);
    Ok(())
}

/// While the stream has a backlog, the next pull goes out before the
/// prefetched messages run out, so the handler's slots never stand empty
/// for a pull's round trip. Here every slot is busy for seconds: without
/// the pull ahead, nothing more than the running messages is pulled until
/// one finishes; with it, one more pull's worth waits in the host, and no
/// more than that. A graceful stop gives the waiting ones back.
#[tokio::test]
async fn nats_jetstream_pulls_ahead_while_slots_are_busy() -> Result {
    const MESSAGES: usize = 40;
    const CONCURRENCY: usize = 4;
    let Some(h) = slow_handler(
        &format!("concurrency = {CONCURRENCY}\ntimeout_ms = 60000\n"),
        Duration::from_secs(125),
    )
    .await?
    else {
        return Ok(());
    };
    publish_bodies(&h.js, &h.subject, "m", MESSAGES, |_| "{\"sleep_ms\": 4000}".to_string()).await?;
    let setup = Setup::new(&h.manifest)?;
    let host = setup.start().await?;
    host.wait_for("a pull ahead of the running messages", LONG, || async {
        Ok(h.stream.clone().consumer_info("slow").await?.num_ack_pending >= 2 * CONCURRENCY)
    })
    .await?;
    assert_eq!(
        host.outcome_count("slow", "acked").await?,
        0,
        "a message finished first; the test proves nothing"
    );
    // One pull ahead, not one after another.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let info = h.stream.clone().consumer_info("slow").await?;
    assert_eq!(info.num_ack_pending, 2 * CONCURRENCY, "{info:?}");
    assert_eq!(host.terminate()?, 0);
    // The running ones finished and were acked.
    let info = h.stream.clone().consumer_info("slow").await?;
    assert_eq!(info.ack_floor.stream_sequence, CONCURRENCY as u64, "{info:?}");
    // The waiting ones were given back: a pull gets them at once, each with
    // the delivery the host counted (kept, they would come back only after
    // the 125 s ack wait, and this pull would get new messages instead).
    let consumer: jetstream::consumer::PullConsumer = h
        .stream
        .get_consumer("slow")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut back = consumer
        .fetch()
        .max_messages(CONCURRENCY)
        .expires(Duration::from_secs(2))
        .messages()
        .await?;
    let mut given_back = Vec::new();
    while let Some(m) = back.next().await {
        let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
        let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        given_back.push((info.stream_sequence, info.delivered));
    }
    let expected: Vec<_> = (CONCURRENCY as u64 + 1..=2 * CONCURRENCY as u64)
        .map(|seq| (seq, 2))
        .collect();
    assert_eq!(given_back, expected);
    Ok(())
}

/// A rate-limited handler takes one message at a time, after the limit:
/// its source pulls nothing ahead, so what it has not started stays on the
/// server, in other hosts' reach.
#[tokio::test]
async fn nats_jetstream_rate_limited_handler_pulls_nothing_ahead() -> Result {
    const MESSAGES: usize = 10;
    let Some(h) = slow_handler(
        "concurrency = 4\nrate_limit = { messages = 1, per_ms = 500 }\n",
        Duration::from_secs(125),
    )
    .await?
    else {
        return Ok(());
    };
    publish_backlog(&h.js, &h.subject, "m", MESSAGES).await?;
    let setup = Setup::new(&h.manifest)?;
    let host = setup.start().await?;
    let mut most = 0;
    let deadline = std::time::Instant::now() + LONG;
    while host.outcome_count("slow", "acked").await? < 4 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the handler did not run");
        let info = h.stream.clone().consumer_info("slow").await?;
        most = most.max(info.num_ack_pending);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(most, 1, "messages were pulled ahead of a rate-limited handler");
    assert_eq!(host.terminate()?, 0);
    Ok(())
}

/// A private nats-server with JetStream on a free port (the example uses
/// fixed subjects and stream names).
struct PrivateNats {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PrivateNats {
    fn start() -> Result<Option<Self>> {
        if !have_binary("nats-server") {
            return Ok(None);
        }
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        Ok(Some(Self { child, port, _dir: dir }))
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn nats_example_pipeline_runs_end_to_end() -> Result {
    let Some(server) = PrivateNats::start()? else {
        return Ok(());
    };
    let mut client = None;
    for _ in 0..100 {
        if let Ok(c) = async_nats::connect(server.url()).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = client.ok_or_else(|| anyhow::anyhow!("private nats-server did not start"))?;
    let js = jetstream::new(client.clone());
    let setup = example("nats", "127.0.0.1:8482", &[("nats://127.0.0.1:4222", &server.url())])?;
    let (code, out, _) = wharf(&["check", &setup.manifest.display().to_string()])?;
    assert_eq!(code, 0, "{out}");
    let host = setup.start().await?;
    let order =
        |id: &str| format!(r#"{{"id":"{id}","customer":"ada","items":[{{"sku":"pear","qty":2,"price_cents":75}}]}}"#);
    for id in ["o-1", "o-2"] {
        js.publish_with_headers("orders", with_id(id), order(id).into())
            .await?
            .await?;
    }
    js.publish_with_headers(
        "orders",
        with_id("o-bad"),
        r#"{"id":"o-bad","customer":"x","items":[]}"#.into(),
    )
    .await?
    .await?;
    // The core entry point: keep offering until the subscription is up.
    host.wait_for("the live order", LONG, || {
        let client = client.clone();
        let host = &host;
        async move {
            client
                .publish_with_headers("orders.live", with_id("o-3"), order("o-3").into())
                .await?;
            client.flush().await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(host.outcome_count("validate-live-order", "acked").await? >= 1)
        }
    })
    .await?;
    host.wait_for("three payments", LONG, || async {
        Ok(host.outcome_count("charge-payment", "acked").await? == 3)
    })
    .await?;
    let dead = js.get_stream("DEAD").await?.get_raw_message(1).await?;
    assert_eq!(
        dead.headers.get("Nats-Msg-Id").map(|v| v.to_string()).as_deref(),
        Some("o-bad:dead")
    );
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    // o-3 may have been offered (and validated) more than once, but each
    // copy published "o-3/0", and the stream's duplicate window kept one.
    assert_eq!(db.counter("shop", "orders:fulfilled"), 3);
    assert_eq!(db.counter("shop", "payments:charged"), 3);
    Ok(())
}
