//! The tasks a stage runs, resolved from its config: generated from the built-in family into
//! the run directory, or loaded from task folders on disk.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use klong_actors::environment::family;
use klong_actors::environment::task::{Task, TaskSet as TaskFolders};

use crate::config::{TaskSet, TaskSource};

/// One task of a stage.
#[derive(Clone)]
pub struct StageTask {
    pub task: Arc<Task>,
    /// Seeds the task's sandbox.
    pub seed: u64,
    /// The family's horizon (experiments); `None` for a task folder from disk.
    pub horizon: Option<u32>,
}

/// Largest task set a stage takes (each task is a folder on disk).
pub const MAX_STAGE_TASKS: usize = 100_000;

/// The tasks of `set`; family tasks are written under `scratch`. Folder tasks are seeded from
/// `seed` and their position, so the same config gives the same sandboxes.
pub fn resolve(set: &TaskSet, scratch: &Path, seed: u64) -> anyhow::Result<Vec<StageTask>> {
    match set {
        TaskSet::Family(source) => {
            if source.count as usize > MAX_STAGE_TASKS {
                anyhow::bail!(
                    "{} tasks asked; a stage takes at most {MAX_STAGE_TASKS}",
                    source.count
                );
            }
            (0..source.count)
                .map(|i| {
                    let (task, seed, horizon) = family_task(scratch, source, i)?;
                    Ok(StageTask {
                        task,
                        seed,
                        horizon: Some(horizon),
                    })
                })
                .collect()
        }
        TaskSet::Dir(dir) => {
            let folders = TaskFolders::load_dir(dir)
                .with_context(|| format!("loading the tasks in {}", dir.display()))?;
            if folders.tasks.is_empty() {
                anyhow::bail!(
                    "{} holds no task folder (a subfolder with a task.ron)",
                    dir.display()
                );
            }
            Ok(folders
                .tasks
                .into_iter()
                .enumerate()
                .map(|(i, task)| StageTask {
                    task: Arc::new(task),
                    seed: seed.wrapping_add(i as u64),
                    horizon: None,
                })
                .collect())
        }
    }
}

/// Task `i` of a task source (seed `seed + i`, horizons cycling through
/// `min_horizon..=max_horizon`), written under `dir` and loaded back: `(task, seed, horizon)`.
pub fn family_task(
    dir: &Path,
    tasks: &TaskSource,
    i: u32,
) -> anyhow::Result<(Arc<Task>, u64, u32)> {
    let seed = tasks.seed.wrapping_add(u64::from(i));
    let span = tasks.max_horizon - tasks.min_horizon + 1;
    let horizon = tasks.min_horizon + i % span;
    let generated = family::generate_styled(seed, horizon, tasks.style);
    let path = family::write_task(dir, &generated)
        .with_context(|| format!("writing task {}", generated.name))?;
    Ok((Arc::new(Task::load(&path)?), seed, horizon))
}
