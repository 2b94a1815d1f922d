//! Redis end-to-end tests, against a real Redis: the machine's own
//! (`WHARF_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`), or one a test
//! starts itself when it needs to restart the server. With `CI=true` an
//! unreachable Redis fails the tests; elsewhere they are skipped, loudly.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use redis::AsyncCommands;

use crate::harness::*;

fn url() -> String {
    std::env::var("WHARF_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A connection to the test Redis, or `None` (skip) when it is unreachable
/// outside CI.
async fn connect(url: &str) -> Option<redis::aio::MultiplexedConnection> {
    let attempt = async { redis::Client::open(url)?.get_multiplexed_async_connection().await };
    reachable(
        &format!("Redis at {url} (WHARF_TEST_REDIS_URL)"),
        Duration::from_secs(3),
        attempt,
    )
    .await
}

/// A key prefix no other test run uses.
fn prefix() -> String {
    format!("wharf-test-{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish() as u32
}

fn broker(url: &str) -> String {
    format!("[brokers.r]\nkind = \"redis\"\nurl = {url:?}\n\n")
}

/// A handler on the Redis broker of [`broker`], its source of `kind`.
fn redis_handler(kind: &str, name: &str, program: &str, subject: &str, extra: &str) -> String {
    handler(name, program, subject, extra)
        .replace("source = {", &format!("source = {{ broker = \"r\", kind = \"{kind}\","))
}

/// Entries of stream `key` as (entry id, fields).
async fn xrange(c: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<BTreeMap<String, String>> {
    let reply: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(c)
        .await
        .expect("XRANGE");
    reply
        .into_iter()
        .map(|(_, fields)| fields.into_iter().collect())
        .collect()
}

async fn xadd(c: &mut redis::aio::MultiplexedConnection, key: &str, id: &str, payload: &str) {
    let _: String = redis::cmd("XADD")
        .arg(key)
        .arg("*")
        .arg("id")
        .arg(id)
        .arg("payload")
        .arg(payload)
        .query_async(c)
        .await
        .expect("XADD");
}

fn job(id: &str, payload: &str) -> String {
    serde_json::json!({ "id": id, "payload": payload }).to_string()
}

/// Pending + lag of every consumer group of `stream` (0 when all have caught
/// up). A stream or group that does not exist yet counts as not caught up.
async fn group_backlog(c: &mut redis::aio::MultiplexedConnection, stream: &str) -> u64 {
    let reply: redis::Value = match redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(c).await {
        Ok(v) => v,
        Err(_) => return u64::MAX,
    };
    let redis::Value::Array(groups) = reply else {
        return u64::MAX;
    };
    if groups.is_empty() {
        return u64::MAX;
    }
    let mut total = 0u64;
    for group in groups {
        let fields: Vec<(String, redis::Value)> = match group {
            redis::Value::Array(flat) => flat
                .chunks(2)
                .filter_map(|kv| match kv {
                    [redis::Value::BulkString(k), v] => Some((String::from_utf8_lossy(k).into_owned(), v.clone())),
                    [redis::Value::SimpleString(k), v] => Some((k.clone(), v.clone())),
                    _ => None,
                })
                .collect(),
            redis::Value::Map(pairs) => pairs
                .into_iter()
                .filter_map(|(k, v)| match k {
                    redis::Value::BulkString(k) => Some((String::from_utf8_lossy(&k).into_owned(), v)),
                    redis::Value::SimpleString(k) => Some((k, v)),
                    _ => None,
                })
                .collect(),
            _ => return u64::MAX,
        };
        for key in ["pending", "lag"] {
            match fields.iter().find(|(k, _)| k == key).map(|(_, v)| v) {
                Some(redis::Value::Int(n)) => total += *n as u64,
                // Unknown lag, or a field missing: not caught up.
                _ => return u64::MAX,
            }
        }
    }
    total
}

#[tokio::test]
async fn redis_stream_success_retry_dead_letter_dedup() -> Result {
    let url = url();
    let Some(mut c) = connect(&url).await else {
        return Ok(());
    };
    let p = prefix();
    let stream =
        |name: &str, program: &str, subject: &str, extra: &str| redis_handler("stream", name, program, subject, extra);
    let manifest = format!(
        "{}{}{}{}",
        broker(&url),
        stream(
            "count",
            "ok",
            &format!("{p}.a"),
            "[handlers.count.dedup]\nttl_secs = 3600\n"
        ),
        stream(
            "flaky",
            "flaky",
            &format!("{p}.b"),
            "[handlers.flaky.retry]\ninitial_delay_ms = 10\nmax_delay_ms = 50\n"
        ),
        stream("validate", "reject", &format!("{p}.c"), ""),
    );
    let setup = Setup::new(&manifest)?;
    let host = setup.start().await?;
    let a1 = format!("{p}-a1");
    xadd(&mut c, &format!("{p}.a"), &a1, "{}").await;
    xadd(&mut c, &format!("{p}.a"), &format!("{p}-a2"), "{}").await;
    xadd(&mut c, &format!("{p}.a"), &a1, "{}").await;
    xadd(&mut c, &format!("{p}.b"), "f1", "{}").await;
    xadd(&mut c, &format!("{p}.c"), "bad", r#"{"valid": false}"#).await;
    xadd(&mut c, &format!("{p}.c"), "good", r#"{"valid": true}"#).await;
    host.wait_for("every stream handled", LONG, || {
        let mut c = c.clone();
        let p = p.clone();
        async move {
            Ok(group_backlog(&mut c, &format!("{p}.a")).await == 0
                && group_backlog(&mut c, &format!("{p}.b")).await == 0
                && group_backlog(&mut c, &format!("{p}.c")).await == 0)
        }
    })
    .await?;
    assert_eq!(host.outcome_count("count", "acked").await?, 2);
    assert_eq!(host.outcome_count("count", "deduplicated").await?, 1);
    assert_eq!(host.outcome_count("flaky", "retried").await?, 2);
    assert_eq!(host.outcome_count("validate", "acked").await?, 1);
    let dead = xrange(&mut c, &format!("{p}.c:dead")).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["id"], "bad");
    assert_eq!(dead[0]["payload"], r#"{"valid": false}"#);
    let headers: Vec<(String, String)> = serde_json::from_str(&dead[0]["headers"])?;
    assert_eq!(header(&headers, "wharf-dead-letter-reason"), "rejected");
    assert_eq!(header(&headers, "wharf-dead-letter-subject"), format!("{p}.c"));
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    assert_eq!(db.counter("default", &format!("runs:{a1}")), 1);
    assert_eq!(
        db.counter("default", "done:f1"),
        3,
        "the delivery counter is the attempt"
    );
    // Dedup marks live in Redis, shared by every host.
    let mark: Option<String> = c.get(format!("wharf:dedup:count:{a1}")).await?;
    assert_eq!(mark.as_deref(), Some("done"));
    Ok(())
}

#[tokio::test]
async fn redis_list_success_retry_dead_letter_dedup_delayed() -> Result {
    let url = url();
    let Some(mut c) = connect(&url).await else {
        return Ok(());
    };
    let p = prefix();
    let list =
        |name: &str, program: &str, subject: &str, extra: &str| redis_handler("list", name, program, subject, extra);
    let manifest = format!(
        "{}{}{}{}",
        broker(&url),
        list(
            "count",
            "ok",
            &format!("{p}.a"),
            "[handlers.count.dedup]\nttl_secs = 3600\n"
        ),
        list(
            "flaky",
            "flaky",
            &format!("{p}.b"),
            "[handlers.flaky.retry]\ninitial_delay_ms = 10\nmax_delay_ms = 50\n"
        ),
        list("validate", "reject", &format!("{p}.c"), ""),
    );
    let setup = Setup::new(&manifest)?;
    let host = setup.start().await?;
    let a = format!("{p}.a");
    let a1 = format!("{p}-a1");
    let _: () = c.lpush(&a, job(&a1, "{}")).await?;
    let _: () = c.lpush(&a, job(&a1, "{}")).await?;
    // A foreign producer's raw item is a job too.
    let _: () = c.lpush(&a, format!("plain text job {p}")).await?;
    let _: () = c.lpush(format!("{p}.b"), job("f1", "{}")).await?;
    let _: () = c.lpush(format!("{p}.c"), job("bad", r#"{"valid": false}"#)).await?;
    // A delayed job: due 1.5 s from now by Redis' clock.
    let due = redis_now_ms(&mut c).await? + 1500;
    let later = format!("{p}-later");
    let _: () = c.zadd(format!("{a}:delayed"), job(&later, "{}"), due).await?;
    let scheduled = Instant::now();

    host.wait_for("the delayed job", LONG, || async {
        Ok(host.outcome_count("count", "acked").await? == 3)
    })
    .await?;
    assert!(
        scheduled.elapsed() >= Duration::from_millis(1400),
        "the delayed job ran early"
    );
    host.wait_for("the retried job", LONG, || async {
        Ok(host.outcome_count("flaky", "acked").await? == 1)
    })
    .await?;
    host.wait_for("the dead letter", LONG, || {
        let mut c = c.clone();
        let p = p.clone();
        async move { Ok(c.llen::<_, usize>(format!("{p}.c:dead")).await? == 1) }
    })
    .await?;
    assert_eq!(host.outcome_count("count", "deduplicated").await?, 1);
    let dead: Vec<String> = c.lrange(format!("{p}.c:dead"), 0, -1).await?;
    let dead: serde_json::Value = serde_json::from_str(&dead[0])?;
    assert_eq!(dead["id"], "bad");
    assert_eq!(dead["attempts"], 1);
    assert!(
        dead["headers"]
            .to_string()
            .contains("\"wharf-dead-letter-reason\",\"rejected\""),
        "{dead}"
    );
    // Nothing is left behind in processing lists.
    let processing: Vec<String> = c.keys(format!("{p}.*:processing:*")).await?;
    for key in processing {
        assert_eq!(c.llen::<_, usize>(&key).await?, 0, "{key} not empty");
    }
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    assert_eq!(db.counter("default", &format!("runs:{a1}")), 1);
    assert_eq!(db.counter("default", &format!("runs:{later}")), 1);
    assert_eq!(db.counter("default", "done:f1"), 3, "attempts counted in the envelope");
    Ok(())
}

#[tokio::test]
async fn redis_pubsub_success_retry_dead_letter_pattern_and_check_warns() -> Result {
    let url = url();
    let Some(mut c) = connect(&url).await else {
        return Ok(());
    };
    let p = prefix();
    let chan =
        |name: &str, program: &str, subject: &str, extra: &str| redis_handler("channel", name, program, subject, extra);
    let pattern = redis_handler(
        "pattern",
        "any",
        "ok",
        &format!("{p}.d.*"),
        "config = { count_subjects = \"1\" }\n",
    );
    let manifest = format!(
        "{}{}{}{}{}",
        broker(&url),
        pattern,
        chan("count", "ok", &format!("{p}.a"), ""),
        chan(
            "flaky",
            "flaky",
            &format!("{p}.b"),
            "[handlers.flaky.retry]\ninitial_delay_ms = 10\nmax_delay_ms = 50\n"
        ),
        chan("validate", "reject", &format!("{p}.c"), ""),
    );
    let setup = Setup::new(&manifest)?;
    let (code, out, _) = wharf(&["check", &setup.manifest.display().to_string()])?;
    assert_eq!(code, 0);
    assert!(
        out.contains("handlers.count.source.kind: Redis pub/sub is at-most-once"),
        "{out}"
    );
    let host = setup.start().await?;
    host.wait_for("three subscriptions", LONG, || {
        let mut c = c.clone();
        let p = p.clone();
        async move {
            let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(format!("{p}.a"))
                .arg(format!("{p}.b"))
                .arg(format!("{p}.c"))
                .query_async(&mut c)
                .await?;
            let patterns: u64 = redis::cmd("PUBSUB").arg("NUMPAT").query_async(&mut c).await?;
            Ok(counts.iter().all(|(_, n)| *n >= 1) && patterns >= 1)
        }
    })
    .await?;
    for channel in ["x", "x", "y"] {
        let _: () = c.publish(format!("{p}.d.{channel}"), "{}").await?;
    }
    let _: () = c.publish(format!("{p}.a"), "{}").await?;
    let _: () = c.publish(format!("{p}.b"), "{}").await?;
    let _: () = c.publish(format!("{p}.c"), r#"{"valid": false}"#).await?;
    host.wait_for("all three handled", LONG, || async {
        Ok(host.outcome_count("count", "acked").await? == 1
            && host.outcome_count("flaky", "acked").await? == 1
            && host.outcome_count("validate", "dead_lettered").await? == 1
            && host.outcome_count("any", "acked").await? == 3)
    })
    .await?;
    assert_eq!(host.outcome_count("flaky", "retried").await?, 2);
    let dead = xrange(&mut c, &format!("{p}.c:dead")).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["payload"], r#"{"valid": false}"#);
    assert_eq!(host.terminate()?, 0);
    // A pattern source's messages carry the channel they were published on.
    let db = setup.open()?;
    assert_eq!(db.counter("default", &format!("on:{p}.d.x")), 2);
    assert_eq!(db.counter("default", &format!("on:{p}.d.y")), 1);
    Ok(())
}

/// Pub/sub gives every subscriber every message, so on shards one shard
/// subscribes (with the handler's whole concurrency): a message is handled
/// once, not once per shard.
#[tokio::test]
async fn redis_pubsub_on_shards_is_read_by_one_shard() -> Result {
    const MESSAGES: u64 = 20;
    let url = url();
    let Some(mut c) = connect(&url).await else {
        return Ok(());
    };
    let p = prefix();
    let channel = format!("{p}.a");
    let manifest = format!(
        "{}{}",
        broker(&url),
        redis_handler("channel", "count", "ok", &channel, "concurrency = 4\n")
    );
    let setup = Setup::with_host("shards = 2", &manifest)?;
    let host = setup.start().await?;
    host.wait_for("the subscription", LONG, || {
        let (mut c, channel) = (c.clone(), channel.clone());
        async move { Ok(subscribers(&mut c, &channel).await? >= 1) }
    })
    .await?;
    for _ in 0..MESSAGES {
        let _: () = c.publish(&channel, "{}").await?;
    }
    host.wait_for("every message handled", LONG, || async {
        Ok(host.outcome_count("count", "acked").await? >= MESSAGES)
    })
    .await?;
    // A second subscriber would have handled each message again by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(host.outcome_count("count", "acked").await?, MESSAGES);
    assert_eq!(subscribers(&mut c, &channel).await?, 1);
    // The first shard took them all; the second has no consumer loop.
    assert_eq!(host.received_by_shard("count").await?, BTreeMap::from([(0, MESSAGES)]));
    assert_eq!(host.terminate()?, 0);
    Ok(())
}

/// How many clients subscribe to `channel`.
async fn subscribers(c: &mut redis::aio::MultiplexedConnection, channel: &str) -> Result<u64> {
    let counts: Vec<(String, u64)> = redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query_async(c).await?;
    Ok(counts.first().map_or(0, |(_, n)| *n))
}

/// Jobs of list `key` anywhere wharf keeps them: the queue, the delayed set
/// and every consumer's processing list, counted in one Lua script — an
/// atomic snapshot. (Listing the processing lists first and counting after
/// could miss a job moved from the queue into a processing list in between,
/// and call a busy list drained.)
async fn list_backlog(c: &mut redis::aio::MultiplexedConnection, key: &str) -> Result<usize> {
    let n: usize = redis::Script::new(
        "local n = redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[1] .. ':delayed') \
         for _, k in ipairs(redis.call('KEYS', KEYS[1] .. ':processing:*')) do n = n + redis.call('LLEN', k) end \
         return n",
    )
    .key(key)
    .invoke_async(c)
    .await?;
    Ok(n)
}

/// Publish `n` messages (ids `<ids>m0`, `<ids>m1`, ...) to a stream or list.
async fn preload(c: &mut redis::aio::MultiplexedConnection, key: &str, list: bool, ids: &str, n: usize) -> Result {
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut pipe = redis::pipe();
        for i in chunk {
            if list {
                pipe.cmd("LPUSH")
                    .arg(key)
                    .arg(job(&format!("{ids}m{i}"), "{}"))
                    .ignore();
            } else {
                pipe.cmd("XADD")
                    .arg(key)
                    .arg("*")
                    .arg("id")
                    .arg(format!("{ids}m{i}"))
                    .arg("payload")
                    .arg("{}")
                    .ignore();
            }
        }
        let _: () = pipe.query_async(c).await?;
    }
    Ok(())
}

/// Kill a host mid-load, start it again, and count: every message handled;
/// run twice, at most the running ones with dedup, and also those whose ack
/// was not yet confirmed without (README: "What a crash can repeat").
/// `host`: more `[host]` settings (shards).
async fn sigkill_mid_load(kind: &str, dedup: bool, host: &str) -> Result {
    const MESSAGES: usize = 1500;
    const CONCURRENCY: usize = 8;
    let dedup_table = if dedup {
        "[handlers.count.dedup]\nttl_secs = 3600\n"
    } else {
        ""
    };
    let url = url();
    let Some(mut c) = connect(&url).await else {
        return Ok(());
    };
    let p = prefix();
    let key = format!("{p}.jobs");
    let manifest = format!(
        "{}{}",
        broker(&url),
        redis_handler(
            kind,
            "count",
            "ok",
            &key,
            &format!("concurrency = {CONCURRENCY}\ntimeout_ms = 1000\n{dedup_table}")
        )
    );
    let setup = Setup::with_host(host, &manifest)?;
    let shards = shards_in(host);
    preload(&mut c, &key, kind == "list", &p, MESSAGES).await?;
    let host = setup.start().await?;
    host.wait_for("some progress", LONG, || async {
        Ok(host.outcome_count("count", "acked").await? >= 200)
    })
    .await?;
    host.wait_every_shard_received("count", shards).await?;
    host.kill()?;
    let acked_before = setup.open()?.handled((0..MESSAGES).map(|i| format!("{p}m{i}"))) as u64;
    assert!(
        acked_before < MESSAGES as u64,
        "everything was done before the kill; the test proves nothing"
    );

    // The restarted host has the same consumer names (same data folder and
    // shards), so it takes back what the killed one held.
    let host = setup.start().await?;
    host.wait_for("the backlog to drain", LONG, || {
        let mut c = c.clone();
        let key = key.clone();
        let list = kind == "list";
        async move {
            Ok(if list {
                list_backlog(&mut c, &key).await? == 0
            } else {
                group_backlog(&mut c, &key).await == 0
            })
        }
    })
    .await?;
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    let repeats = if dedup { CONCURRENCY } else { 2 * CONCURRENCY };
    db.assert_every_message_handled((0..MESSAGES).map(|i| format!("{p}m{i}")), repeats);
    Ok(())
}

#[tokio::test]
async fn redis_stream_sigkill_mid_load_then_restart_loses_nothing() -> Result {
    sigkill_mid_load("stream", true, "").await
}

#[tokio::test]
async fn redis_stream_sigkill_without_dedup_repeats_at_most_twice_concurrency() -> Result {
    sigkill_mid_load("stream", false, "").await
}

#[tokio::test]
async fn redis_list_sigkill_mid_load_then_restart_loses_nothing() -> Result {
    sigkill_mid_load("list", true, "").await
}

/// On shards each shard reads as a consumer of its own: at a restart each
/// takes back what it held (the shares of concurrency add up, so the
/// repeats are bounded as on one thread).
#[tokio::test]
async fn redis_stream_sigkill_on_shards_loses_nothing() -> Result {
    sigkill_mid_load("stream", false, "shards = 3").await
}

#[tokio::test]
async fn redis_list_sigkill_on_shards_loses_nothing() -> Result {
    sigkill_mid_load("list", true, "shards = 3").await
}

/// With `shards = 2` a stream is read by two consumers of the group, the
/// host's name and that name with `-shard1`, which share the handler's
/// concurrency; every message is handled once.
#[tokio::test]
async fn redis_shards_read_as_consumers_of_their_own() -> Result {
    const MESSAGES: usize = 400;
    let url = url();
    let Some(mut c) = connect(&url).await else {
        return Ok(());
    };
    let p = prefix();
    let key = format!("{p}.jobs");
    let manifest = format!(
        "[brokers.r]\nkind = \"redis\"\nurl = {url:?}\nconsumer = \"{p}-host\"\n\n{}",
        redis_handler("stream", "count", "ok", &key, "concurrency = 4\n")
    );
    let setup = Setup::with_host("shards = 2", &manifest)?;
    preload(&mut c, &key, false, &p, MESSAGES).await?;
    let host = setup.start().await?;
    host.wait_for("the backlog to drain", LONG, || {
        let mut c = c.clone();
        let key = key.clone();
        async move { Ok(group_backlog(&mut c, &key).await == 0) }
    })
    .await?;
    assert_eq!(host.outcome_count("count", "acked").await?, MESSAGES as u64);
    assert!(
        host.logs()
            .lines()
            .any(|l| l.contains("wharf running") && l.contains("shards=2"))
    );
    // Each shard took its part of the backlog, and nothing twice.
    let by_shard = host.received_by_shard("count").await?;
    assert_eq!(by_shard.keys().copied().collect::<Vec<_>>(), [0, 1], "{by_shard:?}");
    assert!(by_shard.values().all(|&n| n > 0), "{by_shard:?}");
    assert_eq!(by_shard.values().sum::<u64>(), MESSAGES as u64, "{by_shard:?}");
    assert_eq!(host.terminate()?, 0);

    // XINFO CONSUMERS: one consumer per shard.
    let consumers: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&key)
        .arg("wharf")
        .query_async(&mut c)
        .await?;
    let mut names = consumers
        .iter()
        .map(|consumer| redis::from_redis_value_ref::<String>(&consumer["name"]))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    names.sort();
    assert_eq!(names, [format!("{p}-host"), format!("{p}-host-shard1")]);
    let db = setup.open()?;
    db.assert_every_message_handled((0..MESSAGES).map(|i| format!("{p}m{i}")), 0);
    Ok(())
}

#[tokio::test]
async fn two_hosts_share_a_consumer_group_without_handling_twice() -> Result {
    const MESSAGES: usize = 600;
    let url = url();
    let Some(mut c) = connect(&url).await else {
        return Ok(());
    };
    let p = prefix();
    let key = format!("{p}.jobs");
    let out = format!("{p}.out");
    let manifest = format!(
        "{}{}",
        broker(&url),
        handler(
            "fwd",
            "ok",
            &key,
            &format!("publish = [{out:?}]\nconfig = {{ forward_to = {out:?} }}\n")
        )
        .replace("source = {", "source = { broker = \"r\", group = \"shared\",")
    );
    let one = Setup::new(&manifest)?;
    let two = Setup::new(&manifest)?;
    let (h1, h2) = (one.start().await?, two.start().await?);
    preload(&mut c, &key, false, &p, MESSAGES).await?;
    h1.wait_for("the group to drain", LONG, || {
        let mut c = c.clone();
        let key = key.clone();
        async move { Ok(group_backlog(&mut c, &key).await == 0) }
    })
    .await?;
    let (a, b) = (
        h1.outcome_count("fwd", "acked").await?,
        h2.outcome_count("fwd", "acked").await?,
    );
    assert_eq!(a + b, MESSAGES as u64);
    assert!(a > 0 && b > 0, "both hosts should have worked: {a} and {b}");
    // Every message was forwarded exactly once, with its outbox id.
    let forwarded = xrange(&mut c, &out).await;
    let mut ids: Vec<String> = forwarded.iter().map(|f| f["id"].clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(forwarded.len(), MESSAGES, "a message was handled twice or not at all");
    assert_eq!(ids.len(), MESSAGES);
    assert!(ids.iter().all(|id| id.ends_with("/0")));
    assert_eq!(h1.terminate()?, 0);
    assert_eq!(h2.terminate()?, 0);
    Ok(())
}

/// A manifest with two `slow` handlers on the Redis at `url`: `list` on the
/// list `jobs` and `stream` on the stream `events`, both with `extra`, both
/// counting into the same `runs:<id>` keys.
fn list_and_stream(url: &str, extra: &str) -> String {
    format!(
        "{}{}{}",
        broker(url),
        redis_handler("list", "list", "slow", "jobs", extra),
        redis_handler("stream", "stream", "slow", "events", extra),
    )
}

/// Wait until [`list_and_stream`]'s list and stream hold nothing unfinished.
async fn wait_both_drained(host: &Host, c: &redis::aio::MultiplexedConnection) -> Result {
    host.wait_for("both backlogs to drain", LONG, || {
        let mut c = c.clone();
        async move { Ok(list_backlog(&mut c, "jobs").await? == 0 && group_backlog(&mut c, "events").await == 0) }
    })
    .await
}

/// A private redis-server with an append-only file, so that it can be killed
/// and restarted with its data.
fn private_redis(dir: tempfile::TempDir, port: u16) -> Result<PrivateServer> {
    PrivateServer::start(dir, port, |port, dir| {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(dir);
        cmd
    })
}

fn redis_url(server: &PrivateServer) -> String {
    format!("redis://127.0.0.1:{}", server.port)
}

async fn wait_connect(url: &str) -> redis::aio::MultiplexedConnection {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(1), async {
            redis::Client::open(url)?.get_multiplexed_async_connection().await
        })
        .await
        {
            return c;
        }
        assert!(Instant::now() < deadline, "private redis-server at {url} did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn redis_restart_mid_load_the_host_recovers() -> Result {
    const MESSAGES: usize = 400;
    if !have_binary("redis-server") {
        return Ok(());
    }
    let port = free_port();
    let server = private_redis(tempfile::tempdir()?, port)?;
    let url = redis_url(&server);
    let mut c = wait_connect(&url).await;
    let manifest = list_and_stream(
        &url,
        "concurrency = 8\nconfig = { sleep_ms = \"5\" }\ndedup = { ttl_secs = 3600 }\n",
    );
    let setup = Setup::new(&manifest)?;
    let host = setup.start().await?;
    preload(&mut c, "jobs", true, "", MESSAGES).await?;
    preload(&mut c, "events", false, "", MESSAGES).await?;
    host.wait_for("some progress", LONG, || async {
        Ok(host.outcome_count("list", "acked").await? >= 50 && host.outcome_count("stream", "acked").await? >= 50)
    })
    .await?;
    let dir = server.kill();
    // While Redis is down the host stays up and says it is not ready.
    host.wait_not_ready("not ready").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let server = private_redis(dir, port)?;
    let mut c = wait_connect(&url).await;
    host.wait_ready("ready again").await?;
    wait_both_drained(&host, &c).await?;
    let dead: usize = c.llen("jobs:dead").await?;
    assert_eq!(dead, 0);

    // Once more, and this time Redis comes back without its data: the
    // stream's consumer group is gone and is made again.
    drop(server.kill());
    host.wait_not_ready("not ready").await?;
    let _server = private_redis(tempfile::tempdir()?, port)?;
    let mut c = wait_connect(&url).await;
    host.wait_ready("ready again").await?;
    // Everything before is settled (both backlogs drained): count from here.
    let settled = |handler: &'static str| {
        let host = &host;
        async move {
            Ok::<_, anyhow::Error>(
                host.outcome_count(handler, "acked").await? + host.outcome_count(handler, "deduplicated").await?,
            )
        }
    };
    let (list_before, stream_before) = (settled("list").await?, settled("stream").await?);
    const AFTER: u64 = 50;
    preload(&mut c, "jobs", true, "after-", AFTER as usize).await?;
    preload(&mut c, "events", false, "after-", AFTER as usize).await?;
    host.wait_for("the new messages handled", LONG, || async {
        Ok(settled("list").await? >= list_before + AFTER && settled("stream").await? >= stream_before + AFTER)
    })
    .await?;
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    let ids = (0..MESSAGES).map(|i| format!("m{i}"));
    for id in ids.chain((0..AFTER).map(|i| format!("after-m{i}"))) {
        // Both handlers count into the same key: each message twice, at least.
        assert!(
            db.counter("default", &format!("runs:{id}")) >= 2,
            "message {id} was lost"
        );
    }
    Ok(())
}

#[tokio::test]
async fn redis_example_pipeline_runs_end_to_end() -> Result {
    if !have_binary("redis-server") {
        return Ok(());
    }
    // The example uses fixed key names, so it gets a Redis of its own.
    let server = private_redis(tempfile::tempdir()?, free_port())?;
    let mut c = wait_connect(&redis_url(&server)).await;
    let setup = example(
        "redis",
        "127.0.0.1:8481",
        &[("redis://127.0.0.1:6379", &redis_url(&server))],
    )?;
    let (code, out, _) = wharf(&["check", &setup.manifest.display().to_string()])?;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("validate-live-order.source.kind: Redis pub/sub is at-most-once"),
        "{out}"
    );
    let host = setup.start().await?;
    let order =
        |id: &str| format!(r#"{{"id":"{id}","customer":"ada","items":[{{"sku":"pear","qty":2,"price_cents":75}}]}}"#);
    xadd(&mut c, "orders", "o-1", &order("o-1")).await;
    xadd(&mut c, "orders", "o-2", &order("o-2")).await;
    xadd(&mut c, "orders", "o-bad", r#"{"id":"o-bad","customer":"x","items":[]}"#).await;
    host.wait_for("the live subscription", LONG, || {
        let mut c = c.clone();
        async move {
            let n: Vec<(String, u64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg("orders.live")
                .query_async(&mut c)
                .await?;
            Ok(n.first().is_some_and(|(_, n)| *n >= 1))
        }
    })
    .await?;
    let _: () = c.publish("orders.live", order("o-3")).await?;
    host.wait_for("three payments", LONG, || async {
        Ok(host.outcome_count("charge-payment", "acked").await? == 3)
    })
    .await?;
    let dead = xrange(&mut c, "orders:dead").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["id"], "o-bad");
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    assert_eq!(db.counter("shop", "payments:charged"), 3);
    assert_eq!(db.counter("shop", "reserved:pear"), 6);
    Ok(())
}

/// The Redis dedup store keeps the same contract as the local one
/// (`delivery::dedup`'s unit test), through its batched claims and marks:
/// one claim wins among concurrent copies, `abandon` releases a claim but
/// never a mark, and a claim expires with its lease.
#[tokio::test]
async fn redis_dedup_store_claims_marks_and_abandons() -> Result {
    use wharf::delivery::Claim;
    let url = url();
    let Some(mut c) = connect(&url).await else {
        return Ok(());
    };
    let broker = wharf::broker::redis::RedisBroker::new(&url, "dedup-test".into())?;
    let store = broker.dedup();
    let h = prefix();
    let lease = Duration::from_secs(60);

    // Eight copies of one id at once (one batch, or a few): exactly one wins.
    let copies = futures_util::future::join_all((0..8).map(|_| store.claim(&h, "a", lease))).await;
    let won = copies.iter().filter(|c| matches!(c, Ok(Claim::Acquired))).count();
    assert_eq!(won, 1, "{copies:?}");
    assert!(
        copies.iter().all(|c| matches!(c, Ok(Claim::Acquired | Claim::Busy))),
        "{copies:?}"
    );
    assert_eq!(store.claim("other", "a", lease).await?, Claim::Acquired);
    let _: () = c.del("wharf:dedup:other:a").await?;

    store.abandon(&h, "a").await?;
    let key = format!("wharf:dedup:{h}:a");
    let gone: Option<String> = c.get(&key).await?;
    assert_eq!(gone, None, "abandon releases the claim");
    assert_eq!(store.claim(&h, "a", lease).await?, Claim::Acquired);
    store.finish(&h, "a", Duration::from_secs(60)).await?;
    assert_eq!(store.claim(&h, "a", lease).await?, Claim::Done);
    store.abandon(&h, "a").await?;
    assert_eq!(
        store.claim(&h, "a", lease).await?,
        Claim::Done,
        "abandon never undoes done"
    );
    let ttl: i64 = c.pttl(&key).await?;
    assert!(ttl > 0 && ttl <= 60_000, "the mark expires with its ttl: {ttl} ms");

    // A crashed attempt's claim expires with its lease.
    assert_eq!(store.claim(&h, "b", Duration::from_millis(50)).await?, Claim::Acquired);
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(store.claim(&h, "b", lease).await?, Claim::Acquired);

    let _: () = c.del(&[key, format!("wharf:dedup:{h}:b")]).await?;
    Ok(())
}

/// An empty JSON job with `id` for the list `list`, published after `delay`.
fn list_job(list: &str, id: &str, delay: Duration) -> wharf::broker::OutboundMessage {
    wharf::broker::OutboundMessage {
        id: Some(id.into()),
        subject: list.to_string(),
        payload: bytes::Bytes::from_static(b"{}"),
        headers: vec![],
        content_type: None,
        reply_to: None,
        delay,
    }
}

/// A delayed publish to a Redis list goes to its delayed set, due by Redis'
/// clock, and the rest of the batch to the list at once.
#[tokio::test]
async fn redis_list_sink_delays_by_redis_clock() -> Result {
    use wharf::broker::redis::{RedisBroker, RedisKind};
    let url = url();
    let Some(mut c) = connect(&url).await else {
        return Ok(());
    };
    let list = format!("{}.delayed-sink", prefix());
    let message = |id: &str, delay_ms: u64| list_job(&list, id, Duration::from_millis(delay_ms));
    let sink = RedisBroker::new(&url, "delay-test".into())?.sink(RedisKind::List, None);
    let before = redis_now_ms(&mut c).await?;
    sink.publish(vec![message("now", 0), message("later", 1500)]).await?;

    let queued: Vec<String> = c.lrange(&list, 0, -1).await?;
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert!(queued[0].contains("\"now\""), "{queued:?}");
    let delayed: Vec<(String, u64)> = c.zrange_withscores(format!("{list}:delayed"), 0, -1).await?;
    assert_eq!(delayed.len(), 1, "{delayed:?}");
    assert!(delayed[0].0.contains("\"later\""), "{delayed:?}");
    let due = delayed[0].1;
    assert!(
        (before + 1500..before + 2500).contains(&due),
        "due at {due}, published at {before} with a 1500 ms delay"
    );
    let _: () = c.del(&[list.clone(), format!("{list}:delayed")]).await?;
    Ok(())
}

/// Redis' clock, in ms since the epoch: what list delays are due by.
async fn redis_now_ms(c: &mut redis::aio::MultiplexedConnection) -> Result<u64> {
    let (secs, micros): (String, String) = redis::cmd("TIME").query_async(c).await?;
    Ok(secs.parse::<u64>()? * 1000 + micros.parse::<u64>()? / 1000)
}

#[tokio::test]
async fn redis_down_at_start_the_host_waits_then_works() -> Result {
    const MESSAGES: usize = 100;
    if !have_binary("redis-server") {
        return Ok(());
    }
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let manifest = list_and_stream(&url, "config = { sleep_ms = \"1\" }\n");
    let setup = Setup::new(&manifest)?;
    // Nothing listens on the port yet: the host comes up, serves, and says
    // it is not ready, for as long as Redis is away.
    let host = Host::launch(&setup.manifest, &setup.data_dir()).await?;
    for _ in 0..10 {
        assert!(!host.ready().await?, "ready with its Redis down");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let server = private_redis(tempfile::tempdir()?, port)?;
    let mut c = wait_connect(&redis_url(&server)).await;
    preload(&mut c, "jobs", true, "", MESSAGES).await?;
    preload(&mut c, "events", false, "", MESSAGES).await?;
    host.wait_ready("ready once Redis is up").await?;
    wait_both_drained(&host, &c).await?;
    assert_eq!(host.outcome_count("list", "acked").await?, MESSAGES as u64);
    assert_eq!(host.outcome_count("stream", "acked").await?, MESSAGES as u64);
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    for i in 0..MESSAGES {
        // Both handlers count into the same key: each message once per handler.
        assert_eq!(db.counter("default", &format!("runs:m{i}")), 2, "message m{i}");
    }
    Ok(())
}

/// A shutdown that comes while a `BLMOVE` is waiting: the job it then moves
/// into the processing list goes straight back to the queue, unrun, instead
/// of waiting there for the reaper. (A slow handler keeps the host alive
/// through its grace period, so the read is still outstanding at Redis when
/// the job arrives.)
#[tokio::test]
async fn redis_list_job_taken_during_shutdown_goes_back_at_once() -> Result {
    let url = url();
    let Some(mut c) = connect(&url).await else {
        return Ok(());
    };
    let p = prefix();
    let manifest = format!(
        "{}{}{}",
        broker(&url),
        redis_handler(
            "list",
            "hold",
            "slow",
            &format!("{p}.hold"),
            "config = { sleep_ms = \"3000\" }\n"
        ),
        redis_handler("list", "idle", "ok", &format!("{p}.jobs"), ""),
    );
    let setup = Setup::new(&manifest)?;
    let mut host = setup.start().await?;
    let _: () = c.lpush(format!("{p}.hold"), job("h1", "{}")).await?;
    host.wait_for("the slow job in flight", LONG, || {
        let mut c = c.clone();
        let queue = format!("{p}.hold");
        async move {
            let waiting: u64 = c.llen(&queue).await?;
            Ok(waiting == 0 && list_backlog(&mut c, &queue).await? == 1)
        }
    })
    .await?;
    host.sigterm();
    host.wait_for("the signal to be taken", LONG, || async {
        Ok(host.logs().contains("signal received: stopping"))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _: () = c.lpush(format!("{p}.jobs"), job("late", "{}")).await?;
    let deadline = std::time::Instant::now() + LONG;
    let code = loop {
        if let Some(code) = host.exited()? {
            break code;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "the host did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, 0, "{}", host.logs());
    let waiting: u64 = c.llen(format!("{p}.jobs")).await?;
    assert_eq!(waiting, 1, "the late job is back in the queue:\n{}", host.logs());
    assert_eq!(list_backlog(&mut c, &format!("{p}.jobs")).await?, 1, "and nowhere else");
    assert_eq!(setup.open()?.counter("default", "runs:late"), 0, "it did not run");
    Ok(())
}

/// List acks that meet in one batch go to Redis as one pipeline of `LREM`s,
/// and each is answered for its own job: a job taken out of the processing
/// list meanwhile (as a reaper would) is reported as not acked, the others
/// are acked, and nothing is left behind.
#[tokio::test]
async fn redis_list_acks_in_one_batch_are_answered_job_by_job() -> Result {
    use wharf::broker::redis::{RedisBroker, RedisKind};
    let url = url();
    let Some(mut c) = connect(&url).await else {
        return Ok(());
    };
    let list = format!("{}.acks", prefix());
    let broker = RedisBroker::new(&url, "ack-test".into())?;
    let job = |id: &str| list_job(&list, id, Duration::ZERO);
    broker
        .sink(RedisKind::List, None)
        .publish(vec![job("a"), job("b"), job("c"), job("d")])
        .await?;
    let source = broker.source(RedisKind::List, &list, "unused", Duration::from_secs(60));
    let deliveries = source.receive(4, Duration::from_secs(60)).await?;
    let ids: Vec<&str> = deliveries.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c", "d"]);

    // "b" leaves the processing list behind the host's back.
    let processing = format!("{list}:processing:ack-test");
    let held: Vec<String> = c.lrange(&processing, 0, -1).await?;
    let b = held.iter().find(|j| j.contains("\"b\"")).expect("b is held");
    let removed: i64 = c.lrem(&processing, 1, b).await?;
    assert_eq!(removed, 1);

    let acks = futures_util::future::join_all(deliveries.iter().map(|d| d.acker.ack())).await;
    assert!(acks[0].is_ok() && acks[2].is_ok() && acks[3].is_ok(), "{acks:?}");
    let err = format!("{:#}", acks[1].as_ref().expect_err("b was not there to ack"));
    assert!(err.contains("no longer in"), "{err}");
    let left: Vec<String> = c.lrange(&processing, 0, -1).await?;
    assert!(left.is_empty(), "{left:?}");
    let queued: usize = c.llen(&list).await?;
    assert_eq!(queued, 0);

    source.stop().await;
    let _: () = c
        .del(&[
            list.clone(),
            processing,
            format!("{list}:consumer:ack-test"),
            format!("{list}:consumers"),
        ])
        .await?;
    Ok(())
}
