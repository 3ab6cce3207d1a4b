//! What a reload changed: a hash of each chain's definition (with the models,
//! providers and global settings it inherits), and of each setting that only a
//! restart applies. Computed from the parsed YAML tree, so two files that differ only
//! in layout or comments compare equal. Hashes only: no secret is kept.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use xxhash_rust::xxh3::xxh3_64;

/// Settings a running gateway cannot change (sockets, threads, files and clients
/// opened at start). A reload that changes one keeps the running value and names it.
pub const RESTART_ONLY: &[&str] = &[
    "server.listen",
    "server.worker_threads",
    "server.scheduler",
    "server.drain_delay",
    "server.drain_timeout",
    "store",
    "state",
    "admin",
    "log",
    "cache",
    "responses",
    "retry_budget",
    "hedge_budget",
    "mock",
    "report",
    "shadow_seed",
];

/// Sections every chain inherits from.
const INHERITED: &[&str] = &[
    "retry",
    "breaker",
    "health",
    "server.request_timeout",
    "server.attempt_timeout",
    "server.first_token_timeout",
    "server.idle_timeout",
];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fingerprints {
    /// By chain name (the chains under `chains:`).
    pub chains: BTreeMap<String, u64>,
    /// By entry of [`RESTART_ONLY`].
    pub restart_only: BTreeMap<&'static str, u64>,
}

/// The chains added, removed and changed, and the restart-only settings changed,
/// from `old` to `new`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub restart_required: Vec<&'static str>,
}

impl Fingerprints {
    pub fn of(tree: &Value) -> Fingerprints {
        let inherited: Vec<u64> = INHERITED.iter().map(|p| hash(at(tree, p))).collect();
        let mut chains = BTreeMap::new();
        if let Some(map) = tree.get("chains").and_then(Value::as_object) {
            for (name, chain) in map {
                let mut parts = vec![hash(Some(chain))];
                parts.extend(&inherited);
                for model in models_of(chain) {
                    let m = tree.get("models").and_then(|ms| ms.get(&model));
                    parts.push(hash(m));
                    let provider = m
                        .and_then(|m| m.get("provider"))
                        .and_then(Value::as_str)
                        .and_then(|p| tree.get("providers").and_then(|ps| ps.get(p)));
                    parts.push(hash(provider));
                }
                let bytes: Vec<u8> = parts.iter().flat_map(|h| h.to_le_bytes()).collect();
                chains.insert(name.clone(), xxh3_64(&bytes));
            }
        }
        let restart_only = RESTART_ONLY
            .iter()
            .map(|p| (*p, hash(at(tree, p))))
            .collect();
        Fingerprints {
            chains,
            restart_only,
        }
    }

    pub fn changes_to(&self, new: &Fingerprints) -> Changes {
        let mut c = Changes::default();
        for (name, h) in &new.chains {
            match self.chains.get(name) {
                None => c.added.push(name.clone()),
                Some(old) if old != h => c.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        c.removed = self
            .chains
            .keys()
            .filter(|n| !new.chains.contains_key(*n))
            .cloned()
            .collect();
        c.restart_required = RESTART_ONLY
            .iter()
            .filter(|p| self.restart_only.get(*p) != new.restart_only.get(*p))
            .copied()
            .collect();
        c
    }
}

/// The value at a dotted path, if present.
fn at<'a>(tree: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(tree, |v, key| v.get(key))
}

fn hash(v: Option<&Value>) -> u64 {
    match v {
        None | Some(Value::Null) => 0,
        Some(v) => xxh3_64(v.to_string().as_bytes()),
    }
}

/// The pool models a chain names: the short form is a list, the long form has
/// `models` and maybe `shadow.models`.
fn models_of(chain: &Value) -> BTreeSet<String> {
    let names = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|m| {
                        m.as_str()
                            .map(str::to_string)
                            .or_else(|| m.get("model").and_then(Value::as_str).map(str::to_string))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out: BTreeSet<String> = names(Some(chain)).into_iter().collect();
    out.extend(names(chain.get("models")));
    out.extend(names(chain.get("shadow").and_then(|s| s.get("models"))));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_what_changed() {
        let old = json!({
            "server": {"listen": "127.0.0.1:1"},
            "providers": {"p": {"kind": "openai"}},
            "models": {"a": {"provider": "p", "model_id": "a"}, "b": {"provider": "p", "model_id": "b"}},
            "chains": {"one": ["a", "b"], "two": {"models": ["b"]}, "three": ["a"]},
        });
        let mut new = old.clone();
        new["chains"]["one"] = json!(["b", "a"]);
        new["chains"].as_object_mut().unwrap().remove("three");
        new["chains"]["four"] = json!(["a"]);
        new["models"]["b"]["model_id"] = json!("b2");
        new["server"]["listen"] = json!("127.0.0.1:2");
        let c = Fingerprints::of(&old).changes_to(&Fingerprints::of(&new));
        assert_eq!(c.added, ["four"]);
        assert_eq!(c.removed, ["three"]);
        // `two` uses `b`, whose model_id changed.
        assert_eq!(c.changed, ["one", "two"]);
        assert_eq!(c.restart_required, ["server.listen"]);
        let same = Fingerprints::of(&old).changes_to(&Fingerprints::of(&old));
        assert_eq!(same, Changes::default());
    }
}
