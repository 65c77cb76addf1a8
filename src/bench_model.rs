//! `klongd bench model`: the model core's speed on the CPU against PyTorch + transformers.
//!
//! The reference tiny model R (Llama-style: 4 layers, d_model 256, 8 heads, 4 kv heads, ffn
//! 768, vocab 512, f32) is timed here on two numbers, each against the same measurement made
//! by `benches/peer/llama_peer.py` (transformers' `LlamaForCausalLM`, SDPA attention, torch
//! AdamW) in a subprocess with the same thread count:
//!
//! 1. training tokens/s at batch 8 x 512: forward, masked cross-entropy, backward, AdamW step
//!    (goal: at least 1.5x PyTorch), klongd's side through the learner's own SFT step
//!    (`sft_gradients`, lanes included; no clipping, as the peer does not clip);
//! 2. greedy decode tokens/s with the KV cache at batch 1 and 8, 256 new tokens from a
//!    16-token prompt, prefill included (goal: at least 5x transformers' `generate`).
//!
//! Both sides draw their own weights and tokens (different RNGs), so the numbers compare
//! speed, not outputs; the first losses are reported as a sanity check (both near ln 512).
//! A failed peer is reported as an error beside klongd's numbers, never as a number.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use klong_actors::learner::optim::{AdamW, AdamWParams};
use klong_actors::learner::sft::sft_gradients;
use klong_actors::learner::split::SubTrajectory;
use klong_actors::policy::decode::{with_team, Decoder};
use klong_actors::policy::model::{KvCache, Llama, LlamaConfig};
use serde::{Deserialize, Serialize};

use crate::bench::machine_description;

/// Design goal: training tokens/s, klongd ÷ PyTorch.
pub const GOAL_TRAIN_RATIO: f64 = 1.5;
/// Design goal: decode tokens/s, klongd ÷ transformers `generate`.
pub const GOAL_DECODE_RATIO: f64 = 5.0;

/// Where the peer script lives in the repository.
pub const PEER_SCRIPT: &str = "benches/peer/llama_peer.py";

pub struct ModelBenchOptions {
    /// Timed training steps (each side).
    pub steps: usize,
    /// Untimed training steps first.
    pub warmup: usize,
    /// Compute threads for both sides (candle's rayon pool, torch intra-op threads).
    pub threads: usize,
    /// Python interpreter of the peer; `None` skips the peer.
    pub peer_python: Option<String>,
    /// The peer script; `None` finds `benches/peer/llama_peer.py`.
    pub peer_script: Option<PathBuf>,
    /// The longest the peer may run before it is killed.
    pub peer_timeout: Duration,
    /// Training batch shape.
    pub batch: usize,
    pub seq: usize,
    /// Decode: prompt length, new tokens, timed runs per batch size (the median is reported).
    pub prompt: usize,
    pub new_tokens: usize,
    pub decode_runs: usize,
    /// Rounds of klongd's side then the peer's (at least 1). The host's speed drifts over
    /// minutes (model R's step here read 364-667 ms within one session, the peer's 626-801,
    /// not together), so a ratio of two sides measured a minute apart carries that drift:
    /// several rounds pair each klongd measurement with the peer's that follows it.
    pub rounds: usize,
}

impl Default for ModelBenchOptions {
    fn default() -> Self {
        ModelBenchOptions {
            steps: 5,
            warmup: 1,
            threads: 2,
            peer_python: Some("python3".into()),
            peer_script: None,
            peer_timeout: Duration::from_secs(900),
            batch: 8,
            seq: 512,
            prompt: 16,
            new_tokens: 256,
            decode_runs: 7,
            rounds: 1,
        }
    }
}

/// The reference tiny model R.
pub fn reference_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 512,
        hidden_size: 256,
        intermediate_size: 768,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: Some(4),
        head_dim: None,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 2048,
        tie_word_embeddings: false,
        attention_bias: false,
        use_qk_norm: false,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// The learning rate and decay both sides train with (PyTorch's AdamW defaults otherwise).
const LR: f64 = 1e-3;
const WEIGHT_DECAY: f64 = 0.01;

/// Training throughput of one side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainNumbers {
    pub tok_s: f64,
    pub step_ms_mean: f64,
    pub step_ms_min: f64,
    pub loss_first: f64,
    pub loss_last: f64,
}

/// Decode throughput of one side at one batch size: the median over the timed runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecodeNumbers {
    pub tok_s: f64,
    pub runs_tok_s: Vec<f64>,
}

/// One side's three numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideNumbers {
    pub train: TrainNumbers,
    pub decode_b1: DecodeNumbers,
    pub decode_b8: DecodeNumbers,
}

