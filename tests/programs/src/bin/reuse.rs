//! Counts, in a static, the messages its instance has handled and stores
//! that count as `served:<id>`; prints `handled <id>` to stdout; traps on a
//! payload of `trap`. For the `instance_reuse` tests: a fresh instance
//! always stores 1.
use std::sync::atomic::{AtomicI64, Ordering};

use wharf_sdk::{Handler, HandlerError, Message, export_handler, kv};

static SERVED: AtomicI64 = AtomicI64::new(0);

struct Reuse;

impl Handler for Reuse {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let served = SERVED.fetch_add(1, Ordering::Relaxed) + 1;
        if msg.payload == b"trap" {
            panic!("asked to trap");
        }
        println!("handled {}", msg.id);
        kv::increment(&format!("served:{}", msg.id), served)?;
        Ok(())
    }
}

export_handler!(Reuse);

fn main() {}
