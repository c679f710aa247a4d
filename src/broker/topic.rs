//! Pure MQTT topic rules: which topic names and filters are valid, whether a filter matches a
//! topic (with Mosquitto's `$` rule), `$share/<group>/<filter>` parsing, and the subscription
//! tree that finds every subscriber of a topic. No I/O, no clock.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::Hash;

/// Longest topic or filter, bytes (an MQTT UTF-8 string is at most 65535 bytes).
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// A topic a client may PUBLISH to: non-empty, no wildcard, no NUL (MQTT 3.1.1 §4.7.3, §1.5.3).
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_TOPIC_BYTES && !topic.contains(['+', '#', '\0'])
}

/// A filter a client may SUBSCRIBE to: non-empty, `#` only as the whole last level, `+` only as
/// a whole level, no NUL.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > MAX_TOPIC_BYTES || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        match level {
            "#" if last => {}
            "+" => {}
            l if l.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// Does `filter` match `topic`? Both must be valid. Wildcards at the first level never match a
/// topic starting with `$` (MQTT 3.1.1 §4.7.2, as Mosquitto does).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A subscription filter split into its share group (if any) and the topic filter proper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterSpec<'a> {
    /// `Some(group)` for `$share/group/filter`.
    pub group: Option<&'a str>,
    /// The topic filter that is matched.
    pub filter: &'a str,
}

/// Parse a SUBSCRIBE/UNSUBSCRIBE filter; `None` when invalid (including a `$share` filter with an
/// empty or wildcard group, or no filter after the group, MQTT 5 §4.8.2).
pub fn parse_filter(raw: &str) -> Option<FilterSpec<'_>> {
    if let Some(rest) = raw.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/')?;
        if group.is_empty() || group.contains(['+', '#']) || !valid_filter(filter) {
            return None;
        }
        return Some(FilterSpec {
            group: Some(group),
            filter,
        });
    }
    valid_filter(raw).then_some(FilterSpec {
        group: None,
        filter: raw,
    })
}

/// Members of one share group, in subscription order, and its round-robin cursor.
type Group<K, V> = (Vec<(K, V)>, Cell<usize>);

/// Subscribers stored under one filter node: plain ones by key, shared ones by group.
#[derive(Debug)]
struct Node<K, V> {
    children: HashMap<String, Node<K, V>>,
    plain: HashMap<K, V>,
    /// group → members in subscription order and the round-robin cursor.
    shared: HashMap<String, Group<K, V>>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            plain: HashMap::new(),
            shared: HashMap::new(),
        }
    }
}

impl<K, V> Node<K, V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plain.is_empty() && self.shared.is_empty()
    }
}

/// One subscription found for a topic.
#[derive(Debug, PartialEq, Eq)]
pub struct Hit<'a, K, V> {
    pub key: &'a K,
    pub value: &'a V,
    /// The share group, for a `$share` subscription.
    pub group: Option<&'a str>,
}

/// The subscription tree: topic filter levels as edges, subscribers at the node of their
/// filter's last level. A lookup walks only the levels of the topic, not every filter.
#[derive(Debug)]
pub struct Tree<K, V> {
    root: Node<K, V>,
    len: usize,
}

