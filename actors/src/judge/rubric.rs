//! Rubric trees in PaperBench's schema (`rubric.json`), and their scores.
//!
//! Parsing, validation and scoring follow PaperBench (openai/preparedness, now
//! openai/frontier-evals, `project/paperbench`): `paperbench/rubric/tasks.py` (`TaskNode`,
//! `code_only`, `resources_provided`), `paperbench/grade.py` (how the variants are applied) and
//! `score_from_children` (the weighted mean). Where klongd is stricter than PaperBench, the
//! item says so.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// Deepest tree accepted (the root is at depth 1). serde_json stops at 128 nested JSON values,
/// and each rubric level costs two (the node object and its `sub_tasks` array), so anything
/// deeper could not be parsed anyway; PaperBench's real rubrics reach depth 10.
pub const MAX_DEPTH: usize = 60;
/// Most nodes accepted: the largest real rubric has 2,551.
pub const MAX_NODES: usize = 100_000;

/// The finegrained category that [`Variant::ResourcesProvided`] weighs 0.
pub const DATASET_AND_MODEL_ACQUISITION: &str = "Dataset and Model Acquisition";

/// The finegrained categories PaperBench accepts (`VALID_FINEGRAINED_TASK_CATEGORIES`).
pub const FINEGRAINED_TASK_CATEGORIES: [&str; 7] = [
    "Environment & Infrastructure Setup",
    DATASET_AND_MODEL_ACQUISITION,
    "Data Processing & Preparation",
    "Method Implementation",
    "Experimental Setup",
    "Evaluation, Metrics & Benchmarking",
    "Logging, Analysis & Presentation",
];

/// One node of a rubric tree, field for field as PaperBench writes it.
///
/// Serialization writes every field, `null` included, like PaperBench's `TaskNode.to_dict`
/// (and its files), and integral weights as integers, so that a parsed file serializes back to
/// an equal JSON value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RubricNode {
    pub id: String,
    pub requirements: String,
    /// Relative weight among siblings; PaperBench writes integers, >= 0.
    #[serde(serialize_with = "serialize_weight")]
    pub weight: f64,
    #[serde(default)]
    pub sub_tasks: Vec<RubricNode>,
    /// Set on leaves only. `Option` accepts an explicit `null` as well as an absent field.
    #[serde(default)]
    pub task_category: Option<TaskCategory>,
    #[serde(default)]
    pub finegrained_task_category: Option<String>,
}

/// What a leaf asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskCategory {
    #[serde(rename = "Code Development")]
    CodeDevelopment,
    #[serde(rename = "Code Execution")]
    CodeExecution,
    #[serde(rename = "Result Analysis")]
    ResultAnalysis,
}

impl TaskCategory {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskCategory::CodeDevelopment => "Code Development",
            TaskCategory::CodeExecution => "Code Execution",
            TaskCategory::ResultAnalysis => "Result Analysis",
        }
    }
}

/// Integral weights go out as integers: PaperBench's files hold integers, and serde_json's
/// `1.0` would not compare equal to the file's `1` as a JSON value (nor hash the same).
fn serialize_weight<S: Serializer>(weight: &f64, s: S) -> Result<S::Ok, S::Error> {
    // 2^53: beyond it not every integer is an f64, so the cast could change the value.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if weight.fract() == 0.0 && weight.abs() <= EXACT {
        s.serialize_i64(*weight as i64)
    } else {
        s.serialize_f64(*weight)
    }
}

/// Where a node sits: the root's id, then for each step down the child's index and id, e.g.
/// `root 9930b3ea… > [1] bam-implementation > [0] 5c2a…`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodePath(Vec<(Option<usize>, String)>);

impl NodePath {
    fn root(id: &str) -> Self {
        NodePath(vec![(None, id.to_string())])
    }

    fn child(&self, index: usize, id: &str) -> Self {
        let mut steps = self.0.clone();
        steps.push((Some(index), id.to_string()));
        NodePath(steps)
    }

