//! RabbitMQ end-to-end tests against a real RabbitMQ
//! (`WHARF_TEST_AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! With `CI=true` an unreachable server fails them; elsewhere they are
//! skipped, loudly.

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::harness::*;

/// The connection-drop test closes every connection on the broker, so the
/// RabbitMQ tests take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn url() -> String {
    std::env::var("WHARF_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn connect(url: &str) -> Option<Channel> {
    let attempt = async {
        let conn = Connection::connect(url, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        // The connection lives as long as the channel's users need it.
        std::mem::forget(conn);
        Ok::<_, lapin::Error>(ch)
    };
    reachable(
        &format!("RabbitMQ at {url} (WHARF_TEST_AMQP_URL)"),
        Duration::from_secs(5),
        attempt,
    )
    .await
}

fn prefix() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("wt{:08x}", n ^ (std::process::id() << 8))
}

async fn publish(ch: &Channel, exchange: &str, key: &str, id: &str, body: &str) -> Result {
    let props = BasicProperties::default()
        .with_message_id(id.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        props,
    )
    .await?;
    Ok(())
}

/// Publish `ids` to `queue` (`{}` bodies) and wait until handler `count`
/// has acked `acked` messages in all.
async fn publish_until_acked(host: &Host, ch: &Channel, queue: &str, ids: &[String], acked: u64) -> Result {
    for id in ids {
        publish(ch, "", queue, id, "{}").await?;
    }
    host.wait_for(&format!("{acked} messages acked"), LONG, || async {
        Ok(host.outcome_count("count", "acked").await? == acked)
    })
    .await
}

/// Messages ready in `queue` (declares it passively).
async fn ready(ch: &Channel, queue: &str) -> Result<u32> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

/// Messages in `queues`, ready and unacknowledged (`rabbitmqctl list_queues`:
/// the AMQP passive declare only counts ready ones).
fn total_messages(queues: &[String]) -> Result<u64> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name", "messages"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "rabbitmqctl list_queues: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut total = 0;
    for line in text.lines() {
        let mut cols = line.split_whitespace();
        if let (Some(name), Some(n)) = (cols.next(), cols.next())
            && queues.iter().any(|q| q == name)
        {
            total += n.parse::<u64>()?;
        }
    }
    Ok(total)
}

fn broker(url: &str, topology: &str) -> String {
    format!("[brokers.mq]\nkind = \"amqp\"\nurl = {url:?}\n{topology}\n")
}

fn on_mq(handler_toml: String) -> String {
    handler_toml.replace("source = {", "source = { broker = \"mq\",")
}

/// A manifest with one classic queue, `<p>.jobs`, and handler `count`
/// running `program` on it.
fn one_queue(url: &str, p: &str, program: &str, extra: &str) -> String {
    format!(
        "{}{}",
        broker(url, &queues(p, &["jobs"], "classic")),
        on_mq(handler("count", program, &format!("{p}.jobs"), extra)),
    )
}

fn queues(p: &str, names: &[&str], kind: &str) -> String {
    names
        .iter()
        .map(|n| format!("[[brokers.mq.queues]]\nname = \"{p}.{n}\"\ntype = \"{kind}\"\n"))
        .collect()
}

