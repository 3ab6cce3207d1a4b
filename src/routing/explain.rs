//! Why a request would go where it goes, without calling anyone: the engine's own
//! plan for it (`routing::engine::plan`), with the reason for each target's place.
//! `POST /v1/cascade/explain` and `cascade explain` answer from it.

use std::sync::Arc;

use tokio::time::Instant;

use super::engine::plan;
use crate::api::request::ChatRequest;
use crate::api::ApiError;
use crate::config::{Chain, Model};
use crate::resilience::breaker::BreakerState;

/// What the walk does with a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Called, in this order.
    Try,
    /// Not called.
    Skip,
    /// Called through its open breaker, as a half-open probe: when every breaker is
    /// open, or only after every other target failed.
    LastResort,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Try => "try",
            Step::Skip => "skip",
            Step::LastResort => "last_resort",
        }
    }
}

/// One target of the chain, in the order the walk meets it.
#[derive(Debug, Clone)]
pub struct PlannedTarget {
    /// Position in the chain's config.
    pub position: usize,
    pub model: Arc<Model>,
    pub step: Step,
    /// A short machine-readable reason: `healthy`, `half_open`, `half_open_busy`,
    /// `degraded`, `breaker_open`, `all_open`, `capability`, `context_window`,
    /// `attempt_budget`.
    pub reason: &'static str,
    /// The same, for a person.
    pub detail: String,
    /// When its open breaker lets calls through again.
    pub retry_at: Option<Instant>,
}

/// The plan for one request on one chain.
#[derive(Debug)]
pub struct Explained {
    /// Tried targets first, in order; then the last resort; then those skipped.
    pub targets: Vec<PlannedTarget>,
    /// The error the request gets without any call (no target can serve it, or every
    /// breaker is open and the chain fails fast).
    pub error: Option<ApiError>,
    /// The prompt's estimated size, when a context window made it matter.
    pub prompt_tokens: Option<u64>,
}

/// Explains `req` on `chain` from the targets' state now.
pub fn explain(chain: &Chain, req: &ChatRequest) -> Explained {
    let prompt_tokens = chain
        .targets
        .iter()
        .any(|t| t.model.context_window.is_some())
        .then(|| req.estimated_prompt_tokens());
    let (mut targets, skipped, error) = match plan(chain, req) {
        Ok(plan) => {
            let mut targets: Vec<PlannedTarget> = plan
                .order
                .iter()
                .map(|&pos| {
                    if plan.forced == Some(pos) {
                        every_breaker_open(chain, pos)
                    } else {
                        tried(chain, pos)
                    }
                })
                .collect();
            // The engine probes the first open breaker it can claim, soonest to reopen
            // first, once every other target has failed.
            let mut probe_found = false;
            for &pos in &plan.open {
                let m = &chain.targets[pos].model;
                let probe = !probe_found && m.breaker.last_resort_available();
                probe_found |= probe;
                targets.push(open(chain, pos, probe));
            }
            (targets, plan.skipped, None)
        }
        Err(failed) => {
            let (e, skipped) = *failed;
            // Targets neither skipped nor tried had an open breaker (`when_all_open: fail`).
            let left_out: Vec<PlannedTarget> = (0..chain.targets.len())
                .filter(|&pos| {
                    !skipped
                        .iter()
                        .any(|s| Arc::ptr_eq(&s.model, &chain.targets[pos].model))
                })
                .map(|pos| open(chain, pos, false))
                .collect();
            (left_out, skipped, Some(e))
        }
    };
    for s in skipped {
        let Some(pos) = chain
            .targets
            .iter()
            .position(|t| Arc::ptr_eq(&t.model, &s.model))
        else {
            continue;
        };
        let detail = match s.reason {
            "capability" => format!(
                "lacks the capability `{}` the request needs",
                s.model
                    .capabilities
                    .first_missing(req.needs)
                    .unwrap_or("(unknown)")
            ),
            "context_window" => format!(
                "its context window ({} tokens) is smaller than the prompt (about {} tokens)",
                s.model.context_window.unwrap_or(0),
                prompt_tokens.unwrap_or(0)
            ),
            other => other.to_string(),
        };
        targets.push(PlannedTarget {
            position: pos,
            model: s.model.clone(),
            step: Step::Skip,
            reason: s.reason,
            detail,
            retry_at: None,
        });
    }
    targets.sort_by_key(|t| t.step == Step::Skip);
    budget(chain, &mut targets);
    targets.sort_by_key(|t| t.step == Step::Skip);
    Explained {
        targets,
        error,
        prompt_tokens,
    }
}