    /// The node's own id.
    pub fn id(&self) -> &str {
        self.0.last().map(|(_, id)| id.as_str()).unwrap_or("")
    }

    /// The child indices from the root, e.g. `sub_tasks[1].sub_tasks[0]` is `[1, 0]`.
    pub fn indices(&self) -> Vec<usize> {
        self.0.iter().filter_map(|(i, _)| *i).collect()
    }
}

impl fmt::Display for NodePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, (index, id)) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str(" > ")?;
            }
            match index {
                None => write!(f, "root {id:?}")?,
                Some(i) => write!(f, "[{i}] {id:?}")?,
            }
        }
        Ok(())
    }
}

/// What is wrong with one node.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error("a leaf (no sub_tasks) must have a task_category")]
    LeafWithoutCategory,
    #[error("a node with sub_tasks must not have a task_category (it has {0:?})")]
    NonLeafWithCategory(TaskCategory),
    #[error("weight must be a finite number >= 0, not {0}")]
    BadWeight(f64),
    #[error("id is empty")]
    EmptyId,
    #[error("id is also used by {first}, and the two are not the same leaf criterion")]
    DuplicateId { first: NodePath },
    #[error("unknown finegrained_task_category {0:?}")]
    UnknownFinegrainedCategory(String),
    #[error("the tree is deeper than {0} levels")]
    TooDeep(usize),
    #[error("the tree has more than {0} nodes")]
    TooManyNodes(usize),
    #[error("no grade for this leaf")]
    MissingGrade,
}

#[derive(Debug, thiserror::Error)]
pub enum RubricError {
    #[error("cannot read: {0}")]
    Read(#[source] std::io::Error),
    #[error("not a PaperBench rubric: {0}")]
    Parse(#[source] serde_json::Error),
    #[error("JSON nested deeper than {max} rubric levels")]
    NestedTooDeep { max: usize },
    #[error("at {at}: {problem}")]
    Invalid { at: NodePath, problem: Problem },
    #[error("grade for {id:?} must be 0 or 1, not {grade}")]
    BadGrade { id: String, grade: f64 },
    #[error("grade for {id:?}, which is not a leaf of the rubric")]
    UnknownGradeId { id: String },
    /// An error in a file, with the file's path.
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: Box<RubricError>,
    },
}

impl RubricError {
    fn invalid(at: NodePath, problem: Problem) -> Self {
        RubricError::Invalid { at, problem }
    }

    /// The error without its file wrapper.
    pub fn inner(&self) -> &RubricError {
        match self {
            RubricError::File { source, .. } => source.inner(),
            other => other,
        }
    }
}

impl RubricNode {
    /// Parses a `rubric.json` and validates it.
    pub fn parse(json: &str) -> Result<RubricNode, RubricError> {
        let node = Self::parse_unvalidated(json)?;
        node.validate()?;
        Ok(node)
    }

    /// Parses without validating: for looking at trees PaperBench itself accepts but klongd
    /// does not (see [`RubricNode::validate`]).
    pub fn parse_unvalidated(json: &str) -> Result<RubricNode, RubricError> {
        // Checked before serde so that hostile nesting gets a clear error rather than
        // serde_json's recursion-limit message (and never approaches the stack's end).
        if json_nesting(json) > 2 * MAX_DEPTH {
            return Err(RubricError::NestedTooDeep { max: MAX_DEPTH });
        }
        serde_json::from_str(json).map_err(RubricError::Parse)
    }

    /// Reads, parses and validates a rubric file; errors name the file.
    pub fn load(path: &Path) -> Result<RubricNode, RubricError> {
        let in_file = |e: RubricError| RubricError::File {
            path: path.to_path_buf(),
            source: Box::new(e),
        };
        let text = std::fs::read_to_string(path)
            .map_err(RubricError::Read)
            .map_err(in_file)?;
        Self::parse(&text).map_err(in_file)
    }