#[tokio::test]
async fn amqp_success_retry_dead_letter_dedup_and_topic_routing() -> Result {
    let _turn = SERIAL.lock().await;
    let url = url();
    let Some(ch) = connect(&url).await else { return Ok(()) };
    let p = prefix();
    let topology = format!(
        "{}[[brokers.mq.exchanges]]\nname = \"{p}.events\"\nkind = \"topic\"\n\
         [[brokers.mq.bindings]]\nqueue = \"{p}.t1\"\nexchange = \"{p}.events\"\nrouting_key = \"order.*\"\n\
         [[brokers.mq.bindings]]\nqueue = \"{p}.t2\"\nexchange = \"{p}.events\"\nrouting_key = \"order.#\"\n\
         [[brokers.mq.bindings]]\nqueue = \"{p}.b\"\nexchange = \"{p}.events\"\nrouting_key = \"pay.*\"\n",
        queues(&p, &["a", "b", "c", "t1", "t2"], "classic")
    );
    let manifest = format!(
        "{}{}{}{}{}{}",
        broker(&url, &topology),
        on_mq(handler(
            "count",
            "ok",
            &format!("{p}.a"),
            "config = { count_meta = \"1\" }\n[handlers.count.dedup]\nttl_secs = 3600\n"
        )),
        on_mq(handler(
            "flaky",
            "flaky",
            &format!("{p}.b"),
            "config = { count_subjects = \"1\" }\n[handlers.flaky.retry]\ninitial_delay_ms = 50\nmax_delay_ms = 100\n"
        )),
        on_mq(handler("validate", "reject", &format!("{p}.c"), "")),
        on_mq(handler(
            "one",
            "ok",
            &format!("{p}.t1"),
            "config = { count_subjects = \"1\" }\n"
        )),
        on_mq(handler(
            "any",
            "ok",
            &format!("{p}.t2"),
            "config = { count_subjects = \"1\" }\n"
        )),
    );
    let setup = Setup::new(&manifest)?;
    let host = setup.start().await?;
    publish(&ch, "", &format!("{p}.a"), "a1", "{}").await?;
    publish(&ch, "", &format!("{p}.a"), "a2", "{}").await?;
    publish(&ch, "", &format!("{p}.a"), "a1", "{}").await?;
    publish(&ch, &format!("{p}.events"), "pay.card", "f1", "{}").await?;
    publish(&ch, "", &format!("{p}.c"), "bad", r#"{"valid": false}"#).await?;
    publish(&ch, &format!("{p}.events"), "order.created", "e1", "{}").await?;
    publish(&ch, &format!("{p}.events"), "order.created.eu", "e2", "{}").await?;
    host.wait_for("everything handled", LONG, || async {
        Ok(host.outcome_count("count", "acked").await? == 2
            && host.outcome_count("count", "deduplicated").await? == 1
            && host.outcome_count("flaky", "acked").await? == 1
            && host.outcome_count("validate", "dead_lettered").await? == 1
            && host.outcome_count("one", "acked").await? == 1
            && host.outcome_count("any", "acked").await? == 2)
    })
    .await?;
    assert_eq!(host.outcome_count("flaky", "retried").await?, 2);
    let dead = ch
        .basic_get(format!("{p}.c.dead").as_str().into(), BasicGetOptions { no_ack: true })
        .await?
        .ok_or_else(|| anyhow::anyhow!("no dead letter"))?;
    let headers = dead.delivery.properties.headers().clone().unwrap_or_default();
    let reason = match headers.inner().get("wharf-dead-letter-reason") {
        Some(lapin::types::AMQPValue::LongString(s)) => s.to_string(),
        other => format!("{other:?}"),
    };
    assert_eq!(reason, "rejected");
    assert_eq!(
        dead.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .as_deref(),
        Some("bad")
    );
    assert_eq!(&dead.delivery.data[..], br#"{"valid": false}"#);
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    assert_eq!(db.counter("default", "runs:a1"), 1);
    // The handler is given the message's content type (a1 and a2 ran once each).
    assert_eq!(db.counter("default", "content-type:application/json"), 2);
    assert_eq!(
        db.counter("default", "done:f1"),
        3,
        "attempts carried through the retry queue"
    );
    assert_eq!(db.counter("default", "runs:e1"), 2, "routed to both topic queues");
    assert_eq!(db.counter("default", "runs:e2"), 1, "routed to the `#` queue only");
    // Handlers see the routing key as the subject, on retries too.
    assert_eq!(db.counter("default", "on:order.created"), 2);
    assert_eq!(db.counter("default", "on:order.created.eu"), 1);
    assert_eq!(db.counter("default", "on:pay.card"), 3, "every attempt of f1");
    Ok(())
}

#[tokio::test]
async fn amqp_quorum_queue_counts_redeliveries_as_attempts() -> Result {
    let _turn = SERIAL.lock().await;
    let url = url();
    let Some(ch) = connect(&url).await else { return Ok(()) };
    let p = prefix();
    let topology = queues(&p, &["q"], "quorum");
    let q = format!("{p}.q");
    // First host: holds the message past its shutdown grace, so it is
    // released (nack + requeue); the quorum queue counts that delivery.
    let slow = Setup::new(&format!(
        "{}{}",
        broker(&url, &topology),
        on_mq(handler("slow", "slow", &q, "config = { sleep_ms = \"4000\" }\n"))
    ))?;
    let text = std::fs::read_to_string(&slow.manifest)?.replace("shutdown_grace_ms = 5000", "shutdown_grace_ms = 200");
    std::fs::write(&slow.manifest, text)?;
    let host = slow.start().await?;
    publish(&ch, "", &q, "q1", "{}").await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(host.terminate()?, 0);
    // Second host: records the attempt it sees.
    let flaky = Setup::new(&format!(
        "{}{}",
        broker(&url, &topology),
        on_mq(handler(
            "flaky",
            "flaky",
            &q,
            "config = { succeed_on_attempt = \"1\" }\n"
        ))
    ))?;
    let host = flaky.start().await?;
    host.wait_for("the message", LONG, || async {
        Ok(host.outcome_count("flaky", "acked").await? == 1)
    })
    .await?;
    assert_eq!(host.terminate()?, 0);
    assert_eq!(
        flaky.open()?.counter("default", "done:q1"),
        2,
        "x-delivery-count made this attempt 2"
    );
    Ok(())
}

/// `host`: more `[host]` settings (shards).
async fn load_then_disrupt(disrupt: &str, host: &str) -> Result {
    const MESSAGES: usize = 1000;
    const CONCURRENCY: usize = 8;
    let _turn = SERIAL.lock().await;
    let url = url();
    let Some(ch) = connect(&url).await else { return Ok(()) };
    let p = prefix();
    let q = format!("{p}.jobs");
    let manifest = one_queue(
        &url,
        &p,
        "slow",
        &format!(
            "concurrency = {CONCURRENCY}\nconfig = {{ sleep_ms = \"2\" }}\n[handlers.count.dedup]\nttl_secs = 3600\n"
        ),
    );
    let setup = Setup::with_host(host, &manifest)?;
    let host = setup.start().await?;
    // Shards share the one connection (lapin drives each on a thread of its
    // own, so one per shard would add threads, not locality).
    let logs = host.logs();
    assert_eq!(logs.matches("connected to RabbitMQ").count(), 1, "{logs}");
    for i in 0..MESSAGES {
        publish(&ch, "", &q, &format!("m{i}"), "{}").await?;
    }
    host.wait_for("some progress", LONG, || async {
        Ok(host.outcome_count("count", "acked").await? >= 150)
    })
    .await?;
    // On shards too, the first shard alone reads the queue.
    host.wait_every_shard_received("count", 1).await?;
    let host = if disrupt == "kill" {
        host.kill()?;
        assert!(
            ready(&ch, &q).await? > 0,
            "everything was done before the kill; the test proves nothing"
        );
        setup.start().await?
    } else {
        // Drop every client connection on the broker (ours too).
        let out = std::process::Command::new("rabbitmqctl")
            .args(["close_all_connections", "wharf test"])
            .output()?;
        assert!(
            out.status.success(),
            "rabbitmqctl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        host
    };
    let ch = match connect(&url).await {
        Some(ch) => ch,
        None => anyhow::bail!("reconnecting to RabbitMQ"),
    };
    // Drained: nothing ready *or unacked* in the queue or its retry queue. A
    // message being deferred behind the dead host's dedup claim is always in
    // one of the two (the retry copy is confirmed before the original is
    // acked), so one look is enough.
    host.wait_for("the queue to drain", LONG, || {
        let queues = [q.clone(), format!("{q}.wharf-retry")];
        async move { Ok(total_messages(&queues)? == 0) }
    })
    .await?;
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    db.assert_every_message_handled((0..MESSAGES).map(|i| format!("m{i}")), CONCURRENCY);
    assert_eq!(ready(&ch, &q).await?, 0);
    Ok(())
}

#[tokio::test]
async fn amqp_sigkill_mid_load_then_restart_loses_nothing() -> Result {
    if !have_binary("rabbitmqctl") {
        return Ok(());
    }
    load_then_disrupt("kill", "").await
}

/// On shards a queue is consumed by the first shard alone, with the
/// handler's whole concurrency as prefetch, on the one connection the
/// shards share (`Broker::read_on_every_shard`).
#[tokio::test]
async fn amqp_sigkill_on_shards_loses_nothing() -> Result {
    if !have_binary("rabbitmqctl") {
        return Ok(());
    }
    load_then_disrupt("kill", "shards = 2").await
}

#[tokio::test]
async fn amqp_connection_dropped_mid_load_then_recovered() -> Result {
    if !have_binary("rabbitmqctl") {
        return Ok(());
    }
    load_then_disrupt("drop", "").await
}

/// A queue deleted under a running host (an operator's mistake, or a broker
/// that lost its definitions) is declared again and consumed again: the
/// server cancels the consumer, and the host reconnects and declares its
/// topology before consuming once more.
#[tokio::test]
async fn amqp_queue_deleted_under_the_host_is_declared_again() -> Result {
    let _turn = SERIAL.lock().await;
    let url = url();
    let Some(ch) = connect(&url).await else { return Ok(()) };
    let p = prefix();
    let q = format!("{p}.jobs");
    let manifest = one_queue(&url, &p, "ok", "");
    let setup = Setup::new(&manifest)?;
    let host = setup.start().await?;
    publish(&ch, "", &q, "before", "{}").await?;
    host.wait_for("the first message", LONG, || async {
        Ok(host.outcome_count("count", "acked").await? == 1)
    })
    .await?;
    ch.queue_delete(q.as_str().into(), Default::default()).await?;
    // A passive declare of a missing queue closes its channel: a fresh one
    // for each look.
    host.wait_for("the queue declared again", LONG, || {
        let (url, q) = (url.clone(), q.clone());
        async move {
            let Some(ch) = connect(&url).await else {
                return Ok(false);
            };
            Ok(ready(&ch, &q).await.is_ok())
        }
    })
    .await?;
    let after: Vec<String> = (0..5).map(|i| format!("after{i}")).collect();
    publish_until_acked(&host, &ch, &q, &after, 6).await?;
    assert_eq!(host.terminate()?, 0);
    let db = setup.open()?;
    db.assert_every_message_handled(std::iter::once("before".to_string()).chain(after), 0);
    Ok(())
}

/// A handler whose queue does not exist fails on its own channel (the
/// server closes it with `NOT_FOUND`), again and again. The host keeps its
/// one connection for that (it declares the topology again on it), so the
/// other handler on the broker carries on over the same connection. Before,
/// each failure made a new connection and declared everything again.
#[tokio::test]
async fn amqp_a_missing_queue_fails_its_own_channel_not_the_connection() -> Result {
    let _turn = SERIAL.lock().await;
    let url = url();
    let Some(ch) = connect(&url).await else { return Ok(()) };
    let p = prefix();
    let q = format!("{p}.jobs");
    let manifest = format!(
        "{}{}",
        one_queue(&url, &p, "ok", ""),
        on_mq(handler("lost", "ok", &format!("{p}.missing"), "")),
    );
    let setup = Setup::new(&manifest)?;
    let host = setup.start().await?;
    host.wait_for("three failed consumes of the missing queue", LONG, || async {
        Ok(host.logs().matches("receive failed handler=lost").count() >= 3)
    })
    .await?;
    let ids: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();
    publish_until_acked(&host, &ch, &q, &ids, 5).await?;
    let logs = host.logs();
    assert!(logs.contains("NOT_FOUND"), "{logs}");
    assert_eq!(
        logs.matches("connected to RabbitMQ").count(),
        1,
        "one connection for the whole run:\n{logs}"
    );
    assert_eq!(host.terminate()?, 0);
    setup.open()?.assert_every_message_handled(ids, 0);
    Ok(())
}

/// Handlers finish out of order; the acks that can be folded into one
/// `basic.ack(multiple)` are, and none of them covers a message still being
/// handled: after a SIGKILL exactly the held (slow) messages are back in the
/// queue.
///
/// The messages wait in the queue before the host consumes them, so the
/// broker hands over a full prefetch at once and completions pile up while
/// an ack is being written. Published while the host was already consuming,
/// each could arrive after the previous one was acked, and then no two acks
/// ever meet in one flush (a CI run failed that way).
#[tokio::test]
async fn amqp_multiple_acks_never_cover_a_message_in_flight() -> Result {
    const MESSAGES: usize = 300;
    // The first slow one bars `multiple` past it, so the foldable run is
    // the 100 before it.
    const SLOW: [usize; 3] = [100, 180, 250];
    if !have_binary("rabbitmqctl") {
        return Ok(());
    }
    let _turn = SERIAL.lock().await;
    let url = url();
    let Some(ch) = connect(&url).await else { return Ok(()) };
    let p = prefix();
    let q = format!("{p}.jobs");
    let manifest = format!(
        "{}{}",
        broker(&url, &queues(&p, &["jobs"], "classic")),
        on_mq(handler(
            "work",
            "slow",
            &q,
            "concurrency = 16
timeout_ms = 60000
config = { sleep_ms = \"0\" }
"
        )),
    );
    let setup = Setup::new(&manifest)?;
    // Once to declare the queue, stopped before the backlog goes in.
    assert_eq!(setup.start().await?.terminate()?, 0);
    for i in 0..MESSAGES {
        let body = if SLOW.contains(&i) {
            r#"{"sleep_ms": 55000}"#
        } else {
            "{}"
        };
        publish(&ch, "", &q, &format!("m{i}"), body).await?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while ready(&ch, &q).await? < MESSAGES as u32 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the backlog never reached the queue"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let host = setup.start().await?;
    let fast = (MESSAGES - SLOW.len()) as u64;
    host.wait_for("every fast message acked", LONG, || async {
        Ok(host.outcome_count("work", "acked").await? == fast)
    })
    .await?;
    let metrics = host.metrics().await?;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_default()
    };
    let (acked, frames) = (
        value("wharf_amqp_acks_per_frame_sum"),
        value("wharf_amqp_acks_per_frame_count"),
    );
    assert_eq!(acked as u64, fast, "every ack counted once\n{metrics}");
    assert!(frames < acked, "{acked} acks took {frames} frames: nothing was folded");
    // The slow ones are still running; nothing else is unacked.
    assert_eq!(total_messages(std::slice::from_ref(&q))?, SLOW.len() as u64);
    host.kill()?;
    // The broker requeues a dead connection's unacked messages.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while ready(&ch, &q).await? < SLOW.len() as u32 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut back = Vec::new();
    while let Some(m) = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await?
    {
        back.push(
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
        );
    }
    back.sort();
    let mut expected: Vec<String> = SLOW.iter().map(|i| format!("m{i}")).collect();
    expected.sort();
    assert_eq!(back, expected, "exactly the messages in flight came back");
    Ok(())
}

/// Run `rabbitmqctl <args>`, failing loudly.
fn rabbitmqctl(args: &[&str]) -> Result {
    let out = std::process::Command::new("rabbitmqctl").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn amqp_example_pipeline_runs_end_to_end() -> Result {
    let _turn = SERIAL.lock().await;
    if connect(&url()).await.is_none() {
        return Ok(());
    }
    // The example uses fixed names: give it a virtual host of its own.
    let vhost = format!("wharf-example-{}", prefix());
    rabbitmqctl(&["add_vhost", &vhost])?;
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"])?;
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
    let result = async {
        let setup = example(
            "rabbitmq",
            "127.0.0.1:8483",
            &[("amqp://guest:guest@127.0.0.1:5672/%2f", &url)],
        )?;
        let host = setup.start().await?;
        let ch = connect(&url)
            .await
            .ok_or_else(|| anyhow::anyhow!("connecting to the example vhost"))?;
        let order = |id: &str| {
            format!(r#"{{"id":"{id}","customer":"ada","items":[{{"sku":"pear","qty":2,"price_cents":75}}]}}"#)
        };
        publish(&ch, "shop", "order.eu", "o-1", &order("o-1")).await?;
        publish(&ch, "shop", "order.us", "o-2", &order("o-2")).await?;
        publish(
            &ch,
            "shop",
            "order.eu",
            "o-bad",
            r#"{"id":"o-bad","customer":"x","items":[]}"#,
        )
        .await?;
        host.wait_for("two payments", LONG, || async {
            Ok(host.outcome_count("charge-payment", "acked").await? == 2)
        })
        .await?;
        assert_eq!(ready(&ch, "orders.dead").await?, 1);
        assert_eq!(host.terminate()?, 0);
        let db = setup.open()?;
        assert_eq!(db.counter("shop", "payments:charged"), 2);
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = rabbitmqctl(&["delete_vhost", &vhost]);
    result
}
