//! Batched generation: a request's tokens depend on its prompt and seed only (batched with
//! others of different lengths, it gives what it gives alone); logprobs are those of the
//! distribution sampled; EOS, stop strings, the token budget and the context end a row.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use klong_actors::policy::generate::{generate, GenerateError};
use klong_actors::policy::model::{Llama, LlamaConfig};
use klong_actors::policy::sampling::{distribution, SamplingParams, StopReason};
use klong_actors::policy::tokenizer::{ByteTokenizer, Tokenizer};

fn model(seed: u64) -> Llama {
    let mut cfg = LlamaConfig::tiny(ByteTokenizer::VOCAB_SIZE);
    cfg.max_position_embeddings = 64;
    model_of(&cfg, seed)
}

fn model_of(cfg: &LlamaConfig, seed: u64) -> Llama {
    let vm = VarMap::new();
    let m = Llama::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    // Deterministic, peaked enough that sampling is not uniform noise.
    common::fill(&vm, seed, (0.5, 0.1), &Device::Cpu);
    m
}

fn sampled(seed: u64, max: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 50,
        max_new_tokens: max,
        stop_strings: Vec::new(),
        seed,
    }
}

const TOK: Tokenizer = Tokenizer::Byte(ByteTokenizer);

#[test]
fn batched_requests_equal_each_request_alone() {
    let m = model(1);
    let prompts = vec![
        b"hello".iter().map(|&b| u32::from(b)).collect::<Vec<u32>>(),
        vec![256, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
        vec![42],
    ];
    let params = vec![
        sampled(11, 20),
        SamplingParams {
            max_new_tokens: 9,
            ..SamplingParams::greedy()
        },
        sampled(13, 15),
    ];
    let batch = generate(&m, &TOK, &prompts, &params, &[]).unwrap();
    for i in 0..prompts.len() {
        let alone = generate(&m, &TOK, &prompts[i..=i], &params[i..=i], &[]).unwrap();
        assert_eq!(batch[i].tokens, alone[0].tokens, "request {i}");
        for (a, b) in batch[i].logprobs.iter().zip(&alone[0].logprobs) {
            assert!((a - b).abs() < 1e-4, "request {i}: logprob {a} vs {b}");
        }
        assert_eq!(batch[i].stop, StopReason::MaxTokens);
        assert_eq!(batch[i].tokens.len(), params[i].max_new_tokens);
    }
    // Same seed, same tokens; another seed, other tokens.
    let again = generate(&m, &TOK, &prompts, &params, &[]).unwrap();
    assert_eq!(batch, again);
    let other = generate(&m, &TOK, &prompts[..1], &[sampled(12, 20)], &[]).unwrap();
    assert_ne!(other[0].tokens, batch[0].tokens);
}

/// Generations started from several threads at once all finish, each with what it gives
/// alone. The model is big enough that every decode step runs on all the pool's threads, and
/// each generation holds them for its steps (a decode team), so this is the test that teams
/// queue behind each other instead of waiting on each other.
#[test]
fn concurrent_generations_finish_and_equal_each_alone() {
    let mut cfg = LlamaConfig::tiny(ByteTokenizer::VOCAB_SIZE);
    // ~380k weight multiply-adds per row and step: a step of one row takes several threads.
    cfg.hidden_size = 128;
    cfg.intermediate_size = 320;
    cfg.max_position_embeddings = 128;
    let m = model_of(&cfg, 7);
    let prompts: Vec<Vec<u32>> = (0..4u32)
        .map(|i| (0..3 + 4 * i).map(|j| (j * 7 + i) % 256).collect())
        .collect();
    let params: Vec<SamplingParams> = (0..4).map(|i| sampled(100 + i, 40)).collect();
    let alone: Vec<_> = (0..4)
        .map(|i| generate(&m, &TOK, &prompts[i..=i], &params[i..=i], &[]).unwrap())
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let (m2, p2, s2) = (m.clone(), prompts.clone(), params.clone());
    std::thread::spawn(move || {
        let out: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    let (m, p, s) = (&m2, &p2, &s2);
                    scope.spawn(move || generate(m, &TOK, &p[i..=i], &s[i..=i], &[]).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let _ = tx.send(out);
    });
    let together = rx
        .recv_timeout(std::time::Duration::from_secs(300))
        .expect("four concurrent generations finish within 5 minutes");
    assert_eq!(together, alone);
}

#[test]
fn logprobs_are_those_of_the_sampled_distribution() {
    let m = model(2);
    let prompt: Vec<u32> = vec![256, 65, 66, 67];
    let params = sampled(5, 6);
    let out = generate(
        &m,
        &TOK,
        std::slice::from_ref(&prompt),
        std::slice::from_ref(&params),
        &[],
    )
    .unwrap();
    // Recompute each step with a full forward over prompt + tokens so far.
    let mut seq = prompt;
    let c = &out[0];
    for ((tok, lp), plain) in c.tokens.iter().zip(&c.logprobs).zip(&c.model_logprobs) {
        let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = m.forward(&ids, None, None).unwrap();
        let last: Vec<f32> = logits
            .squeeze(0)
            .unwrap()
            .get(seq.len() - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let dist = distribution(&last, &params).unwrap();
        let expect = dist
            .iter()
            .find(|(id, _)| id == tok)
            .map(|(_, l)| *l as f32)
            .expect("sampled token is in the distribution");
        assert!((expect - lp).abs() < 1e-4, "{expect} vs {lp}");
        let max = last.iter().copied().fold(f32::MIN, f32::max);
        let lse = max + last.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
        let want = last[*tok as usize] - lse;
        assert!(
            (want - plain).abs() < 1e-4,
            "model logprob {want} vs {plain}"
        );
        seq.push(*tok);
    }
}

#[test]
fn eos_stop_strings_and_context_end_generation() {
    let m = model(3);
    let prompt: Vec<u32> = vec![256, 104, 105];
    let greedy = SamplingParams {
        max_new_tokens: 30,
        ..SamplingParams::greedy()
    };
    let free = generate(
        &m,
        &TOK,
        std::slice::from_ref(&prompt),
        std::slice::from_ref(&greedy),
        &[],
    )
    .unwrap();
    let toks = &free[0].tokens;

    // EOS: declare the third greedy token an end-of-sequence id.
    let eos = toks[2];
    let first = toks.iter().position(|&t| t == eos).unwrap();
    let out = generate(
        &m,
        &TOK,
        std::slice::from_ref(&prompt),
        std::slice::from_ref(&greedy),
        &[eos],
    )
    .unwrap();
    assert_eq!(out[0].stop, StopReason::Eos(eos));
    assert_eq!(
        out[0].tokens,
        toks[..=first].to_vec(),
        "EOS is kept as a token"
    );
    assert_eq!(out[0].text, TOK.decode(&toks[..first]).unwrap());

    // A stop string: the decoded text of tokens 3..5, if printable enough to be found.
    let full = TOK.decode(toks).unwrap();
    let stop = full.chars().skip(4).take(2).collect::<String>();
    let at = full.find(&stop).unwrap();
    let params = SamplingParams {
        stop_strings: vec![stop.clone()],
        ..greedy.clone()
    };
    let out = generate(&m, &TOK, std::slice::from_ref(&prompt), &[params], &[]).unwrap();
    assert!(
        matches!(&out[0].stop, StopReason::StopString { stop: s, at: a } if *s == stop && *a == at)
    );
    assert_eq!(out[0].text, full[..at]);

    // The context (64) ends a row that asks for more.
    let long: Vec<u32> = (0..60).map(|i| 60 + i).collect();
    let params = SamplingParams {
        max_new_tokens: 100,
        ..SamplingParams::greedy()
    };
    let out = generate(&m, &TOK, &[long], &[params], &[]).unwrap();
    assert_eq!(out[0].stop, StopReason::ContextFull);
    assert_eq!(out[0].tokens.len(), 4);
}

#[test]
fn bad_requests_are_typed_errors() {
    let m = model(4);
    let g = SamplingParams::greedy();
    assert!(matches!(
        generate(&m, &TOK, &[vec![]], std::slice::from_ref(&g), &[]),
        Err(GenerateError::EmptyPrompt { index: 0 })
    ));
    assert!(matches!(
        generate(
            &m,
            &TOK,
            &[vec![1], vec![0; 64]],
            &[g.clone(), g.clone()],
            &[]
        ),
        Err(GenerateError::PromptTooLong { index: 1, .. })
    ));
    assert!(matches!(
        generate(&m, &TOK, &[vec![9999]], std::slice::from_ref(&g), &[]),
        Err(GenerateError::TokenOutOfRange { id: 9999, .. })
    ));
    assert!(matches!(
        generate(&m, &TOK, &[vec![1]], &[], &[]),
        Err(GenerateError::ParamsCount { .. })
    ));
    let bad = SamplingParams {
        temperature: -1.0,
        ..g
    };
    assert!(matches!(
        generate(&m, &TOK, &[vec![1]], &[bad], &[]),
        Err(GenerateError::Sampling { index: 0, .. })
    ));
}