    pub fn is_leaf(&self) -> bool {
        self.sub_tasks.is_empty()
    }

    /// Checks the tree, iteratively so that a tree built in code cannot exhaust the stack
    /// before its depth is checked:
    /// - a leaf has a task_category, a node with sub_tasks has none (PaperBench's checks);
    /// - weights are finite and >= 0 (PaperBench: >= 0);
    /// - a finegrained_task_category, where set, is one PaperBench knows;
    /// - ids are non-empty and unique, except that the same leaf may appear more than once:
    ///   two real rubrics (bbox, bridging-data-gaps) repeat a leaf, identical in id,
    ///   requirements and categories, under different parents. Such copies are one criterion
    ///   and take one grade. PaperBench does not check ids at all; klongd must, since grades
    ///   are keyed by leaf id;
    /// - at most [`MAX_DEPTH`] levels and [`MAX_NODES`] nodes.
    pub fn validate(&self) -> Result<(), RubricError> {
        let mut seen: HashMap<&str, (NodePath, &RubricNode)> = HashMap::new();
        let mut count = 0usize;
        let mut stack: Vec<(&RubricNode, NodePath)> = vec![(self, NodePath::root(&self.id))];
        while let Some((node, path)) = stack.pop() {
            count += 1;
            if count > MAX_NODES {
                return Err(RubricError::invalid(path, Problem::TooManyNodes(MAX_NODES)));
            }
            if path.0.len() > MAX_DEPTH {
                return Err(RubricError::invalid(path, Problem::TooDeep(MAX_DEPTH)));
            }
            node.check_own_fields(&path)?;
            if let Some((first, other)) = seen.get(node.id.as_str()) {
                let same_leaf = node.is_leaf()
                    && other.is_leaf()
                    && node.requirements == other.requirements
                    && node.task_category == other.task_category
                    && node.finegrained_task_category == other.finegrained_task_category;
                if !same_leaf {
                    let first = first.clone();
                    return Err(RubricError::invalid(path, Problem::DuplicateId { first }));
                }
            } else {
                seen.insert(&node.id, (path.clone(), node));
            }
            // Reversed so that nodes are checked in document order and the first of two
            // duplicates is the one reported as `first`.
            for (i, child) in node.sub_tasks.iter().enumerate().rev() {
                stack.push((child, path.child(i, &child.id)));
            }
        }
        Ok(())
    }

    fn check_own_fields(&self, path: &NodePath) -> Result<(), RubricError> {
        let problem = if self.id.is_empty() {
            Some(Problem::EmptyId)
        } else if !(self.weight.is_finite() && self.weight >= 0.0) {
            Some(Problem::BadWeight(self.weight))
        } else if self.is_leaf() && self.task_category.is_none() {
            Some(Problem::LeafWithoutCategory)
        } else if let (false, Some(c)) = (self.is_leaf(), self.task_category) {
            Some(Problem::NonLeafWithCategory(c))
        } else {
            match &self.finegrained_task_category {
                Some(f) if !FINEGRAINED_TASK_CATEGORIES.contains(&f.as_str()) => {
                    Some(Problem::UnknownFinegrainedCategory(f.clone()))
                }
                _ => None,
            }
        };
        match problem {
            Some(problem) => Err(RubricError::invalid(path.clone(), problem)),
            None => Ok(()),
        }
    }

    /// The leaves, depth first, left to right (PaperBench's `get_leaf_nodes` order).
    pub fn leaves(&self) -> Leaves<'_> {
        Leaves { stack: vec![self] }
    }

    /// All nodes of the tree, the root included.
    pub fn node_count(&self) -> usize {
        let mut count = 0;
        let mut stack = vec![self];
        while let Some(node) = stack.pop() {
            count += 1;
            stack.extend(node.sub_tasks.iter());
        }
        count
    }

