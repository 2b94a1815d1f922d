//! Timing a consumer process from outside: wall time from its first handled
//! message to its last, and the CPU it used in between, read from
//! `/proc/<pid>/task/*/schedstat` (every thread, sampled every 10 ms so that
//! a thread that ends mid-run still counts), and the most memory it had
//! resident at any of those samples (`/proc/<pid>/statm`). The consumer is always
//! its own process — wharf, the native consumer, a Node.js peer — so the
//! figures never include the producer or this harness.
//!
//! Beside it, the CPU the broker's server process spent in the same window
//! ([`BrokerCpu`]): on two shared cores each µs a consumer makes the broker
//! spend is one neither of them gets, so a consumer's own figure alone
//! would not say where a gap between two consumers lies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// One measured drain.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Messages handled inside the timed window.
    pub messages: usize,
    /// The window, seconds.
    pub secs: f64,
    /// CPU the consumer used in the window, seconds.
    pub cpu: f64,
    /// Messages that never arrived (core NATS drops what a slow consumer
    /// cannot take; zero on every acked path).
    pub dropped: usize,
    /// The most the consumer had resident (RSS) at any sample while it ran,
    /// KiB.
    pub peak_rss_kib: u64,
    /// CPU the broker's server process used in the window, seconds; `None`
    /// where it was not found (or is wharf's own, the embedded broker).
    pub broker_cpu: Option<f64>,
}

impl Sample {
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.secs.max(1e-9)
    }

    pub fn cpu_us_per_msg(&self) -> f64 {
        self.cpu * 1e6 / self.messages.max(1) as f64
    }

    pub fn peak_rss_mib(&self) -> f64 {
        self.peak_rss_kib as f64 / 1024.0
    }

    /// The broker's CPU per message, as a run's log says it.
    pub fn broker_note(&self) -> String {
        self.broker_us_per_msg()
            .map_or_else(|| "CPU not measured".into(), |b| format!("{b:.1} µs CPU/msg"))
    }

    pub fn broker_us_per_msg(&self) -> Option<f64> {
        Some(self.broker_cpu? * 1e6 / self.messages.max(1) as f64)
    }
}

/// A run's figures, as its log line says them. A window that held no
/// message (a smoke drain over before the first look at it) has no rate to
/// give, and says so rather than 0 msg/s.
impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.messages == 0 {
            return write!(
                f,
                "drained before the first look (too few messages to time), peak RSS {:.1} MiB",
                self.peak_rss_mib()
            );
        }
        write!(
            f,
            "{:.0} msg/s, CPU {:.1} µs/msg, peak RSS {:.1} MiB, broker {}",
            self.rate(),
            self.cpu_us_per_msg(),
            self.peak_rss_mib(),
            self.broker_note()
        )
    }
}

/// How often a run's CPU is sampled (and, near the end of a drain, wharf's
/// progress looked at: [`next_look`]).
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// CPU seconds used so far by a process: the sum of its threads'
/// `schedstat` run times (nanosecond resolution; the clock-tick figures in
/// `stat` are 10 ms coarse, too coarse for short runs). A thread that has
/// ended is gone from `/proc`, so the meter keeps the last reading of every
/// thread it has seen: sampled every [`SAMPLE_EVERY`], a thread that ends
/// mid-run loses at most that much of its CPU, where reading only at the
/// ends of the run would lose all of it (and could even go backwards).
pub struct CpuMeter {
    pid: u32,
    /// Nanoseconds by thread id, as last read.
    threads: HashMap<u32, u64>,
    /// The largest resident set seen, KiB.
    peak_rss_kib: u64,
}

impl CpuMeter {
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            threads: HashMap::new(),
            peak_rss_kib: 0,
        }
    }

    /// The largest resident set any sample saw, KiB. Sampled, not the
    /// kernel's high-water mark (`VmHWM`): that one would also count what a
    /// consumer held while starting (wharf compiling its component).
    pub fn peak_rss_kib(&self) -> u64 {
        self.peak_rss_kib
    }

    /// Read every live thread and return the process's CPU seconds so far;
    /// note the resident set.
    pub fn sample(&mut self) -> Result<f64> {
        // `statm`: sizes in pages; the second is the resident set.
        if let Some(pages) = std::fs::read_to_string(format!("/proc/{}/statm", self.pid))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        {
            self.peak_rss_kib = self.peak_rss_kib.max(pages * page_kib());
        }
        for task in std::fs::read_dir(format!("/proc/{}/task", self.pid))?.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
                continue;
            };
            let ns = std::fs::read_to_string(task.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()));
            if let Some(ns) = ns {
                self.threads.insert(tid, ns);
            }
        }
        Ok(self.threads.values().sum::<u64>() as f64 / 1e9)
    }
}

