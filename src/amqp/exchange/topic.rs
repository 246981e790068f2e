//! Topic routing: binding keys are dot-separated words where `*` matches exactly one word and
//! `#` matches zero or more.

/// Splits a key into words; the empty key has no words (as RabbitMQ treats it).
fn words(key: &str) -> Vec<&str> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    }
}

/// Whether `routing_key` matches the binding `pattern`.
pub fn matches(pattern: &str, routing_key: &str) -> bool {
    let pattern = words(pattern);
    let key = words(routing_key);
    // reachable[j]: the first i pattern words can match the first j key words.
    let mut reachable = vec![false; key.len() + 1];
    reachable[0] = true;
    for word in &pattern {
        let mut next = vec![false; key.len() + 1];
        match *word {
            "#" => {
                let mut any = false;
                for j in 0..=key.len() {
                    any |= reachable[j];
                    next[j] = any;
                }
            }
            "*" => next[1..].copy_from_slice(&reachable[..key.len()]),
            literal => {
                for j in 1..=key.len() {
                    next[j] = reachable[j - 1] && key[j - 1] == literal;
                }
            }
        }
        reachable = next;
    }
    reachable[key.len()]
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn star_matches_exactly_one_word() {
        assert!(matches("case.*.c1", "case.new.c1"));
        assert!(!matches("case.*.c1", "case.c1"));
        assert!(!matches("case.*", "case.new.c1"));
        assert!(!matches("*", ""));
        assert!(matches("*", "a"));
        assert!(matches("a.*", "a."));
    }

    #[test]
    fn hash_matches_zero_or_more_words() {
        assert!(matches("case.#", "case"));
        assert!(matches("case.#", "case.new.c1"));
        assert!(matches("#", ""));
        assert!(matches("#", "a.b.c"));
        assert!(matches("#.c1", "case.new.c1"));
        assert!(matches("a.#.z", "a.z"));
        assert!(matches("a.#.z", "a.b.c.z"));
        assert!(!matches("a.#.z", "a.b.c"));
        assert!(matches("#.#", "a"));
        assert!(matches("*.#", "a"));
        assert!(!matches("*.#", ""));
        assert!(matches("#.*.#", "x"));
    }

    #[test]
    fn literals_must_be_equal() {
        assert!(matches("error", "error"));
        assert!(!matches("error", "warning"));
        assert!(matches("", ""));
        assert!(!matches("", "a"));
        assert!(!matches("a.b", "a.b.c"));
    }
}
