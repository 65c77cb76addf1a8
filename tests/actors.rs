//! The actor runtime: the supervisor runs episodes of the built-in family through a pool of
//! Environment actors, the Policy actor (scripted expert, or the local candle model batching
//! requests) and the Judge actor; results do not depend on the pool's size; a killed
//! environment's episode is re-queued once and still scored; a killed policy is restarted.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use klong_actors::environment::actor::EnvironmentArgs;
use klong_actors::environment::episode::EpisodeLimits;
use klong_actors::environment::family::{generate, write_task};
use klong_actors::environment::task::Task;
use klong_actors::judge::queue::JudgeContext;
use klong_actors::messages::{EpisodeFailure, EpisodeRequest, PolicyMsg};
use klong_actors::policy::actor::{PolicyArgs, PolicyBackend};
use klong_actors::policy::chat::ChatTemplate;
use klong_actors::policy::local::LocalPolicy;
use klong_actors::policy::model::{Llama, LlamaConfig};
use klong_actors::policy::sampling::SamplingParams;
use klong_actors::policy::tokenizer::{ByteTokenizer, Tokenizer};
use klong_sandbox::{CallLimits, EpisodeBudget, HostSettings, SandboxHost, ToolRegistry};
use klongd::supervisor::{Actors, EpisodeOutcome, RuntimeSettings};

const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/sandboxes/tools/manifests");

fn sandbox_env() -> &'static (Arc<SandboxHost>, Arc<ToolRegistry>) {
    static ENV: OnceLock<(Arc<SandboxHost>, Arc<ToolRegistry>)> = OnceLock::new();
    ENV.get_or_init(|| {
        let host = SandboxHost::new(HostSettings {
            cache_dir: Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("klong-module-cache")),
            ..Default::default()
        })
        .expect("sandbox host");
        let registry = ToolRegistry::load_dir(Path::new(MANIFESTS)).expect("tool registry");
        (host, Arc::new(registry))
    })
}

fn tokenizer() -> Arc<Tokenizer> {
    Arc::new(Tokenizer::Byte(ByteTokenizer))
}

fn actors(environments: usize) -> Actors {
    let (host, registry) = sandbox_env();
    let settings = RuntimeSettings {
        environments,
        window: 2 * environments,
        episode_timeout: Duration::from_secs(120),
        max_restarts: 8,
        judge_concurrency: 2,
        judge_queue: 2 * environments,
    };
    let judge = Arc::new(JudgeContext {
        host: host.clone(),
        registry: registry.clone(),
        check_limits: CallLimits::default(),
        llm: None,
        seed: 0,
    });
    let environment = EnvironmentArgs {
        host: host.clone(),
        registry: registry.clone(),
        call_limits: CallLimits::default(),
        tokenizer: tokenizer(),
        template: Arc::new(ChatTemplate::ChatMl),
        act_timeout: Duration::from_secs(60),
        judge_timeout: Duration::from_secs(60),
    };
    Actors::start(settings, environment, judge).expect("actors start")
}

fn scripted(noise: f64) -> PolicyArgs {
    PolicyArgs {
        backend: PolicyBackend::Scripted {
            noise,
            tokenizer: tokenizer(),
            context: usize::MAX,
        },
        max_queued: 16,
        max_episodes: 16,
    }
}

/// Episode `i`: a family task of horizon `1 + i % 3` (or `horizon`) with seed 500 + i.
fn requests_h(
    dir: &Path,
    n: u64,
    horizon: Option<u32>,
    context: usize,
    sampling: SamplingParams,
) -> Vec<EpisodeRequest> {
    (0..n)
        .map(|i| {
            let h = horizon.unwrap_or(1 + (i % 3) as u32);
            let task_dir =
                write_task(&dir.join("tasks"), &generate(500 + i, h)).expect("task written");
            let task = Arc::new(Task::load(&task_dir).expect("task loads"));
            EpisodeRequest {
                episode_id: i,
                key: format!("ep{i}"),
                attempt: 0,
                limits: EpisodeLimits {
                    max_turns: 1000,
                    max_generated_tokens: 1 << 20,
                    max_turn_tokens: 512,
                    max_observation_bytes: 16 * 1024,
                    max_calls_per_turn: 4,
                    max_wall_time: None,
                },
                task,
                episode_dir: dir.join("episodes").join(format!("{i}")),
                sandbox_seed: 500 + i,
                policy_seed: 77 ^ (i << 20),
                sampling: SamplingParams {
                    seed: i,
                    ..sampling.clone()
                },
                sandbox_budget: EpisodeBudget::default(),
                context,
                priority: 0,
            }
        })
        .collect()
}

