//! Tries to reach outside its box: the host's files, environment, arguments,
//! network, and a subject it was not granted. Succeeds only if every attempt
//! is refused; otherwise rejects, naming what leaked.
use wharf_sdk::{Handler, HandlerError, Message, PublishError, export_handler, log, publish, reject};

struct Sandbox;

impl Handler for Sandbox {
    fn handle(_msg: Message) -> Result<(), HandlerError> {
        let mut leaks = Vec::new();
        if std::fs::read("/etc/passwd").is_ok() {
            leaks.push("read /etc/passwd");
        }
        if std::fs::read_dir("/").is_ok() || std::fs::read_dir(".").is_ok() {
            leaks.push("listed a directory");
        }
        if std::fs::write("escape.txt", b"x").is_ok() {
            leaks.push("wrote a file");
        }
        if std::env::vars().next().is_some() {
            leaks.push("saw environment variables");
        }
        if std::env::args().next().is_some() {
            leaks.push("saw arguments");
        }
        if std::net::TcpStream::connect("127.0.0.1:6379").is_ok() {
            leaks.push("opened a TCP connection");
        }
        if std::net::UdpSocket::bind("127.0.0.1:0").is_ok() {
            leaks.push("bound a UDP socket");
        }
        match publish("not.granted", b"x", &[]) {
            Err(PublishError::Denied(_)) => {}
            _ => leaks.push("published outside its grants"),
        }
        // Control characters must not reach the host's log verbatim.
        log::info("sandbox probe \u{1b}[31mred\u{1b}[0m\nforged line");
        println!("stdout goes to the host log");
        if leaks.is_empty() {
            Ok(())
        } else {
            Err(reject(leaks.join(", ")))
        }
    }
}

export_handler!(Sandbox);

fn main() {}
