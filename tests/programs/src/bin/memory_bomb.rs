//! Allocates 1 MiB blocks until memory runs out.
use wharf_sdk::{Handler, HandlerError, Message, export_handler};

struct MemoryBomb;

impl Handler for MemoryBomb {
    fn handle(_msg: Message) -> Result<(), HandlerError> {
        let mut blocks: Vec<Vec<u8>> = Vec::new();
        loop {
            blocks.push(std::hint::black_box(vec![1u8; 1 << 20]));
        }
    }
}

export_handler!(MemoryBomb);

fn main() {}
