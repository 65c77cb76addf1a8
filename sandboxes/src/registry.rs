//! Tools: a WASI command module (or the host-side shell) plus a manifest that says how the
//! agent calls it. A [`ToolRegistry`] loads every manifest of a directory.
//!
//! A manifest file (`*.json`) holds one tool object or an array of them:
//! ```json
//! { "name": "read_file_chunk",
//!   "description": "Print lines of a file with line numbers.",
//!   "module": "../wasm/coreutils.wasm",      // relative to the manifest; or "builtin": "shell"
//!   "argv0": "read_file_chunk",              // argv[0] (default: name)
//!   "command": false,                        // runnable by name inside `bash` (default false)
//!   "agent": true,                           // offered to the agent (default true)
//!   "parameters": { "type": "object", "properties": { ... }, "required": [ ... ] },
//!   "argv": [ {"param": "path"}, {"lit": "-n"}, {"param": "all", "flag": "--all"},
//!             {"param": "args", "spread": true} ],
//!   "stdin": "content" }                     // parameter fed to stdin
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use wasmtime::InstancePre;

use crate::call::CallState;
use crate::host::SandboxHost;
use crate::SandboxError;

/// Most manifests one registry directory may hold.
const MAX_MANIFEST_FILES: usize = 1_000;
/// Largest manifest file read.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Largest argument payload (all argv strings plus stdin) of one call.
pub const MAX_ARGUMENT_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolManifest {
    pub name: String,
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<Builtin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv0: Option<String>,
    #[serde(default)]
    pub command: bool,
    #[serde(default = "yes")]
    pub agent: bool,
    pub parameters: Value,
    #[serde(default)]
    pub argv: Vec<ArgvPart>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

impl ToolManifest {
    /// The guest's `argv[0]`: `argv0`, else the tool's name.
    pub fn program_name(&self) -> String {
        self.argv0.clone().unwrap_or_else(|| self.name.clone())
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Builtin {
    /// The host-side shell that runs pipelines of registry commands.
    Shell,
}

/// One piece of a tool's argv.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum ArgvPart {
    Literal {
        lit: String,
    },
    Param {
        param: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        flag: Option<String>,
        #[serde(default)]
        spread: bool,
    },
}

/// A compiled module, compiled on first use and then shared by every call.
pub struct ToolModule {
    pub path: PathBuf,
    pre: Mutex<Option<InstancePre<CallState>>>,
}

impl ToolModule {
    pub fn new(path: PathBuf) -> Self {
        ToolModule {
            path,
            pre: Mutex::new(None),
        }
    }

    pub(crate) fn instance_pre(
        &self,
        host: &SandboxHost,
    ) -> Result<InstancePre<CallState>, SandboxError> {
        let mut slot = self.pre.lock().unwrap_or_else(|p| p.into_inner());
        // A registry may serve several hosts (tests do); a prepared module belongs to one engine.
        if let Some(pre) = slot
            .as_ref()
            .filter(|pre| wasmtime::Engine::same(pre.module().engine(), host.engine()))
        {
            return Ok(pre.clone());
        }
        let pre = host.prepare(&self.path)?;
        *slot = Some(pre.clone());
        Ok(pre)
    }
}

pub enum ToolKind {
    Module(Arc<ToolModule>),
    Shell,
}

pub struct Tool {
    pub manifest: ToolManifest,
    pub kind: ToolKind,
    /// Where the manifest came from, for error messages.
    pub source: PathBuf,
}

/// Every tool of a directory, by name.
#[derive(Default)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Tool>,
}

fn manifest_error(path: &Path, reason: impl Into<String>) -> SandboxError {
    SandboxError::Manifest {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl ToolRegistry {
    /// Loads every `*.json` manifest in `dir` (not recursive). Modules compile on first use.
    pub fn load_dir(dir: &Path) -> Result<ToolRegistry, SandboxError> {
        let entries = std::fs::read_dir(dir).map_err(|e| SandboxError::io(dir, e))?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| SandboxError::io(dir, e))?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                files.push(path);
            }
            if files.len() > MAX_MANIFEST_FILES {
                return Err(manifest_error(
                    dir,
                    format!("more than {MAX_MANIFEST_FILES} manifests"),
                ));
            }
        }
        files.sort();
        let mut registry = ToolRegistry::default();
        let mut modules: BTreeMap<PathBuf, Arc<ToolModule>> = BTreeMap::new();
        for file in files {
            let len = std::fs::metadata(&file)
                .map_err(|e| SandboxError::io(&file, e))?
                .len();
            if len > MAX_MANIFEST_BYTES {
                return Err(manifest_error(
                    &file,
                    format!("{len} bytes is over the 1 MiB manifest limit"),
                ));
            }
            let text = std::fs::read_to_string(&file).map_err(|e| SandboxError::io(&file, e))?;
            let value: Value = serde_json::from_str(&text).map_err(|e| {
                manifest_error(
                    &file,
                    format!("line {} column {}: {e}", e.line(), e.column()),
                )
            })?;
            let items = match value {
                Value::Array(items) => items,
                other => vec![other],
            };
            for (i, item) in items.into_iter().enumerate() {
                let manifest: ToolManifest = serde_json::from_value(item)
                    .map_err(|e| manifest_error(&file, format!("tool #{i}: {e}")))?;
                let base = file.parent().unwrap_or(Path::new("."));
                let kind = match (&manifest.module, manifest.builtin) {
                    (Some(module), None) => {
                        let path = base.join(module);
                        let shared = modules
                            .entry(path.clone())
                            .or_insert_with(|| Arc::new(ToolModule::new(path)))
                            .clone();
                        ToolKind::Module(shared)
                    }
                    (None, Some(Builtin::Shell)) => ToolKind::Shell,
                    _ => {
                        return Err(manifest_error(
                            &file,
                            format!(
                                "tool `{}`: give exactly one of `module` and `builtin`",
                                manifest.name
                            ),
                        ))
                    }
                };
                registry.insert(Tool {
                    manifest,
                    kind,
                    source: file.clone(),
                })?;
            }
        }
        Ok(registry)
    }

    /// Adds a tool after checking its manifest.
    pub fn insert(&mut self, tool: Tool) -> Result<(), SandboxError> {
        let m = &tool.manifest;
        let err =
            |reason: String| manifest_error(&tool.source, format!("tool `{}`: {reason}", m.name));
        if m.name.is_empty()
            || !m
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(err(
                "a name is made of ASCII letters, digits, `_` and `-`".into()
            ));
        }
        check_schema(&m.parameters).map_err(err)?;
        let props = m.parameters.get("properties").and_then(Value::as_object);
        let known = |p: &str| props.is_some_and(|props| props.contains_key(p));
        for part in &m.argv {
            if let ArgvPart::Param { param, .. } = part {
                if !known(param) {
                    return Err(err(format!(
                        "argv names `{param}`, which `parameters` does not declare"
                    )));
                }
            }
        }
        if let Some(stdin) = &m.stdin {
            if !known(stdin) {
                return Err(err(format!(
                    "stdin names `{stdin}`, which `parameters` does not declare"
                )));
            }
        }
        if self.tools.contains_key(&m.name) {
            return Err(err("declared twice".into()));
        }
        self.tools.insert(m.name.clone(), tool);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Tool> {
        self.tools.get(name)
    }

    pub fn tools(&self) -> impl Iterator<Item = &Tool> {
        self.tools.values()
    }

    /// The agent-visible tools as an OpenAI-style `tools` list.
    pub fn openai_tools(&self) -> Value {
        Value::Array(
            self.tools
                .values()
                .filter(|t| t.manifest.agent)
                .map(|t| {
                    serde_json::json!({
                        "type": "function",
                        "function": {
                            "name": t.manifest.name,
                            "description": t.manifest.description,
                            "parameters": t.manifest.parameters,
                        }
                    })
                })
                .collect(),
        )
    }

    /// Distinct modules, for warming the cache.
    pub fn modules(&self) -> Vec<Arc<ToolModule>> {
        let mut seen: BTreeMap<PathBuf, Arc<ToolModule>> = BTreeMap::new();
        for tool in self.tools.values() {
            if let ToolKind::Module(m) = &tool.kind {
                seen.entry(m.path.clone()).or_insert_with(|| m.clone());
            }
        }
        seen.into_values().collect()
    }
}