impl<K, V> Default for Tree<K, V> {
    fn default() -> Self {
        Tree {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, V> Tree<K, V> {
    /// Number of subscriptions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn node_mut(&mut self, filter: &str) -> &mut Node<K, V> {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.to_owned()).or_default();
        }
        node
    }

    /// Add or replace `key`'s subscription to `spec`. Returns true when it already existed.
    pub fn insert(&mut self, spec: &FilterSpec<'_>, key: K, value: V) -> bool {
        let node = self.node_mut(spec.filter);
        let existed = match spec.group {
            None => node.plain.insert(key, value).is_some(),
            Some(g) => {
                let (members, _) = node.shared.entry(g.to_owned()).or_default();
                match members.iter_mut().find(|(k, _)| *k == key) {
                    Some(slot) => {
                        slot.1 = value;
                        true
                    }
                    None => {
                        members.push((key, value));
                        false
                    }
                }
            }
        };
        if !existed {
            self.len += 1;
        }
        existed
    }

    /// Remove `key`'s subscription to `spec`; returns its value when it existed. Empty nodes are
    /// pruned so the tree does not grow with every filter ever used.
    pub fn remove(&mut self, spec: &FilterSpec<'_>, key: &K) -> Option<V> {
        let levels: Vec<&str> = spec.filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, spec.group, key);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    /// Every subscription matching `topic`. Plain subscriptions all appear; of each share group
    /// one member is chosen round robin among those for which `eligible` is true (falling back
    /// to any member when none is).
    pub fn lookup(&self, topic: &str, eligible: impl Fn(&K) -> bool) -> Vec<Hit<'_, K, V>> {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        let mut nodes = Vec::new();
        collect_nodes(&self.root, &levels, 0, dollar, &mut nodes);
        let mut hits = Vec::new();
        for node in nodes {
            for (k, v) in &node.plain {
                hits.push(Hit {
                    key: k,
                    value: v,
                    group: None,
                });
            }
            for (group, (members, cursor)) in &node.shared {
                let n = members.len();
                if n == 0 {
                    continue;
                }
                let start = cursor.get() % n;
                let pick = (0..n)
                    .map(|i| (start + i) % n)
                    .find(|&i| eligible(&members[i].0))
                    .unwrap_or(start);
                cursor.set((pick + 1) % n);
                let (k, v) = &members[pick];
                hits.push(Hit {
                    key: k,
                    value: v,
                    group: Some(group.as_str()),
                });
            }
        }
        hits
    }
}

/// Every node whose filter matches `levels[i..]`.
fn collect_nodes<'t, K, V>(
    node: &'t Node<K, V>,
    levels: &[&str],
    i: usize,
    dollar: bool,
    out: &mut Vec<&'t Node<K, V>>,
) {
    let first = i == 0;
    // `#` matches the parent level too ("a/#" matches "a"), never a `$` topic at the root.
    if let Some(hash) = node.children.get("#") {
        if !(first && dollar) {
            out.push(hash);
        }
    }
    let Some(level) = levels.get(i) else {
        out.push(node);
        return;
    };
    if let Some(child) = node.children.get(*level) {
        collect_nodes(child, levels, i + 1, dollar, out);
    }
    if *level != "+" {
        if let Some(child) = node.children.get("+") {
            if !(first && dollar) {
                collect_nodes(child, levels, i + 1, dollar, out);
            }
        }
    }
}

