//! The names of configured chains, models and providers, interned for the life of the
//! process.
//!
//! Every request copies these names into its log line and its store rows, from both
//! worker cores and then the writer thread. An `Arc<str>` would make each copy an
//! atomic increment and decrement on a counter all three share, moving its cache line
//! between cores several times per request; a `&'static str` is copied for free. The
//! cost is that a name is never freed: only names from config files are interned (a
//! reload that renames things adds a few bytes), never a value from a request.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

/// A configured name: a `&'static str` with the one copy of its text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(&'static str);

static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();

impl Name {
    /// The interned copy of `text` (made once, on first use).
    pub fn new(text: &str) -> Name {
        let names = NAMES.get_or_init(Default::default);
        let mut names = match names.lock() {
            Ok(n) => n,
            Err(p) => p.into_inner(),
        };
        if let Some(known) = names.get(text) {
            return Name(known);
        }
        let leaked: &'static str = Box::leak(text.into());
        names.insert(leaked);
        Name(leaked)
    }

    /// The name `text`, only if it was interned already: for names read from outside
    /// the config (a shared cache entry), which must not grow the set.
    pub fn known(text: &str) -> Option<Name> {
        let names = NAMES.get()?;
        let names = match names.lock() {
            Ok(n) => n,
            Err(p) => p.into_inner(),
        };
        names.get(text).map(|n| Name(n))
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self.0
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.0, f)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl serde::Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_text() {
        let a = Name::new("chain-a");
        let b = Name::new(&String::from("chain-a"));
        assert!(std::ptr::eq(a.as_str(), b.as_str()));
        assert_eq!(a, "chain-a");
        assert_ne!(a, Name::new("chain-b"));
        assert_eq!(format!("{a} {a:?}"), "chain-a \"chain-a\"");
        assert_eq!(Name::known("chain-a"), Some(a));
        assert_eq!(Name::known("never-configured"), None);
    }
}
