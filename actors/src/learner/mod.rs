//! The learner's training primitives: losses, the optimizer, mixed precision, trajectory
//! splitting and SFT steps.

pub mod actor;
pub mod loss;
pub mod optim;
pub mod precision;
pub mod sft;
pub mod split;
