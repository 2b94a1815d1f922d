//! Helpers: build the test programs, write a manifest, run the real `wharf`
//! binary against it, talk to it over HTTP, and inspect its database after it
//! has stopped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use wharf::broker::embedded::{DeadLetterEntry, EmbeddedBroker, QueueStats, open_offline};
use wharf::kv::{Kv, KvQuota};
use wharf::store::Store;

/// How long a test waits for something that should happen (the brokers and
/// the host on a busy CI machine can be slow; a wait ends as soon as it holds).
pub const LONG: Duration = Duration::from_secs(90);

pub type Result<T = ()> = anyhow::Result<T>;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// Build the guest crates once per test process and return the folder holding
/// their components. A separate target dir keeps the nested cargo clear of
/// the lock the outer `cargo test` holds.
pub fn guests() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        build_guests(
            "target/guests",
            &[
                "-p",
                "wharf-test-programs",
                "-p",
                "order-validator",
                "-p",
                "order-fulfiller",
                "-p",
                "flaky-payment",
            ],
        )
    })
}

/// Build the lean (no_std) guests once per test process, apart from the
/// others: in one cargo run with them, wharf-sdk's `std` feature would be
/// unified into theirs. Returns the folder holding their components.
pub fn lean_guests() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        build_guests(
            "target/guests-lean",
            &["--no-default-features", "-p", "wharf-test-lean"],
        )
    })
}

/// `cargo build` guests (`args`: packages and features) into `target_dir`
/// (relative to the workspace); the folder holding their components.
fn build_guests(target_dir: &str, args: &[&str]) -> PathBuf {
    let target = workspace().join(target_dir);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace())
        .args(["build", "--profile", "guest", "--target", "wasm32-wasip2"])
        .args(args)
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("running cargo to build the guest components");
    assert!(
        status.success(),
        "building the guest components {args:?} failed (is the wasm32-wasip2 target installed? `rustup target add wasm32-wasip2`)"
    );
    target.join("wasm32-wasip2/guest")
}

/// Path of test program `name` (a file in tests/programs/src/bin/).
pub fn program(name: &str) -> PathBuf {
    let path = guests().join(format!("{name}.wasm"));
    assert!(path.is_file(), "no test program {name} at {}", path.display());
    path
}

/// A temporary folder with a manifest in it.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub manifest: PathBuf,
}

impl Setup {
    /// Write `handlers` (TOML for the `[handlers.*]` and `[tenants.*]`
    /// tables) under a `[host]` table with a free port and the folder's data dir.
    pub fn new(handlers: &str) -> Result<Self> {
        Self::with_host("", handlers)
    }

    /// [`Setup::new`] with more `[host]` settings (`host`: TOML lines).
    pub fn with_host(host: &str, handlers: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let manifest = dir.path().join("wharf.toml");
        let text = format!(
            "[host]\ndata_dir = \"data\"\nhttp = \"127.0.0.1:0\"\nshutdown_grace_ms = 5000\n{host}\n{handlers}"
        );
        std::fs::write(&manifest, text)?;
        Ok(Self { dir, manifest })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Start a host on this manifest and wait until it is ready.
    pub async fn start(&self) -> Result<Host> {
        Host::start(&self.manifest, &self.data_dir()).await
    }

    /// Open the stopped host's database.
    pub fn open(&self) -> Result<Offline> {
        let (store, broker) = open_offline(&self.data_dir().join(wharf::app::DB_FILE))?;
        Ok(Offline { store, broker })
    }
}

/// A stopped host's state.
pub struct Offline {
    pub store: Store,
    pub broker: EmbeddedBroker,
}

impl Offline {
    /// Integer under `key` in `tenant`'s key-value store (0 when absent).
    pub fn counter(&self, tenant: &str, key: &str) -> i64 {
        let kv = Kv::new(
            self.store.clone(),
            tenant,
            KvQuota {
                max_keys: u64::MAX,
                max_value_bytes: u64::MAX,
            },
        );
        kv.get(key)
            .expect("kv readable")
            .map(|v| String::from_utf8_lossy(&v).parse().expect("a number"))
            .unwrap_or(0)
    }

    /// How many ids of `ids` were handled at least once (their `runs:<id>`
    /// counter in the default tenant).
    pub fn handled(&self, ids: impl IntoIterator<Item = String>) -> usize {
        ids.into_iter()
            .filter(|id| self.counter("default", &format!("runs:{id}")) > 0)
            .count()
    }