/// The page size, KiB.
fn page_kib() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(bytes).map_or(4, |b| (b / 1024).max(1))
}

/// The CPU a broker's server process has used: `utime + stime` from
/// `/proc/<pid>/stat`, which counts every thread, ended ones too, in clock
/// ticks (10 ms). One small read, so it can be taken at every sample without
/// disturbing the run (RabbitMQ runs over a hundred threads; reading each
/// one's `schedstat` every 10 ms would cost a share of a core); the ticks'
/// coarseness is 1% of a one-second drain.
pub struct BrokerCpu {
    pid: u32,
}

impl BrokerCpu {
    /// The one process named `name` (`/proc/<pid>/comm`); `None` if there
    /// is none or more than one, so that CPU is never put on the wrong one.
    pub fn find(name: &str) -> Option<Self> {
        let mut found = std::fs::read_dir("/proc").ok()?.flatten().filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim_end() == name).then_some(pid)
        });
        let pid = found.next()?;
        found.next().is_none().then_some(Self { pid })
    }

    /// CPU seconds so far, if the process is still there.
    pub fn seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        Some(stat_cpu_ticks(&stat)? as f64 / clock_ticks_per_second())
    }
}

/// `utime + stime` of a `/proc/<pid>/stat` line. The fields are counted
/// after the command name's closing parenthesis: the name itself may hold
/// spaces and parentheses.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // After the name: state is field 3, so utime (14) and stime (15) are
    // the 12th and 13th.
    let mut fields = rest.split_whitespace().skip(11);
    let utime = fields.next()?.parse::<u64>().ok()?;
    let stime = fields.next()?.parse::<u64>().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// A point in a run: when, how many handled, the consumer's CPU so far and
/// the broker's.
#[derive(Clone, Copy)]
struct Mark {
    at: Instant,
    handled: usize,
    cpu: f64,
    broker: Option<f64>,
}

impl Mark {
    fn now(handled: usize, meter: &mut CpuMeter, broker: Option<&BrokerCpu>) -> Result<Self> {
        Ok(Self {
            at: Instant::now(),
            handled,
            cpu: meter.sample()?,
            broker: broker.and_then(BrokerCpu::seconds),
        })
    }
}

fn window(from: Mark, to: Mark, meter: &CpuMeter) -> Sample {
    Sample {
        messages: to.handled - from.handled,
        secs: (to.at - from.at).as_secs_f64(),
        cpu: to.cpu - from.cpu,
        dropped: 0,
        peak_rss_kib: meter.peak_rss_kib(),
        broker_cpu: to.broker.zip(from.broker).map(|(to, from)| to - from),
    }
}

/// How long a run may go without progress before it is called stuck (or,
/// for core NATS, over: what was dropped stays dropped).
const STALL: Duration = Duration::from_secs(20);
const CORE_STALL: Duration = Duration::from_secs(3);

/// Something to do once the consumer is ready (core NATS: start producing).
pub type OnReady = Option<tokio::task::JoinHandle<Result<()>>>;

/// Run a consumer that reports `ready`, `first` and `done` on stdout (the
/// native consumers and the Node.js peers) until it has handled `n`.
/// `on_ready` starts when it says `ready`.
pub async fn child_lines<F>(
    mut cmd: Command,
    n: usize,
    on_ready: F,
    lossy: bool,
    broker: Option<&BrokerCpu>,
) -> Result<Sample>
where
    F: FnOnce() -> OnReady,
{
    cmd.stdout(Stdio::piped()).stdin(Stdio::null()).kill_on_drop(true);
    let mut child = cmd.spawn().context("starting the consumer")?;
    let pid = child.id().ok_or_else(|| anyhow!("consumer exited at once"))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let mut on_ready = Some(on_ready);
    let mut producer: OnReady = None;
    let mut first = None;
    let stall = if lossy { CORE_STALL } else { STALL };
    let mut meter = CpuMeter::new(pid);
    let mut samples = tokio::time::interval(SAMPLE_EVERY);
    let mut last_line = Instant::now();
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line?,
            _ = samples.tick() => {
                // The process may be gone already; `done` reads it for real.
                let _ = meter.sample();
                if last_line.elapsed() > stall {
                    if lossy && first.is_some() {
                        // Core NATS dropped some (the consumer reports
                        // progress only at `done`).
                        bail!("the consumer stopped short of {n} messages (core NATS drops what a slow consumer cannot take)");
                    }
                    bail!("no progress from the consumer for {stall:?}");
                }
                continue;
            }
        };
        last_line = Instant::now();
        let Some(line) = line else {
            let status = child.wait().await?;
            bail!("the consumer exited ({status}) before handling {n} messages");
        };
        let mut mark = |handled| Mark::now(handled, &mut meter, broker);
        match line.trim() {
            "ready" => {
                if let Some(f) = on_ready.take() {
                    producer = f();
                }
            }
            "first" => first = Some(mark(1)?),
            "done" => {
                let end = mark(n)?;
                let _ = child.kill().await;
                if let Some(p) = producer {
                    p.await??;
                }
                let start = first.ok_or_else(|| anyhow!("`done` before `first`"))?;
                return Ok(window(start, end, &meter));
            }
            other => eprintln!("consumer: {other}"),
        }
    }
}

