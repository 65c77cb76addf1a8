//! The environment's domain logic: one episode's tool calls and their observations.

pub mod observation;

pub use observation::{observe, Observation, ObservationError, ToolCall};
