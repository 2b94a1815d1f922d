//! A handler built without std (a lean handler, wharf-sdk's docs). It parses
//! the payload as JSON, counts its runs per message id in the key-value store
//! (`runs:<id>`) and forwards the payload to `config.forward_to` when set.
//! `{"panic": true}` makes it panic; `{"allocate_kib": N}` makes it hold N KiB
//! at once, more than the initial memory, so its heap must grow.
#![no_std]

extern crate alloc;

use alloc::format;
use alloc::vec::Vec;

use wharf_sdk::{Handler, HandlerError, Message, config, export_handler, kv, publish};

struct Lean;

impl Handler for Lean {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let body: serde_json::Value = msg.json()?;
        kv::increment(&format!("runs:{}", msg.id), 1)?;
        if body["panic"] == true {
            panic!("deliberate panic on message {}", msg.id);
        }
        if let Some(kib) = body["allocate_kib"].as_u64() {
            let held: Vec<u8> = alloc::vec![1; kib as usize * 1024];
            let sum: u64 = held.iter().map(|&b| u64::from(b)).sum();
            kv::increment(&format!("allocated:{}", msg.id), sum as i64 / 1024)?;
        }
        if let Some(to) = config("forward_to") {
            publish(&to, &msg.payload, &[])?;
        }
        Ok(())
    }
}

export_handler!(Lean);
