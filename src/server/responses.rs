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
    /// When it is forgotten (the same moment in memory and in the store).
    expires_at: std::time::Instant,
}

/// Each entry lives until its own `expires_at`, also when it was read back from the
/// store (a fresh TTL then would keep it past `responses.ttl`).
struct UntilExpiry;

impl moka::Expiry<(u128, Box<str>), Arc<Kept>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &(u128, Box<str>),
        value: &Arc<Kept>,
        now: std::time::Instant,
    ) -> Option<std::time::Duration> {
        Some(value.expires_at.saturating_duration_since(now))
    }
}

pub struct ResponsesState {
    /// The recent ones, in memory.
    kept: moka::sync::Cache<(u128, Box<str>), Arc<Kept>>,
    /// Deleted ones, until they would have expired: a deletion still queued for the
    /// store (or dropped with a full queue) never brings a response back.
    deleted: moka::sync::Cache<(u128, Box<str>), ()>,
    /// All of them, in the store (when it is on), so a restart or an evicted entry
    /// loses nothing within `responses.ttl`.
    store: Option<(crate::store::Store, crate::store::Backend)>,
    ttl: std::time::Duration,
}

/// The tenant as the store keeps it.
fn tenant_key(tenant: u128) -> String {
    format!("{tenant:032x}")
}

impl ResponsesState {
    pub fn new(
        settings: &ResponsesSettings,
        store: Option<(crate::store::Store, crate::store::Backend)>,
    ) -> ResponsesState {
        ResponsesState {
            store,
            ttl: settings.ttl,
            kept: moka::sync::Cache::builder()
                .max_capacity(settings.max_memory)
                .weigher(|k: &(u128, Box<str>), v: &Arc<Kept>| {
                    (k.1.len() + v.response.len() + v.items.len() + 64).min(u32::MAX as usize)
                        as u32
                })
                .expire_after(UntilExpiry)
                .build(),
            deleted: moka::sync::Cache::builder()
                .max_capacity(1 << 20)
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
        let kept = Arc::new(Kept {
            response: body.into(),
            items: items.into(),
            expires_at: std::time::Instant::now() + self.ttl,
        });
        if let Some((store, _)) = &self.store {
            let now = crate::clock::now_ms();
            store.record(crate::store::Row::Response(Box::new(
                crate::store::ResponseRow {
                    tenant: tenant_key(tenant),
                    id: id.to_string(),
                    created_ms: now,
                    expires_ms: now.saturating_add(
                        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX / 2),
                    ),
                    response: kept.response.clone(),
                    items: kept.items.clone(),
                },
            )));
        }
        self.kept.insert((tenant, id.into()), kept);
    }

    /// A kept response: from memory, else from the store (off the request thread).
    pub async fn get(&self, tenant: u128, id: &str) -> Option<Arc<Kept>> {
        let key = (tenant, Box::<str>::from(id));
        if self.deleted.contains_key(&key) {
            return None;
        }
        if let Some(k) = self.kept.get(&key) {
            return Some(k);
        }
        let (_, backend) = self.store.as_ref()?;
        let found = crate::store::read_response(backend, &tenant_key(tenant), id)
            .await
            .ok()??;
        let left = u64::try_from(found.2 - crate::clock::now_ms()).unwrap_or(0);
        let kept = Arc::new(Kept {
            response: found.0.into(),
            items: found.1.into(),
            expires_at: std::time::Instant::now() + std::time::Duration::from_millis(left),
        });
        self.kept.insert(key, kept.clone());
        Some(kept)
    }

    /// Whether it was there.
    pub async fn delete(&self, tenant: u128, id: &str) -> bool {
        let existed = self.get(tenant, id).await.is_some();
        self.kept.remove(&(tenant, id.into()));
        if existed {
            self.deleted.insert((tenant, id.into()), ());
        }
        if let (true, Some((store, _))) = (existed, &self.store) {
            store.record(crate::store::Row::ForgetResponse {
                tenant: tenant_key(tenant),
                id: id.to_string(),
            });
        }
        existed
    }
}

/// `GET /v1/responses/{id}`: a kept response, for its own tenant only.
pub async fn get_response(
    axum::extract::State(app): axum::extract::State<Arc<super::AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: http::HeaderMap,
) -> axum::response::Response {
    match app.responses.get(crate::api::tenant(&headers), &id).await {
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
    if app
        .responses
        .delete(crate::api::tenant(&headers), &id)
        .await
    {
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
