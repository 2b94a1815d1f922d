//! Parses the payload as JSON and succeeds: the per-message cost of wharf
//! itself, with as little handler work as a real handler can do. With
//! `config.forward_to` set it also publishes the payload there (the latency
//! benchmark's forwarder). Built with std by default, and without it
//! (`--no-default-features`) as a lean handler.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

use alloc::string::String;

use wharf_sdk::{Handler, HandlerError, Message, config, export_handler, publish};

struct ParseJson;

/// `forward_to`, asked of the host once per instance: a handler's config is
/// fixed for the instance's life, and asking per message was a host call
/// the drains' "parse the JSON, nothing else" did not call for.
#[cfg(feature = "std")]
fn forward_to() -> Option<&'static str> {
    static FORWARD_TO: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    FORWARD_TO.get_or_init(|| config("forward_to")).as_deref()
}

/// The same without std (`OnceLock` is std's). The std build keeps
/// `OnceLock` rather than sharing this `OnceBox` (an allocation more per
/// instance), so that its counts stay comparable with earlier suites.
#[cfg(not(feature = "std"))]
fn forward_to() -> Option<&'static str> {
    static FORWARD_TO: once_cell::race::OnceBox<Option<String>> = once_cell::race::OnceBox::new();
    FORWARD_TO
        .get_or_init(|| alloc::boxed::Box::new(config("forward_to")))
        .as_deref()
}

impl Handler for ParseJson {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let _: serde_json::Value = msg.json()?;
        if let Some(to) = forward_to() {
            publish(to, &msg.payload, &[])?;
        }
        Ok(())
    }
}

export_handler!(ParseJson);
