//! Reserves stock for validated orders (a counter per SKU in the tenant's
//! key-value store) and requests payment on `payments.requested`.
//!
//! The key-value writes are not rolled back if a later step fails, so they are
//! made idempotent: an order already recorded is not counted twice.

use serde::{Deserialize, Serialize};
use wharf_sdk::{Handler, HandlerError, Message, export_handler, kv, log, publish_json};

#[derive(Deserialize)]
struct ValidatedOrder {
    id: String,
    items: Vec<Item>,
    total_cents: u64,
}

#[derive(Deserialize)]
struct Item {
    sku: String,
    qty: u32,
}

#[derive(Serialize)]
struct PaymentRequest<'a> {
    order_id: &'a str,
    amount_cents: u64,
}

struct Fulfil;

impl Handler for Fulfil {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let order: ValidatedOrder = msg.json()?;
        let marker = format!("fulfilled:{}", order.id);
        if kv::get(&marker)?.is_none() {
            for item in &order.items {
                kv::increment(&format!("reserved:{}", item.sku), i64::from(item.qty))?;
            }
            kv::set(&marker, b"1")?;
            kv::increment("orders:fulfilled", 1)?;
        }
        log::info(&format!(
            "order {} reserved; requesting {} cents",
            order.id, order.total_cents
        ));
        publish_json(
            "payments.requested",
            &PaymentRequest {
                order_id: &order.id,
                amount_cents: order.total_cents,
            },
        )?;
        Ok(())
    }
}

export_handler!(Fulfil);
