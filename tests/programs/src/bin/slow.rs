//! Sleeps `config.sleep_ms` (default 300) and then counts the run, for
//! shutdown and kill tests that need messages in flight.
use wharf_sdk::{Handler, HandlerError, Message, config, export_handler, kv};

struct Slow;

impl Handler for Slow {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let ms: u64 = config("sleep_ms").and_then(|v| v.parse().ok()).unwrap_or(300);
        std::thread::sleep(std::time::Duration::from_millis(ms));
        kv::increment(&format!("runs:{}", msg.id), 1)?;
        Ok(())
    }
}

export_handler!(Slow);

fn main() {}
