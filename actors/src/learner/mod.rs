//! The learner's training primitives: losses and the optimizer.

pub mod loss;
pub mod optim;
