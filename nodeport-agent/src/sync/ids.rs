//! Stable ids for backends and service ports. A key keeps its id for as long as any service
//! uses it (reference counted by the sync: an id is freed only when no desired entry names its
//! key), so connection-tracking entries, which name backends by id, stay valid across syncs and
//! agent restarts (ids are re-adopted from the pinned maps). 0 is reserved: it means "none".
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug)]
pub struct Ids<K: Ord + Clone> {
    by_key: BTreeMap<K, u32>,
    free: BTreeSet<u32>,
    next: u32,
    max: u32,
}

impl<K: Ord + Clone> Ids<K> {
    /// Ids 1..=max.
    pub fn new(max: u32) -> Self {
        Self {
            by_key: BTreeMap::new(),
            free: BTreeSet::new(),
            next: 1,
            max,
        }
    }

    /// Adopts an existing assignment (read back from the maps after a restart). Conflicting or
    /// out-of-range entries are skipped and returned, for the caller to rewrite.
    pub fn adopt(&mut self, existing: impl IntoIterator<Item = (K, u32)>) -> Vec<(K, u32)> {
        let mut rejected = Vec::new();
        let used: BTreeSet<u32> = self.by_key.values().copied().collect();
        let mut taken = used;
        for (k, id) in existing {
            if id == 0 || id > self.max || taken.contains(&id) || self.by_key.contains_key(&k) {
                rejected.push((k, id));
                continue;
            }
            taken.insert(id);
            self.by_key.insert(k, id);
        }
        self.next = taken.iter().max().map_or(1, |m| m + 1);
        self.free = (1..self.next).filter(|i| !taken.contains(i)).collect();
        rejected
    }

    pub fn get(&self, key: &K) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// The key's id, allocating the lowest free one for a new key. None when all are in use.
    pub fn acquire(&mut self, key: &K) -> Option<u32> {
        if let Some(id) = self.by_key.get(key) {
            return Some(*id);
        }
        let id = match self.free.pop_first() {
            Some(id) => id,
            None if self.next <= self.max => {
                self.next += 1;
                self.next - 1
            }
            None => return None,
        };
        self.by_key.insert(key.clone(), id);
        Some(id)
    }

    /// Frees the ids of every key not in `keep`; returns the freed (key, id) pairs.
    pub fn retain(&mut self, keep: &BTreeSet<K>) -> Vec<(K, u32)> {
        let gone: Vec<(K, u32)> = self
            .by_key
            .iter()
            .filter(|(k, _)| !keep.contains(k))
            .map(|(k, id)| (k.clone(), *id))
            .collect();
        for (k, id) in &gone {
            self.by_key.remove(k);
            self.free.insert(*id);
        }
        gone
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_reused_and_never_zero() {
        let mut ids = Ids::new(3);
        assert_eq!(ids.acquire(&"a"), Some(1));
        assert_eq!(ids.acquire(&"b"), Some(2));
        assert_eq!(ids.acquire(&"a"), Some(1), "a key keeps its id");
        let freed = ids.retain(&BTreeSet::from(["b"]));
        assert_eq!(freed, [("a", 1)]);
        assert_eq!(
            ids.acquire(&"c"),
            Some(1),
            "freed ids are reused, lowest first"
        );
        assert_eq!(ids.acquire(&"d"), Some(3));
        assert_eq!(ids.acquire(&"e"), None, "exhausted");
        assert_eq!(ids.get(&"b"), Some(2));
    }

    #[test]
    fn adoption_keeps_existing_ids_and_rejects_conflicts() {
        let mut ids = Ids::new(10);
        let rejected = ids.adopt([("a", 4), ("b", 4), ("c", 0), ("d", 11), ("e", 2)]);
        assert_eq!(rejected, [("b", 4), ("c", 0), ("d", 11)]);
        assert_eq!(ids.get(&"a"), Some(4));
        assert_eq!(ids.get(&"e"), Some(2));
        // Holes below the highest adopted id are handed out first.
        assert_eq!(ids.acquire(&"x"), Some(1));
        assert_eq!(ids.acquire(&"y"), Some(3));
        assert_eq!(ids.acquire(&"z"), Some(5));
    }
}
