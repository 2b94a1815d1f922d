//! Runs into its per-attempt limits: publishes until refused (recording the
//! count under `published:<id>`) and logs far more than `max_log_bytes`.
use wharf_sdk::{Handler, HandlerError, Message, PublishError, export_handler, kv, log, publish};

struct Limits;

impl Handler for Limits {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let mut accepted = 0i64;
        loop {
            match publish("out", b"x", &[]) {
                Ok(()) => accepted += 1,
                Err(PublishError::LimitExceeded(_)) => break,
                Err(e) => return Err(wharf_sdk::reject(format!("unexpected: {e}"))),
            }
            if accepted > 10_000 {
                return Err(wharf_sdk::reject("the publish limit never applied"));
            }
        }
        kv::set(&format!("published:{}", msg.id), accepted.to_string().as_bytes())?;
        let line = "y".repeat(1000);
        for _ in 0..100 {
            log::info(&line);
        }
        Ok(())
    }
}

export_handler!(Limits);

fn main() {}
