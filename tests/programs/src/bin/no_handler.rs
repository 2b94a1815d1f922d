//! A component that is not a handler: a plain command with no
//! `wharf:handler/handler` export. `wharf check` must refuse it by name.

fn main() {
    println!("I am a command, not a handler");
}
