//! Slot tables addressed by [`ConnId`] (index + generation), so a stale id never reaches the
//! connection that reused its slot.
//!
//! [`Slots`] hands out the ids (the hub owns one per core); [`SlotMap`] stores values under
//! ids handed out elsewhere (a driver keeps its sockets in one, keyed by the hub's ids).

use super::ConnId;

struct Entry<T> {
    gen: u32,
    value: Option<T>,
}

/// A table that allocates [`ConnId`]s: freed slots are reused with the next generation.
pub(crate) struct Slots<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    live: usize,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Slots<T> {
    /// An empty table.
    pub(crate) const fn new() -> Self {
        Self { entries: Vec::new(), free: Vec::new(), live: 0 }
    }

    /// Stores the value `make` builds from its new id, and returns that id.
    pub(crate) fn insert_with(&mut self, make: impl FnOnce(ConnId) -> T) -> ConnId {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = u32::try_from(self.entries.len()).expect("more than u32::MAX connections");
                self.entries.push(Entry { gen: 0, value: None });
                i
            }
        };
        let entry = &mut self.entries[index as usize];
        let id = ConnId { index, gen: entry.gen };
        entry.value = Some(make(id));
        self.live += 1;
        id
    }

    /// The value under `id`, if that id is still live.
    pub(crate) fn get(&self, id: ConnId) -> Option<&T> {
        let entry = self.entries.get(id.index as usize)?;
        if entry.gen == id.gen {
            entry.value.as_ref()
        } else {
            None
        }
    }

    /// The value under `id`, mutably, if that id is still live.
    pub(crate) fn get_mut(&mut self, id: ConnId) -> Option<&mut T> {
        let entry = self.entries.get_mut(id.index as usize)?;
        if entry.gen == id.gen {
            entry.value.as_mut()
        } else {
            None
        }
    }

    /// Takes the value out and frees the slot; the next id in it has a new generation.
    pub(crate) fn remove(&mut self, id: ConnId) -> Option<T> {
        let entry = self.entries.get_mut(id.index as usize)?;
        if entry.gen != id.gen {
            return None;
        }
        let value = entry.value.take()?;
        entry.gen = entry.gen.wrapping_add(1);
        self.free.push(id.index);
        self.live -= 1;
        Some(value)
    }

    /// Number of live values.
    pub(crate) const fn len(&self) -> usize {
        self.live
    }

    /// Whether no value is live.
    pub(crate) const fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The live ids and values, by slot index.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (ConnId, &T)> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.value.as_ref().map(|v| (ConnId { index: i as u32, gen: e.gen }, v)))
    }

    /// The live ids and values, mutably, by slot index.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (ConnId, &mut T)> {
        self.entries.iter_mut().enumerate().filter_map(|(i, e)| {
            let gen = e.gen;
            e.value.as_mut().map(|v| (ConnId { index: i as u32, gen }, v))
        })
    }

    /// The live ids, by slot index.
    pub(crate) fn ids(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.iter().map(|(id, _)| id)
    }
}

/// Values stored under ids another table allocated (a driver's sockets under the hub's ids).
/// Inserting under an id replaces whatever an older generation left in that slot.
pub(crate) struct SlotMap<T> {
    entries: Vec<Option<(u32, T)>>,
    live: usize,
}

impl<T> Default for SlotMap<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> SlotMap<T> {
    /// An empty map.
    pub(crate) const fn new() -> Self {
        Self { entries: Vec::new(), live: 0 }
    }

    /// Stores `value` under `id`; returns the value of an older generation still in that slot
    /// (which a caller keeping the tables in step treats as a bug of its own).
    pub(crate) fn insert(&mut self, id: ConnId, value: T) -> Option<(ConnId, T)> {
        let i = id.index as usize;
        if self.entries.len() <= i {
            self.entries.resize_with(i + 1, || None);
        }
        let old = self.entries[i].replace((id.gen, value));
        match old {
            Some((gen, v)) => Some((ConnId { index: id.index, gen }, v)),
            None => {
                self.live += 1;
                None
            }
        }
    }

    /// The value under `id`, if that id (with its generation) is stored.
    pub(crate) fn get(&self, id: ConnId) -> Option<&T> {
        match self.entries.get(id.index as usize)? {
            Some((gen, v)) if *gen == id.gen => Some(v),
            _ => None,
        }
    }

    /// The value under `id`, mutably.
    pub(crate) fn get_mut(&mut self, id: ConnId) -> Option<&mut T> {
        match self.entries.get_mut(id.index as usize)? {
            Some((gen, v)) if *gen == id.gen => Some(v),
            _ => None,
        }
    }

    /// Whether `id` is stored.
    #[cfg(test)]
    pub(crate) fn contains(&self, id: ConnId) -> bool {
        self.get(id).is_some()
    }

    /// Takes the value under `id` out.
    pub(crate) fn remove(&mut self, id: ConnId) -> Option<T> {
        let slot = self.entries.get_mut(id.index as usize)?;
        if !matches!(slot, Some((gen, _)) if *gen == id.gen) {
            return None;
        }
        self.live -= 1;
        slot.take().map(|(_, v)| v)
    }

    /// Number of stored values.
    pub(crate) const fn len(&self) -> usize {
        self.live
    }

    /// Whether nothing is stored.
    pub(crate) const fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The stored ids and values, by slot index.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (ConnId, &T)> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|(gen, v)| (ConnId { index: i as u32, gen: *gen }, v)))
    }

    /// The stored ids, by slot index.
    pub(crate) fn ids(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.iter().map(|(id, _)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_slot_is_reused_with_a_new_generation() {
        let mut slots = Slots::new();
        let a = slots.insert_with(|id| (id, "a"));
        let b = slots.insert_with(|id| (id, "b"));
        assert_eq!(slots.get(a).map(|v| v.1), Some("a"));
        assert_eq!(slots.remove(a).map(|v| v.1), Some("a"));
        assert!(slots.get(a).is_none(), "a stale id finds nothing");
        assert!(slots.remove(a).is_none());
        let c = slots.insert_with(|id| (id, "c"));
        assert_eq!(c.index, a.index);
        assert_ne!(c.gen, a.gen);
        assert!(slots.get(a).is_none(), "the stale id does not reach the new value");
        assert_eq!(slots.get(c).map(|v| v.0), Some(c), "make() sees the id it is stored under");
        assert_eq!(slots.len(), 2);
        assert_eq!(slots.ids().collect::<Vec<_>>(), vec![c, b]);
    }

    #[test]
    fn a_slot_map_keeps_generations_apart() {
        let mut slots: Slots<()> = Slots::new();
        let a = slots.insert_with(|_| ());
        let mut map = SlotMap::new();
        assert!(map.insert(a, 1).is_none());
        assert_eq!(map.get(a), Some(&1));
        slots.remove(a);
        let b = slots.insert_with(|_| ());
        assert!(map.get(b).is_none(), "the new generation is not the old value");
        assert!(map.remove(b).is_none());
        assert_eq!(map.len(), 1);
        assert_eq!(map.insert(b, 2), Some((a, 1)), "an older generation left behind is handed back");
        assert_eq!(map.len(), 1);
        assert_eq!(map.remove(b), Some(2));
        assert!(map.is_empty());
        assert!(!map.contains(b));
    }
}
