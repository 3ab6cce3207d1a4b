//! cascade: an LLM fallback gateway. See `../shared/architecture.md` for the shape.

pub mod api;
pub mod body;
pub mod cache;
pub mod classify;
pub mod clock;
pub mod config;
pub mod log;
pub mod log_sink;
pub mod metrics;
pub mod mock;
pub mod name;
pub mod providers;
pub mod redis_conn;
pub mod resilience;
pub mod routing;
pub mod secret;
pub mod server;
pub mod shadow;
pub mod store;
pub mod workers;
