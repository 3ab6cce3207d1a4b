//! `cascade check`'s findings beyond what loading rejects: configs that load and run,
//! but not the way their author meant. Each finding names its YAML path.
//!
//! Errors (exit 2): a `fallbacks` cycle; a `jump_to` that can never move forward; a
//! `context_overflow` jump to a model whose window is no larger. Warnings (exit 0): a
//! chain whose targets all share one provider; a model without a price in a chain that
//! sends shadow traffic (its cost, and the shadow cost cap, would read 0); an
//! `admin.listen` on a non-loopback address without `admin.token`.

use serde::Serialize;

use super::Config;
use crate::classify::{Action, ErrorClass};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub path: String,
    pub message: String,
}

impl Finding {
    fn error(path: String, message: String) -> Finding {
        Finding {
            severity: Severity::Error,
            path,
            message,
        }
    }

    fn warning(path: String, message: String) -> Finding {
        Finding {
            severity: Severity::Warning,
            path,
            message,
        }
    }
}

/// Every finding, errors first, each group in config order.
pub fn lint(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    fallback_cycles(config, &mut out);
    jumps(config, &mut out);
    provider_diversity(config, &mut out);
    shadow_prices(config, &mut out);
    open_admin(config, &mut out);
    out.sort_by_key(|f| f.severity != Severity::Error);
    out
}

/// `models.X.fallbacks` that lead back to X (directly or through other models'
/// fallbacks): a request naming X would be sent round in circles by anyone reading the
/// lists as "and then its fallbacks".
fn fallback_cycles(config: &Config, out: &mut Vec<Finding>) {
    for (name, model) in &config.models {
        // Depth-first from each fallback, looking for `name`; each model is entered once
        // per search, so a dense fallback graph stays linear.
        let mut seen = std::collections::HashSet::new();
        for (i, first) in model.fallbacks.iter().enumerate() {
            let mut path = vec![name.as_str(), first.as_str()];
            if leads_back(config, name, first, &mut path, &mut seen) {
                out.push(Finding::error(
                    format!("models.{name}.fallbacks[{i}]"),
                    format!("a fallbacks cycle: {}", path.join(" -> ")),
                ));
                break;
            }
        }
    }
}

fn leads_back<'a>(
    config: &'a Config,
    start: &str,
    at: &'a str,
    path: &mut Vec<&'a str>,
    seen: &mut std::collections::HashSet<&'a str>,
) -> bool {
    if at == start {
        return true;
    }
    if !seen.insert(at) {
        return false;
    }
    let Some(m) = config.models.get(at) else {
        return false;
    };
    for next in &m.fallbacks {
        path.push(next);
        if leads_back(config, start, next, path, seen) {
            return true;
        }
        path.pop();
    }
    false
}

