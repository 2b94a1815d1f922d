//! Succeeds. Counts its runs per message id in the key-value store
//! (`runs:<id>`) and, when `config.forward_to` is set, publishes the payload
//! there. With `config.count_subjects` set it also counts its runs per
//! subject (`on:<subject>`). With `config.count_meta` set it counts each
//! header it is given (`header:<name>=<value>`) and its content type
//! (`content-type:<type>`, `content-type:none` without one).
use wharf_sdk::{Handler, HandlerError, Message, config, export_handler, kv, publish};

struct Succeed;

impl Handler for Succeed {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        kv::increment(&format!("runs:{}", msg.id), 1)?;
        if config("count_subjects").is_some() {
            kv::increment(&format!("on:{}", msg.subject), 1)?;
        }
        if config("count_meta").is_some() {
            for (name, value) in &msg.headers {
                kv::increment(&format!("header:{name}={value}"), 1)?;
            }
            let content_type = msg.content_type.as_deref().unwrap_or("none");
            kv::increment(&format!("content-type:{content_type}"), 1)?;
        }
        if let Some(to) = config("forward_to") {
            publish(&to, &msg.payload, &[])?;
        }
        Ok(())
    }
}

export_handler!(Succeed);

fn main() {}
