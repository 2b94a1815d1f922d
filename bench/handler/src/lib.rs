//! Parses the payload as JSON and succeeds: the per-message cost of wharf
//! itself, with as little handler work as a real handler can do.
use wharf_sdk::{Handler, HandlerError, Message, export_handler};

struct ParseJson;

impl Handler for ParseJson {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let _: serde_json::Value = msg.json()?;
        Ok(())
    }
}

export_handler!(ParseJson);
