//! Task folders: what an episode starts from and how it is graded.
//!
//! A task folder holds
//! - `paper.md`: the statement the agent keeps in view (the pinned prefix of its context);
//! - `files/`: the episode's initial files (absent = none);
//! - `rubric.json`: the rubric tree in PaperBench's schema;
//! - `task.ron`: the tools the agent may call, the episode's budget, and one grader per rubric
//!   leaf.
//!
//! Loading is strict: a malformed task names its file and the path of the bad node
//! (`task.ron:12:9: field `budget.turns`: ...`, `graders["leaf-x"]: ...`), because a task that
//! loads with a silently dropped grader would score every episode wrong.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use klong_sandbox::registry::MAX_ARGUMENT_BYTES;
use klong_sandbox::{HumanDuration, ToolRegistry};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::judge::rubric::{RubricError, RubricNode};

/// Largest `paper.md`: it is pinned in the agent's context, so it must stay small.
pub const MAX_PAPER_BYTES: u64 = 1 << 20;
/// Largest `task.ron`.
pub const MAX_TASK_RON_BYTES: u64 = 1 << 20;
/// Largest `rubric.json` (PaperBench's largest rubrics are a few hundred KiB).
pub const MAX_RUBRIC_BYTES: u64 = 16 << 20;
/// Most task folders in one [`TaskSet`].
pub const MAX_TASKS: usize = 100_000;
/// Most directory entries [`TaskSet::load_dir`] looks at, so that a huge directory of
/// unrelated files cannot make loading unbounded.
pub const MAX_SCANNED_ENTRIES: usize = 4 * MAX_TASKS;
/// Most files an LLM grader may name; each is read into a prompt.
pub const MAX_LLM_FILES: usize = 64;

pub const PAPER_FILE: &str = "paper.md";
pub const RUBRIC_FILE: &str = "rubric.json";
pub const SPEC_FILE: &str = "task.ron";
pub const FILES_DIR: &str = "files";

/// `task.ron`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Registry tools the agent may call.
    pub tools: Vec<String>,
    /// How the tools are described to the agent.
    #[serde(default, skip_serializing_if = "ToolDocs::is_full")]
    pub tool_docs: ToolDocs,
    pub budget: TaskBudget,
    /// Rubric leaf id -> its grader. A key may appear once: a repeated key would otherwise
    /// silently replace the first grader.
    #[serde(deserialize_with = "unique_keys")]
    pub graders: BTreeMap<String, GraderSpec>,
}

/// How much of each tool's manifest the agent is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ToolDocs {
    /// Everything: the description and every parameter's description.
    #[default]
    Full,
    /// The description's first sentence, and the parameters' names, types and whether they
    /// are required: a short prompt for a small model.
    Brief,
    /// None in the prompt: the task's statement names the tools and their arguments (the
    /// shortest prompt, for a tiny model that learns the tools from demonstrations). The
    /// task's `tools` list still bounds what the agent may call.
    InStatement,
}

impl ToolDocs {
    fn is_full(&self) -> bool {
        *self == ToolDocs::Full
    }
}

/// The episode's budget (the sandbox's per-call limits and totals come from the run config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskBudget {
    /// Agent turns (model calls).
    #[serde(deserialize_with = "klong_sandbox::limits::positive::count32")]
    pub turns: u32,
    /// Tokens the model may generate across the episode.
    #[serde(deserialize_with = "klong_sandbox::limits::positive::count")]
    pub tokens: u64,
    /// Wall time of the whole episode; `None`: only turns and tokens bound it.
    #[serde(default, deserialize_with = "positive_optional_duration")]
    pub wall_time: Option<HumanDuration>,
}

/// How one rubric leaf is graded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum GraderSpec {
    /// A command run over a copy of the episode's final files (see `judge::check`).
    Check(CheckSpec),
    /// A model reads the criterion and the named files and answers 0 or 1.
    Llm(LlmSpec),
}

