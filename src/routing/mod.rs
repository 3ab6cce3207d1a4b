//! Chains and targets: resolving a request to a chain, and the engine that walks it.

pub mod engine;
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
    if let Some(task) = task {
        return config
            .chains
            .get(task)
            .ok_or_else(|| not_found(config, task, "x-cascade-task"));
    }
    match model {
        Some(name) => config
            .chains
            .get(name)
            .or_else(|| config.model_chains.get(name))
            .ok_or_else(|| not_found(config, name, "model")),
        None => config.chains.get("default").ok_or_else(|| {
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
