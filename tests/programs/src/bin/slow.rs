//! Sleeps `config.sleep_ms` (default 300; a JSON payload's `sleep_ms`
//! overrides it) and then counts the run, for shutdown and kill tests that
//! need messages in flight, and for tests that need them to finish out of
//! order.
use wharf_sdk::{Handler, HandlerError, Message, config, export_handler, kv};

struct Slow;

impl Handler for Slow {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let own = msg
            .json::<serde_json::Value>()
            .ok()
            .and_then(|v| v.get("sleep_ms").and_then(|n| n.as_u64()));
        let ms = own
            .or_else(|| config("sleep_ms").and_then(|v| v.parse().ok()))
            .unwrap_or(300);
        std::thread::sleep(std::time::Duration::from_millis(ms));
        kv::increment(&format!("runs:{}", msg.id), 1)?;
        Ok(())
    }
}

export_handler!(Slow);

fn main() {}