/// The JSON-schema subset manifests may use; anything else is rejected rather than ignored,
/// so that a schema never promises a check that does not happen.
fn check_schema(schema: &Value) -> Result<(), String> {
    let obj = schema
        .as_object()
        .ok_or("`parameters` must be a JSON object")?;
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "type" | "properties" | "required" | "additionalProperties" | "description"
        ) {
            return Err(format!(
                "`parameters` uses unsupported schema keyword `{key}`"
            ));
        }
    }
    if obj.get("type").and_then(Value::as_str) != Some("object") {
        return Err("`parameters.type` must be \"object\"".into());
    }
    let empty = Map::new();
    let props = match obj.get("properties") {
        None => &empty,
        Some(p) => p
            .as_object()
            .ok_or("`parameters.properties` must be an object")?,
    };
    for (name, prop) in props {
        let prop = prop
            .as_object()
            .ok_or(format!("property `{name}` must be an object"))?;
        for key in prop.keys() {
            if !matches!(
                key.as_str(),
                "type" | "description" | "enum" | "default" | "minimum" | "maximum" | "items"
            ) {
                return Err(format!(
                    "property `{name}` uses unsupported schema keyword `{key}`"
                ));
            }
        }
        match prop.get("type").and_then(Value::as_str) {
            Some("string" | "integer" | "number" | "boolean") => {}
            Some("array") => {
                let item_type = prop
                    .get("items")
                    .and_then(|i| i.get("type"))
                    .and_then(Value::as_str);
                if item_type != Some("string") {
                    return Err(format!(
                        "array property `{name}` must have `items: {{\"type\": \"string\"}}`"
                    ));
                }
            }
            other => return Err(format!("property `{name}` has unsupported type {other:?}")),
        }
    }
    if let Some(required) = obj.get("required") {
        let list = required.as_array().ok_or("`required` must be an array")?;
        for r in list {
            let r = r.as_str().ok_or("`required` holds property names")?;
            if !props.contains_key(r) {
                return Err(format!("`required` names undeclared property `{r}`"));
            }
        }
    }
    Ok(())
}

