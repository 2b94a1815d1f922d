//! Rejects any payload that is not JSON `{"valid": true}`.
use wharf_sdk::{Handler, HandlerError, Message, export_handler, reject};

#[derive(serde::Deserialize)]
struct Input {
    valid: bool,
}

struct Reject;

impl Handler for Reject {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let input: Input = msg.json()?;
        if !input.valid {
            return Err(reject("input is marked invalid"));
        }
        Ok(())
    }
}

export_handler!(Reject);

fn main() {}