    /// SHA-256 (hex) of the canonical serialization: compact JSON, fields in schema order,
    /// `null`s written, integral weights as integers. Equal trees hash equal whatever the
    /// file's whitespace or key order.
    pub fn content_hash(&self) -> String {
        // Serializing plain strings, numbers and vectors cannot fail.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(&bytes))
    }
}

/// Iterator over a tree's leaves; see [`RubricNode::leaves`].
pub struct Leaves<'a> {
    stack: Vec<&'a RubricNode>,
}

impl<'a> Iterator for Leaves<'a> {
    type Item = &'a RubricNode;

    fn next(&mut self) -> Option<&'a RubricNode> {
        while let Some(node) = self.stack.pop() {
            if node.is_leaf() {
                return Some(node);
            }
            self.stack.extend(node.sub_tasks.iter().rev());
        }
        None
    }
}

/// Deepest nesting of JSON arrays and objects in `json`, ignoring brackets inside strings.
fn json_nesting(json: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Which leaves count, as in PaperBench's `grade.py`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// Every leaf.
    #[default]
    Full,
    /// `TaskNode.code_only()`: only Code Development leaves. Other leaves are removed, and so is
    /// a non-leaf left with no children; removal is by category, not by weight, so a kept
    /// subtree whose Code Development leaves all weigh 0 still weighs in its parent and scores
    /// 0 there. When no Code Development leaf is left at all, PaperBench grades the root
    /// itself as one Code Development leaf (`code_only() or root.set_task_category("Code
    /// Development").set_sub_tasks([])`), so the grade for the root's id is then required.
    CodeDev,
    /// `TaskNode.resources_provided()`: leaves whose finegrained category is "Dataset and
    /// Model Acquisition" weigh 0. Nothing else changes: a non-leaf whose leaves all weigh 0
    /// keeps its own weight and scores 0 (`score_from_children`), which pulls its parent
    /// down even when every leaf passes.
    ResourcesProvided,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Full => "full",
            Variant::CodeDev => "code-dev",
            Variant::ResourcesProvided => "resources-provided",
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Variant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(Variant::Full),
            "code-dev" => Ok(Variant::CodeDev),
            "resources-provided" => Ok(Variant::ResourcesProvided),
            other => Err(format!(
                "unknown rubric variant {other:?} (expected full, code-dev or resources-provided)"
            )),
        }
    }
}

/// A node with its score, as graded under a [`Variant`]: `weight` is the weight the variant
/// gives it, and nodes the variant removes are absent. Serializes like PaperBench's graded
/// tree (children under `sub_tasks`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoredNode {
    pub id: String,
    pub requirements: String,
    #[serde(serialize_with = "serialize_weight")]
    pub weight: f64,
    pub score: f64,
    pub task_category: Option<TaskCategory>,
    pub finegrained_task_category: Option<String>,
    #[serde(rename = "sub_tasks")]
    pub children: Vec<ScoredNode>,
}

/// Scores a tree from its leaves' grades (leaf id -> 0 or 1).
///
/// Each leaf the variant keeps needs a grade; grades must be exactly 0 or 1 and name leaves
/// of the tree (grades for leaves the variant drops are accepted and ignored, so one grades
/// file serves every variant). A non-leaf scores the weighted mean of its children, or 0
/// when their weights sum to 0 (PaperBench's `score_from_children`).
pub fn score(
    root: &RubricNode,
    grades: &BTreeMap<String, f64>,
    variant: Variant,
) -> Result<ScoredNode, RubricError> {
    // Validation also bounds the depth, which the recursion below relies on.
    root.validate()?;
    let no_code_dev = variant == Variant::CodeDev
        && !root
            .leaves()
            .any(|l| l.task_category == Some(TaskCategory::CodeDevelopment));
    for (id, &grade) in grades {
        if grade != 0.0 && grade != 1.0 {
            return Err(RubricError::BadGrade {
                id: id.clone(),
                grade,
            });
        }
        let known = root.leaves().any(|l| &l.id == id) || (no_code_dev && *id == root.id);
        if !known {
            return Err(RubricError::UnknownGradeId { id: id.clone() });
        }
    }
    let path = NodePath::root(&root.id);
    if no_code_dev {
        let grade = grades
            .get(&root.id)
            .ok_or_else(|| RubricError::invalid(path, Problem::MissingGrade))?;
        return Ok(ScoredNode {
            id: root.id.clone(),
            requirements: root.requirements.clone(),
            weight: root.weight,
            score: *grade,
            task_category: Some(TaskCategory::CodeDevelopment),
            finegrained_task_category: root.finegrained_task_category.clone(),
            children: Vec::new(),
        });
    }
    // The root always survives here: under CodeDev it has a Code Development leaf.
    Ok(
        score_node(root, &path, grades, variant)?.unwrap_or_else(|| ScoredNode {
            id: root.id.clone(),
            requirements: root.requirements.clone(),
            weight: 0.0,
            score: 0.0,
            task_category: root.task_category,
            finegrained_task_category: root.finegrained_task_category.clone(),
            children: Vec::new(),
        }),
    )
}

