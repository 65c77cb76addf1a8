//! klong-actors: the roles of a klongd run (policy, environment, judge, learner) and their
//! domain logic. It starts with the environment's side of a tool call: turning the agent's
//! call into a sandbox execution and the outcome into the observation the agent reads.
//!
//! This crate knows nothing of the daemon: no CLI, no config files, no run directory.

pub mod environment;
pub mod judge;
pub mod learner;
pub mod messages;
pub mod policy;
pub mod trajectory;
