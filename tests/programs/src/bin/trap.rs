//! Panics, which traps the instance.
use wharf_sdk::{Handler, HandlerError, Message, export_handler};

struct Trap;

impl Handler for Trap {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        panic!("deliberate panic on message {}", msg.id);
    }
}

export_handler!(Trap);

fn main() {}
