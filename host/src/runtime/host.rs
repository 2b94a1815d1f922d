//! Store state and the host imports a handler sees.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::wharf::handler::{host, kv, types};
use crate::broker::OutboundMessage;
use crate::kv::{Kv, KvError};
use crate::subject::{Grants, SubjectPattern};

/// Bytes of guest stdout + stderr buffered per attempt. Writing past it fails
/// the guest's write (its own budget); only `max_log_bytes` of it is logged.
pub const STDIO_CAPACITY: usize = 64 * 1024;

/// Everything about a handler that does not change between messages.
pub struct HandlerContext {
    /// Where `request` goes (a NATS broker of the handler), if anywhere.
    pub requester: Option<Arc<crate::broker::nats::NatsBroker>>,
    /// Handler name, for logs and dead-letter headers.
    pub name: String,
    /// Tenant name.
    pub tenant: String,
    /// The handler's publish grants.
    pub grants: Grants,
    /// The tenant's publish ceiling.
    pub tenant_grants: Grants,
    /// The manifest's `config` table.
    pub config: BTreeMap<String, String>,
    /// The tenant's key-value store.
    pub kv: Kv,
    /// Per-attempt limits.
    pub limits: AttemptLimits,
}

/// Limits of one attempt.
#[derive(Debug, Clone, Copy)]
pub struct AttemptLimits {
    /// CPU and wall-clock budget.
    pub timeout: Duration,
    /// Linear memory cap of the instance, bytes.
    pub memory_bytes: usize,
    /// Largest payload in or out.
    pub max_payload_bytes: usize,
    /// Publishes per attempt.
    pub max_publishes: u32,
    /// Log bytes per attempt.
    pub max_log_bytes: usize,
    /// Messages one instance may handle before it is replaced; 1 (the
    /// default) is a fresh instance per message. More is for trusted
    /// handlers only: what one message leaves in the instance's memory, the
    /// next message of the same handler can see.
    pub instance_reuse: u32,
}

/// Denies linear memory growth past the handler's cap and remembers that it
/// did, so the failure is reported as `memory` rather than a bare trap.
pub struct MemoryCap {
    /// The cap, bytes.
    pub limit: usize,
    /// Set once growth past the cap was refused.
    pub exceeded: bool,
}

impl wasmtime::ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        // Tables hold 8-16 byte entries; bound them by the same budget.
        Ok(desired.saturating_mul(16) <= self.limit)
    }
}

/// The store's data: one field per context, as wasmtime's own hosts do.
pub struct StoreState {
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) memory: MemoryCap,
    /// CPU ticks (epochs) this attempt has run for.
    pub(super) ticks: u64,
    pub(super) attempt: AttemptState,
}

/// What one attempt accumulates.
pub struct AttemptState {
    pub(super) handler: Arc<HandlerContext>,
    pub(super) message_id: String,
    /// The incoming message's reply subject: always publishable.
    pub(super) reply_to: Option<String>,
    /// Publishes held until the attempt succeeds.
    pub(super) outbox: Vec<OutboundMessage>,
    pub(super) log_bytes: usize,
    pub(super) dropped_log_lines: u32,
    pub(super) stdout: MemoryOutputPipe,
    pub(super) stderr: MemoryOutputPipe,
    /// Bytes of stdout and stderr already logged (earlier messages of a
    /// reused instance).
    pub(super) stdio_seen: (usize, usize),
}

impl StoreState {
    pub(super) fn new(handler: Arc<HandlerContext>, message_id: String, reply_to: Option<String>) -> Self {
        let stdout = MemoryOutputPipe::new(STDIO_CAPACITY);
        let stderr = MemoryOutputPipe::new(STDIO_CAPACITY);
        // No preopens, no environment, no arguments, no stdin, no network:
        // WASI is linked only because Rust's standard library imports it.
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let limit = handler.limits.memory_bytes;
        Self {
            wasi,
            table: ResourceTable::new(),
            memory: MemoryCap { limit, exceeded: false },
            ticks: 0,
            attempt: AttemptState {
                handler,
                message_id,
                reply_to,
                outbox: Vec::new(),
                log_bytes: 0,
                dropped_log_lines: 0,
                stdout,
                stderr,
                stdio_seen: (0, 0),
            },
        }
    }

    /// Make a reused instance's state ready for the next message.
    pub(super) fn next_attempt(&mut self, message_id: String, reply_to: Option<String>) {
        self.ticks = 0;
        self.memory.exceeded = false;
        let a = &mut self.attempt;
        a.message_id = message_id;
        a.reply_to = reply_to;
        a.outbox.clear();
        a.log_bytes = 0;
        a.dropped_log_lines = 0;
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Replace control characters (bar tab) so a guest cannot forge log lines or
/// terminal escapes.
pub fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() && c != '\t' { '\u{FFFD}' } else { c })
        .collect()
}

impl AttemptState {
    /// Emit `text` at `level` if the attempt's log budget allows.
    pub(super) fn log(&mut self, level: host::LogLevel, text: &str) {
        let limit = self.handler.limits.max_log_bytes;
        if self.log_bytes + text.len() > limit {
            self.dropped_log_lines += 1;
            return;
        }
        self.log_bytes += text.len();
        let line = sanitize(text);
        let (handler, id) = (self.handler.name.as_str(), self.message_id.as_str());
        match level {
            host::LogLevel::Trace => tracing::trace!(target: "wharf::guest", handler, message_id = id, "{line}"),
            host::LogLevel::Debug => tracing::debug!(target: "wharf::guest", handler, message_id = id, "{line}"),
            host::LogLevel::Info => tracing::info!(target: "wharf::guest", handler, message_id = id, "{line}"),
            host::LogLevel::Warn => tracing::warn!(target: "wharf::guest", handler, message_id = id, "{line}"),
            host::LogLevel::Error => tracing::error!(target: "wharf::guest", handler, message_id = id, "{line}"),
        }
    }

