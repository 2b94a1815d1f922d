//! Sleeps `config.sleep_ms` (default 300; a JSON payload's `sleep_ms`
//! overrides it) and then counts the run, for shutdown and kill tests that
//! need messages in flight, and for tests that need them to finish out of
//! order. With `config.track_in_flight` set it also keeps the tenant's count
//! of running attempts in its key-value store (`in-flight`) and marks every
//! count it saw (`in-flight-seen:<n>`), for the concurrency tests.
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
        let track = config("track_in_flight").is_some();
        if track {
            let running = kv::increment("in-flight", 1)?;
            kv::increment(&format!("in-flight-seen:{running}"), 1)?;
        }
        std::thread::sleep(std::time::Duration::from_millis(ms));
        if track {
            kv::increment("in-flight", -1)?;
        }
        kv::increment(&format!("runs:{}", msg.id), 1)?;
        Ok(())
    }
}

export_handler!(Slow);

fn main() {}