fn requests(dir: &Path, n: u64, context: usize, sampling: SamplingParams) -> Vec<EpisodeRequest> {
    requests_h(dir, n, None, context, sampling)
}

fn run_all(actors: &mut Actors, reqs: Vec<EpisodeRequest>) -> Vec<EpisodeOutcome> {
    let mut out = Vec::new();
    actors
        .run_episodes(reqs, |o| {
            out.push(o);
            Ok(())
        })
        .expect("episodes run");
    out.sort_by_key(|o| o.episode_id);
    out
}

#[test]
fn a_pool_of_environments_gives_the_same_scores_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for pool in [1, 3] {
        let mut a = actors(pool);
        a.set_policy(scripted(0.3)).unwrap();
        let sub = dir.path().join(format!("pool{pool}"));
        let outcomes = run_all(
            &mut a,
            requests(&sub, 6, usize::MAX, SamplingParams::greedy()),
        );
        a.shutdown();
        assert_eq!(outcomes.len(), 6);
        let summary: Vec<(u64, f64, Vec<u32>)> = outcomes
            .into_iter()
            .map(|o| {
                assert_eq!(o.attempts, 1);
                let s = o.result.expect("scored");
                assert!(s.trajectory.outcome.is_some(), "trajectory judged");
                (
                    s.episode_id,
                    s.score,
                    s.trajectory
                        .turns
                        .iter()
                        .flat_map(|t| t.tokens().to_vec())
                        .collect(),
                )
            })
            .collect();
        // Episode directories are removed once judged.
        let left = std::fs::read_dir(sub.join("episodes"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(left, 0, "episode directories left behind");
        results.push(summary);
    }
    assert_eq!(results[0], results[1], "pool size changed the results");
    // The expert (noise 0.3) solves some tasks fully and botches others: real scores.
    let scores: Vec<f64> = results[0].iter().map(|r| r.1).collect();
    assert!(scores.contains(&1.0), "{scores:?}");
    assert!(
        scores.iter().all(|&s| (0.0..=1.0).contains(&s)),
        "{scores:?}"
    );
}

#[test]
fn a_killed_environment_is_replaced_and_its_episode_requeued_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = actors(1);
    a.set_policy(scripted(0.0)).unwrap();
    let first = a.children().unwrap().environments[0].clone();
    let reqs = requests_h(
        dir.path(),
        1,
        Some(20),
        usize::MAX,
        SamplingParams::greedy(),
    );
    // Kill the only environment once its episode is under way: the episode directory exists
    // and holds a result line (horizon 20: about 80 tool calls, many left to go).
    let results = dir.path().join("episodes/0/results.txt");
    let killer = {
        let first = first.clone();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !results.exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            first.kill();
        })
    };
    let outcomes = run_all(&mut a, reqs);
    killer.join().unwrap();
    let children = a.children().unwrap();
    a.shutdown();
    assert_eq!(outcomes.len(), 1);
    let o = &outcomes[0];
    assert_eq!(o.attempts, 2, "re-queued once");
    let scored = o.result.as_ref().expect("the second attempt is scored");
    assert_eq!(scored.score, 1.0);
    assert_ne!(
        children.environments[0].get_id(),
        first.get_id(),
        "a new environment took the slot"
    );
    assert!(children.restarts >= 1);
}

#[test]
fn a_policy_that_dies_mid_run_is_restarted_and_failures_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = actors(2);
    let policy = a.set_policy(scripted(0.0)).unwrap();
    policy.kill();
    // Give the supervisor a moment to see it go and restart it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let c = a.children().unwrap();
        if c.policy
            .as_ref()
            .is_some_and(|p| p.get_id() != policy.get_id())
        {
            assert_eq!(c.restarts, 1);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "policy not restarted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let outcomes = run_all(
        &mut a,
        requests(dir.path(), 2, usize::MAX, SamplingParams::greedy()),
    );
    a.shutdown();
    for o in outcomes {
        assert_eq!(o.result.expect("scored by the restarted policy").score, 1.0);
    }
}

