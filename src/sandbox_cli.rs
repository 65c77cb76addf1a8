//! `klongd sandbox ...`: one tool call from the command line, and the tool list.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use klong_sandbox::{
    CallLimits, EpisodeBudget, HostSettings, Sandbox, SandboxError, SandboxHost, ToolModule,
    ToolRegistry,
};
use serde_json::{Map, Value};

/// The manifests directory when none is given: `$KLONGD_TOOLS_DIR`, else
/// `sandboxes/tools/manifests` under the working directory, else next to the binary's
/// checkout (`target/<profile>/klongd` -> `../../sandboxes/tools/manifests`).
pub fn default_tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KLONGD_TOOLS_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let local = PathBuf::from("sandboxes/tools/manifests");
    if local.is_dir() {
        return local;
    }
    if let Some(root) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent()?.parent().map(Path::to_path_buf))
    {
        let beside = root.join("sandboxes/tools/manifests");
        if beside.is_dir() {
            return beside;
        }
    }
    local
}

pub fn load_registry(dir: &Path) -> anyhow::Result<ToolRegistry> {
    ToolRegistry::load_dir(dir).with_context(|| {
        format!(
            "cannot load tools from {} (build them with sandboxes/tools/build.sh)",
            dir.display()
        )
    })
}

/// The arguments of `klongd sandbox run` after clap.
pub struct RunRequest {
    pub dir: PathBuf,
    pub tools_dir: PathBuf,
    pub cache_dir: Option<PathBuf>,
    pub limits: CallLimits,
    pub budget: EpisodeBudget,
    pub seed: u64,
    pub deterministic: bool,
    pub tool: String,
    pub args: Vec<String>,
    pub stdin: Vec<u8>,
}

/// Why a request was not run: the user's input (exit 2) or the host (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Host(#[from] anyhow::Error),
}

pub fn run(req: RunRequest) -> Result<klong_sandbox::Outcome, RequestError> {
    let settings = HostSettings {
        cache_dir: req.cache_dir.clone(),
        deterministic: req.deterministic,
        ..HostSettings::default()
    };
    let host = SandboxHost::new(settings).context("cannot start the sandbox host")?;
    let is_module_path =
        req.tool.contains('/') || req.tool.ends_with(".wasm") || req.tool.ends_with(".wat");
    let registry = if is_module_path {
        ToolRegistry::default()
    } else {
        load_registry(&req.tools_dir)?
    };
    let mut sandbox = Sandbox::new(
        host,
        Arc::new(registry),
        &req.dir,
        req.limits,
        req.budget,
        req.seed,
    )
    .context("cannot open the episode directory")?;
    let result = if is_module_path {
        let module = Arc::new(ToolModule::new(PathBuf::from(&req.tool)));
        let name = Path::new(&req.tool)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| req.tool.clone());
        let mut argv = vec![name];
        argv.extend(req.args.iter().cloned());
        sandbox.exec_module(&module, &argv, req.stdin)
    } else {
        let registry = sandbox.registry().clone();
        let tool = registry.get(&req.tool).ok_or_else(|| {
            RequestError::Usage(format!(
                "unknown tool `{}`; `klongd sandbox tools` lists them",
                req.tool
            ))
        })?;
        match json_arguments(&req.args)? {
            Some(args) => sandbox.exec(&req.tool, &args),
            None if tool.manifest.command
                && !names_parameters(&tool.manifest.parameters, &req.args) =>
            {
                sandbox.exec_argv(&req.tool, &req.args, req.stdin)
            }
            None => sandbox.exec(&req.tool, &key_value_arguments(&req.args)?),
        }
    };
    result.map_err(|e| match e {
        SandboxError::UnknownTool { .. } | SandboxError::InvalidArguments { .. } => {
            RequestError::Usage(e.to_string())
        }
        other => RequestError::Host(other.into()),
    })
}

/// A single argument holding a JSON object is the call's arguments, as an agent sends them.
fn json_arguments(args: &[String]) -> Result<Option<Value>, RequestError> {
    match args {
        [one] if one.trim_start().starts_with('{') => serde_json::from_str(one)
            .map(Some)
            .map_err(|e| RequestError::Usage(format!("arguments are not valid JSON: {e}"))),
        _ => Ok(None),
    }
}

/// Whether every argument is `key=value` with a key the tool declares: then they are the
/// call's arguments, not a command line.
fn names_parameters(schema: &Value, args: &[String]) -> bool {
    let props = schema.get("properties").and_then(Value::as_object);
    !args.is_empty()
        && args.iter().all(|a| {
            a.split_once('=')
                .is_some_and(|(k, _)| props.is_some_and(|p| p.contains_key(k)))
        })
}

/// `key=value` pairs; a value that parses as JSON (a number, `true`) is taken as such.
fn key_value_arguments(args: &[String]) -> Result<Value, RequestError> {
    let mut map = Map::new();
    for arg in args {
        let (key, value) = arg.split_once('=').ok_or_else(|| {
            RequestError::Usage(format!(
                "expected KEY=VALUE or one JSON object, got `{arg}`"
            ))
        })?;
        let value = serde_json::from_str::<Value>(value)
            .ok()
            .filter(|v| !v.is_object() && !v.is_array())
            .unwrap_or_else(|| Value::String(value.to_string()));
        map.insert(key.to_string(), value);
    }
    Ok(Value::Object(map))
}

/// `klongd sandbox tools`: the agent's tools as an OpenAI-style list, or a readable summary.
pub fn tools(dir: &Path, json: bool) -> anyhow::Result<String> {
    let registry = load_registry(dir)?;
    if json {
        return Ok(serde_json::to_string_pretty(&registry.openai_tools())?);
    }
    let mut out = String::new();
    for tool in registry.tools() {
        let m = &tool.manifest;
        let role = match (m.agent, m.command) {
            (true, true) => "agent tool, shell command",
            (true, false) => "agent tool",
            (false, true) => "shell command",
            (false, false) => "hidden",
        };
        out.push_str(&format!("{}  ({role})\n    {}\n", m.name, m.description));
        let required: Vec<&str> = m
            .parameters
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(props) = m.parameters.get("properties").and_then(Value::as_object) {
            for (name, prop) in props {
                let ty = prop.get("type").and_then(Value::as_str).unwrap_or("?");
                let need = if required.contains(&name.as_str()) {
                    ", required"
                } else {
                    ""
                };
                let default = prop
                    .get("default")
                    .map(|d| format!(" [default: {d}]"))
                    .unwrap_or_default();
                let about = prop
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                out.push_str(&format!("      {name}: {ty}{need}  {about}{default}\n"));
            }
        }
    }
    Ok(out)
}