fn tried(chain: &Chain, pos: usize) -> PlannedTarget {
    let m = &chain.targets[pos].model;
    let h = m.health.snapshot();
    let settings = m.health.settings();
    let rate = || {
        format!(
            "{:.0}% success over {} calls in the last {}s",
            h.success_rate * 100.0,
            h.calls,
            settings.window.as_secs()
        )
    };
    let (reason, detail) = if h.degraded {
        (
            "degraded",
            format!(
                "degraded ({}, below {:.0}%): moved after the healthy targets",
                rate(),
                settings.degraded_below * 100.0
            ),
        )
    } else if m.breaker.state() == BreakerState::HalfOpen && !m.breaker.probe_available() {
        // The circuit refuses the call without sending it, and the walk moves on.
        return PlannedTarget {
            position: pos,
            model: m.clone(),
            step: Step::Skip,
            reason: "half_open_busy",
            detail: "its breaker is half-open and every probe slot is taken: passed over".into(),
            retry_at: None,
        };
    } else if m.breaker.state() == BreakerState::HalfOpen {
        (
            "half_open",
            "its breaker is half-open: the call is a probe that closes it on success".into(),
        )
    } else if h.calls == 0 {
        ("healthy", "healthy (no calls in the health window)".into())
    } else {
        ("healthy", format!("healthy ({})", rate()))
    };
    PlannedTarget {
        position: pos,
        model: m.clone(),
        step: Step::Try,
        reason,
        detail,
        retry_at: None,
    }
}

fn every_breaker_open(chain: &Chain, pos: usize) -> PlannedTarget {
    let m = &chain.targets[pos].model;
    PlannedTarget {
        position: pos,
        model: m.clone(),
        step: Step::LastResort,
        reason: "all_open",
        detail: "every usable target's breaker is open: this one, the soonest to reopen, is called through its breaker (when_all_open: try_soonest)".into(),
        retry_at: m.breaker.retry_at(),
    }
}

fn open(chain: &Chain, pos: usize, probe: bool) -> PlannedTarget {
    let m = &chain.targets[pos].model;
    let detail = if probe {
        "its breaker is open: skipped, then called through its breaker once if every other target fails and attempts and time are left"
    } else {
        "its breaker is open: skipped"
    };
    PlannedTarget {
        position: pos,
        model: m.clone(),
        step: if probe { Step::LastResort } else { Step::Skip },
        reason: "breaker_open",
        detail: detail.into(),
        retry_at: m.breaker.retry_at(),
    }
}

/// The request's `max_attempts` is shared by the whole walk: a target after as many
/// others as there are attempts is never reached, and one after targets whose retries
/// could spend them is reached only if they do not.
fn budget(chain: &Chain, targets: &mut [PlannedTarget]) {
    let max = chain.max_attempts;
    let (mut at_least, mut at_most) = (0u32, 0u32);
    for t in targets.iter_mut().filter(|t| t.step != Step::Skip) {
        if at_least >= max {
            t.step = Step::Skip;
            t.reason = "attempt_budget";
            t.detail = format!(
                "the chain's max_attempts ({max}) is spent by the targets before it, even without retries"
            );
            continue;
        }
        if at_most >= max {
            t.detail.push_str(&format!(
                "; reached only if the retries before it leave some of max_attempts ({max})"
            ));
        }
        let retries = chain.targets[t.position].policy.retry.max_retries;
        at_least += 1;
        at_most = at_most.saturating_add(1 + retries);
    }
}
