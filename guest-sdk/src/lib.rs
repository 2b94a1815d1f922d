//! Write [wharf](https://github.com/) message handlers in Rust.
//!
//! A handler is a WebAssembly component (built for `wasm32-wasip2`) that wharf
//! calls once per message. The host does all delivery work — acks, retries
//! with backoff, dead-lettering, deduplication, limits — and this crate hides
//! the generated WIT bindings behind a small API:
//!
//! - [`Handler`] and [`export_handler!`] to export the handler,
//! - [`Message::json`] to decode the payload,
//! - [`retry`], [`retry_after`] and [`reject`] to say what went wrong,
//! - [`publish`] / [`publish_json`] for the outbox (released only when the
//!   attempt succeeds),
//! - [`log`], [`config`] and [`kv`] for logging, configuration and the
//!   tenant's key-value store.
//!
//! # Example
//!
//! ```no_run
//! use serde::Deserialize;
//! use wharf_sdk::{Handler, HandlerError, Message, export_handler, publish_json, reject};
//!
//! #[derive(Deserialize, serde::Serialize)]
//! struct Order { id: String, total_cents: u64 }
//!
//! struct Validate;
//!
//! impl Handler for Validate {
//!     fn handle(msg: Message) -> Result<(), HandlerError> {
//!         let order: Order = msg.json()?; // bad JSON: rejected (dead-lettered)
//!         if order.total_cents == 0 {
//!             return Err(reject("empty order"));
//!         }
//!         publish_json("orders.valid", &order)?; // outside the grants: retried
//!         Ok(())
//!     }
//! }
//!
//! export_handler!(Validate);
//! ```
//!
//! Build it as a `cdylib` for `wasm32-wasip2`:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//! ```
//!
//! `cargo build --release --target wasm32-wasip2` then writes the component to
//! `target/wasm32-wasip2/release/<name>.wasm`; point a handler's `component`
//! at it in the manifest.
//!
//! # Lean handlers (`no_std`)
//!
//! With `default-features = false` this crate, and a handler that is itself
//! `#![no_std]` (using `alloc`), build without Rust's standard library. The
//! component then imports none of WASI, only the wharf functions it calls,
//! and a fresh instance of it costs 17% fewer instructions
//! (`docs/BENCHMARKS.md`, *The thirty-first session*): what counts when
//! every message gets its own instance, as it does by default. This crate
//! then supplies what std would have: the allocator, `cabi_realloc`,
//! `memcmp` and a panic handler that sends the panic message to the host's
//! log before trapping. Every dependency must then build without std too
//! (`serde_json` with `default-features = false, features = ["alloc"]`, for
//! example); one that needs std brings a second panic handler and fails the
//! build with a duplicate `panic_impl`. Build such a handler in a cargo run
//! of its own: built together with std guests, it would get the SDK's std
//! feature too (cargo unifies features).

#![cfg_attr(not(feature = "std"), no_std)]
#![deny(missing_docs)]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

#[cfg(all(not(feature = "std"), target_arch = "wasm32"))]
mod lean;

/// The generated bindings. Not part of the stable API: use the re-exports.
#[doc(hidden)]
#[allow(missing_docs, clippy::all)]
pub mod wit {
    wit_bindgen::generate!({
        path: "../wit",
        world: "handler-world",
        pub_export_macro: true,
        export_macro_name: "__export_handler_world",
        default_bindings_module: "::wharf_sdk::wit",
        generate_all,
    });
}

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use wit::wharf::handler::host::{PublishError, RequestError};
pub use wit::wharf::handler::kv::KvError;
pub use wit::wharf::handler::types::{HandlerError, Message, RetryInfo};

/// A message handler. Implement it on a unit struct and export it with
/// [`export_handler!`].
pub trait Handler {
    /// Process one message: `Ok(())` acknowledges it; an error says whether
    /// to retry it later or dead-letter it now.
    fn handle(msg: Message) -> Result<(), HandlerError>;
}

/// Export `$handler` (a type implementing [`Handler`]) as the component's
/// `wharf:handler/handler` export. Use it once per component.
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        const _: () = {
            struct __WharfExport;
            impl $crate::wit::exports::wharf::handler::handler::Guest for __WharfExport {
                fn handle(msg: $crate::Message) -> ::core::result::Result<(), $crate::HandlerError> {
                    <$handler as $crate::Handler>::handle(msg)
                }
            }
    $crate::wit::__export_handler_world!(__WharfExport with_types_in $crate::wit);
        };
    };
}

/// A transient failure: retry with the handler's backoff.
pub fn retry(reason: impl Into<String>) -> HandlerError {
    HandlerError::Retry(RetryInfo {
        reason: reason.into(),
        after_ms: None,
    })
}

/// A transient failure: retry no sooner than `after_ms` milliseconds from now
/// (capped at the handler's `retry.max_delay_ms`).
pub fn retry_after(after_ms: u64, reason: impl Into<String>) -> HandlerError {
    HandlerError::Retry(RetryInfo {
        reason: reason.into(),
        after_ms: Some(after_ms),
    })
}

