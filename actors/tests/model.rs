//! The model core and training primitives: gradients against finite differences, a copy task
//! learned from scratch, KV-cache and padded-batch equivalence, AdamW / schedule / clipping /
//! accumulation against hand-computed values, and a bitwise export/import round trip.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::max_abs_diff;
use klong_actors::learner::loss::{masked_cross_entropy, token_logprobs};
use klong_actors::learner::optim::{
    clip_grad_norm, AdamW, AdamWParams, GradAccumulator, Grads, LrSchedule,
};
use klong_actors::policy::model::{KvCache, Llama, LlamaConfig};

/// A small deterministic generator (candle's CPU randn cannot be seeded), so that every test
/// sees the same weights and data on every run.
struct Lcg(u64);

impl Lcg {
    fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn uniform(&mut self) -> f64 {
        (self.next_u32() as f64 + 0.5) / (1u64 << 31) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    fn below(&mut self, n: u32) -> u32 {
        self.next_u32() % n
    }
}

fn build(cfg: &LlamaConfig, dtype: DType) -> (VarMap, Llama) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
    let model = Llama::new(cfg, vb).unwrap();
    (vm, model)
}

fn sorted_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let mut v: Vec<(String, Var)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Overwrites every variable deterministically: matrices ~ N(0, std), norm weights ~ 1 + N(0,
/// 0.1) and biases ~ N(0, 0.1) (not 1 and 0, so that their gradients are not degenerate).
fn reseed(vm: &VarMap, seed: u64, std: f64) {
    let mut rng = Lcg(seed);
    for (name, var) in sorted_vars(vm) {
        let n = var.elem_count();
        let vals: Vec<f64> = if name.ends_with("norm.weight") {
            (0..n).map(|_| 1.0 + 0.1 * rng.normal()).collect()
        } else if name.ends_with(".bias") {
            (0..n).map(|_| 0.1 * rng.normal()).collect()
        } else {
            (0..n).map(|_| std * rng.normal()).collect()
        };
        let t = Tensor::from_vec(vals, var.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(var.dtype())
            .unwrap();
        var.set(&t).unwrap();
    }
}

fn ids(rows: &[Vec<u32>]) -> Tensor {
    Tensor::new(rows.to_vec(), &Device::Cpu).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Gradients

/// Every variable's analytic gradient matches central finite differences, in f64 (candle's
/// CPU backend supports it): h = 1e-5, tolerance |g - fd| <= 1e-7 + 1e-5·|fd| (central
/// differences err by O(h²) ≈ 1e-10 here, rounding by ~1e-16/h ≈ 1e-11). A variable without a
/// gradient fails at once: that is how candle 0.11's gradient-less fused ops show up.
fn grad_check(cfg: &LlamaConfig, seed: u64) {
    let (vm, model) = build(cfg, DType::F64);
    reseed(&vm, seed, 0.3);
    let mut rng = Lcg(seed ^ 0xabc);
    let (b, t) = (2, 5);
    let mk = |rng: &mut Lcg| -> Vec<Vec<u32>> {
        (0..b)
            .map(|_| (0..t).map(|_| rng.below(cfg.vocab_size as u32)).collect())
            .collect()
    };
    let input = ids(&mk(&mut rng));
    let targets = ids(&mk(&mut rng));
    // Left padding on row 1 exercises the mask and per-row positions too.
    let attn = Tensor::new(&[[1u32, 1, 1, 1, 1], [0, 0, 1, 1, 1]], &Device::Cpu).unwrap();
    let lmask = Tensor::new(
        &[[1f64, 1., 0., 1., 1.], [0., 0., 1., 1., 1.]],
        &Device::Cpu,
    )
    .unwrap();
    let loss = || -> Tensor {
        let logits = model.forward(&input, Some(&attn), None).unwrap();
        masked_cross_entropy(&logits, &targets, &lmask).unwrap().0
    };
    let grads = model.backward(&loss()).unwrap();
    let vars = sorted_vars(&vm);
    assert!(vars.len() >= 9 * cfg.num_hidden_layers + 2);
    let h = 1e-5;
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let at = |vals: &[f64]| {
            var.set(&Tensor::from_vec(vals.to_vec(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss().to_scalar::<f64>().unwrap()
        };
        for _ in 0..3 {
            let i = rng.below(base.len() as u32) as usize;
            let mut p = base.clone();
            p[i] += h;
            let up = at(&p);
            p[i] = base[i] - h;
            let down = at(&p);
            let fd = (up - down) / (2.0 * h);
            assert!(
                (g[i] - fd).abs() <= 1e-7 + 1e-5 * fd.abs(),
                "{name}[{i}]: analytic {} vs finite difference {fd}",
                g[i]
            );
        }
        at(&base);
    }
}

#[test]
fn gradients_match_finite_differences() {
    grad_check(&LlamaConfig::tiny(32), 1);
}

#[test]
fn gradients_match_finite_differences_qk_norm_bias_tied_rope_scaling() {
    let mut cfg = LlamaConfig::tiny(32);
    cfg.use_qk_norm = true;
    cfg.attention_bias = true;
    cfg.tie_word_embeddings = true;
    cfg.rope_scaling = Some(klong_actors::policy::model::RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 16,
        rope_type: Some("llama3".into()),
    });
    grad_check(&cfg, 2);
}

// ---------------------------------------------------------------------------------------------
// Learning

/// A 2-layer model from scratch learns "x1..x6 SEP x1..x6": the copied half needs attention
/// to look back (an induction-style circuit). Threshold: mean cross-entropy < 0.1 over the
/// copied tokens of a fresh batch (chance is ln 10 ≈ 2.3).
#[test]
fn learns_copy_task() {
    let mut cfg = LlamaConfig::tiny(12);
    cfg.hidden_size = 32;
    cfg.intermediate_size = 64;
    let (vm, model) = build(&cfg, DType::F32);
    reseed(&vm, 7, 0.02);
    let mut opt = AdamW::from_varmap(
        &vm,
        AdamWParams {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let sched = LrSchedule {
        peak_lr: 1e-2,
        warmup_steps: 20,
        total_steps: 400,
        min_ratio: 0.1,
    };
    let (half, bsz) = (6usize, 32usize);
    let sep = 11u32;
    let mut rng = Lcg(99);
    let batch = |rng: &mut Lcg| {
        let (mut inp, mut tgt, mut mask) = (vec![], vec![], vec![]);
        for _ in 0..bsz {
            let x: Vec<u32> = (0..half).map(|_| 1 + rng.below(10)).collect();
            let seq: Vec<u32> = x
                .iter()
                .copied()
                .chain([sep])
                .chain(x.iter().copied())
                .collect();
            inp.push(seq[..seq.len() - 1].to_vec());
            tgt.push(seq[1..].to_vec());
            // Only the copied half is predictable: count targets after the separator.
            mask.push(
                (0..seq.len() - 1)
                    .map(|i| if i >= half { 1f32 } else { 0. })
                    .collect::<Vec<_>>(),
            );
        }
        (
            ids(&inp),
            ids(&tgt),
            Tensor::new(mask, &Device::Cpu).unwrap(),
        )
    };
    let start = std::time::Instant::now();
    let mut steps = 0;
    for step in 0..400u64 {
        opt.set_lr(sched.lr(step));
        let (i, t, m) = batch(&mut rng);
        let (loss, _) =
            masked_cross_entropy(&model.forward(&i, None, None).unwrap(), &t, &m).unwrap();
        let mut g = opt.grads_from(&model.backward(&loss).unwrap());
        clip_grad_norm(&mut g, 1.0).unwrap();
        opt.step(&g).unwrap();
        steps += 1;
        if step % 25 == 24 && loss.to_scalar::<f32>().unwrap() < 0.03 {
            break;
        }
    }
    let (i, t, m) = batch(&mut rng);
    let (loss, n) = masked_cross_entropy(&model.forward(&i, None, None).unwrap(), &t, &m).unwrap();
    let loss = loss.to_scalar::<f32>().unwrap();
    eprintln!(
        "copy task: {steps} steps, {:?}, held-out loss {loss}",
        start.elapsed()
    );
    assert_eq!(n, bsz * half);
    assert!(
        loss < 0.1,
        "copy task not learned: loss {loss} after {steps} steps"
    );
}

// ---------------------------------------------------------------------------------------------
// Inference

fn random_model(cfg: &LlamaConfig, seed: u64) -> (VarMap, Llama) {
    let (vm, model) = build(cfg, DType::F32);
    reseed(&vm, seed, 0.3);
    (vm, model)
}

/// A frozen copy of trained weights (what evaluation and RL rollouts act with) records no
/// graph, even from `var.as_tensor().copy()`, which records a `Copy` op: a generation over a
/// graph-recording model keeps every layer's activations alive until its logits are dropped.
#[test]
fn a_model_from_copied_variables_records_no_graph() {
    let mut cfg = LlamaConfig::tiny(32);
    cfg.attention_bias = true;
    cfg.use_qk_norm = true;
    let (vm, model) = random_model(&cfg, 4);
    let input = ids(&[vec![1, 2, 3, 4, 5]]);
    let trained = model.forward(&input, None, None).unwrap();
    assert!(
        trained.track_op(),
        "a model over a VarMap records the graph"
    );

    let copies = sorted_vars(&vm)
        .into_iter()
        .map(|(name, v)| (name, v.as_tensor().copy().unwrap()))
        .collect();
    assert!(sorted_vars(&vm)[0].1.as_tensor().copy().unwrap().track_op());
    let frozen = Llama::from_tensors(&cfg, copies, &Device::Cpu).unwrap();
    let logits = frozen.forward(&input, None, None).unwrap();
    assert!(!logits.track_op(), "the frozen model recorded a graph");
    // Not bitwise: with nothing to backpropagate, the frozen model's attention takes the
    // inference kernel of `skinny.rs` (another summation order).
    let diff = max_abs_diff(&trained, &logits);
    assert!(diff < 1e-5, "frozen vs trainable logits differ by {diff}");
}

#[test]
fn kv_cache_decode_matches_full_forward() {
    let mut cfg = LlamaConfig::tiny(32);
    cfg.use_qk_norm = true;
    let (_vm, model) = random_model(&cfg, 3);
    let mut rng = Lcg(5);
    let rows: Vec<Vec<u32>> = (0..2)
        .map(|_| (0..9).map(|_| rng.below(32)).collect())
        .collect();
    let full = model.forward(&ids(&rows), None, None).unwrap();
    let mut cache = KvCache::new();
    let prefix: Vec<Vec<u32>> = rows.iter().map(|r| r[..4].to_vec()).collect();
    let mut parts = vec![model
        .forward(&ids(&prefix), None, Some(&mut cache))
        .unwrap()];
    for p in 4..9 {
        let step: Vec<Vec<u32>> = rows.iter().map(|r| vec![r[p]]).collect();
        parts.push(model.forward(&ids(&step), None, Some(&mut cache)).unwrap());
    }
    assert_eq!(cache.len(), 9);
    let inc = Tensor::cat(&parts, 1).unwrap();
    let d = max_abs_diff(&full, &inc);
    assert!(
        d < 1e-4,
        "cache decode differs from the full forward by {d}"
    );
}

#[test]
fn padded_batch_matches_each_sequence_alone() {
    let cfg = LlamaConfig::tiny(32);
    let (_vm, model) = random_model(&cfg, 4);
    let a = vec![3u32, 7, 1, 30, 12];
    let b = vec![9u32, 2, 25];
    // Left padding (pad id 0, masked), so that both rows end at the last column.
    let batch = ids(&[a.clone(), vec![0, 0, 9, 2, 25]]);
    let mask = Tensor::new(&[[1u8, 1, 1, 1, 1], [0, 0, 1, 1, 1]], &Device::Cpu).unwrap();
    let mut cache = KvCache::new();
    let logits = model
        .forward(&batch, Some(&mask), Some(&mut cache))
        .unwrap();
    let mut cache_a = KvCache::new();
    let mut cache_b = KvCache::new();
    let la = model.forward(&ids(&[a]), None, Some(&mut cache_a)).unwrap();
    let lb = model.forward(&ids(&[b]), None, Some(&mut cache_b)).unwrap();
    let last = |l: &Tensor, row: usize| l.get(row).unwrap().get(l.dim(1).unwrap() - 1).unwrap();
    let d = max_abs_diff(&last(&logits, 0), &last(&la, 0))
        .max(max_abs_diff(&last(&logits, 1), &last(&lb, 0)));
    assert!(d < 1e-4, "padded batch last-token logits differ by {d}");

    // Greedy decode 6 tokens: the batch gives each row's tokens alone, logits within 1e-4.
    let argmax =
        |l: &Tensor, row: usize| last(l, row).argmax(0).unwrap().to_scalar::<u32>().unwrap();
    let (mut lg, mut la, mut lb) = (logits, la, lb);
    for _ in 0..6 {
        let (ta, tb) = (argmax(&lg, 0), argmax(&lg, 1));
        assert_eq!(ta, argmax(&la, 0));
        assert_eq!(tb, argmax(&lb, 0));
        let one = Tensor::new(&[[1u8], [1]], &Device::Cpu).unwrap();
        lg = model
            .forward(&ids(&[vec![ta], vec![tb]]), Some(&one), Some(&mut cache))
            .unwrap();
        la = model
            .forward(&ids(&[vec![ta]]), None, Some(&mut cache_a))
            .unwrap();
        lb = model
            .forward(&ids(&[vec![tb]]), None, Some(&mut cache_b))
            .unwrap();
        let d = max_abs_diff(&last(&lg, 0), &last(&la, 0))
            .max(max_abs_diff(&last(&lg, 1), &last(&lb, 0)));
        assert!(d < 1e-4, "padded batch decode logits differ by {d}");
    }
    assert_eq!(cache.seen(1), 9);
}

#[test]
fn token_logprobs_are_normalised_log_softmax() {
    let logits = Tensor::new(&[[[1f32, 2., 3.], [0., 0., 0.]]], &Device::Cpu).unwrap();
    let lp = token_logprobs(&logits, &ids(&[vec![2, 1]]))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let lse = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
    assert!((lp[0][0] - (3. - lse)).abs() < 1e-6);
    assert!((lp[0][1] + 3f32.ln()).abs() < 1e-6);
}

#[test]
fn config_parses_hf_config_json_and_round_trips() {
    // SmolLM2-135M-Instruct's config.json (abridged; unknown keys must be ignored).
    let json = r#"{"architectures":["LlamaForCausalLM"],"attention_bias":false,"bos_token_id":1,
      "eos_token_id":2,"hidden_act":"silu","hidden_size":576,"intermediate_size":1536,
      "max_position_embeddings":8192,"model_type":"llama","num_attention_heads":9,
      "num_hidden_layers":30,"num_key_value_heads":3,"rms_norm_eps":1e-05,"rope_scaling":null,
      "rope_theta":100000,"tie_word_embeddings":true,"torch_dtype":"bfloat16","vocab_size":49152}"#;
    let cfg: LlamaConfig = serde_json::from_str(json).unwrap();
    assert_eq!((cfg.head_dim(), cfg.num_kv_heads()), (64, 3));
    assert!(cfg.tie_word_embeddings && cfg.validate().is_ok());
    let back: LlamaConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
    let llama3 = r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
      "num_attention_heads":2,"rope_scaling":{"factor":32.0,"high_freq_factor":4.0,
      "low_freq_factor":1.0,"original_max_position_embeddings":8192,"rope_type":"llama3"},
      "eos_token_id":[1,2]}"#;
    let c: LlamaConfig = serde_json::from_str(llama3).unwrap();
    assert!(c.validate().is_ok() && c.rope_scaling.is_some());
}

// ---------------------------------------------------------------------------------------------
// Optimizer

#[test]
fn adamw_two_steps_match_hand_computation() {
    let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
    let hp = AdamWParams {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(vec![("p".into(), p.clone())], hp).unwrap();
    let gs = [[0.5f64, -0.1], [-0.2, 0.3]];
    // Hand computation (PyTorch AdamW), in f64.
    let (mut th, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
    for (t, g) in gs.iter().enumerate() {
        let t = t as i32 + 1;
        for i in 0..2 {
            th[i] *= 1.0 - 0.1 * 0.1;
            m[i] = 0.9 * m[i] + 0.1 * g[i];
            v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
            let mh = m[i] / (1.0 - 0.9f64.powi(t));
            let vh = v[i] / (1.0 - 0.999f64.powi(t));
            th[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
        }
        let g = Tensor::new(&[g[0] as f32, g[1] as f32], &Device::Cpu).unwrap();
        opt.step(&Grads(vec![Some(g)])).unwrap();
    }
    let got = p.as_tensor().to_vec1::<f32>().unwrap();
    for i in 0..2 {
        assert!(
            (got[i] as f64 - th[i]).abs() < 1e-6,
            "param {i}: {} vs {}",
            got[i],
            th[i]
        );
    }
    assert_eq!(opt.step_count(), 2);
}

#[test]
fn schedule_values_at_known_steps() {
    let s = LrSchedule {
        peak_lr: 1.0,
        warmup_steps: 10,
        total_steps: 110,
        min_ratio: 0.1,
    };
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert!(close(s.lr(0), 0.1));
    assert!(close(s.lr(4), 0.5));
    assert!(close(s.lr(9), 1.0));
    assert!(close(s.lr(10), 1.0));
    assert!(close(s.lr(60), 0.55)); // halfway through the cosine: 0.1 + 0.9 * 0.5
    assert!(close(s.lr(110), 0.1));
    assert!(close(s.lr(10_000), 0.1));
}

#[test]
fn clip_by_global_norm() {
    let g = |a: &[f32]| Some(Tensor::new(a, &Device::Cpu).unwrap());
    // Two tensors, global norm sqrt(9 + 16 + 0) = 5.
    let mut grads = Grads(vec![g(&[3.0]), g(&[4.0, 0.0]), None]);
    let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-9);
    let a = grads.0[0].as_ref().unwrap().to_vec1::<f32>().unwrap();
    let b = grads.0[1].as_ref().unwrap().to_vec1::<f32>().unwrap();
    assert!((a[0] - 0.6).abs() < 1e-6 && (b[0] - 0.8).abs() < 1e-6 && b[1] == 0.0);
    // Under the bound: unchanged.
    let mut grads = Grads(vec![g(&[3.0]), g(&[4.0, 0.0])]);
    assert!((clip_grad_norm(&mut grads, 10.0).unwrap() - 5.0).abs() < 1e-9);
    assert_eq!(
        grads.0[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
        vec![3.0]
    );
}

/// Two micro-batches weighted by their token shares give the whole batch's gradient.
#[test]
fn accumulation_equals_full_batch() {
    let cfg = LlamaConfig::tiny(32);
    let (vm, model) = build(&cfg, DType::F64);
    reseed(&vm, 11, 0.2);
    let opt = AdamW::from_varmap(&vm, AdamWParams::default()).unwrap();
    let rows: Vec<Vec<u32>> = vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![9, 10, 11, 12]];
    let tg: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| r.iter().map(|x| x + 1).collect())
        .collect();
    let masks = [
        vec![1f64, 1., 1., 1.],
        vec![0., 1., 1., 1.],
        vec![0., 0., 1., 1.],
    ];
    let grads_of = |r: std::ops::Range<usize>| {
        let m = Tensor::new(masks[r.clone()].to_vec(), &Device::Cpu).unwrap();
        let logits = model.forward(&ids(&rows[r.clone()]), None, None).unwrap();
        let (loss, n) = masked_cross_entropy(&logits, &ids(&tg[r]), &m).unwrap();
        (opt.grads_from(&model.backward(&loss).unwrap()), n)
    };
    let (full, n) = grads_of(0..3);
    let (g1, n1) = grads_of(0..1);
    let (g2, n2) = grads_of(1..3);
    assert_eq!(n1 + n2, n);
    let mut acc = GradAccumulator::new(full.0.len());
    acc.add(&g1, n1 as f64 / n as f64).unwrap();
    acc.add(&g2, n2 as f64 / n as f64).unwrap();
    for (a, b) in acc.finish().0.iter().zip(&full.0) {
        let d = max_abs_diff(a.as_ref().unwrap(), b.as_ref().unwrap());
        assert!(d < 1e-12, "accumulated gradient differs by {d}");
    }
}

fn bits(t: &Tensor) -> Vec<u64> {
    match t.dtype() {
        DType::F32 => t
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::I64 => t
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|x| *x as u64)
            .collect(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

#[test]
fn export_import_round_trip_is_bitwise() {
    let mut cfg = LlamaConfig::tiny(32);
    cfg.attention_bias = true;
    let (vm, model) = random_model(&cfg, 21);
    let mut opt = AdamW::from_varmap(&vm, AdamWParams::default()).unwrap();
    let input = ids(&[vec![1, 2, 3, 4, 5]]);
    let mask = Tensor::new(&[[1f32; 5]], &Device::Cpu).unwrap();
    for _ in 0..2 {
        let (loss, _) =
            masked_cross_entropy(&model.forward(&input, None, None).unwrap(), &input, &mask)
                .unwrap();
        let g = opt.grads_from(&model.backward(&loss).unwrap());
        opt.step(&g).unwrap();
    }
    let exported: BTreeMap<String, Tensor> = opt.export().unwrap();
    assert!(exported.contains_key("model.layers.1.self_attn.q_proj.bias"));
    assert!(exported.contains_key("optim.m.lm_head.weight"));
    assert!(exported.contains_key("optim.v.model.norm.weight"));

    let (vm2, model2) = random_model(&cfg, 22);
    let mut opt2 = AdamW::from_varmap(&vm2, AdamWParams::default()).unwrap();
    opt2.import(&exported).unwrap();
    assert_eq!(opt2.step_count(), 2);
    let again = opt2.export().unwrap();
    assert_eq!(
        exported.keys().collect::<Vec<_>>(),
        again.keys().collect::<Vec<_>>()
    );
    for (k, t) in &exported {
        assert_eq!(bits(t), bits(&again[k]), "{k} changed in the round trip");
    }
    let l1 = model.forward(&input, None, None).unwrap();
    let l2 = model2.forward(&input, None, None).unwrap();
    assert_eq!(bits(&l1), bits(&l2));

    // A checkpoint missing a tensor is refused, and changes nothing.
    let mut partial = exported.clone();
    partial.remove("optim.v.model.norm.weight");
    let (vm3, _m3) = random_model(&cfg, 23);
    let mut opt3 = AdamW::from_varmap(&vm3, AdamWParams::default()).unwrap();
    let before = opt3.export().unwrap();
    assert!(opt3.import(&partial).is_err());
    let after = opt3.export().unwrap();
    for (k, t) in &before {
        assert_eq!(bits(t), bits(&after[k]));
    }
}