/// A check grader: passes when every condition that is set holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// A command line for the sandbox's host-side shell (the `bash` tool).
    pub command: String,
    /// Expected exit code; default `Some(0)`. `None`: any exit code.
    #[serde(default = "default_exit_code")]
    pub exit_code: Option<i32>,
    /// Expected stdout, exactly.
    #[serde(default)]
    pub stdout: Option<String>,
    /// A substring stdout must contain.
    #[serde(default)]
    pub stdout_contains: Option<String>,
}

fn default_exit_code() -> Option<i32> {
    Some(0)
}

/// An LLM grader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSpec {
    /// Files of the episode's final state the judge model reads, relative to its directory.
    pub files: Vec<String>,
}

/// One loaded, validated task.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// The folder's name.
    pub name: String,
    pub dir: PathBuf,
    pub paper: String,
    pub rubric: RubricNode,
    pub spec: TaskSpec,
}

/// The tasks of a directory, sorted by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskSet {
    pub tasks: Vec<Task>,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A problem with a file as a whole (missing, too large, not UTF-8).
    #[error("{}: {message}", file.display())]
    File { file: PathBuf, message: String },
    /// A parse error; `line`/`col` are 1-based, `node` is the path of the field being read
    /// (empty when the error is outside any field).
    #[error("{}:{line}:{col}: {}{message}", file.display(), node_prefix(node))]
    Syntax {
        file: PathBuf,
        line: usize,
        col: usize,
        node: String,
        message: String,
    },
    /// A node that parsed but is invalid, e.g. `graders["leaf-x"]` or `sub_tasks[1]`.
    #[error("{}: {node}: {message}", file.display())]
    Invalid {
        file: PathBuf,
        node: String,
        message: String,
    },
    /// The rubric parsed but is not a valid tree; the error names the node.
    #[error("{}: {source}", file.display())]
    Rubric { file: PathBuf, source: RubricError },
    #[error("{}: more than {limit} {what}", dir.display())]
    TooMany {
        dir: PathBuf,
        limit: usize,
        what: &'static str,
    },
}

fn node_prefix(node: &str) -> String {
    // serde_path_to_error writes `?` for a position it cannot name (e.g. between fields).
    if node.is_empty() || node == "." || node == "?" {
        String::new()
    } else {
        format!("field `{node}`: ")
    }
}

impl TaskSpec {
    /// Parses and validates `task.ron` on its own (without the rubric); `file` only names it
    /// in errors.
    pub fn parse(file: &Path, text: &str) -> Result<TaskSpec, TaskError> {
        let syntax = |e: ron::error::SpannedError, node: String| TaskError::Syntax {
            file: file.to_path_buf(),
            line: e.span.start.line,
            col: e.span.start.col,
            node,
            message: e.code.to_string(),
        };
        let mut de = ron::Deserializer::from_str(text).map_err(|e| syntax(e, String::new()))?;
        let spec: TaskSpec = match serde_path_to_error::deserialize(&mut de) {
            Ok(s) => s,
            Err(e) => {
                let node = e.path().to_string();
                let spanned = de.span_error(e.into_inner());
                return Err(syntax(spanned, node));
            }
        };
        de.end()
            .map_err(|e| syntax(de.span_error(e), String::new()))?;
        spec.validate(file)?;
        Ok(spec)
    }

    /// Pretty RON, as `parse` reads it back.
    pub fn to_ron(&self) -> Result<String, ron::Error> {
        ron::ser::to_string_pretty(self, ron::ser::PrettyConfig::new().struct_names(false))
    }

