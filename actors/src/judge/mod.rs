//! The judge: rubric trees, leaf graders, and the queue that grades finished episodes.

pub mod check;
pub mod llm;
pub mod queue;
pub mod rubric;
