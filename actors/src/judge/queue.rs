//! The Judge actor: grades finished episodes from a priority queue under a concurrency bound.
//!
//! A judge failure (a check that could not run, an LLM endpoint that kept failing) is an
//! infrastructure failure: it reaches the caller as [`JudgeFailure`] and is never turned into
//! a score of 0, which would teach the policy that its work was wrong when the judge was.

use std::collections::{BTreeMap, BinaryHeap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use klong_sandbox::{CallLimits, SandboxHost, ToolRegistry};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::environment::task::{GraderSpec, Task};
use crate::judge::check::{run_check, CheckError};
use crate::judge::llm::{LeafRequest, LlmError, LlmGrader};
use crate::judge::rubric::{score, RubricError, ScoredNode, Variant};

/// Most files and bytes of an episode's final state that the judge reads.
const MAX_STATE_FILES: usize = 100_000;
const MAX_STATE_BYTES: u64 = 1 << 30;
/// Most bytes of one file shown to an LLM grader (the grader truncates further).
const MAX_LLM_FILE_BYTES: u64 = 1 << 20;

/// What the judge needs besides the episodes.
pub struct JudgeContext {
    pub host: Arc<SandboxHost>,
    pub registry: Arc<ToolRegistry>,
    /// Limits of each check grader's sandbox call.
    pub check_limits: CallLimits,
    /// The LLM grader, if the run configured one; a task with LLM leaves fails without it.
    pub llm: Option<Arc<LlmGrader>>,
    pub seed: u64,
}

/// An episode that ended (submitted, or its budget spent), ready to be graded on its files.
#[derive(Debug, Clone)]
pub struct FinishedEpisode {
    pub episode_id: u64,
    pub task: Arc<Task>,
    /// The episode directory as the agent left it.
    pub final_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GraderKind {
    Check,
    Llm,
}

#[derive(Debug, Clone, Serialize)]
pub struct LeafGrade {
    pub leaf_id: String,
    pub passed: bool,
    pub grader: GraderKind,
    pub explanation: String,
}

/// A graded episode: every leaf's verdict and the scored tree.
#[derive(Debug, Clone, Serialize)]
pub struct GradedEpisode {
    pub episode_id: u64,
    pub task: String,
    pub rubric_hash: String,
    pub final_state_hash: String,
    pub score: f64,
    pub leaves: Vec<LeafGrade>,
    pub tree: ScoredNode,
}

#[derive(Debug, thiserror::Error)]
pub enum JudgeFailure {
    #[error("check grader for leaf `{leaf}` could not run: {source}")]
    Check { leaf: String, source: CheckError },
    #[error("LLM grader for leaf `{leaf}` failed: {source}")]
    Llm { leaf: String, source: LlmError },
    #[error("leaf `{leaf}` needs an LLM grader, and none is configured")]
    NoLlmGrader { leaf: String },
    #[error("leaf `{leaf}` has no grader")]
    NoGrader { leaf: String },
    #[error("cannot read the final state {}: {reason}", path.display())]
    FinalState { path: PathBuf, reason: String },
    #[error("scoring failed: {0}")]
    Score(#[from] RubricError),
    #[error("judge queue is full ({0} episodes waiting)")]
    Overloaded(usize),
    #[error("judge worker failed: {0}")]
    Worker(String),
}

/// Grades one episode: every leaf with its grader, then the weighted tree.
pub async fn grade_episode(
    ctx: &Arc<JudgeContext>,
    episode: &FinishedEpisode,
) -> Result<GradedEpisode, JudgeFailure> {
    let task = &episode.task;
    let final_state_hash = state_hash(&episode.final_dir)?;
    let rubric_hash = task.rubric.content_hash();
    let mut leaves = Vec::new();
    let mut llm_leaves = tokio::task::JoinSet::new();
    for leaf in task.rubric.leaves() {
        match task.spec.graders.get(&leaf.id) {
            Some(GraderSpec::Check(spec)) => {
                let (ctx2, dir, spec, leaf_id) = (
                    ctx.clone(),
                    episode.final_dir.clone(),
                    spec.clone(),
                    leaf.id.clone(),
                );
                let verdict = tokio::task::spawn_blocking(move || {
                    run_check(
                        &ctx2.host,
                        &ctx2.registry,
                        &dir,
                        &spec,
                        ctx2.check_limits,
                        ctx2.seed,
                    )
                })
                .await
                .map_err(|e| JudgeFailure::Worker(e.to_string()))?
                .map_err(|source| JudgeFailure::Check {
                    leaf: leaf_id.clone(),
                    source,
                })?;
                leaves.push(LeafGrade {
                    leaf_id,
                    passed: verdict.passed,
                    grader: GraderKind::Check,
                    explanation: verdict.explanation,
                });
            }
            Some(GraderSpec::Llm(spec)) => {
                let llm = ctx.llm.clone().ok_or_else(|| JudgeFailure::NoLlmGrader {
                    leaf: leaf.id.clone(),
                })?;
                let files = read_files(&episode.final_dir, &spec.files);
                let request = LeafRequest {
                    rubric_hash: rubric_hash.clone(),
                    leaf_id: leaf.id.clone(),
                    requirements: leaf.requirements.clone(),
                    category: leaf
                        .task_category
                        .unwrap_or(crate::judge::rubric::TaskCategory::CodeDevelopment),
                    paper: task.paper.clone(),
                    files,
                    final_state_hash: final_state_hash.clone(),
                };
                llm_leaves.spawn(async move {
                    let verdict = llm.grade(&request).await;
                    (request.leaf_id, verdict)
                });
            }
            None => {
                return Err(JudgeFailure::NoGrader {
                    leaf: leaf.id.clone(),
                })
            }
        }
    }
    while let Some(joined) = llm_leaves.join_next().await {
        let (leaf_id, verdict) = joined.map_err(|e| JudgeFailure::Worker(e.to_string()))?;
        let verdict = verdict.map_err(|source| JudgeFailure::Llm {
            leaf: leaf_id.clone(),
            source,
        })?;
        leaves.push(LeafGrade {
            leaf_id,
            passed: verdict.score == 1,
            grader: GraderKind::Llm,
            explanation: verdict.explanation,
        });
    }
    let grades: BTreeMap<String, f64> = leaves
        .iter()
        .map(|l| (l.leaf_id.clone(), if l.passed { 1.0 } else { 0.0 }))
        .collect();
    let tree = score(&task.rubric, &grades, Variant::Full)?;
    Ok(GradedEpisode {
        episode_id: episode.episode_id,
        task: task.name.clone(),
        rubric_hash,
        final_state_hash,
        score: tree.score,
        leaves,
        tree,
    })
}

/// The files an LLM leaf asks for, each bounded; a missing file is shown as missing.
fn read_files(root: &Path, names: &[String]) -> Vec<(String, String)> {
    names
        .iter()
        .map(|name| {
            let safe = Path::new(name)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            let content = if !safe {
                "[path outside the episode directory]".to_string()
            } else {
                match std::fs::File::open(root.join(name)) {
                    Ok(f) => {
                        let mut buf = Vec::new();
                        match std::io::Read::read_to_end(
                            &mut std::io::Read::take(f, MAX_LLM_FILE_BYTES),
                            &mut buf,
                        ) {
                            Ok(_) => String::from_utf8_lossy(&buf).into_owned(),
                            Err(e) => format!("[unreadable: {e}]"),
                        }
                    }
                    Err(_) => "[file does not exist]".to_string(),
                }
            };
            (name.clone(), content)
        })
        .collect()
}

/// SHA-256 over the final state's regular files (sorted relative paths, sizes, contents);
/// symlinks are recorded by name only. Keys the LLM verdict cache.
pub fn state_hash(root: &Path) -> Result<String, JudgeFailure> {
    let fail = |reason: String| JudgeFailure::FinalState {
        path: root.to_path_buf(),
        reason,
    };
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| fail(e.to_string()))?;
        for entry in entries {
            let entry = entry.map_err(|e| fail(e.to_string()))?;
            let kind = entry.file_type().map_err(|e| fail(e.to_string()))?;
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
            } else {
                files.push((path, kind.is_file()));
            }
            if files.len() > MAX_STATE_FILES {
                return Err(fail(format!("more than {MAX_STATE_FILES} files")));
            }
        }
    }
    files.sort();
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    for (path, regular) in files {
        let rel = path.strip_prefix(root).unwrap_or(&path);
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update([0]);
        if regular {
            let bytes =
                std::fs::read(&path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
            total += bytes.len() as u64;
            if total > MAX_STATE_BYTES {
                return Err(fail(format!("more than {MAX_STATE_BYTES} bytes")));
            }
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
        } else {
            hasher.update(b"symlink");
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

// ---------------------------------------------------------------------------------------------
// The actor.

pub type GradeReply = Result<GradedEpisode, JudgeFailure>;

pub enum JudgeMsg {
    /// Grade an episode; higher priority first, equal priorities in arrival order.
    Grade {
        episode: FinishedEpisode,
        priority: i64,
        reply: RpcReplyPort<GradeReply>,
    },
    /// A grading task finished (sent by the judge to itself).
    Finished,
}

pub struct JudgeArgs {
    pub ctx: Arc<JudgeContext>,
    pub max_concurrent: usize,
    pub max_queued: usize,
}

struct Pending {
    priority: i64,
    seq: u64,
    episode: FinishedEpisode,
    reply: RpcReplyPort<GradeReply>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.priority, self.seq) == (other.priority, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    // Max-heap: higher priority first; among equals the earlier arrival (smaller seq).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.priority
            .cmp(&other.priority)
            .then(other.seq.cmp(&self.seq))
    }
}

pub struct JudgeState {
    args: JudgeArgs,
    queue: BinaryHeap<Pending>,
    running: usize,
    seq: u64,
}

pub struct Judge;

/// Tells the judge a grading task ended, even if the task panicked.
struct FinishedGuard(ActorRef<JudgeMsg>);

impl Drop for FinishedGuard {
    fn drop(&mut self) {
        let _ = self.0.cast(JudgeMsg::Finished);
    }
}

impl Judge {
    fn start_ready(myself: &ActorRef<JudgeMsg>, state: &mut JudgeState) {
        while state.running < state.args.max_concurrent {
            let Some(job) = state.queue.pop() else { break };
            state.running += 1;
            let ctx = state.args.ctx.clone();
            let guard = FinishedGuard(myself.clone());
            tokio::spawn(async move {
                let _guard = guard;
                let result = grade_episode(&ctx, &job.episode).await;
                // The caller may have given up waiting; nothing else to do then.
                let _ = job.reply.send(result);
            });
        }
    }
}

impl Actor for Judge {
    type Msg = JudgeMsg;
    type State = JudgeState;
    type Arguments = JudgeArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<JudgeMsg>,
        args: JudgeArgs,
    ) -> Result<JudgeState, ActorProcessingErr> {
        if args.max_concurrent == 0 {
            return Err("judge max_concurrent must be at least 1".into());
        }
        Ok(JudgeState {
            args,
            queue: BinaryHeap::new(),
            running: 0,
            seq: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<JudgeMsg>,
        msg: JudgeMsg,
        state: &mut JudgeState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            JudgeMsg::Grade {
                episode,
                priority,
                reply,
            } => {
                if state.queue.len() >= state.args.max_queued {
                    let _ = reply.send(Err(JudgeFailure::Overloaded(state.queue.len())));
                } else {
                    state.seq += 1;
                    state.queue.push(Pending {
                        priority,
                        seq: state.seq,
                        episode,
                        reply,
                    });
                }
            }
            JudgeMsg::Finished => state.running = state.running.saturating_sub(1),
        }
        Judge::start_ready(&myself, state);
        Ok(())
    }
}
