//! klongd: trains LLM agents for long-horizon, tool-using tasks. This library is the binary's
//! body (config, run directory, CLI commands); `main.rs` only parses arguments and maps errors
//! to exit codes.

pub mod bench;
pub mod bench_model;
pub mod bench_split;
pub mod config;
pub mod eval_cli;
pub mod eval_stage;
pub mod generate_cli;
pub mod malloc;
pub mod progress;
pub mod rl_stage;
pub mod rubric_cli;
pub mod run;
pub mod sandbox_cli;
pub mod sft_stage;
pub mod store;
pub mod supervisor;
pub mod task_set;
pub mod tasks_cli;