    /// Assert that every id of `ids` was handled (its `runs:<id>` counter in
    /// the default tenant is at least 1) and that at most `max_twice` ran
    /// more than once: what a host that died could repeat (README: "What a
    /// crash can repeat").
    pub fn assert_every_message_handled(&self, ids: impl IntoIterator<Item = String>, max_twice: usize) {
        let mut twice = 0;
        for id in ids {
            let runs = self.counter("default", &format!("runs:{id}"));
            assert!(runs >= 1, "message {id} was lost");
            if runs > 1 {
                twice += 1;
            }
        }
        assert!(
            twice <= max_twice,
            "{twice} messages ran twice (at most {max_twice} could be repeated)"
        );
    }

    pub fn stats(&self) -> Vec<QueueStats> {
        self.broker.stats().expect("stats")
    }
}

/// A running `wharf run` process.
pub struct Host {
    pub child: Child,
    pub url: String,
    pub log: PathBuf,
    client: reqwest::Client,
}

impl Host {
    pub async fn start(manifest: &Path, data_dir: &Path) -> Result<Self> {
        Self::start_with_env(manifest, data_dir, &[]).await
    }

    /// [`Host::start`] with more environment variables for the host.
    pub async fn start_with_env(manifest: &Path, data_dir: &Path, env: &[(&str, &str)]) -> Result<Self> {
        let mut host = Self::launch_with_env(manifest, data_dir, env).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = host.child.try_wait()? {
                anyhow::bail!("host exited early ({status}):\n{}", host.logs());
            }
            if host.ready().await.unwrap_or(false) {
                return Ok(host);
            }
            anyhow::ensure!(Instant::now() < deadline, "host not ready in time:\n{}", host.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether `/readyz` says ready.
    pub async fn ready(&self) -> Result<bool> {
        let r = self.client.get(format!("{}/readyz", self.url)).send().await?;
        Ok(r.status().is_success())
    }

    /// Wait (up to [`LONG`]) until `/readyz` says ready.
    pub async fn wait_ready(&self, what: &str) -> Result {
        self.wait_for(what, LONG, || self.ready()).await
    }

    /// Wait (up to [`LONG`]) until `/readyz` says not ready (a broker the
    /// host needs went away).
    pub async fn wait_not_ready(&self, what: &str) -> Result {
        self.wait_for(what, LONG, || async { Ok(!self.ready().await?) }).await
    }

    /// Start a host and return once its HTTP server answers, ready or not
    /// (a broker it needs may still be down).
    pub async fn launch(manifest: &Path, data_dir: &Path) -> Result<Self> {
        Self::launch_with_env(manifest, data_dir, &[]).await
    }

    async fn launch_with_env(manifest: &Path, data_dir: &Path, env: &[(&str, &str)]) -> Result<Self> {
        let _ = std::fs::remove_file(data_dir.join(wharf::app::HTTP_ADDR_FILE));
        std::fs::create_dir_all(data_dir)?;
        let log = data_dir.join(format!(
            "host-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        let child = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .arg("run")
            .arg(manifest)
            .env("RUST_LOG", "info,wharf=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut host = Self {
            child,
            url: String::new(),
            log,
            client: reqwest::Client::new(),
        };
        let addr_file = data_dir.join(wharf::app::HTTP_ADDR_FILE);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = host.child.try_wait()? {
                anyhow::bail!("host exited early ({status}):\n{}", host.logs());
            }
            if let Ok(addr) = std::fs::read_to_string(&addr_file) {
                host.url = format!("http://{}", addr.trim());
                if host.client.get(format!("{}/healthz", host.url)).send().await.is_ok() {
                    return Ok(host);
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "host not up in time:\n{}", host.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Publish through the HTTP API; returns the id.
    pub async fn publish(&self, subject: &str, payload: &str, id: Option<&str>) -> Result<String> {
        self.publish_delayed(subject, payload, id, 0).await
    }

    /// Publish through the HTTP API, due `delay_ms` from now; returns the id.
    pub async fn publish_delayed(
        &self,
        subject: &str,
        payload: &str,
        id: Option<&str>,
        delay_ms: u64,
    ) -> Result<String> {
        let mut req = self
            .client
            .post(format!("{}/v1/publish/{subject}", self.url))
            .body(payload.to_string());
        if let Some(id) = id {
            req = req.query(&[("id", id)]);
        }
        if delay_ms > 0 {
            req = req.query(&[("delay_ms", delay_ms)]);
        }
        let resp = req.send().await?;
        anyhow::ensure!(resp.status().as_u16() == 202, "publish failed: {}", resp.text().await?);
        let v: Value = resp.json().await?;
        Ok(v["id"].as_str().unwrap_or_default().to_string())
    }

    /// Publish `{}` as ids `m0`..`m{count - 1}` to `subject` through the
    /// HTTP API from ten clients at once.
    pub async fn publish_many(&self, subject: &str, count: usize) -> Result {
        self.publishing_many(subject, count).await?
    }

    /// [`Host::publish_many`] in the background: await the handle for its end.
    pub fn publishing_many(&self, subject: &str, count: usize) -> tokio::task::JoinHandle<Result> {
        const CLIENTS: usize = 10;
        let (url, subject) = (self.url.clone(), subject.to_string());
        tokio::spawn(async move {
            let mut clients = tokio::task::JoinSet::new();
            for first in 0..CLIENTS {
                let (url, subject) = (url.clone(), subject.clone());
                clients.spawn(async move {
                    let client = reqwest::Client::new();
                    for i in (first..count).step_by(CLIENTS) {
                        let resp = client
                            .post(format!("{url}/v1/publish/{subject}?id=m{i}"))
                            .body("{}")
                            .send()
                            .await?;
                        anyhow::ensure!(resp.status().as_u16() == 202, "publish m{i}: {}", resp.status());
                    }
                    Ok(())
                });
            }
            while let Some(r) = clients.join_next().await {
                r??;
            }
            Ok(())
        })
    }

    pub async fn stats(&self) -> Result<Vec<QueueStats>> {
        Ok(self
            .client
            .get(format!("{}/v1/queues", self.url))
            .send()
            .await?
            .json()
            .await?)
    }

    pub async fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetterEntry>> {
        Ok(self
            .client
            .get(format!("{}/v1/dlq/{queue}", self.url))
            .send()
            .await?
            .json()
            .await?)
    }

    pub async fn metrics(&self) -> Result<String> {
        Ok(self
            .client
            .get(format!("{}/metrics", self.url))
            .send()
            .await?
            .text()
            .await?)
    }

    /// The value of counter `wharf_messages_total{handler,outcome}` (0 if absent).
    pub async fn outcome_count(&self, handler: &str, outcome: &str) -> Result<u64> {
        self.counter(
            "wharf_messages_total",
            &format!("handler=\"{handler}\",outcome=\"{outcome}\""),
        )
        .await
    }

    /// Every message the host counted as settled, by any handler.
    async fn settled_total(&self) -> Result<u64> {
        let text = self.metrics().await?;
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix("wharf_messages_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<u64>().ok())
            .sum())
    }

    /// Wait until no subject has ready or pending messages (dead letters may
    /// remain) and the host's counts have caught up: a message leaves the
    /// queue when its ack commits, and is counted just after, so the counts
    /// must stay the same across one more poll of a drained queue.
    pub async fn wait_drained(&self, timeout: Duration) -> Result<Vec<QueueStats>> {
        let deadline = Instant::now() + timeout;
        let mut counted = None;
        loop {
            let stats = self.stats().await?;
            if stats.iter().all(|s| s.ready == 0 && s.pending == 0) {
                let now = self.settled_total().await?;
                if counted == Some(now) {
                    return Ok(stats);
                }
                counted = Some(now);
            } else {
                counted = None;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "not drained in {timeout:?}: {stats:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until `cond` holds.
    pub async fn wait_for<F, Fut>(&self, what: &str, timeout: Duration, mut cond: F) -> Result
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let deadline = Instant::now() + timeout;
        while !cond().await? {
            anyhow::ensure!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// SIGTERM, then wait for exit; returns the exit code.
    pub fn terminate(mut self) -> Result<i32> {
        self.sigterm();
        let status = self.child.wait()?;
        Ok(status.code().unwrap_or(-1))
    }

    /// Send SIGTERM and return at once.
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Send `signal` and return at once.
    pub fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// The value of the counter `name{labels}` (0 if absent); `labels` as
    /// the exposition writes them, e.g. `handler="h",outcome="acked"`.
    pub async fn counter(&self, name: &str, labels: &str) -> Result<u64> {
        let text = self.metrics().await?;
        let needle = format!("{name}{{{labels}}} ");
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(&needle))
            .map(|v| v.trim().parse().unwrap_or(0))
            .unwrap_or(0))
    }

    /// `wharf_received_total{handler,shard}` for `handler`: what each
    /// shard's consumer loop took from the broker, by shard. Labels as the
    /// exposition writes them, in the order the host gives them (as
    /// [`Host::counter`] reads them).
    pub async fn received_by_shard(&self, handler: &str) -> Result<std::collections::BTreeMap<usize, u64>> {
        let text = self.metrics().await?;
        let prefix = format!("wharf_received_total{{handler=\"{handler}\",shard=\"");
        let mut by_shard = std::collections::BTreeMap::new();
        for line in text.lines().filter(|l| l.starts_with(&prefix)) {
            let (shard, value) = line[prefix.len()..]
                .split_once("\"} ")
                .ok_or_else(|| anyhow::anyhow!("unexpected labels in {line:?}"))?;
            by_shard.insert(shard.parse()?, value.trim().parse()?);
        }
        Ok(by_shard)
    }

    /// Wait until each of the first `readers` shards has taken messages of
    /// `handler` from the broker; then no other shard may have a count.
    /// This is what proves that a test on shards ran on them.
    pub async fn wait_every_shard_received(&self, handler: &str, readers: usize) -> Result {
        self.wait_for(&format!("{readers} shard(s) receiving for {handler}"), LONG, || async {
            let by_shard = self.received_by_shard(handler).await?;
            Ok((0..readers).all(|shard| by_shard.get(&shard).is_some_and(|&n| n > 0)))
        })
        .await?;
        let by_shard = self.received_by_shard(handler).await?;
        anyhow::ensure!(
            by_shard.keys().all(|&shard| shard < readers),
            "{handler}: shards beyond the first {readers} received: {by_shard:?}"
        );
        Ok(())
    }

    /// The exit code, if the host has exited.
    pub fn exited(&mut self) -> Result<Option<i32>> {
        Ok(self.child.try_wait()?.map(|s| s.code().unwrap_or(-1)))
    }

    /// SIGKILL, then reap.
    pub fn kill(mut self) -> Result {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `wharf <args>` to completion: (exit code, stdout, stderr).
pub fn wharf(args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A handler table for test program `program` consuming `subject`.
pub fn handler(name: &str, program_name: &str, subject: &str, extra: &str) -> String {
    format!(
        "[handlers.{name}]\ncomponent = {:?}\nsource = {{ subject = {subject:?} }}\n{extra}\n",
        program(program_name).display().to_string()
    )
}

/// A broker or binary the tests need is missing: a failure under `CI=true`,
/// a loud skip elsewhere. Returns so the caller can `return Ok(())`.
pub fn unavailable(what: &str, why: impl std::fmt::Display) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what} is required in CI: {why}");
    }
    eprintln!("SKIPPED: {what} is not available ({why})");
}

/// Await `attempt` (connecting to a broker) for up to `within`; on failure
/// or timeout, report `what` as [`unavailable`] and return `None`.
pub async fn reachable<T, E: std::fmt::Display>(
    what: &str,
    within: Duration,
    attempt: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> Option<T> {
    match tokio::time::timeout(within, attempt).await {
        Ok(Ok(value)) => Some(value),
        Ok(Err(e)) => {
            unavailable(what, e);
            None
        }
        Err(_) => {
            unavailable(what, "timed out");
            None
        }
    }
}

/// Whether `program` can be run; `unavailable` when not.
pub fn have_binary(program: &str) -> bool {
    let ok = std::process::Command::new(program).arg("--version").output().is_ok();
    if !ok {
        unavailable(program, "not on PATH");
    }
    ok
}

/// The value of the first header `key`.
pub fn header<'a>(headers: &'a [(String, String)], key: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

/// A setup running `examples/<name>/wharf.toml` in a temporary folder: its
/// data folder, HTTP port (`http`) and component paths rewritten, retry
/// delays shortened, and each `(from, to)` of `more` replaced.
pub fn example(name: &str, http: &str, more: &[(&str, &str)]) -> Result<Setup> {
    let mut text = std::fs::read_to_string(workspace().join(format!("examples/{name}/wharf.toml")))?
        .replace(&format!("../../target/{name}-example-data"), "data")
        .replace("../../target/quickstart-data", "data")
        .replace(http, "127.0.0.1:0")
        .replace(
            "../../target/guests/wasm32-wasip2/guest",
            &guests().display().to_string(),
        )
        .replace("initial_delay_ms = 200", "initial_delay_ms = 10");
    for (from, to) in more {
        text = text.replace(from, to);
    }
    let setup = Setup::new("")?;
    std::fs::write(&setup.manifest, text)?;
    Ok(setup)
}

/// A broker server of the test's own (redis-server, nats-server), on its own
/// port and data folder, so that a test can kill it and start it again with
/// its data without disturbing the machine's shared one.
pub struct PrivateServer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl PrivateServer {
    /// Start the command `command(port, dir)` builds, its output discarded.
    pub fn start(dir: tempfile::TempDir, port: u16, command: impl Fn(u16, &Path) -> Command) -> Result<Self> {
        let child = command(port, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self { child, port, dir })
    }

    /// SIGKILL the server; its data folder, to start it again with.
    pub fn kill(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"))
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The shards a `[host]` settings fragment (`"shards = 2"`, or `""`) asks
/// for: 1 without `shards`, as the host runs then.
pub fn shards_in(host: &str) -> usize {
    let settings: toml::Table = toml::from_str(host).expect("a [host] settings fragment");
    settings
        .get("shards")
        .and_then(toml::Value::as_integer)
        .map_or(1, |n| usize::try_from(n).expect("shards is positive"))
}
