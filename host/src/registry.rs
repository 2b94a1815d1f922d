//! The running handler bindings by name.
//!
//! Each binding holds its component behind an `ArcSwap`, so replacing a
//! handler's code is one pointer swap: attempts already running keep the
//! component they started with, the next attempt gets the new one
//! ([`crate::reload`] decides when).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::delivery::Binding;
use crate::runtime::LoadedComponent;

/// Bindings by handler name.
#[derive(Default)]
pub struct Registry {
    bindings: BTreeMap<String, Arc<Binding>>,
}

impl Registry {
    /// Add `binding` under its name.
    pub fn insert(&mut self, binding: Arc<Binding>) {
        self.bindings.insert(binding.name.clone(), binding);
    }

    /// The binding of `handler`.
    pub fn get(&self, handler: &str) -> Option<&Arc<Binding>> {
        self.bindings.get(handler)
    }

    /// Every binding.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Binding>> {
        self.bindings.values()
    }

    /// The digests of the components the handlers run now.
    pub fn digests(&self) -> Vec<String> {
        self.bindings
            .values()
            .map(|b| b.component.load().digest.clone())
            .collect()
    }

    /// Replace the component `handler` runs; false if there is no such
    /// handler. The old one's warm instances are dropped (now, or as their
    /// attempts end), so the two never hold more than the handler's
    /// concurrency between them.
    pub fn swap_component(&self, handler: &str, component: LoadedComponent) -> bool {
        match self.bindings.get(handler) {
            Some(b) => {
                b.component.swap(Arc::new(component)).retire();
                true
            }
            None => false,
        }
    }
}