/// The longest wait between two looks at wharf's progress.
const LOOK_AT_MOST: Duration = Duration::from_millis(100);

/// How long after `now` to look at wharf's progress again, in a drain of
/// `n` that began at `start`: a quarter of the time the rate so far says is
/// left, between [`SAMPLE_EVERY`] and [`LOOK_AT_MOST`].
///
/// Why not every [`SAMPLE_EVERY`]: each look renders wharf's whole
/// `/metrics`, which cost wharf 1–2% of its CPU in a drain looked at every
/// 10 ms (the native consumers and the peers print a line on stdout
/// instead). Why a quarter: the window ends at the first look that sees
/// all `n`, so a look that comes late lengthens it; a drain would have to
/// speed up fourfold to finish before this look, and near the end the
/// looks come every [`SAMPLE_EVERY`] again, as before.
fn next_look(start: &Mark, now: &Mark, n: usize) -> Duration {
    let (done, took) = (now.handled.saturating_sub(start.handled), now.at - start.at);
    if done == 0 || took.is_zero() {
        return SAMPLE_EVERY;
    }
    let left = took.mul_f64(n.saturating_sub(now.handled) as f64 / done as f64);
    (left / 4).clamp(SAMPLE_EVERY, LOOK_AT_MOST)
}

/// A running `wharf run <manifest>`.
pub struct Wharf {
    child: Child,
    pid: u32,
    metrics: String,
    http: reqwest::Client,
}