/// A permanent failure: dead-letter the message now with this reason.
pub fn reject(reason: impl Into<String>) -> HandlerError {
    HandlerError::Reject(reason.into())
}

/// A publish that was refused is a transient failure by default: the grants
/// or limits may be fixed by a manifest change and a reload.
impl From<PublishError> for HandlerError {
    fn from(err: PublishError) -> Self {
        retry(format!("publish failed: {err}"))
    }
}

/// A failed request is transient: the responder may come back.
impl From<RequestError> for HandlerError {
    fn from(err: RequestError) -> Self {
        retry(format!("request failed: {err}"))
    }
}

/// A key-value failure is transient: the store may come back.
impl From<KvError> for HandlerError {
    fn from(err: KvError) -> Self {
        retry(format!("key-value store: {err}"))
    }
}

impl Message {
    /// Decode the payload as JSON. A payload that does not decode is a
    /// permanent failure, so the error is a [`reject`].
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.payload).map_err(|e| reject(format!("payload is not the expected JSON: {e}")))
    }

    /// The payload as UTF-8 text, or a [`reject`].
    pub fn text(&self) -> Result<&str, HandlerError> {
        core::str::from_utf8(&self.payload).map_err(|e| reject(format!("payload is not UTF-8: {e}")))
    }

    /// The first header named `name` (case-sensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Queue `payload` for `subject` with `headers`. See the WIT `publish` for
/// the outbox and grant rules.
pub fn publish(subject: &str, payload: &[u8], headers: &[(String, String)]) -> Result<(), PublishError> {
    wit::wharf::handler::host::publish(subject, payload, headers)
}

/// Serialise `value` as JSON and queue it for `subject`, with the header
/// `content-type: application/json`.
pub fn publish_json<T: Serialize + ?Sized>(subject: &str, value: &T) -> Result<(), PublishError> {
    let payload =
        serde_json::to_vec(value).map_err(|e| PublishError::TooLarge(format!("could not encode JSON: {e}")))?;
    publish(
        subject,
        &payload,
        &[("content-type".to_string(), "application/json".to_string())],
    )
}

/// Send `payload` to `subject` and wait up to `timeout_ms` for the reply
/// (NATS request/reply; `subject` must be granted). Leaves at once: not part
/// of the outbox.
pub fn request(subject: &str, payload: &[u8], timeout_ms: u32) -> Result<Vec<u8>, RequestError> {
    wit::wharf::handler::host::request(subject, payload, &[], timeout_ms)
}

/// Answer the message's requester, if it asked for a reply: publishes
/// `payload` to the message's `reply_to` (always allowed), through the
/// outbox like any publish. Returns false when there was nobody to answer.
pub fn reply(msg: &Message, payload: &[u8]) -> Result<bool, PublishError> {
    match &msg.reply_to {
        Some(to) => publish(to, payload, &[]).map(|()| true),
        None => Ok(false),
    }
}

/// A value from the handler's `config` table in the manifest.
pub fn config(key: &str) -> Option<String> {
    wit::wharf::handler::host::config_get(key)
}

/// Log lines, tagged by the host with the handler's name and message id.
pub mod log {
    use crate::wit::wharf::handler::host::{LogLevel, log};

    /// Log at debug level.
    pub fn debug(message: &str) {
        log(LogLevel::Debug, message)
    }
    /// Log at info level.
    pub fn info(message: &str) {
        log(LogLevel::Info, message)
    }
    /// Log at warn level.
    pub fn warn(message: &str) {
        log(LogLevel::Warn, message)
    }
    /// Log at error level.
    pub fn error(message: &str) {
        log(LogLevel::Error, message)
    }
}

/// The tenant's key-value store. Writes are durable and immediate: they are
/// not rolled back when the attempt fails, so make them idempotent (key them
/// on the message id) where that matters.
pub mod kv {
    use alloc::vec::Vec;

    use crate::KvError;
    use crate::wit::wharf::handler::kv as raw;

    /// The value under `key`, if any.
    pub fn get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
        raw::get(key)
    }
    /// Store `value` under `key`, forever.
    pub fn set(key: &str, value: &[u8]) -> Result<(), KvError> {
        raw::set(key, value, None)
    }
    /// Store `value` under `key` for `ttl_ms` milliseconds.
    pub fn set_with_ttl(key: &str, value: &[u8], ttl_ms: u64) -> Result<(), KvError> {
        raw::set(key, value, Some(ttl_ms))
    }
    /// Remove `key`; true when it existed.
    pub fn delete(key: &str) -> Result<bool, KvError> {
        raw::delete(key)
    }
    /// Add `delta` to the integer under `key` and return the new value.
    pub fn increment(key: &str, delta: i64) -> Result<i64, KvError> {
        raw::increment(key, delta)
    }
}
