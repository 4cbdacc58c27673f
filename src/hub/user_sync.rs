//! USER_SYNC merging (ARCHITECTURE.md invariant 6): the upstream sees one `start` when the first
//! reporter starts a user and one `end` when the last one stops or goes away.
use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// What changed for a user after an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    /// The first reporter started syncing the user: forward `start`.
    Started,
    /// The last reporter stopped: forward `end`.
    Ended,
    /// Nothing visible upstream changed.
    Unchanged,
}

/// Tracks which reporters (connections, or cores) hold each user syncing.
#[derive(Debug)]
pub(crate) struct UserSyncMerger<K> {
    by_user: HashMap<String, HashSet<K>>,
    by_reporter: HashMap<K, HashSet<String>>,
}

impl<K> Default for UserSyncMerger<K> {
    fn default() -> Self {
        Self { by_user: HashMap::new(), by_reporter: HashMap::new() }
    }
}

impl<K: Copy + Eq + Hash> UserSyncMerger<K> {
    /// An empty merger.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// `reporter` says `user` is syncing.
    pub(crate) fn start(&mut self, reporter: K, user: &str) -> Transition {
        let set = self.by_user.entry(user.to_owned()).or_default();
        let was_empty = set.is_empty();
        if set.insert(reporter) {
            self.by_reporter.entry(reporter).or_default().insert(user.to_owned());
        }
        if was_empty {
            Transition::Started
        } else {
            Transition::Unchanged
        }
    }

    /// `reporter` says `user` stopped syncing.
    pub(crate) fn end(&mut self, reporter: K, user: &str) -> Transition {
        let Some(set) = self.by_user.get_mut(user) else {
            return Transition::Unchanged;
        };
        if !set.remove(&reporter) {
            return Transition::Unchanged;
        }
        if let Some(users) = self.by_reporter.get_mut(&reporter) {
            users.remove(user);
            if users.is_empty() {
                self.by_reporter.remove(&reporter);
            }
        }
        if set.is_empty() {
            self.by_user.remove(user);
            Transition::Ended
        } else {
            Transition::Unchanged
        }
    }

    /// `reporter` went away: returns the users for which it was the last reporter.
    pub(crate) fn remove_reporter(&mut self, reporter: K) -> Vec<String> {
        let Some(users) = self.by_reporter.remove(&reporter) else {
            return Vec::new();
        };
        let mut ended = Vec::new();
        for user in users {
            if let Some(set) = self.by_user.get_mut(&user) {
                set.remove(&reporter);
                if set.is_empty() {
                    self.by_user.remove(&user);
                    ended.push(user);
                }
            }
        }
        ended.sort();
        ended
    }

    /// Every user currently syncing (sorted, for deterministic re-announcement).
    pub(crate) fn users(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.by_user.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Number of users `reporter` holds syncing.
    pub(crate) fn count(&self, reporter: K) -> usize {
        self.by_reporter.get(&reporter).map_or(0, HashSet::len)
    }

    /// Whether `reporter` holds `user` syncing.
    pub(crate) fn holds(&self, reporter: K, user: &str) -> bool {
        self.by_reporter.get(&reporter).is_some_and(|users| users.contains(user))
    }

    /// Number of users syncing.
    pub(crate) fn len(&self) -> usize {
        self.by_user.len()
    }

    /// Whether nobody is syncing.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.by_user.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_start_and_last_end_are_visible() {
        let mut m = UserSyncMerger::new();
        assert_eq!(m.start(1u32, "@a:hs"), Transition::Started);
        assert_eq!(m.start(2, "@a:hs"), Transition::Unchanged);
        assert_eq!(m.start(1, "@a:hs"), Transition::Unchanged, "repeated start");
        assert_eq!(m.end(1, "@a:hs"), Transition::Unchanged);
        assert_eq!(m.end(1, "@a:hs"), Transition::Unchanged, "repeated end");
        assert_eq!(m.end(2, "@a:hs"), Transition::Ended);
        assert!(m.is_empty());
        assert_eq!(m.end(3, "@nobody:hs"), Transition::Unchanged);
    }

    #[test]
    fn removing_a_reporter_ends_only_its_last_users() {
        let mut m = UserSyncMerger::new();
        m.start(1u32, "@a:hs");
        m.start(1, "@b:hs");
        m.start(2, "@b:hs");
        assert_eq!(m.remove_reporter(1), vec!["@a:hs".to_owned()]);
        assert_eq!(m.users(), vec!["@b:hs"]);
        assert!(m.remove_reporter(1).is_empty());
        assert_eq!(m.remove_reporter(2), vec!["@b:hs".to_owned()]);
    }
}