/// Checks `args` against a manifest's schema (unknown arguments are rejected) and fills in
/// declared defaults.
pub fn validate_arguments(schema: &Value, args: &Value) -> Result<Map<String, Value>, String> {
    let empty = Map::new();
    let given = match args {
        Value::Object(map) => map,
        Value::Null => &empty,
        _ => return Err("arguments must be a JSON object".into()),
    };
    let props = schema
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let mut out = Map::new();
    for (name, value) in given {
        let prop = props.get(name).ok_or_else(|| {
            format!(
                "unknown argument `{name}`; expected one of: {}",
                names(props)
            )
        })?;
        check_value(name, prop, value)?;
        out.insert(name.clone(), value.clone());
    }
    for (name, prop) in props {
        if !out.contains_key(name) {
            if let Some(default) = prop.get("default") {
                out.insert(name.clone(), default.clone());
            }
        }
    }
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for r in required.iter().filter_map(Value::as_str) {
            if !out.contains_key(r) {
                return Err(format!("missing required argument `{r}`"));
            }
        }
    }
    Ok(out)
}

fn names(props: &Map<String, Value>) -> String {
    props
        .keys()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_value(name: &str, prop: &Value, value: &Value) -> Result<(), String> {
    let ty = prop.get("type").and_then(Value::as_str).unwrap_or("string");
    let ok = match ty {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "array" => value
            .as_array()
            .is_some_and(|a| a.iter().all(Value::is_string)),
        _ => false,
    };
    if !ok {
        return Err(format!(
            "argument `{name}` must be of type {ty}, got {value}"
        ));
    }
    if let Some(options) = prop.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            return Err(format!(
                "argument `{name}` must be one of {}",
                Value::Array(options.clone())
            ));
        }
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = prop.get("minimum").and_then(Value::as_f64) {
            if n < min {
                return Err(format!("argument `{name}` must be >= {min}"));
            }
        }
        if let Some(max) = prop.get("maximum").and_then(Value::as_f64) {
            if n > max {
                return Err(format!("argument `{name}` must be <= {max}"));
            }
        }
    }
    Ok(())
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Builds argv and stdin from validated arguments.
pub fn build_invocation(
    manifest: &ToolManifest,
    args: &Map<String, Value>,
) -> (Vec<String>, Vec<u8>) {
    let mut argv = vec![manifest
        .argv0
        .clone()
        .unwrap_or_else(|| manifest.name.clone())];
    for part in &manifest.argv {
        match part {
            ArgvPart::Literal { lit } => argv.push(lit.clone()),
            ArgvPart::Param {
                param,
                flag,
                spread,
            } => {
                let Some(value) = args.get(param) else {
                    continue;
                };
                match (value, flag) {
                    (Value::Bool(b), Some(flag)) => {
                        if *b {
                            argv.push(flag.clone());
                        }
                    }
                    (Value::Array(items), _) if *spread => {
                        if let Some(flag) = flag {
                            argv.push(flag.clone());
                        }
                        argv.extend(items.iter().map(scalar));
                    }
                    (value, Some(flag)) => {
                        argv.push(flag.clone());
                        argv.push(scalar(value));
                    }
                    (value, None) => argv.push(scalar(value)),
                }
            }
        }
    }
    let stdin = manifest
        .stdin
        .as_ref()
        .and_then(|p| args.get(p))
        .map(|v| scalar(v).into_bytes())
        .unwrap_or_default();
    (argv, stdin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest() -> ToolManifest {
        serde_json::from_value(json!({
            "name": "read_file_chunk",
            "description": "d",
            "module": "x.wasm",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "start_line": {"type": "integer", "minimum": 1, "default": 1},
                    "all": {"type": "boolean"},
                    "rest": {"type": "array", "items": {"type": "string"}}
                },
                "required": ["path"]
            },
            "argv": [{"param": "all", "flag": "--all"}, {"param": "path"}, {"param": "start_line"},
                     {"param": "rest", "spread": true}]
        }))
        .unwrap()
    }

    #[test]
    fn arguments_are_checked_and_mapped() {
        let m = manifest();
        let args = validate_arguments(
            &m.parameters,
            &json!({"path": "a.txt", "all": true, "rest": ["x", "y"]}),
        )
        .unwrap();
        let (argv, stdin) = build_invocation(&m, &args);
        assert_eq!(argv, ["read_file_chunk", "--all", "a.txt", "1", "x", "y"]);
        assert!(stdin.is_empty());
        assert!(validate_arguments(&m.parameters, &json!({}))
            .unwrap_err()
            .contains("missing required"));
        assert!(validate_arguments(&m.parameters, &json!({"path": 3}))
            .unwrap_err()
            .contains("type string"));
        assert!(validate_arguments(&m.parameters, &json!({"path": "a", "start_line": 0})).is_err());
        assert!(
            validate_arguments(&m.parameters, &json!({"path": "a", "bogus": 1}))
                .unwrap_err()
                .contains("unknown argument")
        );
    }

    #[test]
    fn unsupported_schema_is_rejected() {
        assert!(check_schema(&json!({"type": "object", "oneOf": []})).is_err());
        assert!(
            check_schema(&json!({"type": "object", "properties": {"x": {"type": "object"}}}))
                .is_err()
        );
        assert!(check_schema(&json!({"type": "object", "required": ["nope"]})).is_err());
    }
}
