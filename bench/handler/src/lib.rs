//! Parses the payload as JSON and succeeds: the per-message cost of wharf
//! itself, with as little handler work as a real handler can do. With
//! `config.forward_to` set it also publishes the payload there (the latency
//! benchmark's forwarder).
use wharf_sdk::{Handler, HandlerError, Message, config, export_handler, publish};

struct ParseJson;

impl Handler for ParseJson {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let _: serde_json::Value = msg.json()?;
        if let Some(to) = config("forward_to") {
            publish(&to, &msg.payload, &[])?;
        }
        Ok(())
    }
}

export_handler!(ParseJson);
