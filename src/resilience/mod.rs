//! Resilience: backoff, budgets, circuit breakers, health windows, and the tower
//! layers that put them around each chain target. Knows no provider wire format.

pub mod backoff;
pub mod breaker;
pub mod budget;
pub mod health;
pub mod window;
