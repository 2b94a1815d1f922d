//! Publishes two messages to `out`, then fails its first attempt: the outbox
//! of the failed attempt must be discarded, the second attempt's released.
use wharf_sdk::{Handler, HandlerError, Message, export_handler, publish, retry_after};

struct Outbox;

impl Handler for Outbox {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let attempt = msg.attempt.to_string();
        publish("out", attempt.as_bytes(), &[("attempt".into(), attempt.clone())])?;
        publish("out", attempt.as_bytes(), &[("attempt".into(), attempt.clone())])?;
        if msg.attempt == 1 {
            return Err(retry_after(10, "first attempt always fails"));
        }
        Ok(())
    }
}

export_handler!(Outbox);

fn main() {}
