//! Live state of the targets (breaker, health window), kept apart from the config so
//! a reload can swap the config and keep what the gateway learned about each target.
//!
//! A target is identified by its pool name, its provider's name and URL, and its
//! `model_id`: a reload that keeps all four keeps the target's state, even when its
//! thresholds change. Anything else is a new target and starts fresh; a target the
//! new config no longer has is forgotten.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::breaker::{Breaker, BreakerSettings};
use super::health::{Health, HealthSettings};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TargetKey {
    pub name: String,
    pub provider: String,
    pub base_url: String,
    pub model_id: String,
}

impl TargetKey {
    /// A short stable id for the target, the same on every replica (shared state keys).
    pub fn id(&self) -> String {
        let text = format!(
            "{}\0{}\0{}\0{}",
            self.name, self.provider, self.base_url, self.model_id
        );
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
    }
}

/// One target's state, shared by every chain (and every config generation) that uses it.
#[derive(Debug, Clone)]
pub struct TargetState {
    pub breaker: Arc<Breaker>,
    pub health: Arc<Health>,
}

impl TargetState {
    pub fn new(breaker: BreakerSettings, health: HealthSettings) -> TargetState {
        TargetState {
            breaker: Arc::new(Breaker::new(breaker)),
            health: Arc::new(Health::new(health)),
        }
    }
}

#[derive(Debug, Default)]
pub struct TargetRegistry {
    targets: Mutex<HashMap<TargetKey, TargetState>>,
}

impl TargetRegistry {
    /// Starts building the state for a new config; nothing changes until
    /// [`Generation::commit`].
    pub fn generation(&self) -> Generation<'_> {
        let current = match self.targets.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        Generation {
            registry: self,
            current,
            next: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.targets.lock().map(|g| g.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The targets of a config being built.
pub struct Generation<'a> {
    registry: &'a TargetRegistry,
    current: HashMap<TargetKey, TargetState>,
    next: HashMap<TargetKey, TargetState>,
}

impl Generation<'_> {
    /// The state for `key`: the running one when the target is known (carried over to
    /// new settings if they changed), a fresh one otherwise.
    pub fn target(
        &mut self,
        key: TargetKey,
        breaker: BreakerSettings,
        health: HealthSettings,
    ) -> TargetState {
        let state = match self.current.get(&key) {
            Some(s) => TargetState {
                breaker: if *s.breaker.settings() == breaker {
                    s.breaker.clone()
                } else {
                    Arc::new(s.breaker.with_settings(breaker))
                },
                health: if *s.health.settings() == health {
                    s.health.clone()
                } else {
                    Arc::new(s.health.with_settings(health))
                },
            },
            None => TargetState::new(breaker, health),
        };
        self.next.insert(key, state.clone());
        state
    }

    /// Registers a target built elsewhere (the config the gateway started with).
    pub fn keep(&mut self, key: TargetKey, state: TargetState) {
        self.next.insert(key, state);
    }

    /// Makes this generation's targets the registry's: targets it did not ask for are
    /// forgotten.
    pub fn commit(self) {
        match self.registry.targets.lock() {
            Ok(mut g) => *g = self.next,
            Err(p) => *p.into_inner() = self.next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::ErrorClass;
    use crate::resilience::breaker::{BreakerState, CallResult};
    use std::time::Duration;

    fn key(name: &str) -> TargetKey {
        TargetKey {
            name: name.into(),
            provider: "p".into(),
            base_url: "http://x/v1".into(),
            model_id: "m".into(),
        }
    }

    #[test]
    fn known_targets_keep_their_state_and_removed_ones_are_forgotten() {
        let registry = TargetRegistry::default();
        let b = BreakerSettings {
            consecutive_failures: 1,
            ..BreakerSettings::default()
        };
        let h = HealthSettings::default();
        let mut g = registry.generation();
        let a = g.target(key("a"), b, h);
        g.target(key("gone"), b, h);
        g.commit();
        let admitted = a.breaker.admit();
        a.breaker.record(
            admitted,
            CallResult::of(Some(ErrorClass::Transient), Some(Duration::from_secs(60))),
        );
        assert_eq!(a.breaker.state(), BreakerState::Open);

        let mut g = registry.generation();
        let same = g.target(key("a"), b, h);
        assert!(Arc::ptr_eq(&same.breaker, &a.breaker));
        assert!(Arc::ptr_eq(&same.health, &a.health));
        // New thresholds: a new breaker, still open until the same time.
        let changed = g.target(
            key("a"),
            BreakerSettings {
                consecutive_failures: 5,
                ..b
            },
            h,
        );
        assert!(!Arc::ptr_eq(&changed.breaker, &a.breaker));
        assert_eq!(changed.breaker.state(), BreakerState::Open);
        assert_eq!(changed.breaker.retry_at(), a.breaker.retry_at());
        let fresh = g.target(key("new"), b, h);
        assert_eq!(fresh.breaker.state(), BreakerState::Closed);
        g.commit();
        assert_eq!(registry.len(), 2, "`gone` was forgotten");

        // A generation that is never committed changes nothing.
        let mut g = registry.generation();
        g.target(key("other"), b, h);
        drop(g);
        assert_eq!(registry.len(), 2);
    }
}
