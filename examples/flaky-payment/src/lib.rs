//! Charges payments through a "gateway" that is down for the first
//! `config.failures` attempts of every payment (default 2): each failure asks
//! for a retry, and wharf retries with backoff until the charge goes through.

use serde::Deserialize;
use wharf_sdk::{Handler, HandlerError, Message, config, export_handler, kv, log, retry};

#[derive(Deserialize)]
struct PaymentRequest {
    order_id: String,
    amount_cents: u64,
}

struct Charge;

impl Handler for Charge {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let payment: PaymentRequest = msg.json()?;
        let failures: u32 = config("failures").and_then(|v| v.parse().ok()).unwrap_or(2);
        if msg.attempt <= failures {
            log::warn(&format!(
                "gateway unavailable for order {} (attempt {})",
                payment.order_id, msg.attempt
            ));
            return Err(retry("payment gateway unavailable"));
        }
        kv::set(
            &format!("paid:{}", payment.order_id),
            payment.amount_cents.to_string().as_bytes(),
        )?;
        kv::increment("payments:charged", 1)?;
        log::info(&format!(
            "charged {} cents for order {} on attempt {}",
            payment.amount_cents, payment.order_id, msg.attempt
        ));
        Ok(())
    }
}

export_handler!(Charge);
