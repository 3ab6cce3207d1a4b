//! One way to open a Redis connection for the cache tier and the shared state: a
//! connection manager whose every operation (and the connect itself) is bounded.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Connects within `2 * limit`; each later operation times out after `limit`.
pub async fn connect(client: &redis::Client, limit: Duration) -> Result<ConnectionManager, String> {
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(1)
        .set_connection_timeout(limit)
        .set_response_timeout(limit);
    match tokio::time::timeout(
        limit * 2,
        ConnectionManager::new_with_config(client.clone(), config),
    )
    .await
    {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connection timed out".to_string()),
    }
}
