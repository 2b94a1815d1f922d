//! Validates incoming orders and publishes them, priced, to `orders.validated`.
//! An order that can never be valid is rejected: it goes to the dead-letter
//! queue with the reason, and is not retried.

use serde::{Deserialize, Serialize};
use wharf_sdk::{Handler, HandlerError, Message, config, export_handler, log, publish_json, reject};

#[derive(Deserialize)]
struct Order {
    id: String,
    customer: String,
    items: Vec<Item>,
}

#[derive(Deserialize, Serialize)]
struct Item {
    sku: String,
    qty: u32,
    price_cents: u64,
}

#[derive(Serialize)]
struct ValidatedOrder {
    id: String,
    customer: String,
    items: Vec<Item>,
    total_cents: u64,
}

struct Validate;

impl Handler for Validate {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let order: Order = msg.json()?;
        if order.items.is_empty() {
            return Err(reject(format!("order {} has no items", order.id)));
        }
        if let Some(item) = order.items.iter().find(|i| i.qty == 0) {
            return Err(reject(format!("order {}: item {} has quantity 0", order.id, item.sku)));
        }
        let total_cents: u64 = order.items.iter().map(|i| i.price_cents * u64::from(i.qty)).sum();
        let max: u64 = config("max_total_cents")
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX);
        if total_cents > max {
            return Err(reject(format!("order {} total {total_cents} exceeds {max}", order.id)));
        }
        log::info(&format!(
            "order {} for {} is valid: {total_cents} cents",
            order.id, order.customer
        ));
        publish_json(
            "orders.validated",
            &ValidatedOrder {
                id: order.id,
                customer: order.customer,
                items: order.items,
                total_cents,
            },
        )?;
        Ok(())
    }
}

export_handler!(Validate);
