//! The host's durable local state: one redb database in the data folder.
//!
//! It holds the embedded broker's queues, the dedup marks and the tenants'
//! key-value data. Writes go through one writer thread that applies every
//! waiting write in a single transaction and commits once (group commit):
//! a commit is an fsync, so batching is what makes per-message durability
//! affordable. A write is acknowledged to its caller only after its commit.
//!
//! Invariant for writers: a job that returns `Err` must not have written
//! anything, because its transaction is shared with other jobs that commit.
//! Jobs therefore read and check first, then write.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use redb::{Database, ReadTransaction, ReadableDatabase, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

type Completion = Box<dyn FnOnce(Result<(), String>) + Send>;
type Job = Box<dyn FnOnce(&WriteTransaction) -> Completion + Send>;

/// Most writes folded into one transaction.
const MAX_GROUP: usize = 512;

/// A handle to the database; cheap to clone. When the last handle is
/// dropped, the writer finishes the writes already queued and the database
/// is closed before the drop returns, so the file can be opened again at once.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    jobs: Option<mpsc::UnboundedSender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer's loop; it drops its database
        // handle on the way out.
        self.jobs.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Store {
    /// Open (or create) the database at `path`, creating every table, and
    /// start the writer thread. Fails if another process holds it open.
    pub fn open(path: &Path, init: impl FnOnce(&WriteTransaction) -> Result<()>) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating data folder {}", dir.display()))?;
        }
        let db = Database::create(path).with_context(|| {
            format!(
                "opening {} (is another wharf running on this data folder?)",
                path.display()
            )
        })?;
        let txn = db.begin_write()?;
        init(&txn)?;
        txn.commit()?;
        let db = Arc::new(db);
        let (jobs, rx) = mpsc::unbounded_channel();
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("wharf-store-writer".into())
            .spawn(move || writer(writer_db, rx))
            .context("starting the store writer thread")?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                jobs: Some(jobs),
                writer: Some(writer),
            }),
        })
    }

    /// Run `f` in a write transaction shared with other writers; resolves
    /// after the transaction has committed durably.
    pub async fn write<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<R> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |txn| {
            let result = f(txn);
            Box::new(move |committed: Result<(), String>| {
                let _ = tx.send(match committed {
                    Ok(()) => result,
                    Err(e) => Err(anyhow!("store commit failed: {e}")),
                });
            })
        });
        let jobs = self.inner.jobs.as_ref().ok_or_else(|| anyhow!("the store is closed"))?;
        jobs.send(job).map_err(|_| anyhow!("the store writer has stopped"))?;
        rx.await.map_err(|_| anyhow!("the store writer dropped a write"))?
    }

    /// Run `f` in a read transaction (a consistent snapshot).
    pub fn read<R>(&self, f: impl FnOnce(&ReadTransaction) -> Result<R>) -> Result<R> {
        let txn = self.inner.db.begin_read()?;
        f(&txn)
    }
}

fn writer(db: Arc<Database>, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let txn = match db.begin_write() {
            Ok(txn) => txn,
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(error = %msg, "store: cannot begin a write transaction");
                // Jobs need a transaction to run; without one each fails.
                drop(group);
                continue;
            }
        };
        let completions: Vec<Completion> = group.into_iter().map(|job| job(&txn)).collect();
        let committed = txn.commit().map_err(|e| e.to_string());
        if let Err(e) = &committed {
            tracing::error!(error = %e, "store: commit failed");
        }
        for done in completions {
            done(committed.clone());
        }
    }
}

/// Milliseconds since the Unix epoch, by the host's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Open the database at `path` with every table wharf keeps in it.
pub fn open_all(path: &Path) -> Result<Store> {
    Store::open(path, |txn| {
        crate::broker::embedded::EmbeddedBroker::init_tables(txn)?;
        crate::kv::init_tables(txn)?;
        crate::delivery::dedup::init_tables(txn)?;
        Ok(())
    })
}