/// `None` when the variant removes the node.
fn score_node(
    node: &RubricNode,
    path: &NodePath,
    grades: &BTreeMap<String, f64>,
    variant: Variant,
) -> Result<Option<ScoredNode>, RubricError> {
    let mut weight = node.weight;
    let (score, children) = if node.is_leaf() {
        match variant {
            Variant::CodeDev if node.task_category != Some(TaskCategory::CodeDevelopment) => {
                return Ok(None)
            }
            Variant::ResourcesProvided
                if node.finegrained_task_category.as_deref()
                    == Some(DATASET_AND_MODEL_ACQUISITION) =>
            {
                weight = 0.0
            }
            _ => {}
        }
        let grade = grades
            .get(&node.id)
            .ok_or_else(|| RubricError::invalid(path.clone(), Problem::MissingGrade))?;
        (*grade, Vec::new())
    } else {
        let mut children = Vec::with_capacity(node.sub_tasks.len());
        for (i, child) in node.sub_tasks.iter().enumerate() {
            if let Some(scored) = score_node(child, &path.child(i, &child.id), grades, variant)? {
                children.push(scored);
            }
        }
        if children.is_empty() {
            // Only CodeDev removes nodes: a non-leaf with no Code Development leaf goes too.
            return Ok(None);
        }
        (score_from_children(&children), children)
    };
    Ok(Some(ScoredNode {
        id: node.id.clone(),
        requirements: node.requirements.clone(),
        weight,
        score,
        task_category: node.task_category,
        finegrained_task_category: node.finegrained_task_category.clone(),
        children,
    }))
}

/// PaperBench's `score_from_children`: the weighted mean, or 0 when the weights sum to 0.
fn score_from_children(children: &[ScoredNode]) -> f64 {
    let total: f64 = children.iter().map(|c| c.weight).sum();
    if total == 0.0 {
        return 0.0;
    }
    children.iter().map(|c| c.score * c.weight).sum::<f64>() / total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_ignores_brackets_in_strings() {
        assert_eq!(json_nesting(r#"{"a": "[[{{\"]]", "b": [[1]]}"#), 3);
    }

    #[test]
    fn integral_weights_serialize_as_integers() {
        let node = RubricNode::parse(
            r#"{"id":"a","requirements":"r","weight":3,"task_category":"Code Development"}"#,
        )
        .expect("valid");
        let json = serde_json::to_string(&node).expect("serializes");
        assert!(json.contains(r#""weight":3,"#), "{json}");
        assert!(
            json.contains(r#""finegrained_task_category":null"#),
            "{json}"
        );
    }

    #[test]
    fn node_path_reads_well() {
        let path = NodePath::root("r").child(2, "x").child(0, "y");
        assert_eq!(path.to_string(), r#"root "r" > [2] "x" > [0] "y""#);
        assert_eq!(path.indices(), vec![2, 0]);
        assert_eq!(path.id(), "y");
    }
}
