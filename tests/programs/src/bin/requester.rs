//! Makes a request of its own: sends the payload to `config.target` and
//! stores the answer under `reply:<id>`.
use wharf_sdk::{Handler, HandlerError, Message, config, export_handler, kv, reject, request};

struct Ask;

impl Handler for Ask {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let target = config("target").ok_or_else(|| reject("no config.target"))?;
        let answer = request(&target, &msg.payload, 2000)?;
        kv::set(&format!("reply:{}", msg.id), &answer)?;
        Ok(())
    }
}

export_handler!(Ask);

fn main() {}