fn remove_at<K: Hash + Eq, V>(
    node: &mut Node<K, V>,
    levels: &[&str],
    group: Option<&str>,
    key: &K,
) -> Option<V> {
    let Some((first, rest)) = levels.split_first() else {
        return match group {
            None => node.plain.remove(key),
            Some(g) => {
                let (members, cursor) = node.shared.get_mut(g)?;
                let at = members.iter().position(|(k, _)| k == key)?;
                let (_, v) = members.remove(at);
                if members.is_empty() {
                    node.shared.remove(g);
                } else if cursor.get() > at {
                    cursor.set(cursor.get() - 1);
                }
                Some(v)
            }
        };
    };
    let child = node.children.get_mut(*first)?;
    let removed = remove_at(child, rest, group, key);
    if child.is_empty() {
        node.children.remove(*first);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_and_filter_validity() {
        for ok in ["a", "a/b", "/", "site/dev-1", "$SYS/broker/uptime", "a//b"] {
            assert!(valid_topic(ok), "{ok}");
        }
        for bad in ["", "a/+", "#", "a/#/b", "a\0b"] {
            assert!(!valid_topic(bad), "{bad}");
        }
        for ok in ["#", "+", "a/+/b", "a/#", "+/+", "/#", "$SYS/#"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "#/a", "a\0"] {
            assert!(!valid_filter(bad), "{bad}");
        }
    }

    #[test]
    fn matching_follows_the_spec_and_the_dollar_rule() {
        let table = [
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("+/+", "/x", true),
            ("+", "", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/broker/uptime", true),
            ("a/b", "a/c", false),
            ("a/b/c", "a/b", false),
        ];
        for (f, t, want) in table {
            assert_eq!(matches(f, t), want, "{f} vs {t}");
        }
    }

    #[test]
    fn shared_subscription_parsing() {
        assert_eq!(
            parse_filter("$share/g1/a/+"),
            Some(FilterSpec {
                group: Some("g1"),
                filter: "a/+"
            })
        );
        assert_eq!(
            parse_filter("a/#"),
            Some(FilterSpec {
                group: None,
                filter: "a/#"
            })
        );
        for bad in [
            "$share/g1",
            "$share//a",
            "$share/g+/a",
            "$share/g/a/#/b",
            "a/#/b",
        ] {
            assert_eq!(parse_filter(bad), None, "{bad}");
        }
    }

    fn keys(hits: &[Hit<'_, String, u8>]) -> Vec<String> {
        let mut v: Vec<String> = hits.iter().map(|h| h.key.clone()).collect();
        v.sort();
        v
    }

    #[test]
    fn tree_lookup_agrees_with_matches() {
        let filters = [
            "#", "+", "a/#", "a/+", "a/b", "+/b", "a/+/c", "/#", "+/+", "$SYS/#", "a/b/#",
        ];
        let topics = ["a", "a/b", "a/b/c", "/x", "x/b", "$SYS/up", "a//c", ""];
        let mut tree: Tree<String, u8> = Tree::default();
        for f in filters {
            tree.insert(&parse_filter(f).expect("valid"), f.to_owned(), 0);
        }
        for t in topics {
            let got = keys(&tree.lookup(t, |_| true));
            let mut want: Vec<String> = filters
                .iter()
                .filter(|f| matches(f, t))
                .map(|f| f.to_string())
                .collect();
            want.sort();
            assert_eq!(got, want, "topic {t:?}");
        }
    }

    #[test]
    fn tree_remove_prunes_and_counts() {
        let mut tree: Tree<String, u8> = Tree::default();
        let spec = parse_filter("a/b/c").expect("valid");
        assert!(!tree.insert(&spec, "c1".into(), 1));
        assert!(tree.insert(&spec, "c1".into(), 2));
        assert_eq!(tree.len(), 1);
        assert_eq!(tree.remove(&spec, &"c1".to_string()), Some(2));
        assert_eq!(tree.remove(&spec, &"c1".to_string()), None);
        assert!(tree.is_empty());
        assert!(tree.root.is_empty(), "empty nodes pruned");
    }

    #[test]
    fn share_group_round_robins_over_eligible_members() {
        let mut tree: Tree<String, u8> = Tree::default();
        let spec = parse_filter("$share/g/t/+").expect("valid");
        for k in ["a", "b", "c"] {
            tree.insert(&spec, k.into(), 0);
        }
        let picks: Vec<String> = (0..6)
            .map(|_| keys(&tree.lookup("t/1", |_| true))[0].clone())
            .collect();
        assert_eq!(picks, ["a", "b", "c", "a", "b", "c"]);
        // Offline members are skipped while someone is eligible.
        let picks: Vec<String> = (0..3)
            .map(|_| keys(&tree.lookup("t/1", |k| k != "b"))[0].clone())
            .collect();
        assert!(!picks.contains(&"b".to_string()), "{picks:?}");
        // A plain subscriber to the same filter still gets its own copy.
        tree.insert(&parse_filter("t/+").expect("valid"), "p".into(), 0);
        let hits = tree.lookup("t/1", |_| true);
        assert_eq!(hits.len(), 2);
        assert_eq!(hits.iter().filter(|h| h.group == Some("g")).count(), 1);
    }
}
