//! The learner's training primitives: losses, the optimizer, mixed precision, trajectory
//! splitting, SFT steps and policy-gradient steps.

pub mod actor;
pub mod loss;
pub mod optim;
pub mod precision;
pub mod rl;
pub mod sft;
pub mod split;
