//! The second build of a handler, for the hot-reload tests: counts its runs
//! per message id (`runs:<id>`) as `ok` does, and also `v2:<id>`, so a test
//! can tell which of the two handled each message.
use wharf_sdk::{Handler, HandlerError, Message, export_handler, kv};

struct Reloaded;

impl Handler for Reloaded {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        kv::increment(&format!("runs:{}", msg.id), 1)?;
        kv::increment(&format!("v2:{}", msg.id), 1)?;
        Ok(())
    }
}

export_handler!(Reloaded);

fn main() {}