impl SideNumbers {
    /// One side's numbers over rounds: per figure the median of the rounds' (each a mean of
    /// steps or a median of runs), the fastest step of all, every decode run, and the first
    /// round's losses (every round trains the same seeded model on the same tokens); `None`
    /// for no rounds.
    fn median_of(rounds: &[SideNumbers]) -> Option<SideNumbers> {
        let first = rounds.first()?;
        let m = |f: fn(&SideNumbers) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        let runs = |f: fn(&SideNumbers) -> &DecodeNumbers| {
            rounds
                .iter()
                .flat_map(|r| f(r).runs_tok_s.iter().copied())
                .collect()
        };
        Some(SideNumbers {
            train: TrainNumbers {
                tok_s: m(|r| r.train.tok_s),
                step_ms_mean: m(|r| r.train.step_ms_mean),
                step_ms_min: rounds
                    .iter()
                    .map(|r| r.train.step_ms_min)
                    .fold(f64::INFINITY, f64::min),
                loss_first: first.train.loss_first,
                loss_last: first.train.loss_last,
            },
            decode_b1: DecodeNumbers {
                tok_s: m(|r| r.decode_b1.tok_s),
                runs_tok_s: runs(|r| &r.decode_b1),
            },
            decode_b8: DecodeNumbers {
                tok_s: m(|r| r.decode_b8.tok_s),
                runs_tok_s: runs(|r| &r.decode_b8),
            },
        })
    }
}

/// Where klongd's training step spends its time (means over the timed steps, ms).
#[derive(Debug, Clone, Serialize)]
pub struct TrainBreakdown {
    /// Forward, loss and backward over the step's lanes (`sft_gradients`).
    pub gradients_ms: f64,
    pub optimizer_ms: f64,
}

