//! The `klongd` command line. Exit codes: 0 the command did its job; 1 a failure of the host or
//! the run; 2 bad input (arguments, config, tool arguments).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use klong_actors::judge::llm::LlmJudgeSettings;
use klong_actors::judge::rubric::Variant;
use klong_sandbox::{ByteSize, CallLimits, EpisodeBudget, HumanDuration};
use klongd::config::{Config, ConfigError, StageConfig};
use klongd::sandbox_cli::{self, RequestError};
use klongd::{bench, bench_model, eval_cli, generate_cli, rubric_cli, run, tasks_cli};

#[derive(Parser)]
#[command(
    name = "klongd",
    version,
    about = "Train LLM agents for long-horizon, tool-using tasks"
)]
struct Cli {
    /// Log format on stderr; RUST_LOG sets the level (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and validate a config, and print the resolved plan.
    Check { config: PathBuf },
    /// Start a run, or resume the one in the config's run directory.
    Run {
        config: PathBuf,
        /// Stop after this many learner steps (checkpointed); run again to go on.
        #[arg(long)]
        max_steps: Option<u64>,
    },
    /// Where a run stands: stage, step, latest metrics.
    Status { run_dir: PathBuf },
    /// Run a config's Eval stages on a checkpoint: an HF folder (e.g. RUN_DIR/models/STAGE),
    /// a .gguf file, or a run directory (its latest checkpoint).
    Eval {
        config: PathBuf,
        #[arg(long)]
        checkpoint: PathBuf,
        /// Only this Eval stage (repeatable); default: all of them.
        #[arg(long = "stage")]
        stages: Vec<String>,
        /// Where the reports go [default: RUN_DIR/eval-cli/<checkpoint's name>].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the reports as JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Run tool calls in the WASM sandbox.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Rubric trees (PaperBench's schema).
    #[command(subcommand)]
    Rubric(RubricCommand),
    /// Task folders: the built-in family, and its scripted expert.
    #[command(subcommand)]
    Tasks(TasksCommand),
    /// Generate a completion with a model (an HF folder or a .gguf file).
    Generate(Box<GenerateArgs>),
}

#[derive(Args)]
struct GenerateArgs {
    /// An HF folder (config.json, *.safetensors, tokenizer.json) or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print the prompt's token ids, the generated ids and their logprobs as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum RubricCommand {
    /// Score a rubric from leaf grades and print the scored tree as JSON.
    Score {
        rubric: PathBuf,
        /// JSON object: leaf id -> 0 or 1.
        #[arg(long)]
        grades: PathBuf,
        /// full, code-dev (Code Development leaves only) or resources-provided.
        #[arg(long, default_value = "full")]
        variant: Variant,
    },
}

#[derive(Subcommand)]
enum TasksCommand {
    /// Write task folders of a generated family.
    Gen {
        #[arg(long, default_value = klong_actors::environment::family::FAMILY)]
        family: String,
        #[arg(long)]
        seed: u64,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Experiments per task (the task's length in tool calls grows with it).
        #[arg(long)]
        horizon: u32,
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the scripted expert on task folders through the sandbox, judge, and print scores.
    Solve {
        /// A task folder, or a folder of task folders.
        dir: PathBuf,
        /// Probability that the expert skips or botches each experiment.
        #[arg(long, default_value_t = 0.0)]
        expert_noise: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        tools: Option<PathBuf>,
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Episodes the judge grades at once.
        #[arg(long, default_value_t = 2)]
        judge_concurrency: usize,
        /// RON file of LLM grader settings (base_url, model, api_key_env, timeout, ...), needed
        /// by tasks whose rubric has LLM-graded leaves.
        #[arg(long)]
        llm_judge: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// Run one tool call and print its outcome as JSON. TOOL is a registry name or the path of
    /// a `.wasm` WASI command. ARGS: one JSON object (the agent's arguments), KEY=VALUE pairs,
    /// or, for shell commands and `.wasm` paths, the raw argv.
    Run(Box<SandboxRunArgs>),
    /// List the tool registry with its schemas.
    Tools {
        #[arg(long)]
        tools: Option<PathBuf>,
        /// Print the agent's tools as an OpenAI-style `tools` list.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct SandboxRunArgs {
    /// The episode directory (created if missing): the only thing the tool sees.
    #[arg(long)]
    dir: PathBuf,
    /// Directory of tool manifests [default: $KLONGD_TOOLS_DIR or sandboxes/tools/manifests].
    #[arg(long)]
    tools: Option<PathBuf>,
    /// Compiled-module cache [default: $XDG_CACHE_HOME/klongd/modules or ~/.cache/klongd/modules].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Do not cache compiled modules on disk.
    #[arg(long, conflicts_with = "cache_dir")]
    no_disk_cache: bool,
    #[arg(long)]
    wall_time: Option<HumanDuration>,
    #[arg(long)]
    fuel: Option<u64>,
    #[arg(long)]
    memory: Option<ByteSize>,
    #[arg(long)]
    stdout: Option<ByteSize>,
    #[arg(long)]
    stderr: Option<ByteSize>,
    #[arg(long)]
    written_bytes: Option<ByteSize>,
    #[arg(long)]
    files_created: Option<u64>,
    /// Seed of the guest's randomness.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Real clocks, host file times and inode numbers, and OS randomness instead of
    /// deterministic ones.
    #[arg(long)]
    nondeterministic: bool,
    /// File whose bytes are the tool's stdin.
    #[arg(long)]
    stdin_file: Option<PathBuf>,
    tool: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Tool-call latency against fork/exec, module compile cold vs cached, sandboxes per GiB.
    Sandbox {
        #[arg(long)]
        tools: Option<PathBuf>,
        #[arg(long, default_value_t = 2000)]
        iterations: usize,
        #[arg(long, default_value_t = 2000)]
        sandboxes: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Model R training and KV-cache decode tokens/s against PyTorch + transformers.
    Model {
        /// Timed training steps (each side).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Untimed training steps first.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Python interpreter with torch and transformers, for the peer.
        #[arg(long, default_value = "python3")]
        peer: String,
        /// Measure klongd only.
        #[arg(long)]
        no_peer: bool,
        /// The peer script [default: benches/peer/llama_peer.py].
        #[arg(long)]
        peer_script: Option<PathBuf>,
        /// Seconds the peer may run before it is killed.
        #[arg(long, default_value_t = 900)]
        peer_timeout: u64,
        /// Compute threads of both sides.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Timed decode runs per batch size (the median is reported). A run is short (a
        /// fraction of a second on klongd's side) and runs vary: take several.
        #[arg(long, default_value_t = 7)]
        decode_runs: usize,
        /// Decode: the prompt's length in tokens (the benchmark: 16). Longer prompts
        /// measure decode at the context lengths of long episodes, where attention dominates.
        #[arg(long, default_value_t = 16)]
        prompt: usize,
        /// Decode: new tokens per row (the benchmark: 256).
        #[arg(long, default_value_t = 256)]
        new_tokens: usize,
        /// Rounds of klongd's side, then the peer's (1 to 20). The host's speed drifts over
        /// minutes, and a ratio of two sides measured apart carries the drift: with several
        /// rounds each side reports its medians and each ratio is the median of the rounds'
        /// paired ratios (each round's ratios are listed).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The trajectory-splitting ablation: the config's Sft stage trained with Split, Truncate
    /// and Sliding at equal tokens, each scored by the config's Eval stages.
    Split {
        config: PathBuf,
        /// Training tokens of each mode [default: the Sft stage's train_tokens].
        #[arg(long)]
        tokens: Option<u64>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Prints an error chain the way users read it: the outer context, then each cause.
fn report(err: &anyhow::Error) {
    eprintln!("error: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}

/// Prints a command's report as JSON or as its readable rendering.
fn print_report<T: serde::Serialize>(
    result: anyhow::Result<T>,
    json: bool,
    render: impl FnOnce(&T) -> String,
) -> ExitCode {
    let report_value = match result {
        Ok(r) => r,
        Err(e) => {
            report(&e);
            return ExitCode::FAILURE;
        }
    };
    if !json {
        print!("{}", render(&report_value));
        return ExitCode::SUCCESS;
    }
    match serde_json::to_string_pretty(&report_value) {
        Ok(s) => {
            println!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(2)
}

/// Pins the compute thread count (rayon's pool, candle's matmuls, our kernels) in
/// `RAYON_NUM_THREADS` unless the user set it. candle looks the count up on every matmul, and
/// without the variable that means reading /proc/cpuinfo for the physical core count each
/// time: 12% of `klongd generate`'s time with SmolLM2-135M. Same number, looked up once.
fn pin_compute_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // Called first thing in `main`, before any other thread exists.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

fn main() -> ExitCode {
    pin_compute_threads();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    klongd::malloc::keep_freed_memory();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                let settings = match c.sandbox.host_settings() {
                    Ok(s) => s,
                    Err(e) => return config_error(&e),
                };
                println!("# {} is valid; resolved plan:", config.display());
                println!("{}", c.to_ron());
                if let Some(dir) = settings.cache_dir {
                    println!("# module cache: {}", dir.display());
                }
                match sandbox_cli::load_registry(&c.sandbox.tools_dir) {
                    Ok(r) => println!(
                        "# tools: {}",
                        r.tools()
                            .map(|t| t.manifest.name.as_str())
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                    Err(e) => println!("# warning: {e:#}"),
                }
                let stages: Vec<String> = c
                    .stages
                    .iter()
                    .map(|s| {
                        let kind = match s {
                            StageConfig::Sft(_) => "Sft",
                            StageConfig::Rl(_) => "Rl",
                            StageConfig::Eval(_) => "Eval",
                        };
                        format!("{kind} {}", s.name())
                    })
                    .collect();
                if stages.is_empty() {
                    println!("# stages: none (the run brings up the sandbox and stops)");
                } else {
                    println!("# stages: {}", stages.join(", "));
                }
                for w in c.warnings() {
                    println!("# warning: {w}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        Command::Run { config, max_steps } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            match run::run(&config, max_steps) {
                Ok(summary) => {
                    tracing::info!(run_dir = %summary.run_dir.display(), resumed = summary.resumed, "done");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    report(&e);
                    ExitCode::FAILURE
                }
            }
        }
        Command::Eval {
            config,
            checkpoint,
            stages,
            out,
            json,
        } => {
            let c = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            let chosen = match eval_cli::eval_stages(&c, &stages) {
                Ok(chosen) => chosen,
                Err(why) => {
                    eprintln!("error: {}: {why}", config.display());
                    return ExitCode::from(2);
                }
            };
            let out = out.unwrap_or_else(|| eval_cli::default_out(&c, &checkpoint));
            match eval_cli::eval(&c, &chosen, &checkpoint, &out) {
                Ok(reports) => {
                    if json {
                        match serde_json::to_string_pretty(&reports) {
                            Ok(text) => println!("{text}"),
                            Err(e) => {
                                report(&e.into());
                                return ExitCode::FAILURE;
                            }
                        }
                    } else {
                        for r in &reports {
                            print!("{}", r.table());
                        }
                        println!("# reports in {}", out.join("eval").display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    report(&e);
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { run_dir } => match run::status(&run_dir) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                report(&e);
                ExitCode::FAILURE
            }
        },
        Command::Sandbox(SandboxCommand::Tools { tools, json }) => {
            let dir = tools.unwrap_or_else(sandbox_cli::default_tools_dir);
            match sandbox_cli::tools(&dir, json) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    report(&e);
                    ExitCode::FAILURE
                }
            }
        }
        Command::Sandbox(SandboxCommand::Run(a)) => sandbox_run(*a),
        Command::Generate(a) => generate(*a),
        Command::Rubric(RubricCommand::Score {
            rubric,
            grades,
            variant,
        }) => match rubric_cli::score_command(&rubric, &grades, variant) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                report(&e);
                ExitCode::from(2)
            }
        },
        Command::Tasks(TasksCommand::Gen {
            family,
            seed,
            count,
            horizon,
            out,
        }) => match tasks_cli::generate(&family, seed, count, horizon, &out) {
            Ok(dirs) => {
                for dir in dirs {
                    println!("{}", dir.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                report(&e);
                ExitCode::from(2)
            }
        },
        Command::Tasks(TasksCommand::Solve {
            dir,
            expert_noise,
            seed,
            tools,
            cache_dir,
            judge_concurrency,
            llm_judge,
            json,
        }) => {
            let llm_judge = match llm_judge
                .as_deref()
                .map(|f| (f, klongd::config::load_ron::<LlmJudgeSettings>(f)))
            {
                None => None,
                Some((_, Err(e))) => return config_error(&e),
                Some((file, Ok(settings))) => match settings.validate() {
                    Ok(()) => Some(settings),
                    Err(e) => {
                        eprintln!("error: {}: {e}", file.display());
                        return ExitCode::from(2);
                    }
                },
            };
            let cache_dir = match cache_dir
                .map(Ok)
                .unwrap_or_else(klongd::config::default_cache_dir)
            {
                Ok(dir) => Some(dir),
                Err(e) => return config_error(&e),
            };
            let opts = tasks_cli::SolveOptions {
                dir,
                tools_dir: tools.unwrap_or_else(sandbox_cli::default_tools_dir),
                cache_dir,
                expert_noise,
                seed,
                judge_concurrency,
                llm_judge,
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(tasks_cli::solve(opts));
            print_report(result, json, tasks_cli::SolveReport::render)
        }
        Command::Bench(BenchCommand::Split {
            config,
            tokens,
            json,
        }) => print_report(
            klongd::bench_split::run(&config, tokens),
            json,
            klongd::bench_split::SplitBenchReport::render,
        ),
        Command::Bench(BenchCommand::Sandbox {
            tools,
            iterations,
            sandboxes,
            json,
        }) => {
            let tools_dir = tools.unwrap_or_else(sandbox_cli::default_tools_dir);
            let native_dir = tools_dir.parent().unwrap_or(&tools_dir).join("wasm/native");
            let opts = bench::SandboxBenchOptions {
                tools_dir,
                native_dir,
                iterations,
                sandboxes,
            };
            print_report(
                bench::sandbox(&opts),
                json,
                bench::SandboxBenchReport::render,
            )
        }
        Command::Bench(BenchCommand::Model {
            steps,
            warmup,
            peer,
            no_peer,
            peer_script,
            peer_timeout,
            threads,
            decode_runs,
            prompt,
            new_tokens,
            rounds,
            json,
        }) => {
            let opts = bench_model::ModelBenchOptions {
                steps,
                warmup,
                threads,
                peer_python: (!no_peer).then_some(peer),
                peer_script,
                peer_timeout: std::time::Duration::from_secs(peer_timeout),
                decode_runs,
                prompt,
                new_tokens,
                rounds,
                ..Default::default()
            };
            let result = bench_model::model(&opts);
            // A failed peer still prints klongd's numbers, then fails the command.
            let peer_failed = matches!(&result, Ok(r) if r.peer_failed());
            let code = print_report(result, json, bench_model::ModelBenchReport::render);
            if peer_failed {
                eprintln!("error: the peer gave no numbers (see the report)");
                ExitCode::FAILURE
            } else {
                code
            }
        }
    }
}

fn generate(a: GenerateArgs) -> ExitCode {
    let opts = generate_cli::GenerateOptions {
        model: a.model,
        prompt: a.prompt,
        chat: a.chat,
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        device: a.device,
    };
    print_report(
        generate_cli::run(&opts),
        a.json,
        generate_cli::GenerateReport::render,
    )
}

fn sandbox_run(a: SandboxRunArgs) -> ExitCode {
    let d = CallLimits::default();
    let limits = CallLimits {
        wall_time: a.wall_time.unwrap_or(d.wall_time),
        fuel: a.fuel.unwrap_or(d.fuel),
        memory: a.memory.unwrap_or(d.memory),
        table_elements: d.table_elements,
        stdout: a.stdout.unwrap_or(d.stdout),
        stderr: a.stderr.unwrap_or(d.stderr),
        written_bytes: a.written_bytes.unwrap_or(d.written_bytes),
        files_created: a.files_created.unwrap_or(d.files_created),
    };
    let stdin = match &a.stdin_file {
        Some(path) => match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) => {
                eprintln!("error: {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => Vec::new(),
    };
    let cache_dir = if a.no_disk_cache {
        None
    } else {
        match a
            .cache_dir
            .map(Ok)
            .unwrap_or_else(klongd::config::default_cache_dir)
        {
            Ok(dir) => Some(dir),
            Err(e) => return config_error(&e),
        }
    };
    let req = sandbox_cli::RunRequest {
        dir: a.dir,
        tools_dir: a.tools.unwrap_or_else(sandbox_cli::default_tools_dir),
        cache_dir,
        limits,
        budget: EpisodeBudget::default(),
        seed: a.seed,
        deterministic: !a.nondeterministic,
        tool: a.tool,
        args: a.args,
        stdin,
    };
    match sandbox_cli::run(req) {
        Ok(outcome) => match serde_json::to_string_pretty(&outcome) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Err(RequestError::Usage(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
        Err(RequestError::Host(e)) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}
