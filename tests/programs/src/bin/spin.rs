//! Never returns: a loop with no host calls, which only epoch interruption
//! can stop.
use wharf_sdk::{Handler, HandlerError, Message, export_handler};

struct Spin;

impl Handler for Spin {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let mut x = msg.payload.len() as u64;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

export_handler!(Spin);

fn main() {}