impl TrainBreakdown {
    /// Per phase, the median over rounds; `None` for no rounds.
    fn median_of(rounds: &[TrainBreakdown]) -> Option<TrainBreakdown> {
        let m = |f: fn(&TrainBreakdown) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        (!rounds.is_empty()).then(|| TrainBreakdown {
            gradients_ms: m(|b| b.gradients_ms),
            optimizer_ms: m(|b| b.optimizer_ms),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    pub python: String,
    pub torch: String,
    pub transformers: String,
    pub threads: usize,
    pub attention: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    pub train: f64,
    pub decode_b1: f64,
    pub decode_b8: f64,
    pub meets_train_goal: bool,
    pub meets_decode_b1_goal: bool,
    pub meets_decode_b8_goal: bool,
}

impl Ratios {
    /// klongd ÷ peer for one pair of measurements.
    fn of(k: &SideNumbers, p: &SideNumbers) -> Ratios {
        let div = |a: f64, b: f64| a / b.max(f64::MIN_POSITIVE);
        Ratios::judged(
            div(k.train.tok_s, p.train.tok_s),
            div(k.decode_b1.tok_s, p.decode_b1.tok_s),
            div(k.decode_b8.tok_s, p.decode_b8.tok_s),
        )
    }

    fn judged(train: f64, decode_b1: f64, decode_b8: f64) -> Ratios {
        Ratios {
            train,
            decode_b1,
            decode_b8,
            meets_train_goal: train >= GOAL_TRAIN_RATIO,
            meets_decode_b1_goal: decode_b1 >= GOAL_DECODE_RATIO,
            meets_decode_b8_goal: decode_b8 >= GOAL_DECODE_RATIO,
        }
    }

    /// Per ratio, the median over paired rounds, and the goals judged on those medians;
    /// `None` for no rounds.
    fn median_of(rounds: &[Ratios]) -> Option<Ratios> {
        let m = |f: fn(&Ratios) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        (!rounds.is_empty())
            .then(|| Ratios::judged(m(|r| r.train), m(|r| r.decode_b1), m(|r| r.decode_b8)))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelBenchReport {
    pub machine: String,
    pub model: String,
    /// Threads candle actually uses.
    pub threads: usize,
    pub batch: usize,
    pub seq: usize,
    pub prompt: usize,
    pub new_tokens: usize,
    pub steps: usize,
    /// Rounds of klongd's side then the peer's: the sides' figures are medians over them.
    pub rounds: usize,
    pub klongd: SideNumbers,
    pub klongd_train_breakdown: TrainBreakdown,
    pub peer: Option<SideNumbers>,
    pub peer_info: Option<PeerInfo>,
    /// Why there are no peer numbers (the peer failed, timed out, or was skipped).
    pub peer_error: Option<String>,
    /// klongd ÷ peer, when the peer ran: per ratio, the median over the rounds' ratios.
    pub ratios: Option<Ratios>,
    /// Each round's ratios (klongd's side against the peer's that ran right after it).
    pub round_ratios: Vec<Ratios>,
}

impl ModelBenchReport {
    /// Whether the peer was asked for but gave no numbers (the command then exits nonzero).
    pub fn peer_failed(&self) -> bool {
        self.peer.is_none() && self.peer_error.is_some()
    }

    pub fn render(&self) -> String {
        let mut s = format!(
            "model benchmark ({}; f32, {} threads; {})\n",
            self.model, self.threads, self.machine
        );
        if let Some(p) = &self.peer_info {
            s.push_str(&format!(
                "peer: torch {} + transformers {} ({} attention, {} threads, {})\n",
                p.torch, p.transformers, p.attention, p.threads, p.python
            ));
        }
        s.push('\n');
        row(&mut s, "", "klongd", "peer", "ratio", "");
        let k = &self.klongd;
        let p = self.peer.as_ref();
        let r = self.ratios.as_ref();
        let goal = |met: Option<bool>, g: f64| match met {
            Some(m) => format!("(goal >= {g}x: {})", verdict(m)),
            None => format!("(goal >= {g}x: no peer)"),
        };
        row(
            &mut s,
            &format!("train tok/s ({} x {}, AdamW)", self.batch, self.seq),
            &format!("{:.1}", k.train.tok_s),
            &p.map_or("-".into(), |p| format!("{:.1}", p.train.tok_s)),
            &r.map_or("-".into(), |r| format!("{:.2}x", r.train)),
            &goal(r.map(|r| r.meets_train_goal), GOAL_TRAIN_RATIO),
        );
        // The goal is set for the issue's decode (a 16-token prompt, 256 new tokens).
        let issue_decode = self.prompt == 16 && self.new_tokens == 256;
        let decode_goal = |met: Option<bool>| {
            if issue_decode {
                goal(met, GOAL_DECODE_RATIO)
            } else {
                "(not the issue's 16 + 256)".to_string()
            }
        };
        let prompt = if issue_decode {
            String::new()
        } else {
            format!("{} + ", self.prompt)
        };
        row(
            &mut s,
            &format!("decode tok/s batch 1 ({prompt}{} new)", self.new_tokens),
            &format!("{:.1}", k.decode_b1.tok_s),
            &p.map_or("-".into(), |p| format!("{:.1}", p.decode_b1.tok_s)),
            &r.map_or("-".into(), |r| format!("{:.2}x", r.decode_b1)),
            &decode_goal(r.map(|r| r.meets_decode_b1_goal)),
        );
        row(
            &mut s,
            &format!("decode tok/s batch 8 ({prompt}{} new)", self.new_tokens),
            &format!("{:.1}", k.decode_b8.tok_s),
            &p.map_or("-".into(), |p| format!("{:.1}", p.decode_b8.tok_s)),
            &r.map_or("-".into(), |r| format!("{:.2}x", r.decode_b8)),
            &decode_goal(r.map(|r| r.meets_decode_b8_goal)),
        );
        row(
            &mut s,
            "train step ms (mean)",
            &format!("{:.0}", k.train.step_ms_mean),
            &p.map_or("-".into(), |p| format!("{:.0}", p.train.step_ms_mean)),
            "",
            "",
        );
        row(
            &mut s,
            "loss first -> last step",
            &format!("{:.3} -> {:.3}", k.train.loss_first, k.train.loss_last),
            &p.map_or("-".into(), |p| {
                format!("{:.3} -> {:.3}", p.train.loss_first, p.train.loss_last)
            }),
            "",
            "",
        );
        if self.rounds > 1 {
            s.push_str(&format!(
                "\n{} rounds of klongd's side, then the peer's: each side's figures are its medians \
                 over them, each ratio the median of the rounds' ratios\n",
                self.rounds
            ));
            if !self.round_ratios.is_empty() {
                let per_round = |f: fn(&Ratios) -> f64| {
                    let v: Vec<String> = self
                        .round_ratios
                        .iter()
                        .map(|r| format!("{:.2}", f(r)))
                        .collect();
                    v.join(", ")
                };
                s.push_str(&format!(
                    "ratios per round: train {}; decode b1 {}; decode b8 {}\n",
                    per_round(|r| r.train),
                    per_round(|r| r.decode_b1),
                    per_round(|r| r.decode_b8)
                ));
            }
        }
        let b = &self.klongd_train_breakdown;
        s.push_str(&format!(
            "\nklongd train step: gradients {:.0} ms (forward, loss, backward), AdamW {:.0} ms\n",
            b.gradients_ms, b.optimizer_ms
        ));
        if let Some(e) = &self.peer_error {
            s.push_str(&format!("\npeer FAILED (no peer numbers): {e}\n"));
        }
        s
    }
}

fn row(out: &mut String, label: &str, a: &str, b: &str, ratio: &str, goal: &str) {
    let line = format!("{label:<34} {a:>16} {b:>16} {ratio:>8}   {goal}");
    out.push_str(line.trim_end());
    out.push('\n');
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

/// A small deterministic generator for token ids (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|_| (self.next() % vocab as u64) as u32)
            .collect()
    }
}

/// A fresh model R with HF's init (normal 0.02), seeded as `klongd run` seeds its tiny
/// models (candle's CPU device has no seed of its own).
fn build_model(cfg: &LlamaConfig, seed: u64) -> Result<(VarMap, Llama)> {
    let device = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &device);
    let model = Llama::new(cfg, vb).context("building model R")?;
    crate::sft_stage::seeded_init(&vm, seed, crate::config::DEFAULT_INIT_STD, &device)?;
    Ok((vm, model))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn train(
    cfg: &LlamaConfig,
    opts: &ModelBenchOptions,
    seed: u64,
) -> Result<(TrainNumbers, TrainBreakdown)> {
    let (vm, model) = build_model(cfg, seed)?;
    let mut opt = AdamW::from_varmap(
        &vm,
        AdamWParams {
            lr: LR,
            weight_decay: WEIGHT_DECAY,
            ..AdamWParams::default()
        },
    )?;
    let (b, t) = (opts.batch, opts.seq);
    let mut rng = Rng(seed ^ 0x7261_696e);
    let tokens = rng.tokens(b * (t + 1), cfg.vocab_size);
    // Rows of t + 1 tokens, every one a target but the first: inputs [b, t], targets [b, t].
    let rows: Vec<SubTrajectory> = tokens
        .chunks(t + 1)
        .enumerate()
        .map(|(i, row)| SubTrajectory {
            trajectory: "bench".into(),
            window: i,
            tokens: row.to_vec(),
            loss_mask: (0..row.len()).map(|j| j > 0).collect(),
            behaviour_logprobs: None,
            spans: Vec::new(),
            prefix_len: 0,
            context_len: 0,
            reward: None,
            advantage: None,
        })
        .collect();
    let micro = [rows.iter().collect::<Vec<_>>()];

    let mut losses = Vec::new();
    let mut step_times = Vec::new();
    let mut parts = [0.0f64; 2];
    for i in 0..opts.warmup + opts.steps {
        // On the compute pool, as the learner's steps run (`sft_step`, `rl_step`).
        let (t0, t1, t2, loss) = klong_actors::policy::on_compute_pool(|| -> Result<_> {
            let t0 = Instant::now();
            let step = sft_gradients(&model, &opt, None, &micro)?;
            let t1 = Instant::now();
            opt.step(&step.grads)?;
            let t2 = Instant::now();
            Ok((t0, t1, t2, step.loss))
        })?;
        ensure!(loss.is_finite(), "training loss is {loss} at step {i}");
        losses.push(loss);
        tracing::info!(
            step = i,
            ms = ms(t2 - t0),
            loss,
            "klongd train step (gradients {:.0} ms, adamw {:.0} ms)",
            ms(t1 - t0),
            ms(t2 - t1)
        );
        if i >= opts.warmup {
            step_times.push(ms(t2 - t0));
            for (p, d) in parts.iter_mut().zip([t1 - t0, t2 - t1]) {
                *p += ms(d);
            }
        }
    }
    let n = step_times.len() as f64;
    let total_ms: f64 = step_times.iter().sum();
    Ok((
        TrainNumbers {
            tok_s: (opts.steps * b * t) as f64 / (total_ms / 1e3),
            step_ms_mean: total_ms / n,
            step_ms_min: step_times.iter().copied().fold(f64::INFINITY, f64::min),
            loss_first: losses[0],
            loss_last: *losses.last().unwrap_or(&f64::NAN),
        },
        TrainBreakdown {
            gradients_ms: parts[0] / n,
            optimizer_ms: parts[1] / n,
        },
    ))
}

/// Greedy decode of `new_tokens` tokens for each of `prompt` rows ([B, P]), prefill included,
/// on the compute pool as `generate` runs. Returns the generated ids (row-major) so that runs
/// can be checked against each other.
fn greedy_decode(model: &Llama, prompt: &Tensor, new_tokens: usize) -> Result<Vec<u32>> {
    klong_actors::policy::on_compute_pool(|| greedy_decode_here(model, prompt, new_tokens))
}

fn greedy_decode_here(model: &Llama, prompt: &Tensor, new_tokens: usize) -> Result<Vec<u32>> {
    let (b, _) = prompt.dims2()?;
    let mut cache = KvCache::inference();
    let mut out = Vec::with_capacity(b * new_tokens);
    // The prefill through the graph, then the steps through the decode engine, as `generate`
    // runs them (the graph again where the engine does not serve the model).
    let logits = model.forward(prompt, None, Some(&mut cache))?;
    let t = logits.dim(1)?;
    let mut next = logits
        .i((.., t - 1, ..))?
        .argmax(D::Minus1)?
        .to_vec1::<u32>()?;
    let live = vec![true; b];
    match Decoder::after_prefill(model, &cache)? {
        // The steps on a team holding the pool's threads, as `generate` runs them.
        Some(mut decoder) => with_team(|team| -> Result<()> {
            for _ in 1..new_tokens {
                out.extend(&next);
                let logits = decoder.step(model, &next, &live, Some(team))?;
                next = logits.iter().map(|row| argmax(row)).collect();
            }
            Ok(())
        })??,
        None => {
            for _ in 1..new_tokens {
                out.extend(&next);
                let input = Tensor::from_vec(next.clone(), (b, 1), model.device())?;
                let logits = model.forward(&input, None, Some(&mut cache))?;
                next = logits.i((.., 0, ..))?.argmax(D::Minus1)?.to_vec1::<u32>()?;
            }
        }
    }
    out.extend(&next);
    Ok(out)
}

/// The index of the largest logit, the first of equals (as candle's `argmax`).
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn decode(
    model: &Llama,
    cfg: &LlamaConfig,
    opts: &ModelBenchOptions,
    batch: usize,
    seed: u64,
) -> Result<DecodeNumbers> {
    let mut rng = Rng(seed ^ (0x6465_636f + batch as u64));
    let prompt = Tensor::from_vec(
        rng.tokens(batch * opts.prompt, cfg.vocab_size),
        (batch, opts.prompt),
        &Device::Cpu,
    )?;
    // Warm-up, as the peer does.
    greedy_decode(model, &prompt, 8.min(opts.new_tokens))?;
    let mut rates = Vec::new();
    let mut first: Option<Vec<u32>> = None;
    for _ in 0..opts.decode_runs.max(1) {
        let t0 = Instant::now();
        let ids = greedy_decode(model, &prompt, opts.new_tokens)?;
        let dt = t0.elapsed().as_secs_f64();
        ensure!(
            ids.len() == batch * opts.new_tokens,
            "decode made {} tokens, expected {}",
            ids.len(),
            batch * opts.new_tokens
        );
        match &first {
            None => first = Some(ids),
            Some(f) => ensure!(*f == ids, "greedy decode is not deterministic across runs"),
        }
        rates.push((batch * opts.new_tokens) as f64 / dt);
        tracing::info!(
            batch,
            ms = dt * 1e3,
            tok_s = rates.last(),
            "klongd decode run"
        );
    }
    Ok(DecodeNumbers {
        tok_s: median(&rates),
        runs_tok_s: rates,
    })
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// The most rounds one bench runs (each is a minute or so with the peer).
pub const MAX_ROUNDS: usize = 20;

/// klongd's side of one round: training, then decode at batch 1 and 8.
fn klongd_side(
    cfg: &LlamaConfig,
    opts: &ModelBenchOptions,
    seed: u64,
    round: usize,
) -> Result<(SideNumbers, TrainBreakdown)> {
    tracing::info!(
        round = round + 1,
        steps = opts.steps,
        warmup = opts.warmup,
        threads = opts.threads,
        "klongd: training"
    );
    let (train_numbers, breakdown) = train(cfg, opts, seed)?;
    tracing::info!("klongd: decode");
    // Generation in klongd runs on a frozen copy of the weights (`Llama::from_tensors`: no
    // graph is recorded), as transformers' `generate` runs under `no_grad`.
    let (vm, _) = build_model(cfg, seed)?;
    let weights = vm
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("model R's variables: lock poisoned"))?
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect();
    let m = Llama::from_tensors(cfg, weights, &Device::Cpu).context("freezing model R")?;
    let decode_b1 = decode(&m, cfg, opts, 1, seed)?;
    let decode_b8 = decode(&m, cfg, opts, 8, seed)?;
    let side = SideNumbers {
        train: train_numbers,
        decode_b1,
        decode_b8,
    };
    Ok((side, breakdown))
}

/// Runs klongd's side, then the peer's, `opts.rounds` times.
pub fn model(opts: &ModelBenchOptions) -> Result<ModelBenchReport> {
    ensure!(opts.steps > 0, "steps must be at least 1");
    ensure!(
        (1..=MAX_ROUNDS).contains(&opts.rounds),
        "rounds must be 1 to {MAX_ROUNDS}, not {}",
        opts.rounds
    );
    ensure!(opts.threads > 0, "threads must be at least 1");
    ensure!(
        opts.batch > 0 && opts.seq > 0 && opts.prompt > 0 && opts.new_tokens > 0,
        "batch, seq, prompt and new tokens must be positive"
    );
    // candle's matmuls read RAYON_NUM_THREADS on every call and rayon sizes its global pool
    // from it on first use; set it before any tensor work.
    std::env::set_var("RAYON_NUM_THREADS", opts.threads.to_string());
    let threads = candle_core::utils::get_num_threads();
    ensure!(
        threads == opts.threads,
        "candle uses {threads} threads, not the {} asked for",
        opts.threads
    );
    let cfg = reference_config();
    ensure!(
        opts.prompt + opts.new_tokens <= cfg.max_position_embeddings
            && opts.seq <= cfg.max_position_embeddings,
        "model R's context is {} tokens: a prompt of {} plus {} new tokens, or a training \
         sequence of {}, does not fit",
        cfg.max_position_embeddings,
        opts.prompt,
        opts.new_tokens,
        opts.seq
    );
    let seed = 0;

    let (mut klongd_rounds, mut breakdowns, mut peer_rounds) = (vec![], vec![], vec![]);
    let (mut peer_info, mut peer_error) = (None, None);
    for round in 0..opts.rounds {
        let (side, breakdown) = klongd_side(&cfg, opts, seed, round)?;
        klongd_rounds.push(side);
        breakdowns.push(breakdown);
        let Some(python) = &opts.peer_python else {
            continue;
        };
        match run_peer(python, opts) {
            Ok((numbers, info)) => {
                peer_rounds.push(numbers);
                peer_info = Some(info);
            }
            Err(e) => {
                // No peer numbers at all, rather than some rounds' (the report says why).
                peer_error = Some(format!("round {} of {}: {e:#}", round + 1, opts.rounds));
                peer_rounds.clear();
                peer_info = None;
                break;
            }
        }
    }
    let round_ratios: Vec<Ratios> = klongd_rounds
        .iter()
        .zip(&peer_rounds)
        .map(|(k, p)| Ratios::of(k, p))
        .collect();
    let (Some(klongd), Some(breakdown)) = (
        SideNumbers::median_of(&klongd_rounds),
        TrainBreakdown::median_of(&breakdowns),
    ) else {
        bail!("no rounds were measured");
    };
    Ok(ModelBenchReport {
        machine: format!(
            "{}; products on {}",
            machine_description(),
            klong_actors::policy::cpu_products()
        ),
        model: format!(
            "tiny Llama R: {} layers, d_model {}, {} heads / {} kv, ffn {}, vocab {}",
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.intermediate_size,
            cfg.vocab_size
        ),
        threads,
        batch: opts.batch,
        seq: opts.seq,
        prompt: opts.prompt,
        new_tokens: opts.new_tokens,
        steps: opts.steps,
        rounds: klongd_rounds.len(),
        klongd,
        klongd_train_breakdown: breakdown,
        peer: SideNumbers::median_of(&peer_rounds),
        peer_info,
        peer_error,
        ratios: Ratios::median_of(&round_ratios),
        round_ratios,
    })
}

/// The peer script: as given, else under the working directory, else under the source tree
/// this binary was built from.
fn find_peer_script(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        ensure!(p.is_file(), "peer script {} not found", p.display());
        return Ok(p.to_path_buf());
    }
    let candidates = [
        PathBuf::from(PEER_SCRIPT),
        Path::new(env!("CARGO_MANIFEST_DIR")).join(PEER_SCRIPT),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| format!("peer script {PEER_SCRIPT} not found (run from the repository root or pass --peer-script)"))
}

/// Kills the peer and its process group (it leads one: see `run_peer`).
fn kill_tree(child: &mut std::process::Child) {
    #[cfg(unix)]
    {
        extern "C" {
            fn kill(pid: i32, sig: i32) -> i32;
        }
        const SIGKILL: i32 = 9;
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: signals the process group this benchmark created for its own child.
            unsafe { kill(-pid, SIGKILL) };
        }
    }
    let _ = child.kill();
}

/// What the peer prints: one JSON line.
#[derive(Deserialize)]
struct PeerOutput {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    torch: String,
    #[serde(default)]
    transformers: String,
    #[serde(default)]
    threads: usize,
    #[serde(default)]
    results: std::collections::BTreeMap<String, PeerResults>,
}

#[derive(Deserialize)]
struct PeerResults {
    train: TrainNumbers,
    decode_b1: DecodeNumbers,
    decode_b8: DecodeNumbers,
}

/// Runs the peer with a bounded wait; its stderr (progress, tracebacks) is kept for errors.
fn run_peer(python: &str, opts: &ModelBenchOptions) -> Result<(SideNumbers, PeerInfo)> {
    let script = find_peer_script(opts.peer_script.as_deref())?;
    let attention = "sdpa";
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .args(["--steps", &opts.steps.to_string()])
        .args(["--warmup", &opts.warmup.to_string()])
        .args(["--threads", &opts.threads.to_string()])
        .args(["--batch", &opts.batch.to_string()])
        .args(["--seq", &opts.seq.to_string()])
        .args(["--prompt", &opts.prompt.to_string()])
        .args(["--new-tokens", &opts.new_tokens.to_string()])
        .args(["--decode-runs", &opts.decode_runs.to_string()])
        .args(["--lr", &LR.to_string()])
        .args(["--weight-decay", &WEIGHT_DECAY.to_string()])
        .args(["--attn", attention])
        .env("OMP_NUM_THREADS", opts.threads.to_string())
        .env("MKL_NUM_THREADS", opts.threads.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own process group, so that a timeout kills whatever it started too (a child still
    // holding the pipes would otherwise keep the reads below waiting).
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    tracing::info!(python, script = %script.display(), "running the peer");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the peer `{python} {}`", script.display()))?;
    // Drain both pipes on threads, so that a chatty peer cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + opts.peer_timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the peer")? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            kill_tree(&mut child);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let tail = |s: &str| {
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    let Some(status) = status else {
        bail!(
            "the peer ran past {:?} and was killed; its stderr ended:\n{}",
            opts.peer_timeout,
            tail(&stderr)
        );
    };
    let parsed: Option<PeerOutput> = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok());
    let Some(parsed) = parsed else {
        bail!(
            "the peer exited with {status} and printed no JSON result; its stderr ended:\n{}",
            tail(&stderr)
        );
    };
    if !parsed.ok || !status.success() {
        bail!(
            "the peer failed ({status}): {}",
            parsed.error.as_deref().unwrap_or("no error message")
        );
    }
    let Some(r) = parsed.results.get(attention) else {
        bail!("the peer printed no `{attention}` results");
    };
    Ok((
        SideNumbers {
            train: r.train.clone(),
            decode_b1: r.decode_b1.clone(),
            decode_b8: r.decode_b8.clone(),
        },
        PeerInfo {
            python: python.to_string(),
            torch: parsed.torch,
            transformers: parsed.transformers,
            threads: parsed.threads,
            attention: attention.into(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(script: &Path, timeout: Duration) -> ModelBenchOptions {
        ModelBenchOptions {
            peer_script: Some(script.to_path_buf()),
            peer_timeout: timeout,
            ..Default::default()
        }
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("peer.sh");
        std::fs::write(&path, body).expect("write script");
        path
    }

    #[test]
    fn peer_error_line_is_an_error_not_a_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = script(
            dir.path(),
            "echo progress >&2\necho '{\"ok\": false, \"error\": \"ModuleNotFoundError: No module named torch\"}'\nexit 1\n",
        );
        let err = run_peer("sh", &opts(&s, Duration::from_secs(30))).unwrap_err();
        assert!(
            format!("{err:#}").contains("No module named torch"),
            "{err:#}"
        );
    }

    #[test]
    fn peer_without_json_reports_its_stderr() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = script(dir.path(), "echo 'Traceback: boom' >&2\nexit 3\n");
        let err = run_peer("sh", &opts(&s, Duration::from_secs(30))).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("no JSON") && msg.contains("boom"), "{msg}");
    }

    #[test]
    fn peer_past_its_timeout_is_killed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = script(dir.path(), "sleep 30\n");
        let started = Instant::now();
        let err = run_peer("sh", &opts(&s, Duration::from_millis(300))).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(format!("{err:#}").contains("killed"), "{err:#}");
    }

    #[test]
    fn peer_results_are_parsed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let train = r#"{"tok_s": 100.0, "step_ms_mean": 40.0, "step_ms_min": 39.0, "loss_first": 6.2, "loss_last": 6.0}"#;
        let dec = r#"{"tok_s": 50.0, "runs_tok_s": [50.0]}"#;
        let line = format!(
            r#"{{"ok": true, "torch": "2.x", "transformers": "5.x", "threads": 2, "results": {{"sdpa": {{"train": {train}, "decode_b1": {dec}, "decode_b8": {dec}}}}}}}"#
        );
        let s = script(dir.path(), &format!("echo 'noise'\necho '{line}'\n"));
        let (numbers, info) = run_peer("sh", &opts(&s, Duration::from_secs(30))).expect("peer");
        assert_eq!(numbers.train.tok_s, 100.0);
        assert_eq!(numbers.decode_b8.tok_s, 50.0);
        assert_eq!((info.torch.as_str(), info.threads), ("2.x", 2));
    }

    #[test]
    fn report_renders_ratios_and_peer_failures() {
        let side = SideNumbers {
            train: TrainNumbers {
                tok_s: 300.0,
                step_ms_mean: 10.0,
                step_ms_min: 9.0,
                loss_first: 6.2,
                loss_last: 6.0,
            },
            decode_b1: DecodeNumbers {
                tok_s: 500.0,
                runs_tok_s: vec![500.0],
            },
            decode_b8: DecodeNumbers {
                tok_s: 800.0,
                runs_tok_s: vec![800.0],
            },
        };
        let mut report = ModelBenchReport {
            machine: "test".into(),
            model: "R".into(),
            threads: 2,
            batch: 8,
            seq: 512,
            prompt: 16,
            new_tokens: 256,
            steps: 1,
            klongd: side.clone(),
            klongd_train_breakdown: TrainBreakdown {
                gradients_ms: 1.0,
                optimizer_ms: 1.0,
            },
            rounds: 1,
            peer: None,
            peer_info: None,
            peer_error: Some("torch missing".into()),
            ratios: None,
            round_ratios: vec![],
        };
        assert!(report.peer_failed());
        let text = report.render();
        assert!(
            text.contains("peer FAILED") && text.contains("torch missing"),
            "{text}"
        );
        assert!(text.contains("300.0") && !text.contains("x   (goal >= 1.5x: met"));
        report.peer = Some(side);
        report.peer_error = None;
        report.ratios = Some(Ratios {
            train: 1.0,
            decode_b1: 6.0,
            decode_b8: 1.0,
            meets_train_goal: false,
            meets_decode_b1_goal: true,
            meets_decode_b8_goal: false,
        });
        assert!(!report.peer_failed());
        let text = report.render();
        assert!(text.contains("6.00x") && text.contains("MISSED") && text.contains("met"));
        assert!(!text.contains("rounds"), "{text}");
    }

    /// A side whose figures are `train`, `b1` and `b8` tokens/s.
    fn side(train: f64, b1: f64, b8: f64) -> SideNumbers {
        SideNumbers {
            train: TrainNumbers {
                tok_s: train,
                step_ms_mean: 4096.0 / train * 1e3,
                step_ms_min: 4000.0 / train * 1e3,
                loss_first: 6.2,
                loss_last: 6.0,
            },
            decode_b1: DecodeNumbers {
                tok_s: b1,
                runs_tok_s: vec![b1],
            },
            decode_b8: DecodeNumbers {
                tok_s: b8,
                runs_tok_s: vec![b8 - 1.0, b8],
            },
        }
    }

    #[test]
    fn rounds_pair_each_klongd_side_with_the_peer_after_it() {
        // The host slows down in round 2 and klongd with it; the peer's slow round is 3.
        let klongd = [
            side(9000.0, 3000.0, 15000.0),
            side(6000.0, 2600.0, 11000.0),
            side(9400.0, 3100.0, 15500.0),
        ];
        let peer = [
            side(5400.0, 500.0, 2800.0),
            side(5500.0, 320.0, 1700.0),
            side(4000.0, 300.0, 1600.0),
        ];
        let rounds: Vec<Ratios> = klongd
            .iter()
            .zip(&peer)
            .map(|(k, p)| Ratios::of(k, p))
            .collect();
        let r = Ratios::median_of(&rounds).expect("three rounds");
        // Paired: 1.667, 1.091, 2.35 -> 1.667. The medians' ratio would be 9000 / 5400 too, but
        // not for decode b8: paired 5.36, 6.47, 9.69 -> 6.47; medians 15000 / 1700 = 8.8.
        assert!((r.train - 9000.0 / 5400.0).abs() < 1e-9, "{}", r.train);
        assert!(
            (r.decode_b8 - 11000.0 / 1700.0).abs() < 1e-9,
            "{}",
            r.decode_b8
        );
        assert!(r.meets_train_goal && r.meets_decode_b8_goal);
        let k = SideNumbers::median_of(&klongd).expect("three rounds");
        assert_eq!(
            (k.train.tok_s, k.decode_b1.tok_s, k.decode_b8.tok_s),
            (9000.0, 3000.0, 15000.0)
        );
        assert_eq!(k.train.step_ms_min, 4000.0 / 9400.0 * 1e3);
        assert_eq!(k.decode_b8.runs_tok_s.len(), 6);
        assert!(SideNumbers::median_of(&[]).is_none() && Ratios::median_of(&[]).is_none());
        let median_of_two = Ratios::median_of(&rounds[..2]).expect("two rounds");
        assert!((median_of_two.train - (rounds[0].train + rounds[1].train) / 2.0).abs() < 1e-12);

        let report = ModelBenchReport {
            machine: "test".into(),
            model: "R".into(),
            threads: 2,
            batch: 8,
            seq: 512,
            prompt: 16,
            new_tokens: 256,
            steps: 5,
            rounds: 3,
            klongd: k,
            klongd_train_breakdown: TrainBreakdown::median_of(&[TrainBreakdown {
                gradients_ms: 1.0,
                optimizer_ms: 1.0,
            }])
            .expect("one round"),
            peer: SideNumbers::median_of(&peer),
            peer_info: None,
            peer_error: None,
            ratios: Some(r),
            round_ratios: rounds,
        };
        let text = report.render();
        assert!(
            text.contains("3 rounds") && text.contains("train 1.67, 1.09, 2.35"),
            "{text}"
        );
        assert!(text.contains("6.47x"), "{text}");
    }

    #[test]
    fn rounds_out_of_range_are_refused_before_any_work() {
        for rounds in [0, MAX_ROUNDS + 1] {
            let opts = ModelBenchOptions {
                rounds,
                peer_python: None,
                ..Default::default()
            };
            let err = model(&opts).expect_err("refused");
            assert!(format!("{err:#}").contains("rounds must be"), "{err:#}");
        }
    }
}
