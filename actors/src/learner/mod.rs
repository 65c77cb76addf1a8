//! The learner's training primitives: losses, the optimizer, mixed precision, trajectory
//! splitting, SFT steps and policy-gradient steps; synthetic recall data for a warm-up.

pub mod actor;
pub mod lanes;
pub mod loss;
pub mod optim;
pub mod precision;
pub mod recall;
pub mod rl;
pub mod sft;
pub mod split;
