//! The policy: the model that acts (and, through the learner, trains).

pub mod chat;
pub mod model;
pub mod sampling;
pub mod tokenizer;
pub mod toolcall;