    /// Checks that need the whole spec (single values are checked while parsing).
    fn validate(&self, file: &Path) -> Result<(), TaskError> {
        let invalid = |node: String, message: String| TaskError::Invalid {
            file: file.to_path_buf(),
            node,
            message,
        };
        if self.tools.is_empty() {
            return Err(invalid(
                "tools".into(),
                "an agent with no tools cannot act: list at least one".into(),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, tool) in self.tools.iter().enumerate() {
            if tool.trim().is_empty() {
                return Err(invalid(format!("tools[{i}]"), "empty tool name".into()));
            }
            if !seen.insert(tool.as_str()) {
                return Err(invalid(
                    format!("tools[{i}]"),
                    format!("`{tool}` is listed twice"),
                ));
            }
        }
        for (id, grader) in &self.graders {
            let node = grader_node(id);
            match grader {
                GraderSpec::Check(check) => {
                    if check.command.trim().is_empty() {
                        return Err(invalid(node, "the check's `command` is empty".into()));
                    }
                    // The sandbox refuses longer arguments; refusing here names the task
                    // instead of failing every grading with an infrastructure error.
                    if check.command.len() > MAX_ARGUMENT_BYTES {
                        return Err(invalid(
                            node,
                            format!(
                                "the check's `command` is {} bytes, over the {MAX_ARGUMENT_BYTES}-byte limit",
                                check.command.len()
                            ),
                        ));
                    }
                    if check.exit_code.is_none()
                        && check.stdout.is_none()
                        && check.stdout_contains.is_none()
                    {
                        return Err(invalid(
                            node,
                            "the check sets no condition (exit_code, stdout, stdout_contains): \
                             it would pass every submission"
                                .into(),
                        ));
                    }
                }
                GraderSpec::Llm(llm) => {
                    if llm.files.is_empty() {
                        return Err(invalid(
                            node,
                            "an LLM grader needs at least one file to read".into(),
                        ));
                    }
                    if llm.files.len() > MAX_LLM_FILES {
                        return Err(invalid(
                            node,
                            format!(
                                "{} files, more than the {MAX_LLM_FILES} an LLM grader may read",
                                llm.files.len()
                            ),
                        ));
                    }
                    for (i, f) in llm.files.iter().enumerate() {
                        // The judge reads these on the host: a path that could leave the
                        // episode's directory would let a task read any host file.
                        if let Err(why) = check_relative(f) {
                            return Err(invalid(format!("{node}.files[{i}]"), why));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The node path of a grader, as errors print it.
pub fn grader_node(id: &str) -> String {
    format!("graders[{id:?}]")
}

/// A path that stays inside the directory it is joined to: relative, no `..`, not empty.
fn check_relative(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    for c in Path::new(path).components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(format!("`{path}` leaves the episode directory")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "`{path}` is absolute: name files relative to the episode directory"
                ))
            }
        }
    }
    Ok(())
}

fn positive_optional_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<HumanDuration>, D::Error> {
    let v = Option::<HumanDuration>::deserialize(d)?;
    if v.is_some_and(|v| v.0.is_zero()) {
        return Err(serde::de::Error::custom(
            "expected a positive duration, like \"30m\"",
        ));
    }
    Ok(v)
}

/// A map that refuses a repeated key.
fn unique_keys<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, GraderSpec>, D::Error> {
    struct Unique;
    impl<'de> Visitor<'de> for Unique {
        type Value = BTreeMap<String, GraderSpec>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map from rubric leaf ids to graders")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                if out.contains_key(&key) {
                    return Err(serde::de::Error::custom(format!(
                        "leaf `{key}` has two graders: a leaf has exactly one"
                    )));
                }
                let value = map.next_value::<GraderSpec>()?;
                out.insert(key, value);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique)
}

/// Reads a UTF-8 file of at most `limit` bytes.
fn read_bounded(file: &Path, limit: u64) -> Result<String, TaskError> {
    let io = |source| TaskError::Io {
        path: file.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(file).map_err(io)?;
    let mut bytes = Vec::new();
    // Bounded by the read itself, not only by the metadata: the file may grow meanwhile.
    f.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(TaskError::File {
            file: file.to_path_buf(),
            message: format!("over the {limit}-byte limit"),
        });
    }
    String::from_utf8(bytes).map_err(|e| TaskError::File {
        file: file.to_path_buf(),
        message: format!("not UTF-8 (at byte {})", e.utf8_error().valid_up_to()),
    })
}

/// Parses and validates `rubric.json`. Parsed here rather than by `RubricNode::load` so that
/// the read is bounded and a syntax error names its field path as well as its line and column
/// (serde_json's own recursion limit bounds the nesting).
fn load_rubric(file: &Path) -> Result<RubricNode, TaskError> {
    let text = read_bounded(file, MAX_RUBRIC_BYTES)?;
    let mut de = serde_json::Deserializer::from_str(&text);
    let rubric: RubricNode = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| json_syntax(file, e.path().to_string(), &e.into_inner()))?;
    de.end().map_err(|e| json_syntax(file, String::new(), &e))?;
    rubric.validate().map_err(|source| TaskError::Rubric {
        file: file.to_path_buf(),
        source,
    })?;
    Ok(rubric)
}

fn json_syntax(file: &Path, node: String, e: &serde_json::Error) -> TaskError {
    let message = e.to_string();
    // serde_json ends its message with the position, which the error already leads with.
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    TaskError::Syntax {
        file: file.to_path_buf(),
        line: e.line(),
        col: e.column(),
        node,
        message: message
            .strip_suffix(&suffix)
            .unwrap_or(&message)
            .to_string(),
    }
}

/// A rubric node and its path from the root, written like `RubricError`'s paths:
/// `root "r" > [1] "b" > [0] "leaf"`.
struct Located<'a> {
    node: &'a RubricNode,
    path: String,
}

/// Every node of the tree with its path, depth first. Iterative: a deep tree from a file
/// must not overflow the stack.
fn nodes_with_paths(root: &RubricNode) -> Vec<Located<'_>> {
    let mut out = Vec::new();
    let mut stack = vec![Located {
        node: root,
        path: format!("root {:?}", root.id),
    }];
    while let Some(here) = stack.pop() {
        for (i, child) in here.node.sub_tasks.iter().enumerate().rev() {
            let path = format!("{} > [{i}] {:?}", here.path, child.id);
            stack.push(Located { node: child, path });
        }
        out.push(here);
    }
    out
}

/// Every rubric leaf has exactly one grader, and every grader names a leaf. The rubric is
/// already valid: ids are unique, except for copies of one leaf, which are one criterion and
/// share one grader.
fn check_graders(dir: &Path, rubric: &RubricNode, spec: &TaskSpec) -> Result<(), TaskError> {
    let spec_file = dir.join(SPEC_FILE);
    let nodes = nodes_with_paths(rubric);
    let mut by_id: HashMap<&str, &Located<'_>> = HashMap::new();
    for n in &nodes {
        by_id.entry(n.node.id.as_str()).or_insert(n);
    }
    for n in &nodes {
        if n.node.sub_tasks.is_empty() && !spec.graders.contains_key(&n.node.id) {
            return Err(TaskError::Invalid {
                file: spec_file,
                node: grader_node(&n.node.id),
                message: format!(
                    "missing: rubric leaf `{}` ({RUBRIC_FILE}: {}) has no grader: each leaf has exactly one",
                    n.node.id, n.path
                ),
            });
        }
    }
    for id in spec.graders.keys() {
        let message = match by_id.get(id.as_str()) {
            None => format!("the rubric has no node with id `{id}`"),
            Some(n) if !n.node.sub_tasks.is_empty() => format!(
                "rubric node `{id}` ({RUBRIC_FILE}: {}) is not a leaf: its score comes from its sub_tasks",
                n.path
            ),
            Some(_) => continue,
        };
        return Err(TaskError::Invalid {
            file: spec_file,
            node: grader_node(id),
            message,
        });
    }
    Ok(())
}

impl Task {
    /// Loads and validates the task folder `dir`.
    pub fn load(dir: &Path) -> Result<Task, TaskError> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| TaskError::File {
                file: dir.to_path_buf(),
                message: "a task folder needs a UTF-8 name".into(),
            })?
            .to_string();
        let meta = std::fs::metadata(dir).map_err(|source| TaskError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(TaskError::File {
                file: dir.to_path_buf(),
                message: "not a directory".into(),
            });
        }
        for required in [SPEC_FILE, PAPER_FILE, RUBRIC_FILE] {
            let file = dir.join(required);
            if !file.is_file() {
                return Err(TaskError::File {
                    file,
                    message: format!(
                        "missing: a task folder holds {PAPER_FILE}, {RUBRIC_FILE}, {SPEC_FILE} and optionally {FILES_DIR}/"
                    ),
                });
            }
        }
        let spec_file = dir.join(SPEC_FILE);
        let spec = TaskSpec::parse(&spec_file, &read_bounded(&spec_file, MAX_TASK_RON_BYTES)?)?;
        let paper = read_bounded(&dir.join(PAPER_FILE), MAX_PAPER_BYTES)?;
        let rubric = load_rubric(&dir.join(RUBRIC_FILE))?;
        check_graders(dir, &rubric, &spec)?;
        let files = dir.join(FILES_DIR);
        match std::fs::symlink_metadata(&files) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(TaskError::File {
                    file: files,
                    message: "must be a directory (the episode's initial files)".into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TaskError::Io {
                    path: files,
                    source,
                })
            }
        }
        Ok(Task {
            name,
            dir: dir.to_path_buf(),
            paper,
            rubric,
            spec,
        })
    }

    /// The episode's initial files (may not exist: then the episode starts empty).
    pub fn files_dir(&self) -> PathBuf {
        self.dir.join(FILES_DIR)
    }

    /// Copies the initial files into the episode directory `dest` (symlinks and special files
    /// are skipped, see [`copy_tree`]).
    pub fn copy_files_into(&self, dest: &Path, bounds: CopyBounds) -> Result<CopyStats, CopyError> {
        let src = self.files_dir();
        if !src.is_dir() {
            std::fs::create_dir_all(dest).map_err(|source| CopyError::Io {
                path: dest.to_path_buf(),
                source,
            })?;
            return Ok(CopyStats::default());
        }
        copy_tree(&src, dest, bounds)
    }

    /// Every tool the task allows exists in `registry` and is offered to agents.
    pub fn check_tools(&self, registry: &ToolRegistry) -> Result<(), TaskError> {
        for (i, tool) in self.spec.tools.iter().enumerate() {
            let message = match registry.get(tool) {
                None => format!("there is no tool `{tool}` in the registry"),
                Some(t) if !t.manifest.agent => {
                    format!("`{tool}` is a grader-only tool, not offered to agents")
                }
                Some(_) => continue,
            };
            return Err(TaskError::Invalid {
                file: self.dir.join(SPEC_FILE),
                node: format!("tools[{i}]"),
                message,
            });
        }
        Ok(())
    }
}

