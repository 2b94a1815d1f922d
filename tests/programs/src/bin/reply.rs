//! Answers requests: publishes the payload, upper-cased, to the message's
//! reply-to (always allowed, no grant needed).
use wharf_sdk::{Handler, HandlerError, Message, export_handler, reply};

struct Upper;

impl Handler for Upper {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let text = msg.text()?.to_uppercase();
        reply(&msg, text.as_bytes())?;
        Ok(())
    }
}

export_handler!(Upper);

fn main() {}
