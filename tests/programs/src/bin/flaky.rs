//! Asks for a retry until attempt `config.succeed_on_attempt`, then succeeds
//! and records the attempt that succeeded under `done:<id>`. With
//! `config.count_subjects` set it also counts its attempts per subject
//! (`on:<subject>`).
use wharf_sdk::{Handler, HandlerError, Message, config, export_handler, kv, retry_after};

struct Flaky;

impl Handler for Flaky {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let succeed_on: u32 = config("succeed_on_attempt").and_then(|v| v.parse().ok()).unwrap_or(3);
        kv::increment(&format!("runs:{}", msg.id), 1)?;
        if config("count_subjects").is_some() {
            kv::increment(&format!("on:{}", msg.subject), 1)?;
        }
        if msg.attempt < succeed_on {
            return Err(retry_after(20, format!("not yet (attempt {})", msg.attempt)));
        }
        kv::set(&format!("done:{}", msg.id), msg.attempt.to_string().as_bytes())?;
        Ok(())
    }
}

export_handler!(Flaky);

fn main() {}