impl TaskSet {
    /// Loads every subfolder of `dir` that has a `task.ron`, sorted by name. A subfolder with
    /// a `paper.md` or `rubric.json` but no `task.ron` is an error (a task missing its spec
    /// should not vanish silently); other entries are skipped.
    pub fn load_dir(dir: &Path) -> Result<TaskSet, TaskError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TaskError::Io { path, source }
        };
        let mut folders = Vec::new();
        for (scanned, entry) in std::fs::read_dir(dir).map_err(io(dir))?.enumerate() {
            if scanned >= MAX_SCANNED_ENTRIES {
                return Err(TaskError::TooMany {
                    dir: dir.to_path_buf(),
                    limit: MAX_SCANNED_ENTRIES,
                    what: "entries",
                });
            }
            let path = entry.map_err(io(dir))?.path();
            if !path.is_dir() {
                continue;
            }
            if path.join(SPEC_FILE).is_file() {
                if folders.len() >= MAX_TASKS {
                    return Err(TaskError::TooMany {
                        dir: dir.to_path_buf(),
                        limit: MAX_TASKS,
                        what: "task folders",
                    });
                }
                folders.push(path);
            } else if path.join(PAPER_FILE).exists() || path.join(RUBRIC_FILE).exists() {
                return Err(TaskError::File {
                    file: path.join(SPEC_FILE),
                    message: format!(
                        "missing: the folder has {PAPER_FILE} or {RUBRIC_FILE}, so it is a task, but no {SPEC_FILE}"
                    ),
                });
            }
        }
        folders.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        let tasks = folders
            .iter()
            .map(|f| Task::load(f))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TaskSet { tasks })
    }

    pub fn get(&self, name: &str) -> Option<&Task> {
        self.tasks.iter().find(|t| t.name == name)
    }
}

