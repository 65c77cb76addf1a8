//! The environment's domain logic: one episode's tool calls and their observations, and the
//! episode loop of a token-level policy.

pub mod actor;
pub mod episode;
pub mod expert;
pub mod expert_policy;
pub mod family;
pub mod observation;
pub mod task;

pub use observation::{observe, Observation, ObservationError, ToolCall};
