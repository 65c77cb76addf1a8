//! SFT steps: packing by token budget, gradient accumulation equal to one big batch, lanes
//! equal to their rows alone, and a loss that falls.

mod common;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use klong_actors::learner::optim::{AdamW, AdamWParams};
use klong_actors::learner::sft::{pack_batches, sft_gradients, sft_step, SftError};
use klong_actors::learner::split::SubTrajectory;
use klong_actors::policy::model::{Llama, LlamaConfig};

fn sub(id: usize, tokens: Vec<u32>, loss_from: usize) -> SubTrajectory {
    let n = tokens.len();
    SubTrajectory {
        trajectory: format!("t{id}"),
        window: 0,
        loss_mask: (0..n).map(|i| i >= loss_from).collect(),
        tokens,
        behaviour_logprobs: None,
        spans: Vec::new(),
        prefix_len: loss_from,
        context_len: loss_from,
        reward: None,
        advantage: None,
    }
}

/// Copy-task rows of varied lengths: `a b c ... | a b c ...`, loss on the copy.
fn data(n: usize) -> Vec<SubTrajectory> {
    (0..n)
        .map(|i| {
            let half = 3 + i % 6;
            let row: Vec<u32> = (0..half)
                .map(|j| ((i * 7 + j * 3) % 20) as u32 + 2)
                .collect();
            let tokens: Vec<u32> = row
                .iter()
                .chain([1u32].iter())
                .chain(row.iter())
                .copied()
                .collect();
            sub(i, tokens, half + 1)
        })
        .collect()
}

fn model(seed: u64) -> (VarMap, Llama) {
    let mut cfg = LlamaConfig::tiny(24);
    cfg.hidden_size = 32;
    cfg.intermediate_size = 64;
    let vm = VarMap::new();
    let m = Llama::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    common::fill(&vm, seed, (0.2, 0.0), &Device::Cpu);
    (vm, m)
}

#[test]
fn packing_respects_the_budget_and_keeps_every_row_once() {
    let subs = data(40);
    let budget = 64;
    let batches = pack_batches(&subs, budget, 7).unwrap();
    let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..40).collect::<Vec<_>>());
    for b in &batches {
        let longest = b.iter().map(|&i| subs[i].len()).max().unwrap();
        assert!(b.len() * longest <= budget, "{} rows x {longest}", b.len());
    }
    assert_eq!(batches, pack_batches(&subs, budget, 7).unwrap());
    assert_ne!(batches, pack_batches(&subs, budget, 8).unwrap());
    let e = pack_batches(&subs, 10, 0).unwrap_err();
    assert!(matches!(e, SftError::TooLong { .. }), "{e}");
}

#[test]
fn accumulated_micro_batches_equal_one_batch() {
    let subs = data(12);
    let all: Vec<&SubTrajectory> = subs.iter().collect();
    let run = |micro: Vec<Vec<&SubTrajectory>>| {
        let (vm, m) = model(3);
        let mut opt = AdamW::from_varmap(&vm, AdamWParams::default()).unwrap();
        sft_step(&m, &mut opt, None, &micro, 1e-3, 0.0).unwrap()
    };
    let one = run(vec![all.clone()]);
    let three = run(vec![
        all[..2].to_vec(),
        all[2..7].to_vec(),
        all[7..].to_vec(),
    ]);
    eprintln!("one batch {one:?}\nthree micro-batches {three:?}");
    assert_eq!(one.targets, three.targets);
    assert!(
        (one.loss - three.loss).abs() < 1e-5,
        "{} vs {}",
        one.loss,
        three.loss
    );
    assert!(
        (one.grad_norm - three.grad_norm).abs() < 1e-5 * one.grad_norm,
        "{} vs {}",
        one.grad_norm,
        three.grad_norm
    );
}

/// One micro-batch of rows runs as two lanes side by side, each on its own replica of the
/// model: its gradients must be those of the same rows as one-row micro-batches (one lane
/// each, one after another), and the same bits from run to run whatever thread ran which lane.
#[test]
fn lanes_give_the_gradients_of_their_rows_alone() {
    let subs = data(6);
    let all: Vec<&SubTrajectory> = subs.iter().collect();
    let grads = |micro: Vec<Vec<&SubTrajectory>>| {
        let (vm, m) = model(3);
        let opt = AdamW::from_varmap(&vm, AdamWParams::default()).unwrap();
        let g = sft_gradients(&m, &opt, None, &micro).unwrap();
        let flat: Vec<Vec<f32>> = g
            .grads
            .0
            .iter()
            .map(|t| {
                let t = t.as_ref().expect("every weight has a gradient");
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect();
        (g.loss, flat)
    };
    let (loss, lanes) = grads(vec![all.clone()]);
    for _ in 0..3 {
        let (again_loss, again) = grads(vec![all.clone()]);
        assert_eq!(loss.to_bits(), again_loss.to_bits());
        assert!(lanes == again, "lanes' gradients differ from run to run");
    }
    let (rows_loss, rows) = grads(all.iter().map(|s| vec![*s]).collect());
    assert!((loss - rows_loss).abs() < 1e-6, "{loss} vs {rows_loss}");
    for (i, (a, b)) in lanes.iter().zip(&rows).enumerate() {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "weight {i} has a zero gradient");
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff <= 1e-5 * scale,
            "weight {i}: max diff {diff}, scale {scale}"
        );
    }
}

#[test]
fn sft_steps_lower_the_loss() {
    let subs = data(32);
    let (vm, m) = model(5);
    let mut opt = AdamW::from_varmap(
        &vm,
        AdamWParams {
            weight_decay: 0.0,
            ..AdamWParams::default()
        },
    )
    .unwrap();
    let mut first = None;
    let mut last = 0.0;
    for epoch in 0..15 {
        for batch in pack_batches(&subs, 128, epoch).unwrap() {
            let rows: Vec<&SubTrajectory> = batch.iter().map(|&i| &subs[i]).collect();
            let st = sft_step(&m, &mut opt, None, &[rows], 3e-3, 1.0).unwrap();
            first.get_or_insert(st.loss);
            last = st.loss;
        }
    }
    let first = first.unwrap();
    eprintln!("loss {first} -> {last}");
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}
