//! State that outlives a config swap, kept one way for everything that has
//! it (an endpoint's balancer statistics and pooled connection, a rate
//! limit's buckets, a route rule's retry budget).
//!
//! Each applied config renews the store: every key the new config names gets
//! its previous value back (or a fresh one when it is new or its settings
//! changed), and every key it no longer names is dropped. So the store never
//! outgrows the config, however often endpoints and rules come and go.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Values by key, renewed as a whole on every applied config.
#[derive(Debug)]
pub struct Kept<K, V> {
    map: Mutex<HashMap<K, Arc<V>>>,
}

impl<K, V> Default for Kept<K, V> {
    fn default() -> Self {
        Self { map: Mutex::new(HashMap::new()) }
    }
}

impl<K: Hash + Eq + Clone, V> Kept<K, V> {
    /// Starts the renewal for the next config; nothing changes until
    /// [`Renewal::commit`] (a rejected config leaves the store as it was).
    pub fn renew(&self) -> Renewal<'_, K, V> {
        Renewal { kept: self, next: HashMap::new() }
    }

    /// How many values are kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Arc<V>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The values the next config keeps, collected while it is built.
pub struct Renewal<'a, K, V> {
    kept: &'a Kept<K, V>,
    next: HashMap<K, Arc<V>>,
}

impl<K: Hash + Eq + Clone, V> Renewal<'_, K, V> {
    /// The value for `key`: the kept one when `still_fits` accepts it, else
    /// a new one from `make`.
    pub fn get(&mut self, key: K, still_fits: impl FnOnce(&V) -> bool, make: impl FnOnce() -> V) -> Arc<V> {
        if let Some(v) = self.next.get(&key) {
            return v.clone();
        }
        let v = match self.kept.lock().get(&key) {
            Some(v) if still_fits(v) => v.clone(),
            _ => Arc::new(make()),
        };
        self.next.insert(key, v.clone());
        v
    }

    /// Makes the renewal the store's content: what the new config did not
    /// name is dropped here.
    pub fn commit(self) {
        *self.kept.lock() = self.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_the_next_config_names_and_drops_the_rest() {
        let kept: Kept<&str, u32> = Kept::default();
        let mut r = kept.renew();
        let a = r.get("a", |_| true, || 1);
        let b = r.get("b", |_| true, || 2);
        assert!(Arc::ptr_eq(&a, &r.get("a", |_| true, || 9)), "one value per key within a renewal");
        r.commit();
        assert_eq!(kept.len(), 2);

        let mut r = kept.renew();
        let a2 = r.get("a", |_| true, || 3);
        let c = r.get("c", |_| true, || 4);
        r.commit();
        assert!(Arc::ptr_eq(&a, &a2), "a lives on across the swap");
        assert_eq!((*c, kept.len()), (4, 2), "b was pruned, c added");
        drop(b);

        // Changed settings start afresh; an uncommitted renewal changes nothing.
        let mut r = kept.renew();
        assert_eq!(*r.get("a", |v| *v == 99, || 5), 5);
        drop(r);
        assert_eq!(kept.len(), 2);
        kept.renew().commit();
        assert!(kept.is_empty(), "an empty config keeps nothing");
        assert_eq!(Arc::strong_count(&a), 2, "only the holders outside the store remain");
    }
}