/// `chains.X.on.CLASS.jump_to`. Jumps only ever move forward (a failing target at or
/// after the jump's model goes on to the next one), so a jump to the first model never
/// happens, and a `context_overflow` jump helps only to a larger window.
fn jumps(config: &Config, out: &mut Vec<Finding>) {
    for (name, chain) in &config.chains {
        let Some(first) = chain.targets.first() else {
            continue;
        };
        for class in ErrorClass::ALL {
            let Action::JumpTo(to) = first.policy.action(class) else {
                continue;
            };
            let path = format!("chains.{name}.on.{}.jump_to", class.as_str());
            let Some(target) = chain.targets.get(to) else {
                continue;
            };
            let target_name = &target.model.name;
            if to == 0 {
                out.push(Finding::error(
                    path.clone(),
                    format!(
                        "jumps to {target_name:?}, the chain's first model: no failing target is \
                         ever before it, so the jump never happens (the first model would \
                         jump to itself)"
                    ),
                ));
                continue;
            }
            if class != ErrorClass::ContextOverflow {
                continue;
            }
            let Some(window) = target.model.context_window else {
                out.push(Finding::error(
                    path,
                    format!(
                        "jumps to {target_name:?} on context_overflow, but {target_name:?} has \
                         no context_window: set it, larger than the models before it"
                    ),
                ));
                continue;
            };
            let before = &chain.targets[..to];
            let not_larger: Vec<String> = before
                .iter()
                .filter_map(|t| {
                    let w = t.model.context_window?;
                    (w >= window).then(|| format!("{:?} ({w})", t.model.name))
                })
                .collect();
            let unknown: Vec<String> = before
                .iter()
                .filter(|t| t.model.context_window.is_none())
                .map(|t| format!("{:?}", t.model.name))
                .collect();
            if !not_larger.is_empty() {
                out.push(Finding::error(
                    path.clone(),
                    format!(
                        "jumps to {target_name:?} (context_window {window}) on context_overflow, \
                         which is not larger than {}: a prompt too long for them is too long \
                         for it",
                        not_larger.join(", ")
                    ),
                ));
            }
            // An unknown window may well be smaller: worth a look, not a refusal.
            if !unknown.is_empty() {
                out.push(Finding::warning(
                    path,
                    format!(
                        "jumps to {target_name:?} (context_window {window}) on context_overflow, \
                         but {} before it {} no context_window, so cascade cannot tell whether \
                         the jump leads to a larger window",
                        unknown.join(", "),
                        if unknown.len() == 1 { "has" } else { "have" }
                    ),
                ));
            }
        }
    }
}

/// `chains.X`: every target on one provider, so one outage takes the whole chain down.
fn provider_diversity(config: &Config, out: &mut Vec<Finding>) {
    // A model with fallbacks is a chain too (a client naming it walks them).
    let model_chains = config.models.iter().filter_map(|(name, m)| {
        let chain = config.model_chains.get(name)?;
        (!m.fallbacks.is_empty()).then_some((format!("models.{name}.fallbacks"), chain))
    });
    let chains = config
        .chains
        .iter()
        .map(|(name, chain)| (format!("chains.{name}"), chain))
        .chain(model_chains);
    for (path, chain) in chains {
        let Some(first) = chain.targets.first() else {
            continue;
        };
        let provider = &first.model.provider.name;
        if chain
            .targets
            .iter()
            .all(|t| &t.model.provider.name == provider)
        {
            out.push(Finding::warning(
                path,
                format!(
                    "no provider diversity: every target is on provider {provider:?}, so an \
                     outage there takes the whole chain down"
                ),
            ));
        }
    }
}

/// A model without a price in a chain with shadow traffic: the report's costs and the
/// shadow cost cap would count it as free.
fn shadow_prices(config: &Config, out: &mut Vec<Finding>) {
    let mut seen = std::collections::HashSet::new();
    for (name, chain) in &config.chains {
        let Some(shadow) = &chain.shadow else {
            continue;
        };
        for t in chain.targets.iter().chain(&shadow.targets) {
            let m = &t.model;
            if m.cost_per_1k_input == 0.0 && m.cost_per_1k_output == 0.0 && seen.insert(&m.name) {
                out.push(Finding::warning(
                    format!("models.{}.cost_per_1k_input", m.name),
                    format!(
                        "no price, in chain {name:?} which sends shadow traffic: its cost and \
                         the shadow cost cap (max_cost_per_hour) count it as free"
                    ),
                ));
            }
        }
    }
}

/// `admin.listen` on an address others can reach, with no token: anyone who reaches
/// it can read the console and reload the config.
fn open_admin(config: &Config, out: &mut Vec<Finding>) {
    let admin = &config.admin;
    if let (Some(addr), None) = (admin.listen, &admin.token) {
        if !addr.ip().is_loopback() {
            out.push(Finding::warning(
                "admin.listen".into(),
                format!(
                    "{addr} is not a loopback address and admin.token is not set: whoever \
                     can reach it can read /admin and reload the config (set admin.token, or \
                     bind a private interface)"
                ),
            ));
        }
    }
}
