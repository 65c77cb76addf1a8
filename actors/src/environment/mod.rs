//! The environment's domain logic: one episode's tool calls and their observations.

pub mod expert;
pub mod family;
pub mod observation;
pub mod task;

pub use observation::{observe, Observation, ObservationError, ToolCall};
