//! Resilience: backoff, budgets, circuit breakers, health windows, and the tower
//! layers that wrap each chain target (retry -> circuit breaker -> timeout). Knows no
//! provider wire format: the layers are generic over the request and response.

pub mod backoff;
pub mod breaker;
pub mod budget;
pub mod circuit;
pub mod fleet;
pub mod health;
pub mod registry;
pub mod retry;
pub mod timeout;
pub mod window;

use tokio::time::Instant;

/// What the layers need to know about a request.
pub trait Attempt: Clone + Send + 'static {
    /// The request's deadline: no call or wait may pass it.
    fn deadline(&self) -> Instant;
    /// Takes one upstream call from the request's attempt budget (shared by the whole
    /// chain, so a fallback hop never resets it). `false` when it is spent.
    fn take_attempt(&self) -> bool;
    /// Gives back an attempt that made no upstream call.
    fn refund_attempt(&self);
    /// Call through an open breaker (`when_all_open: try_soonest`).
    fn force_breaker(&self) -> bool;
    /// A timed-out call moves on to the next target rather than waiting on this one
    /// again: the chain has targets not tried yet, and the engine's second pass spends
    /// the retries left if none of them answers.
    fn defer_timeouts(&self) -> bool {
        false
    }
}

/// Whether a successful response is the call's final outcome. A stream that has only
/// passed its commit point is not: whoever consumes it reports how it ended.
pub trait Settled {
    fn settled(&self) -> bool;
}