    /// Log what the guest wrote to stdout/stderr, within the log budget.
    pub(super) fn flush_stdio(&mut self) {
        let (out, err) = (self.stdout.contents(), self.stderr.contents());
        let (out_seen, err_seen) = std::mem::replace(&mut self.stdio_seen, (out.len(), err.len()));
        for (stream, level) in [
            (out.get(out_seen..).unwrap_or_default(), host::LogLevel::Info),
            (err.get(err_seen..).unwrap_or_default(), host::LogLevel::Warn),
        ] {
            for line in String::from_utf8_lossy(stream).lines().filter(|l| !l.is_empty()) {
                self.log(level, line);
            }
        }
        if self.dropped_log_lines > 0 {
            tracing::warn!(
                handler = %self.handler.name,
                message_id = %self.message_id,
                dropped = self.dropped_log_lines,
                "log lines dropped: over max_log_bytes for this attempt"
            );
        }
    }
}

impl types::Host for StoreState {}

impl host::Host for StoreState {
    async fn publish(
        &mut self,
        subject: String,
        payload: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> Result<(), host::PublishError> {
        let a = &mut self.attempt;
        let h = &a.handler;
        if a.reply_to.as_deref() != Some(subject.as_str())
            && let Err(e) = SubjectPattern::check_literal(&subject)
        {
            return Err(host::PublishError::Denied(e));
        }
        let is_reply = a.reply_to.as_deref() == Some(subject.as_str());
        if !is_reply && (!h.grants.allows(&subject) || !h.tenant_grants.allows(&subject)) {
            tracing::warn!(handler = %h.name, message_id = %a.message_id, subject = %sanitize(&subject), "publish denied: not granted");
            return Err(host::PublishError::Denied(format!(
                "handler {:?} is not granted publish to {subject:?}",
                h.name
            )));
        }
        if a.outbox.len() as u64 >= u64::from(h.limits.max_publishes) {
            return Err(host::PublishError::LimitExceeded(format!(
                "at most {} publishes per attempt",
                h.limits.max_publishes
            )));
        }
        if payload.len() > h.limits.max_payload_bytes {
            return Err(host::PublishError::TooLarge(format!(
                "payload is {} bytes; max_payload_bytes is {}",
                payload.len(),
                h.limits.max_payload_bytes
            )));
        }
        let content_type = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.clone());
        let position = a.outbox.len();
        a.outbox.push(OutboundMessage {
            id: Some(format!("{}/{position}", a.message_id)),
            subject,
            payload: Bytes::from(payload),
            headers,
            content_type,
            reply_to: None,
            delay: Duration::ZERO,
        });
        Ok(())
    }

    async fn request(
        &mut self,
        subject: String,
        payload: Vec<u8>,
        headers: Vec<(String, String)>,
        timeout_ms: u32,
    ) -> Result<Vec<u8>, host::RequestError> {
        use crate::broker::nats::RequestError as E;
        let a = &self.attempt;
        let h = a.handler.clone();
        let Some(nats) = h.requester.clone() else {
            return Err(host::RequestError::Denied(format!(
                "handler {:?} has no NATS broker to send requests through",
                h.name
            )));
        };
        if SubjectPattern::check_literal(&subject).is_err()
            || !h.grants.allows(&subject)
            || !h.tenant_grants.allows(&subject)
        {
            tracing::warn!(handler = %h.name, message_id = %a.message_id, subject = %sanitize(&subject), "request denied: not granted");
            return Err(host::RequestError::Denied(format!(
                "handler {:?} is not granted {subject:?}",
                h.name
            )));
        }
        if payload.len() > h.limits.max_payload_bytes {
            return Err(host::RequestError::Denied(format!(
                "payload is {} bytes; max_payload_bytes is {}",
                payload.len(),
                h.limits.max_payload_bytes
            )));
        }
        let timeout = Duration::from_millis(u64::from(timeout_ms)).min(h.limits.timeout);
        match nats.request(&subject, payload, &headers, timeout).await {
            Ok(reply) => Ok(reply),
            Err(E::Denied(s)) => Err(host::RequestError::Denied(s)),
            Err(E::Timeout(s)) => Err(host::RequestError::Timeout(s)),
            Err(E::NoResponders(s)) => Err(host::RequestError::NoResponders(s)),
            Err(E::Failed(s)) => Err(host::RequestError::Failed(s)),
        }
    }

    async fn log(&mut self, level: host::LogLevel, message: String) {
        self.attempt.log(level, &message);
    }

    async fn config_get(&mut self, key: String) -> Option<String> {
        self.attempt.handler.config.get(&key).cloned()
    }
}

fn kv_error(e: KvError) -> kv::KvError {
    match e {
        KvError::QuotaExceeded(s) => kv::KvError::QuotaExceeded(s),
        KvError::NotANumber(s) => kv::KvError::NotANumber(s),
        KvError::Unavailable(s) => kv::KvError::Unavailable(s),
    }
}

impl kv::Host for StoreState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, kv::KvError> {
        self.attempt.handler.kv.get(&key).map_err(kv_error)
    }

    async fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<(), kv::KvError> {
        self.attempt.handler.kv.set(&key, value, ttl_ms).await.map_err(kv_error)
    }

    async fn delete(&mut self, key: String) -> Result<bool, kv::KvError> {
        self.attempt.handler.kv.delete(&key).await.map_err(kv_error)
    }

    async fn increment(&mut self, key: String, delta: i64) -> Result<i64, kv::KvError> {
        self.attempt.handler.kv.increment(&key, delta).await.map_err(kv_error)
    }
}
