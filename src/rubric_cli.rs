//! `klongd rubric score`: scores a rubric from a grades file and prints the scored tree, so
//! that a judge's verdicts can be audited and checked against PaperBench's scores.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use klong_actors::judge::rubric::{score, RubricNode, Variant};
use serde_json::Value;

/// Loads `rubric` and `grades` (a JSON object: leaf id -> 0/1, as numbers or booleans) and
/// returns pretty JSON `{ "root_score", "variant", "tree" }`. Errors name the file at fault.
pub fn score_command(rubric: &Path, grades: &Path, variant: Variant) -> anyhow::Result<String> {
    let tree = RubricNode::load(rubric)?;
    let grade_map = load_grades(grades)?;
    let scored = score(&tree, &grade_map, variant)
        .with_context(|| format!("scoring {} with {}", rubric.display(), grades.display()))?;
    let out = serde_json::json!({
        "root_score": scored.score,
        "variant": variant.as_str(),
        "tree": scored,
    });
    Ok(serde_json::to_string_pretty(&out)?)
}

fn load_grades(path: &Path) -> anyhow::Result<BTreeMap<String, f64>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let raw: BTreeMap<String, Value> = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a JSON object of leaf id -> 0 or 1", path.display()))?;
    let mut grades = BTreeMap::new();
    for (id, value) in raw {
        // Booleans are accepted because judges naturally write pass/fail as true/false;
        // the 0/1 check itself is the scorer's.
        let grade = match &value {
            Value::Bool(b) => f64::from(u8::from(*b)),
            Value::Number(n) => match n.as_f64() {
                Some(g) => g,
                None => bail!("{}: grade for {id:?} is not a number", path.display()),
            },
            other => bail!(
                "{}: grade for {id:?} must be 0, 1, true or false, not {other}",
                path.display()
            ),
        };
        grades.insert(id, grade);
    }
    Ok(grades)
}