/// Bounds of [`copy_tree`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyBounds {
    /// Files and directories copied.
    pub max_entries: u64,
    /// Bytes of file contents copied.
    pub max_bytes: u64,
}

impl Default for CopyBounds {
    /// Above the sandbox's default episode budget (20,000 files, 1 GiB), so that what an
    /// episode could write fits, with room for the task's own files.
    fn default() -> Self {
        CopyBounds {
            max_entries: 100_000,
            max_bytes: 2 << 30,
        }
    }
}

/// What [`copy_tree`] copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Symlinks and special files (FIFOs, sockets, devices) left out.
    pub skipped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The tree is larger than the bounds.
    #[error("{}: over the copy bound of {limit} {what}", src.display())]
    Bound {
        src: PathBuf,
        limit: u64,
        what: &'static str,
    },
}

/// Copies the tree under `src` into `dst` (created if needed), within `bounds`.
///
/// Only regular files and directories are copied: symlinks are never followed (one could
/// point anywhere on the host), and FIFOs or devices are never opened (reading one could
/// block or never end). The walk is iterative, so depth cannot overflow the stack. It assumes
/// nothing modifies `src` meanwhile (a finished episode's files, or a task's).
pub fn copy_tree(src: &Path, dst: &Path, bounds: CopyBounds) -> Result<CopyStats, CopyError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CopyError::Io { path, source }
    };
    let bound = |limit, what| CopyError::Bound {
        src: src.to_path_buf(),
        limit,
        what,
    };
    std::fs::create_dir_all(dst).map_err(io(dst))?;
    let mut stats = CopyStats::default();
    let mut stack = vec![(src.to_path_buf(), dst.to_path_buf())];
    while let Some((from_dir, to_dir)) = stack.pop() {
        for entry in std::fs::read_dir(&from_dir).map_err(io(&from_dir))? {
            let entry = entry.map_err(io(&from_dir))?;
            let from = entry.path();
            let to = to_dir.join(entry.file_name());
            // `DirEntry::file_type` does not follow symlinks.
            let kind = entry.file_type().map_err(io(&from))?;
            if !(kind.is_dir() || kind.is_file()) {
                stats.skipped += 1;
                continue;
            }
            if stats.files + stats.dirs >= bounds.max_entries {
                return Err(bound(bounds.max_entries, "files and directories"));
            }
            if kind.is_dir() {
                std::fs::create_dir(&to).map_err(io(&to))?;
                stats.dirs += 1;
                stack.push((from, to));
                continue;
            }
            let input = std::fs::File::open(&from).map_err(io(&from))?;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&to)
                .map_err(io(&to))?;
            let left = bounds.max_bytes.saturating_sub(stats.bytes);
            // Bounded by the read, not the metadata: a file's size may differ from what it
            // yields.
            let copied = std::io::copy(&mut input.take(left.saturating_add(1)), &mut out)
                .map_err(io(&to))?;
            if copied > left {
                return Err(bound(bounds.max_bytes, "bytes"));
            }
            out.flush().map_err(io(&to))?;
            stats.bytes += copied;
            stats.files += 1;
        }
    }
    Ok(stats)
}