impl Wharf {
    /// Start wharf on `manifest` (whose data dir is `data_dir`) and wait
    /// until it is ready.
    pub async fn start(binary: &Path, manifest: &Path, data_dir: &Path) -> Result<Self> {
        let mut child = Command::new(binary)
            .arg("run")
            .arg(manifest)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child.id().ok_or_else(|| anyhow!("wharf exited at once"))?;
        let addr_file = data_dir.join(wharf::app::HTTP_ADDR_FILE);
        let deadline = Instant::now() + Duration::from_secs(120);
        let addr = loop {
            // Only a whole address: a file caught mid-write (by an older
            // wharf, which did not write it atomically) is read again.
            if let Some(addr) = std::fs::read_to_string(&addr_file)
                .ok()
                .and_then(|a| a.trim().parse::<std::net::SocketAddr>().ok())
            {
                break addr;
            }
            if let Some(status) = child.try_wait()? {
                bail!("wharf exited ({status}) before serving HTTP");
            }
            anyhow::ensure!(Instant::now() < deadline, "wharf did not start in 120 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let http = reqwest::Client::new();
        loop {
            let ready = http.get(format!("http://{addr}/readyz")).send().await;
            let last = match ready {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => format!("answered {}", r.status()),
                Err(e) => format!("{e}"),
            };
            anyhow::ensure!(
                Instant::now() < deadline,
                "wharf did not become ready in 120 s (http://{addr}/readyz: {last})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            child,
            pid,
            metrics: format!("http://{addr}/metrics"),
            http,
        })
    }

    /// Messages of handler `bench` settled as handled (acked or deduplicated).
    async fn handled(&self) -> Result<usize> {
        let text = self.http.get(&self.metrics).send().await?.text().await?;
        let mut total = 0.0;
        for line in text.lines() {
            if line.starts_with("wharf_messages_total{")
                && line.contains("handler=\"bench\"")
                && (line.contains("outcome=\"acked\"") || line.contains("outcome=\"deduplicated\""))
            {
                total += line
                    .rsplit_once(' ')
                    .and_then(|(_, v)| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        }
        Ok(total as usize)
    }

    /// Look until `n` messages are handled; the window runs from now (wharf
    /// is ready: it starts consuming at once) to the look that sees all.
    /// The CPU is sampled every [`SAMPLE_EVERY`]; progress is looked at as
    /// [`next_look`] says.
    pub async fn drain(&mut self, n: usize, lossy: bool, broker: Option<&BrokerCpu>) -> Result<Sample> {
        let mut meter = CpuMeter::new(self.pid);
        let start = Mark::now(self.handled().await?, &mut meter, broker)?;
        let mut last_progress = start;
        let mut look_at = start.at + SAMPLE_EVERY;
        let stall = if lossy { CORE_STALL } else { STALL };
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("wharf exited ({status}) during the run");
            }
            if Instant::now() < look_at {
                // The process may be gone already; the next look reads it
                // for real.
                let _ = meter.sample();
                tokio::time::sleep(SAMPLE_EVERY).await;
                continue;
            }
            let handled = self.handled().await?;
            let mark = Mark::now(handled, &mut meter, broker)?;
            if handled > last_progress.handled {
                last_progress = mark;
            }
            if handled >= n {
                return Ok(window(start, mark, &meter));
            }
            // A lossy drain may stop short of `n`, and its window ends at
            // the last look that saw progress: keep that one sharp.
            let gap = if lossy {
                SAMPLE_EVERY
            } else {
                next_look(&start, &mark, n)
            };
            look_at = mark.at + gap;
            if last_progress.at.elapsed() > stall {
                if lossy {
                    // At-most-once: what was dropped stays dropped. The
                    // window ends at the last message that arrived.
                    let mut sample = window(start, last_progress, &meter);
                    sample.dropped = n - handled;
                    return Ok(sample);
                }
                // Say what wharf itself counted, to tell a stuck message
                // from a slow one.
                let text = self.http.get(&self.metrics).send().await?.text().await?;
                let outcomes: Vec<&str> = text
                    .lines()
                    .filter(|l| l.starts_with("wharf_messages_total") || l.starts_with("wharf_failures_total"))
                    .collect();
                if std::env::var_os("WHARF_BENCH_KEEP").is_some() {
                    // Leave it running to be looked at (gdb -p, /metrics).
                    eprintln!("WHARF_BENCH_KEEP: leaving wharf (pid {}) running", self.pid);
                    let stand_in = Command::new("true").kill_on_drop(true).spawn()?;
                    std::mem::forget(std::mem::replace(&mut self.child, stand_in));
                }
                bail!(
                    "wharf stopped at {handled} of {n} messages; its counters:\n{}",
                    outcomes.join("\n")
                );
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    }

    /// SIGTERM and wait (a graceful stop).
    pub async fn stop(mut self) -> Result<()> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .map_err(|_| anyhow!("wharf did not stop in 30 s"))??;
        Ok(())
    }
}

/// The cache-line round trip between the machine's first two CPUs, ns: two
/// threads pinned one to each bounce one atomic 100 000 times (~5–30 ms).
/// `None` with fewer than two CPUs to pin to.
///
/// Why the suite logs it before each run: a VM's two vCPUs may sit on one
/// core's hyperthreads or far apart, and the host moves them while a suite
/// runs. On the twenty-fourth session's machine the round trip flipped
/// between ~55 and ~300 ns, and wharf's default Redis stream drain cost 17
/// µs of CPU a message in the first state and 23–25 in the second: every
/// message crosses between tokio's two worker threads (task stealing, the
/// ack batcher), which a native consumer's single task does not.
pub fn vcpu_round_trip_ns() -> Option<f64> {
    use std::hint::spin_loop;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    const TRIPS: u64 = 100_000;

    // SAFETY: plain libc calls on a zeroed `cpu_set_t` of our own.
    let cpus: Vec<usize> = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .take(2)
            .collect()
    };
    let [a, b] = cpus[..] else { return None };
    // A thread that cannot be pinned still bounces (so neither waits for
    // ever); the figure is then not reported.
    let pin = |cpu: usize| unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0
    };
    let flag = Arc::new(AtomicU64::new(0));
    let answer = {
        let flag = flag.clone();
        std::thread::spawn(move || {
            let pinned = pin(b);
            for i in 0..TRIPS {
                while flag.load(Ordering::Acquire) != 2 * i + 1 {
                    spin_loop();
                }
                flag.store(2 * i + 2, Ordering::Release);
            }
            pinned
        })
    };
    let ask = std::thread::spawn(move || {
        let pinned = pin(a);
        let started = Instant::now();
        for i in 0..TRIPS {
            flag.store(2 * i + 1, Ordering::Release);
            while flag.load(Ordering::Acquire) != 2 * i + 2 {
                spin_loop();
            }
        }
        (pinned, started.elapsed())
    });
    let (pinned_a, took) = ask.join().ok()?;
    let pinned_b = answer.join().ok()?;
    (pinned_a && pinned_b).then(|| took.as_secs_f64() * 1e9 / TRIPS as f64)
}

/// The `wharf` binary beside this one (`cargo build -p wharf` puts it there),
/// or `$WHARF_BIN`.
pub fn wharf_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("WHARF_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let beside = exe.with_file_name("wharf");
    anyhow::ensure!(
        beside.exists(),
        "{} not found: build it first (`cargo build -p wharf` with the same profile) or set WHARF_BIN",
        beside.display()
    );
    Ok(beside)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread's own CPU seconds so far.
    fn thread_cpu() -> f64 {
        let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
        s.split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .expect("run time") as f64
            / 1e9
    }

    fn mark(at: Instant, handled: usize) -> Mark {
        Mark {
            at,
            handled,
            cpu: 0.0,
            broker: None,
        }
    }

    /// Looks at wharf's progress come a quarter of the time left apart,
    /// no sooner than a CPU sample's interval and no later than the cap.
    #[test]
    fn looks_come_a_quarter_of_the_time_left_apart() {
        let t = Instant::now();
        let start = mark(t, 0);
        let n = 100_000;
        // 10 000 in 100 ms: 900 ms left, so look again in 225 ms, capped.
        assert_eq!(
            next_look(&start, &mark(t + Duration::from_millis(100), 10_000), n),
            LOOK_AT_MOST
        );
        // 80 000 in 800 ms: 200 ms left, so 50 ms.
        assert_eq!(
            next_look(&start, &mark(t + Duration::from_millis(800), 80_000), n),
            Duration::from_millis(50)
        );
        // 99 000 in 990 ms: 10 ms left, so no sooner than a sample.
        assert_eq!(
            next_look(&start, &mark(t + Duration::from_millis(990), 99_000), n),
            SAMPLE_EVERY
        );
        // No progress yet: nothing to go by.
        assert_eq!(next_look(&start, &mark(t + Duration::from_secs(1), 0), n), SAMPLE_EVERY);
        // A window that began with some already handled counts from there.
        let begun = mark(t, 50_000);
        assert_eq!(
            next_look(&begun, &mark(t + Duration::from_millis(400), 90_000), n),
            Duration::from_millis(25)
        );
    }

    #[test]
    fn stat_cpu_is_read_after_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 567 0 0 20 0 8 0 99 0 0";
        assert_eq!(stat_cpu_ticks(stat), Some(1234 + 567));
        assert_eq!(stat_cpu_ticks("4242 (short) S 1"), None);
        assert_eq!(stat_cpu_ticks("no name at all"), None);
    }

