//! Responses kept for `previous_response_id`, `GET` and `DELETE /v1/responses/{id}`:
//! each under its caller's tenant, for `responses.ttl`, within `responses.max_memory`
//! (the oldest go first when it is full).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use crate::config::ResponsesSettings;

/// One kept response.
#[derive(Debug)]
pub struct Kept {
    /// The `response` object, as served.
    pub response: Bytes,
    /// The conversation up to and including this response's output, as a JSON array
    /// of Responses items: what a follow-up turn prepends.
    pub items: Bytes,
}

pub struct ResponsesState {
    kept: moka::sync::Cache<(u128, Box<str>), Arc<Kept>>,
}

impl ResponsesState {
    pub fn new(settings: &ResponsesSettings) -> ResponsesState {
        ResponsesState {
            kept: moka::sync::Cache::builder()
                .max_capacity(settings.max_memory)
                .weigher(|k: &(u128, Box<str>), v: &Arc<Kept>| {
                    (k.1.len() + v.response.len() + v.items.len() + 64).min(u32::MAX as usize)
                        as u32
                })
                .time_to_live(settings.ttl)
                .build(),
        }
    }

    /// Keeps `response` (a `response` object) after `history` and `input`.
    pub fn keep(&self, tenant: u128, history: &[Value], input: &[Value], response: &Value) {
        let Some(id) = response["id"].as_str() else {
            return;
        };
        let items = crate::api::responses::conversation(history, input, response);
        let (Ok(items), Ok(body)) = (serde_json::to_vec(&items), serde_json::to_vec(response))
        else {
            return;
        };
        self.kept.insert(
            (tenant, id.into()),
            Arc::new(Kept {
                response: body.into(),
                items: items.into(),
            }),
        );
    }

    pub fn get(&self, tenant: u128, id: &str) -> Option<Arc<Kept>> {
        self.kept.get(&(tenant, id.into()))
    }

    /// Whether it was there.
    pub fn delete(&self, tenant: u128, id: &str) -> bool {
        self.kept.remove(&(tenant, id.into())).is_some()
    }
}

/// `GET /v1/responses/{id}`: a kept response, for its own tenant only.
pub async fn get_response(
    axum::extract::State(app): axum::extract::State<Arc<super::AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: http::HeaderMap,
) -> axum::response::Response {
    match app.responses.get(crate::api::tenant(&headers), &id) {
        Some(kept) => super::json_response(kept.response.clone()),
        None => super::error_response(&not_found(&id)),
    }
}

/// `DELETE /v1/responses/{id}`.
pub async fn delete_response(
    axum::extract::State(app): axum::extract::State<Arc<super::AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: http::HeaderMap,
) -> axum::response::Response {
    if app.responses.delete(crate::api::tenant(&headers), &id) {
        let body = serde_json::json!({"id": id, "object": "response", "deleted": true});
        super::json_response(serde_json::to_vec(&body).unwrap_or_default().into())
    } else {
        super::error_response(&not_found(&id))
    }
}

fn not_found(id: &str) -> crate::api::ApiError {
    crate::api::ApiError::new(
        http::StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("Response with id '{id}' not found."),
    )
}