#[test]
fn episodes_without_a_policy_fail_typed_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = actors(1);
    let outcomes = run_all(
        &mut a,
        requests(dir.path(), 2, usize::MAX, SamplingParams::greedy()),
    );
    a.shutdown();
    assert_eq!(outcomes.len(), 2);
    for o in outcomes {
        assert!(
            matches!(o.result, Err(EpisodeFailure::Setup(_))),
            "{:?}",
            o.result
        );
    }
}

/// A tiny random model with a context long enough for the family's prompt.
fn tiny_local(version: u64) -> LocalPolicy {
    tiny_local_and_weights(version).0
}

/// The policy and its weights by name (what `sync_policy` takes).
fn tiny_local_and_weights(
    version: u64,
) -> (
    LocalPolicy,
    std::collections::BTreeMap<String, candle_core::Tensor>,
) {
    let mut cfg = LlamaConfig::tiny(ByteTokenizer::VOCAB_SIZE);
    cfg.hidden_size = 32;
    cfg.num_hidden_layers = 1;
    cfg.num_attention_heads = 2;
    cfg.num_key_value_heads = Some(1);
    cfg.intermediate_size = 64;
    cfg.max_position_embeddings = 16384;
    let vm = VarMap::new();
    let model = Llama::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let weights = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    (
        LocalPolicy::new(model, Tokenizer::Byte(ByteTokenizer), version),
        weights,
    )
}

#[test]
fn the_local_policy_batches_episodes_and_versions_flow_into_trajectories() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = actors(3);
    let policy = a
        .set_policy(PolicyArgs {
            backend: PolicyBackend::Local {
                policy: Box::new(tiny_local(7)),
                max_batch: 8,
            },
            max_queued: 16,
            max_episodes: 16,
        })
        .unwrap();
    let sampling = SamplingParams {
        temperature: 1.0,
        ..SamplingParams::greedy()
    };
    let mut reqs = requests(dir.path(), 3, 16384, sampling.clone());
    for r in &mut reqs {
        r.limits.max_turns = 2;
        r.limits.max_turn_tokens = 16;
    }
    let first = run_all(&mut a, reqs);
    // A weight sync moves the version the next actions carry.
    let synced = a
        .call(
            &policy,
            |reply| PolicyMsg::SyncWeights {
                version: 8,
                weights: None,
                reply,
            },
            Duration::from_secs(10),
            "sync",
        )
        .unwrap();
    assert!(synced.is_ok());
    let mut reqs = requests(&dir.path().join("again"), 1, 16384, sampling.clone());
    reqs[0].limits.max_turns = 1;
    reqs[0].limits.max_turn_tokens = 16;
    let second = run_all(&mut a, reqs);

    // Weights synced through the supervisor survive the policy's death: the restarted policy
    // comes back with them and their version, not with its first ones.
    let (_, weights) = tiny_local_and_weights(0);
    a.sync_policy(9, weights).unwrap();
    let before = a.children().unwrap().policy.unwrap();
    before.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while a
        .children()
        .unwrap()
        .policy
        .is_none_or(|p| p.get_id() == before.get_id())
    {
        assert!(std::time::Instant::now() < deadline, "policy not restarted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut reqs = requests(&dir.path().join("restarted"), 1, 16384, sampling);
    reqs[0].limits.max_turns = 1;
    reqs[0].limits.max_turn_tokens = 16;
    let third = run_all(&mut a, reqs);
    a.shutdown();
    for (outcomes, version) in [(first, 7), (second, 8), (third, 9)] {
        for o in outcomes {
            let s = o.result.expect("a random policy's episode is still judged");
            // A random byte model writes no valid call: every turn is malformed, nothing
            // passes.
            assert_eq!(s.score, 0.0);
            let versions: Vec<Option<u64>> = s
                .trajectory
                .turns
                .iter()
                .filter_map(|t| match t {
                    klong_actors::trajectory::Turn::Assistant(a) => Some(a.policy_version),
                    _ => None,
                })
                .collect();
            assert!(!versions.is_empty());
            assert!(versions.iter().all(|&v| v == Some(version)), "{versions:?}");
        }
    }
}