    /// The reading counts every thread of the process, including one that
    /// has ended (what a broker's own figure needs), and finds no process
    /// by a name nobody has.
    #[test]
    fn broker_cpu_counts_a_process_whose_threads_ended() {
        const BURN: f64 = 0.05;
        let me = BrokerCpu {
            pid: std::process::id(),
        };
        let start = me.seconds().expect("this process's stat");
        std::thread::spawn(|| {
            let mut x = 0u64;
            while thread_cpu() < BURN {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        })
        .join()
        .expect("join");
        let after = me.seconds().expect("this process's stat");
        // The ticks are 10 ms coarse.
        assert!(after - start >= BURN - 0.02, "{after} - {start}");
        assert!(BrokerCpu::find("no-such-broker-process").is_none());
    }

    /// A thread that used CPU and ended still counts: the meter keeps what
    /// it last read of it, where a sum over the live threads would drop it.
    #[test]
    fn cpu_meter_keeps_the_cpu_of_a_thread_that_ended() {
        const BURN: f64 = 0.03;
        let mut meter = CpuMeter::new(std::process::id());
        let start = meter.sample().expect("sample");
        let (burned_tx, burned_rx) = std::sync::mpsc::channel();
        let (seen_tx, seen_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            let mut x = 0u64;
            while thread_cpu() < BURN {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            burned_tx.send(()).expect("send");
            seen_rx.recv().expect("recv");
        });
        burned_rx.recv().expect("the worker burned its CPU");
        let while_alive = meter.sample().expect("sample");
        seen_tx.send(()).expect("send");
        worker.join().expect("join");
        let after = meter.sample().expect("sample");
        assert!(while_alive - start >= BURN, "{while_alive} - {start}");
        assert!(
            after >= while_alive,
            "the ended thread's CPU was dropped: {after} < {while_alive}"
        );
    }
}
