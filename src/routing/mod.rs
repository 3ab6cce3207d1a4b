//! Chains and targets: resolving a request to a chain, and the engine that walks it.

pub mod engine;
pub mod explain;
pub mod target;

use std::sync::Arc;

use http::StatusCode;

use crate::api::ApiError;
use crate::config::{Chain, Config};

/// Picks the chain for a request: the `x-cascade-task` header names a chain; otherwise
/// the body's `model` names a chain or a pool model (that model plus its `fallbacks`).
pub fn resolve<'a>(
    config: &'a Config,
    task: Option<&str>,
    model: Option<&str>,
) -> Result<&'a Arc<Chain>, ApiError> {
    resolve_why(config, task, model).map(|(chain, _)| chain)
}

/// How [`resolve`] chose a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainReason {
    /// The `x-cascade-task` header names it.
    TaskHeader,
    /// The body's `model` names the chain.
    ModelIsChain,
    /// The body's `model` names a pool model: that model, then its `fallbacks`.
    ModelInPool,
    /// No `model`: the `default` chain.
    Default,
}

impl ChainReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ChainReason::TaskHeader => "x-cascade-task",
            ChainReason::ModelIsChain => "model_names_chain",
            ChainReason::ModelInPool => "model_names_pool_model",
            ChainReason::Default => "default",
        }
    }
}

/// [`resolve`], saying why.
pub fn resolve_why<'a>(
    config: &'a Config,
    task: Option<&str>,
    model: Option<&str>,
) -> Result<(&'a Arc<Chain>, ChainReason), ApiError> {
    if let Some(task) = task {
        return config
            .chains
            .get(task)
            .map(|c| (c, ChainReason::TaskHeader))
            .ok_or_else(|| not_found(config, task, "x-cascade-task"));
    }
    match model {
        Some(name) => config
            .chains
            .get(name)
            .map(|c| (c, ChainReason::ModelIsChain))
            .or_else(|| {
                config
                    .model_chains
                    .get(name)
                    .map(|c| (c, ChainReason::ModelInPool))
            })
            .ok_or_else(|| not_found(config, name, "model")),
        None => config
            .chains
            .get("default")
            .map(|c| (c, ChainReason::Default))
            .ok_or_else(|| {
                ApiError::invalid_request("Missing required parameter: 'model'.")
                    .with_param("model")
                    .with_code("missing_required_parameter")
            }),
    }
}

fn not_found(config: &Config, name: &str, param: &str) -> ApiError {
    let known: Vec<&str> = config.routable_names().collect();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "The model `{name}` does not exist. Available chains and models: {}.",
            known.join(", ")
        ),
    )
    .with_param(param)
    .with_code("model_not_found")
}
