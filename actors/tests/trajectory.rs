//! Trajectories (token-exact turns, JSONL import/export) and trajectory splitting (design §5).
//!
//! The property tests use a seeded generator of their own (SplitMix64): a failure prints the
//! case's seed, and `case(seed)` reproduces it.

use std::collections::BTreeMap;

use klong_actors::learner::split::{split, Pin, SplitConfig, SplitError, SplitMode, SubTrajectory};
use klong_actors::policy::chat::{ChatMessage, ChatTemplate, Role};
use klong_actors::policy::generate::Completion;
use klong_actors::policy::sampling::StopReason;
use klong_actors::policy::tokenizer::{ByteTokenizer, Tokenizer};
use klong_actors::policy::toolcall::ToolCallRequest;
use klong_actors::trajectory::{
    export_jsonl, import_jsonl, tokenize_conversation, AssistantTurn, ConversationError,
    ImportErrorKind, ImportOptions, PrefixRule, Trajectory, TrajectoryError, Turn,
};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// A seeded generator

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn asst(tokens: Vec<u32>, logprobs: bool, version: Option<u64>) -> Turn {
    let lp = logprobs.then(|| tokens.iter().map(|&t| -(t as f32) / 1000.0).collect());
    Turn::Assistant(AssistantTurn {
        tokens,
        logprobs: lp,
        policy_version: version,
    })
}

/// A random trajectory whose token ids are their positions (so a window's tokens name where
/// they came from), with turns up to `3 * context` tokens long.
fn random_trajectory(rng: &mut Rng, context: usize) -> Trajectory {
    let mut next = 0u32;
    let mut take = |n: usize| -> Vec<u32> {
        let v = (next..next + n as u32).collect();
        next += n as u32;
        v
    };
    let turn_len = |rng: &mut Rng| match rng.range(0, 9) {
        0 => 0,
        1 => rng.range(context / 2, 3 * context),
        _ => rng.range(1, (context / 4).max(2)),
    };
    let mut prefix = Vec::new();
    let prefix_turns = rng.range(0, 4);
    for i in 0..prefix_turns {
        if i > 0 && rng.chance(30) {
            let n = rng.range(1, 6);
            let (lp, v) = (rng.chance(70), rng.chance(50).then_some(0));
            prefix.push(asst(take(n), lp, v));
        } else {
            let hi = if rng.chance(20) { context } else { context / 3 };
            let n = rng.range(usize::from(i == 0), hi.max(1));
            prefix.push(Turn::Prompt(take(n)));
        }
    }
    let mut t = Trajectory::new(format!("t{}", rng.next() % 1000), None, prefix);
    let n_turns = rng.range(1, 300);
    for i in 0..n_turns {
        let n = turn_len(rng);
        let first = i == 0 && t.prefix_len() == 0;
        if first || rng.chance(45) {
            let n = if first { n.max(1) } else { n };
            if rng.chance(50) {
                t.push_observation(take(n));
            } else {
                t.push_prompt(take(n));
            }
        } else {
            let (lp, v) = (rng.chance(80), Some(rng.range(0, 5) as u64));
            t.push_assistant(match asst(take(n), lp, v) {
                Turn::Assistant(a) => a,
                _ => unreachable!(),
            });
        }
    }
    if rng.chance(50) {
        t.judge(rng.range(0, 10) as f64 / 10.0, BTreeMap::new());
    }
    t
}

/// Position -> (turn, offset, is assistant) for a trajectory made by `random_trajectory`.
fn positions(t: &Trajectory) -> Vec<(usize, usize, bool)> {
    let mut out = Vec::new();
    for (i, turn) in t.all_turns().enumerate() {
        for k in 0..turn.len() {
            out.push((i, k, turn.is_assistant()));
        }
    }
    out
}

/// Checks that the spans describe the window's tokens, mask, logprobs and versions.
fn check_spans(t: &Trajectory, s: &SubTrajectory) {
    let mut pos = 0;
    for span in &s.spans {
        let turn = t.turn(span.turn).expect("span names a turn");
        assert_eq!(
            &s.tokens[pos..pos + span.len],
            &turn.tokens()[span.offset..span.offset + span.len]
        );
        for k in 0..span.len {
            assert_eq!(s.loss_mask[pos + k], span.loss);
            if let (Some(lp), true) = (&s.behaviour_logprobs, span.loss) {
                let a = turn.as_assistant().unwrap();
                assert_eq!(lp[pos + k], a.logprobs.as_ref().unwrap()[span.offset + k]);
            }
        }
        if span.loss {
            assert!(turn.is_assistant());
            assert_eq!(
                span.policy_version,
                turn.as_assistant().unwrap().policy_version
            );
        }
        pos += span.len;
    }
    assert_eq!(pos, s.tokens.len());
    assert_eq!(s.loss_mask.len(), s.tokens.len());
    let has_all = s.spans.iter().filter(|sp| sp.loss).all(|sp| {
        t.turn(sp.turn)
            .unwrap()
            .as_assistant()
            .unwrap()
            .logprobs
            .is_some()
    });
    assert_eq!(s.behaviour_logprobs.is_some(), has_all);
}

/// One random case: a trajectory and a config, split, and every property checked. Returns the
/// mode and the number of windows (`None` for an error).
fn case(seed: u64) -> (SplitMode, Option<usize>) {
    let mut rng = Rng(seed);
    let context = rng.range(2, 400);
    let overlap = match rng.range(0, 3) {
        0 => 0,
        1 => rng.range(0, context),
        _ => rng.range(0, context / 4),
    };
    let mode = [SplitMode::Split, SplitMode::Truncate, SplitMode::Sliding][rng.range(0, 2)];
    let t = random_trajectory(&mut rng, context);
    t.validate().expect("generated trajectories are valid");
    // Pin the recorded prefix, or re-pin the first K turns.
    let (pin, pinned_turns) = if rng.chance(30) {
        let k = rng.range(0, 5);
        (Pin::FirstTurns(k), k.min(t.num_turns()))
    } else {
        (Pin::Recorded, t.prefix.len())
    };
    let config = SplitConfig::new(context, mode, overlap).with_pin(pin);
    let pos = positions(&t);
    let p: usize = t.all_turns().take(pinned_turns).map(Turn::len).sum();
    let result = split(&t, &config);

    // Errors exactly when the parameters leave no room.
    let pinned = if mode == SplitMode::Split { p } else { 0 };
    let carried = if pinned == 0 { overlap.max(1) } else { overlap };
    match mode {
        SplitMode::Truncate => assert!(result.is_ok()),
        _ if overlap + 2 > context => {
            assert!(matches!(result, Err(SplitError::OverlapTooLarge { .. })))
        }
        _ if pinned + carried + 1 > context => {
            assert!(matches!(result, Err(SplitError::PrefixTooLong { .. })))
        }
        _ => assert!(result.is_ok(), "{result:?}"),
    }
    let Ok(subs) = result else {
        return (mode, None);
    };

    let mut targets = vec![0u32; pos.len()];
    let mut last_own_end = 0;
    for (w, s) in subs.iter().enumerate() {
        assert_eq!(s.window, w);
        assert_eq!(s.trajectory, t.id);
        assert!(s.len() <= context, "window {w}: {} > {context}", s.len());
        assert!(!s.loss_mask[0], "window {w}: the first token is a target");
        assert!(s.num_targets() > 0, "window {w} has no target");
        assert_eq!(s.reward, t.outcome.as_ref().map(|j| j.reward));
        check_spans(&t, s);
        for (k, &tok) in s.tokens.iter().enumerate() {
            let (_, _, assistant) = pos[tok as usize];
            if s.loss_mask[k] {
                assert!(assistant, "window {w}: a non-assistant token is a target");
                targets[tok as usize] += 1;
            }
        }
        match mode {
            SplitMode::Truncate => {
                assert_eq!(s.tokens, t.tokens()[..context.min(t.len())]);
            }
            SplitMode::Split | SplitMode::Sliding => {
                // The pinned prefix, untruncated, then one contiguous stretch of the body:
                // carried-over context (no targets) and the window's own tokens.
                assert_eq!(s.prefix_len, pinned);
                assert_eq!(s.tokens[..pinned], t.tokens()[..pinned]);
                let body = &s.tokens[pinned..];
                assert!(body.windows(2).all(|x| x[1] == x[0] + 1), "window {w}: gap");
                let c = s.context_len - pinned;
                assert!(s.loss_mask[pinned..s.context_len].iter().all(|m| !m));
                if let Some(&own_start) = body.get(c) {
                    let own_start = own_start as usize;
                    assert!(own_start >= last_own_end, "window {w}: own tokens overlap");
                    assert_eq!(c, carried.min(own_start - pinned), "window {w}: carried");
                    last_own_end = own_start + body.len() - c;
                }
                if w > 0 && pinned > 0 {
                    assert!(
                        s.loss_mask[..pinned].iter().all(|m| !m),
                        "prefix targets after window 0"
                    );
                }
            }
        }
    }
    for (i, &(turn, offset, assistant)) in pos.iter().enumerate() {
        let n = targets[i];
        match mode {
            SplitMode::Truncate => {
                assert_eq!(n, u32::from(assistant && i < context), "position {i}")
            }
            _ => assert_eq!(
                n,
                u32::from(assistant),
                "turn {turn} offset {offset}: a target {n} times ({config:?})"
            ),
        }
    }
    (mode, Some(subs.len()))
}

#[test]
fn split_properties_hold_on_random_trajectories() {
    let mut multi = BTreeMap::new();
    for seed in 0..600u64 {
        match std::panic::catch_unwind(|| case(seed)) {
            Ok((mode, Some(n))) if n > 1 => *multi.entry(format!("{mode:?}")).or_insert(0) += 1,
            Ok(_) => {}
            Err(_) => panic!("property failed for seed {seed} (reproduce with case({seed}))"),
        }
    }
    // The cases exercise what matters: many trajectories split into several windows.
    assert!(multi.get("Split").is_some_and(|&n| n >= 80), "{multi:?}");
    assert!(multi.get("Sliding").is_some_and(|&n| n >= 80), "{multi:?}");
}

// ---------------------------------------------------------------------------------------------
// Hand-checked windows

fn prompt(r: std::ops::Range<u32>) -> Turn {
    Turn::Prompt(r.collect())
}

/// prefix 0..3 | A1 3..7 | O1 7..10 | A2 10..15 | O2 15..17 | A3 17..20
fn small() -> Trajectory {
    let mut t = Trajectory::new("small", Some("task".into()), vec![prompt(0..3)]);
    let a = |r: std::ops::Range<u32>, v| AssistantTurn {
        logprobs: Some(r.clone().map(|x| -(x as f32)).collect()),
        tokens: r.collect(),
        policy_version: Some(v),
    };
    t.push_assistant(a(3..7, 1));
    t.push_observation((7..10).collect());
    t.push_assistant(a(10..15, 2));
    t.push_observation((15..17).collect());
    t.push_assistant(a(17..20, 3));
    t
}

fn targets(s: &SubTrajectory) -> Vec<u32> {
    s.tokens
        .iter()
        .zip(&s.loss_mask)
        .filter(|(_, &m)| m)
        .map(|(&t, _)| t)
        .collect()
}

fn range(r: std::ops::Range<u32>) -> Vec<u32> {
    r.collect()
}

#[test]
fn split_windows_by_hand() {
    let t = small();
    let subs = split(&t, &SplitConfig::new(12, SplitMode::Split, 2)).unwrap();
    let got: Vec<_> = subs
        .iter()
        .map(|s| (s.tokens.clone(), targets(s)))
        .collect();
    // Window 0: prefix + A1 (O1 would be trailing context: moved on).
    // Then prefix + O1 alone would teach nothing (A2 does not fit beside O1): not emitted.
    // Window 1: prefix + 2 carried (O1's tail) + A2 (O2 trailing: moved on).
    // Window 2: prefix + 2 carried (A2's tail, not targets again) + O2 + A3.
    assert_eq!(
        got,
        vec![
            ([range(0..3), range(3..7)].concat(), range(3..7)),
            ([range(0..3), range(8..15)].concat(), range(10..15)),
            ([range(0..3), range(13..20)].concat(), range(17..20)),
        ]
    );
    assert_eq!(
        subs.iter()
            .map(|s| (s.prefix_len, s.context_len))
            .collect::<Vec<_>>(),
        vec![(3, 3), (3, 5), (3, 5)]
    );
    assert_eq!(subs[1].policy_versions(), Some((2, 2)));
    let lp = subs[1].behaviour_logprobs.as_ref().unwrap();
    assert_eq!(lp[5..], [-10.0, -11.0, -12.0, -13.0, -14.0]);
    assert_eq!(lp[..5], [0.0; 5]);

    // Everything fits: one window, the whole trajectory.
    let subs = split(&t, &SplitConfig::new(20, SplitMode::Split, 4)).unwrap();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].tokens, range(0..20));
    assert_eq!(subs[0].num_targets(), 12);
    assert_eq!(subs[0].policy_versions(), Some((1, 3)));
}

#[test]
fn a_turn_longer_than_the_window_is_cut() {
    let mut t = Trajectory::new("long", None, vec![prompt(0..2)]);
    t.push_assistant(AssistantTurn {
        tokens: range(2..22),
        logprobs: None,
        policy_version: None,
    });
    let subs = split(&t, &SplitConfig::new(10, SplitMode::Split, 3)).unwrap();
    let got: Vec<_> = subs
        .iter()
        .map(|s| (s.tokens.clone(), targets(s)))
        .collect();
    assert_eq!(
        got,
        vec![
            (range(0..10), range(2..10)),
            ([range(0..2), range(7..15)].concat(), range(10..15)),
            ([range(0..2), range(12..20)].concat(), range(15..20)),
            ([range(0..2), range(17..22)].concat(), range(20..22)),
        ]
    );
    assert!(subs.iter().all(|s| s.behaviour_logprobs.is_none()));
    // The span of a cut turn says where in the turn the window starts.
    let spans: Vec<_> = subs[1]
        .spans
        .iter()
        .map(|s| (s.turn, s.offset, s.len, s.loss))
        .collect();
    assert_eq!(
        spans,
        vec![(0, 0, 2, false), (1, 5, 3, false), (1, 8, 5, true)]
    );
}

#[test]
fn a_long_observation_is_cut_and_the_windows_without_targets_dropped() {
    // prefix 0..2 | A 2..4 | O 4..30 | A 30..33; L = 8, overlap 2: fresh room 4.
    let mut t = Trajectory::new("obs", None, vec![prompt(0..2)]);
    let a = |r: std::ops::Range<u32>| AssistantTurn {
        tokens: r.collect(),
        logprobs: None,
        policy_version: None,
    };
    t.push_assistant(a(2..4));
    t.push_observation(range(4..30));
    t.push_assistant(a(30..33));
    let subs = split(&t, &SplitConfig::new(8, SplitMode::Split, 2)).unwrap();
    let got: Vec<_> = subs
        .iter()
        .map(|s| (s.tokens.clone(), targets(s)))
        .collect();
    assert_eq!(
        got,
        vec![
            (range(0..4), range(2..4)),
            // Exactly `overlap` tokens of the observation's tail are carried over.
            ([range(0..2), range(28..33)].concat(), range(30..33)),
        ]
    );
    assert_eq!(subs[1].window, 1);
}

#[test]
fn prefix_assistant_tokens_are_targets_in_the_first_window_only() {
    let prefix = vec![prompt(0..2), asst(range(2..4), true, Some(0)), prompt(4..5)];
    let mut t = Trajectory::new("p", None, prefix);
    t.push_assistant(AssistantTurn {
        tokens: range(5..15),
        logprobs: Some(vec![-0.5; 10]),
        policy_version: Some(1),
    });
    let subs = split(&t, &SplitConfig::new(9, SplitMode::Split, 0)).unwrap();
    let got: Vec<_> = subs.iter().map(targets).collect();
    assert_eq!(
        got,
        vec![
            [range(2..4), range(5..9)].concat(),
            range(9..13),
            range(13..15)
        ]
    );
    assert!(subs.iter().all(|s| s.tokens[..5] == range(0..5)));

    // Only the prefix has assistant tokens: one window, the prefix alone.
    let t = Trajectory::new(
        "p2",
        None,
        vec![prompt(0..2), asst(range(2..4), true, None)],
    );
    let subs = split(&t, &SplitConfig::new(9, SplitMode::Split, 0)).unwrap();
    assert_eq!(subs.len(), 1);
    assert_eq!(targets(&subs[0]), range(2..4));
}

#[test]
fn truncate_and_sliding_by_hand() {
    let t = small();
    let subs = split(&t, &SplitConfig::new(12, SplitMode::Truncate, 5)).unwrap();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].tokens, range(0..12));
    assert_eq!(targets(&subs[0]), [range(3..7), range(10..12)].concat());
    assert_eq!((subs[0].prefix_len, subs[0].context_len), (0, 0));

    // Sliding: no pinned prefix. L = 8, overlap 1.
    let subs = split(&t, &SplitConfig::new(8, SplitMode::Sliding, 1)).unwrap();
    let got: Vec<_> = subs
        .iter()
        .map(|s| (s.tokens.clone(), targets(s)))
        .collect();
    assert_eq!(
        got,
        vec![
            (range(0..7), range(3..7)),
            (range(9..15), range(10..15)),
            (range(14..20), range(17..20)),
        ]
    );
    assert!(subs.iter().all(|s| s.prefix_len == 0));

    // Overlap 0 without a prefix still carries one token, so no target is first.
    let subs = split(&t, &SplitConfig::new(8, SplitMode::Sliding, 0)).unwrap();
    assert!(subs
        .iter()
        .all(|s| !s.loss_mask[0] && s.context_len == 1 || s.window == 0));
}

#[test]
fn split_errors() {
    let t = small();
    let err = |c, m, o| split(&t, &SplitConfig::new(c, m, o)).unwrap_err();
    assert_eq!(err(1, SplitMode::Split, 0), SplitError::ContextTooSmall(1));
    assert!(matches!(
        err(6, SplitMode::Sliding, 5),
        SplitError::OverlapTooLarge {
            overlap: 5,
            context: 6
        }
    ));
    // Prefix 3 + overlap 2 + 1 own token > 5.
    let e = err(5, SplitMode::Split, 2);
    assert!(
        matches!(e, SplitError::PrefixTooLong { prefix: 3, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("needs 6"), "{e}");
    assert!(split(&t, &SplitConfig::new(6, SplitMode::Split, 2)).is_ok());

    let mut bad = small();
    if let Turn::Assistant(a) = &mut bad.turns[0] {
        a.logprobs = Some(vec![-1.0]);
    }
    let e = split(&bad, &SplitConfig::new(12, SplitMode::Split, 0)).unwrap_err();
    assert!(matches!(
        e,
        SplitError::Invalid {
            source: TrajectoryError::LogprobCount {
                turn: 1,
                tokens: 4,
                logprobs: 1
            },
            ..
        }
    ));

    // No assistant tokens: no sub-trajectories.
    let mut t = Trajectory::new("none", None, vec![prompt(0..3)]);
    t.push_observation(range(3..50));
    assert!(split(&t, &SplitConfig::new(8, SplitMode::Split, 2))
        .unwrap()
        .is_empty());
}

// ---------------------------------------------------------------------------------------------
// Trajectory invariants and serde

#[test]
fn validation() {
    let mut t = small();
    assert_eq!(t.len(), 20);
    assert_eq!(t.prefix_len(), 3);
    assert_eq!(t.assistant_len(), 12);
    assert_eq!(t.num_turns(), 6);
    assert_eq!(t.tokens(), range(0..20));
    t.validate().unwrap();
    t.validate_vocab(20).unwrap();
    assert_eq!(
        t.validate_vocab(19),
        Err(TrajectoryError::TokenOutOfRange {
            turn: 5,
            id: 19,
            vocab: 19
        })
    );

    if let Turn::Assistant(a) = &mut t.turns[2] {
        a.logprobs.as_mut().unwrap()[2] = f32::NAN;
    }
    assert!(matches!(
        t.validate(),
        Err(TrajectoryError::BadLogprob {
            turn: 3,
            index: 2,
            ..
        })
    ));

    let mut t = small();
    t.judge(f64::INFINITY, BTreeMap::new());
    assert!(matches!(t.validate(), Err(TrajectoryError::BadReward(_))));
    let mut t = small();
    t.judge(1.0, BTreeMap::from([("leaf".to_string(), f64::NAN)]));
    assert!(matches!(
        t.validate(),
        Err(TrajectoryError::BadGrade { .. })
    ));

    // An empty prompt does not count as a first token.
    let mut t = Trajectory::new("a", None, vec![Turn::Prompt(vec![])]);
    t.push_assistant(AssistantTurn {
        tokens: vec![1],
        logprobs: None,
        policy_version: None,
    });
    assert_eq!(
        t.validate(),
        Err(TrajectoryError::AssistantFirst { turn: 1 })
    );
}

#[test]
fn serde_round_trip_and_completions() {
    let mut t = small();
    t.tools = vec![json!({"type": "function", "function": {"name": "ls"}})];
    t.judge(0.25, BTreeMap::from([("a/b".to_string(), 1.0)]));
    let completion = Completion {
        tokens: vec![104, 105, 258],
        logprobs: vec![-0.1, -0.2, -0.3],
        model_logprobs: vec![-0.1, -0.2, -0.3],
        text: "hi".into(),
        stop: StopReason::Eos(258),
    };
    t.push_observation(vec![1, 2]);
    t.push_assistant(AssistantTurn::from_completion(&completion, 7));
    t.validate().unwrap();
    let text = serde_json::to_string(&t).unwrap();
    // Tools are one JSON string: formats that are not self-describing can hold them.
    assert!(text.contains(r#""tools":"[{"#), "{text}");
    let back: Trajectory = serde_json::from_str(&text).unwrap();
    assert_eq!(back, t);
    let a = back.turns.last().unwrap().as_assistant().unwrap();
    assert_eq!(a.tokens, vec![104, 105, 258]);
    assert_eq!(a.policy_version, Some(7));
}

// ---------------------------------------------------------------------------------------------
// JSONL import and export (byte tokenizer, built-in ChatML)

fn byte() -> Tokenizer {
    Tokenizer::Byte(ByteTokenizer)
}

fn tools() -> Value {
    json!([{"type": "function", "function": {"name": "ls", "description": "list files",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}])
}

fn conversation() -> Value {
    json!({
        "messages": [
            {"role": "system", "content": "You reproduce papers."},
            {"role": "user", "content": "PAPER: read it"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "ls", "arguments": "{\"path\": \".\"}"}},
                {"id": "c2", "type": "function",
                 "function": {"name": "ls", "arguments": {"path": "src"}}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "a.py\nb.py"},
            {"role": "tool", "tool_call_id": "c2", "content": "main.rs"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"type": "function", "function": {"name": "ls", "arguments": "{}"}}]},
            {"role": "tool", "content": [{"type": "text", "text": "x"}]},
            {"role": "user", "content": "go on"},
            {"role": "assistant", "content": "Done."}
        ],
        "tools": tools(),
        "reward": 0.75
    })
}

fn import(
    text: &str,
    options: &ImportOptions,
) -> Result<Vec<Trajectory>, klong_actors::trajectory::ImportError> {
    import_jsonl(
        text.as_bytes(),
        "data.jsonl",
        &byte(),
        &ChatTemplate::ChatMl,
        options,
    )
}

fn decode(t: &[u32]) -> String {
    ByteTokenizer.decode(t)
}

#[test]
fn import_tokenizes_once_with_the_template() {
    let line = conversation().to_string();
    let trajs = import(&format!("{line}\n\n{line}\n"), &ImportOptions::default()).unwrap();
    assert_eq!(trajs.len(), 2);
    let t = &trajs[0];
    assert_eq!(t.id, "data.jsonl:1");
    assert_eq!(trajs[1].id, "data.jsonl:3");
    assert_eq!(t.outcome.as_ref().unwrap().reward, 0.75);
    t.validate().unwrap();

    // The tokens are the whole rendered conversation, less the "\n" after the last <|im_end|>.
    let record: Value = conversation();
    let messages = wire_to_chat(&record["messages"]);
    let tools = record["tools"].as_array().unwrap().clone();
    let full = ChatTemplate::ChatMl
        .render(&messages, &tools, false)
        .unwrap();
    assert_eq!(decode(&t.tokens()), full.strip_suffix('\n').unwrap());
    assert_eq!(
        t.tokens(),
        ByteTokenizer.encode(full.strip_suffix('\n').unwrap(), true)
    );

    // The prefix: system + user + the generation prompt.
    let prefix = decode(
        &t.prefix
            .iter()
            .flat_map(|x| x.tokens().to_vec())
            .collect::<Vec<_>>(),
    );
    assert!(prefix.starts_with("<|im_start|>system\nYou reproduce papers.\n\n# Tools"));
    assert!(
        prefix.ends_with("PAPER: read it<|im_end|>\n<|im_start|>assistant\n"),
        "{prefix}"
    );
    assert_eq!(t.prefix.len(), 2);

    // Assistant turns hold what the policy writes, through <|im_end|>; framing elsewhere.
    let kinds: Vec<(&str, String)> = t
        .turns
        .iter()
        .map(|x| {
            let k = match x {
                Turn::Prompt(_) => "prompt",
                Turn::Assistant(_) => "assistant",
                Turn::Observation(_) => "observation",
            };
            (k, decode(x.tokens()))
        })
        .collect();
    let expect = [
        ("assistant", "Let me look.\n<tool_call>\n{\"name\": \"ls\", \"arguments\": {\"path\": \".\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"ls\", \"arguments\": {\"path\": \"src\"}}\n</tool_call><|im_end|>"),
        ("observation", "\n<|im_start|>user\n<tool_response>\na.py\nb.py\n</tool_response>"),
        ("observation", "\n<tool_response>\nmain.rs\n</tool_response><|im_end|>\n<|im_start|>assistant\n"),
        ("assistant", "<tool_call>\n{\"name\": \"ls\", \"arguments\": {}}\n</tool_call><|im_end|>"),
        ("observation", "\n<|im_start|>user\n<tool_response>\nx\n</tool_response><|im_end|>\n"),
        ("prompt", "<|im_start|>user\ngo on<|im_end|>\n<|im_start|>assistant\n"),
        ("assistant", "Done.<|im_end|>"),
    ];
    let expect: Vec<(&str, String)> = expect.iter().map(|(k, s)| (*k, s.to_string())).collect();
    assert_eq!(kinds, expect);
    for a in t.turns.iter().filter_map(Turn::as_assistant) {
        assert_eq!((a.logprobs.as_ref(), a.policy_version), (None, None));
    }

    // Split for SFT: no behaviour logprobs.
    let subs = split(
        t,
        &SplitConfig::new(t.prefix_len() + 60, SplitMode::Split, 8),
    )
    .unwrap();
    assert!(subs.len() > 1);
    assert!(subs.iter().all(|s| s.behaviour_logprobs.is_none()));
}

fn wire_to_chat(messages: &Value) -> Vec<ChatMessage> {
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role: Role = serde_json::from_value(m["role"].clone()).unwrap();
            let content = match &m["content"] {
                Value::String(s) => s.clone(),
                Value::Array(parts) => parts.iter().map(|p| p["text"].as_str().unwrap()).collect(),
                _ => String::new(),
            };
            let calls = m["tool_calls"]
                .as_array()
                .map(|cs| {
                    cs.iter()
                        .map(|c| {
                            let args = &c["function"]["arguments"];
                            let arguments = match args {
                                Value::String(s) => serde_json::from_str(s).unwrap(),
                                v => v.clone(),
                            };
                            ToolCallRequest {
                                name: c["function"]["name"].as_str().unwrap().into(),
                                arguments,
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            ChatMessage {
                role,
                content,
                tool_calls: calls,
                tool_call_id: None,
                name: None,
            }
        })
        .collect()
}

#[test]
fn export_round_trips() {
    let line = conversation().to_string();
    let trajs = import(&line, &ImportOptions::default()).unwrap();
    let mut out = Vec::new();
    export_jsonl(&mut out, &trajs, &byte(), &ChatTemplate::ChatMl).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 1);
    let exported: Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(exported["reward"], json!(0.75));
    assert_eq!(exported["tools"], tools());
    assert_eq!(exported["id"], json!("data.jsonl:1"));
    // The same messages (tool-call ids are not in the tokens, so they do not come back).
    assert_eq!(
        wire_to_chat(&exported["messages"]),
        wire_to_chat(&conversation()["messages"])
    );
    // Arguments are written as JSON strings, as OpenAI does.
    assert!(exported["messages"][2]["tool_calls"][0]["function"]["arguments"].is_string());

    // Importing the export gives the same tokens.
    let again = import(&text, &ImportOptions::default()).unwrap();
    assert_eq!(again[0].prefix, trajs[0].prefix);
    assert_eq!(again[0].turns, trajs[0].turns);

    // A rollout-built trajectory exports too (no system message; a turn cut short).
    let tok = ByteTokenizer;
    let mut t = Trajectory::new(
        "rollout",
        Some("task-1".into()),
        vec![Turn::Prompt(tok.encode(
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
            true,
        ))],
    );
    t.push_assistant(AssistantTurn {
        tokens: tok.encode("Hello<|im_end|>", true),
        logprobs: Some(vec![-0.5; 6]),
        policy_version: Some(3),
    });
    t.push_prompt(tok.encode(
        "\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n",
        true,
    ));
    t.push_assistant(AssistantTurn {
        tokens: tok.encode("cut sho", true),
        logprobs: Some(vec![-0.5; 7]),
        policy_version: Some(3),
    });
    let mut out = Vec::new();
    export_jsonl(&mut out, &[t], &byte(), &ChatTemplate::ChatMl).unwrap();
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        v["messages"],
        json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "more"},
            {"role": "assistant", "content": "cut sho"},
        ])
    );
    assert!(v.get("reward").is_none());
}

#[test]
fn prefix_rules() {
    let line = conversation().to_string();
    let with = |prefix| ImportOptions {
        prefix,
        ..ImportOptions::default()
    };
    let t = &import(&line, &with(PrefixRule::FirstMessages(1))).unwrap()[0];
    assert_eq!(t.prefix.len(), 1);
    assert!(decode(t.prefix[0].tokens()).ends_with("# Tools") || t.prefix_len() > 0);
    let t = &import(&line, &with(PrefixRule::FirstMessages(5))).unwrap()[0];
    // system, user, assistant, tool, tool (the last with the next generation prompt).
    assert_eq!(t.prefix.len(), 5);
    assert!(decode(&t.tokens()[..t.prefix_len()]).ends_with("<|im_start|>assistant\n"));
    let t = &import(&line, &with(PrefixRule::ThroughMarker("PAPER:".into()))).unwrap()[0];
    assert_eq!(t.prefix.len(), 2);
    let e = import(&line, &with(PrefixRule::ThroughMarker("nowhere".into()))).unwrap_err();
    assert!(matches!(
        *e.kind,
        ImportErrorKind::Conversation(ConversationError::MarkerNotFound(_))
    ));
    assert!(e.to_string().starts_with("data.jsonl:1: "), "{e}");
}

#[test]
fn bad_input_names_file_line_and_message() {
    let good = conversation().to_string();
    let opts = ImportOptions::default();

    let e = import(&format!("{good}\n{{not json\n"), &opts).unwrap_err();
    assert_eq!(
        (e.file.as_str(), e.line, e.message),
        ("data.jsonl", 2, None)
    );
    assert!(matches!(*e.kind, ImportErrorKind::Json(_)));
    assert!(
        e.to_string()
            .starts_with("data.jsonl:2: not a conversation"),
        "{e}"
    );

    let first_assistant = json!({"messages": [{"role": "assistant", "content": "hi"}]});
    let e = import(&first_assistant.to_string(), &opts).unwrap_err();
    assert_eq!(e.message, Some(0));
    assert!(e.to_string().contains("message 0"), "{e}");

    let mut bad_args = conversation();
    bad_args["messages"][2]["tool_calls"][0]["function"]["arguments"] = json!("[1, 2]");
    let e = import(&bad_args.to_string(), &opts).unwrap_err();
    assert_eq!((e.line, e.message), (1, Some(2)));
    assert!(
        e.to_string()
            .starts_with("data.jsonl:1: message 2: tool call 0"),
        "{e}"
    );

    let mut bad_part = conversation();
    bad_part["messages"][6]["content"] = json!([{"type": "image_url", "image_url": {}}]);
    let e = import(&format!("\n{}", bad_part), &opts).unwrap_err();
    assert_eq!((e.line, e.message), (2, Some(6)));

    let mut bad_role = conversation();
    bad_role["messages"][1]["role"] = json!("narrator");
    assert!(matches!(
        *import(&bad_role.to_string(), &opts).unwrap_err().kind,
        ImportErrorKind::Json(_)
    ));

    let empty = json!({"messages": []});
    assert!(matches!(
        *import(&empty.to_string(), &opts).unwrap_err().kind,
        ImportErrorKind::Conversation(ConversationError::Empty)
    ));

    let small = ImportOptions {
        max_messages: 3,
        ..ImportOptions::default()
    };
    assert!(matches!(
        *import(&good, &small).unwrap_err().kind,
        ImportErrorKind::TooManyMessages { count: 9, max: 3 }
    ));
    let short = ImportOptions {
        max_line_bytes: 100,
        ..ImportOptions::default()
    };
    let e = import(&format!("{good}\n"), &short).unwrap_err();
    assert!(matches!(*e.kind, ImportErrorKind::LineTooLong { max: 100 }));
    assert_eq!(e.line, 1);

    let e = import_jsonl(
        &b"\xff\xfe\n"[..],
        "x.jsonl",
        &byte(),
        &ChatTemplate::ChatMl,
        &opts,
    )
    .unwrap_err();
    assert!(matches!(*e.kind, ImportErrorKind::NotUtf8));
}

#[test]
fn a_template_that_is_not_incremental_is_an_error() {
    // A template that writes the message count first: no rendering is a prefix of a longer one.
    let template = ChatTemplate::from_jinja(
        "{{ messages|length }}{% for m in messages %}{{ m.content }}{% endfor %}",
        None,
        None,
    )
    .unwrap();
    let messages = vec![
        ChatMessage::user("hi"),
        ChatMessage::assistant("yo", vec![]),
    ];
    let e = tokenize_conversation(&messages, &[], &byte(), &template, &PrefixRule::default())
        .unwrap_err();
    assert!(
        matches!(e, ConversationError::NotIncremental { message: 1 }),
        "{e}"
    );
    assert_eq!(e.message(), Some(1));
}

#[test]
fn import_with_a_bpe_tokenizer_and_its_own_template() {
    // SmolLM2's GGUF (tests/fetch-models.sh); its tokenizer is BPE, its template Jinja.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run tests/fetch-models.sh",
        path.display()
    );
    let tokenizer = Tokenizer::load(&path).unwrap();
    let template = ChatTemplate::for_tokenizer(&tokenizer, true).unwrap();
    let line = json!({"messages": [
        {"role": "user", "content": "List the files, then say done."},
        {"role": "assistant", "content": "Running ls now."},
        {"role": "tool", "content": "a.py  b.py\n"},
        {"role": "assistant", "content": "done"}
    ]});
    let trajs = import_jsonl(
        line.to_string().as_bytes(),
        "smol.jsonl",
        &tokenizer,
        &template,
        &ImportOptions::default(),
    )
    .unwrap();
    let t = &trajs[0];
    let decoded = tokenizer.decode(&t.tokens()).unwrap();
    assert!(decoded.starts_with("<|im_start|>system\n"), "{decoded}");
    assert!(decoded.ends_with("done<|im_end|>"), "{decoded}");
    let answers: Vec<String> = t
        .turns
        .iter()
        .filter_map(Turn::as_assistant)
        .map(|a| tokenizer.decode(&a.tokens).unwrap())
        .collect();
    assert_eq!(answers, ["Running ls now.<|im_end|>", "done<|im_end|>"]);
    let prefix = tokenizer.decode(&t.tokens()[..t.prefix_len()]).unwrap();
    assert!(prefix.ends_with("<|im_start|>assistant\n"), "{prefix}");
}

#[test]
fn the_pinned_prefix_can_be_chosen_at_split_time() {
    let t = small();
    // The first 3 turns pinned: prompt, A1 (targets in window 0 only), O1.
    let config = SplitConfig::new(14, SplitMode::Split, 0).with_pin(Pin::FirstTurns(3));
    let subs = split(&t, &config).unwrap();
    let got: Vec<_> = subs
        .iter()
        .map(|s| (s.tokens.clone(), targets(s)))
        .collect();
    assert_eq!(
        got,
        vec![
            (range(0..14), [range(3..7), range(10..14)].concat()),
            ([range(0..10), range(14..15)].concat(), range(14..15)),
            ([range(0..10), range(17..20)].concat(), range(17..20)),
        ]
    );
    assert!(subs.iter().all(|s| s.prefix_len == 10));

    // Up to the turn holding a marker (A2 holds 12, 13).
    let config =
        SplitConfig::new(30, SplitMode::Split, 0).with_pin(Pin::ThroughMarker(vec![12, 13]));
    let subs = split(&t, &config).unwrap();
    assert_eq!(subs[0].prefix_len, 15);
    let config =
        SplitConfig::new(30, SplitMode::Split, 0).with_pin(Pin::ThroughMarker(vec![13, 12]));
    assert!(matches!(
        split(&t, &config),
        Err(SplitError::MarkerNotFound { .. })
    ));
    // Sliding pins nothing whatever the pin says.
    let config = SplitConfig::new(8, SplitMode::Sliding, 1).with_pin(Pin::FirstTurns(3));
    assert!(split(&t, &config)
        .unwrap()
        .iter()
        .all(|s| s.prefix_len == 0));
}

fn random_text(rng: &mut Rng, max: usize) -> String {
    const PIECES: [&str; 14] = [
        "a", "b", "ls", " ", "\n", "é", "日本", "{", "}", "\"", "<", ">", "tool", "\t",
    ];
    let n = rng.range(0, max);
    (0..n)
        .map(|_| PIECES[rng.range(0, PIECES.len() - 1)])
        .collect()
}

/// Random conversations survive import -> export -> import with the same tokens.
#[test]
fn random_conversations_round_trip() {
    for seed in 0..150u64 {
        let mut rng = Rng(seed);
        let mut messages = Vec::new();
        if rng.chance(70) {
            messages.push(json!({"role": "system", "content": random_text(&mut rng, 20)}));
        }
        messages.push(json!({"role": "user", "content": random_text(&mut rng, 20)}));
        for _ in 0..rng.range(0, 12) {
            let calls: Vec<Value> = (0..rng.range(0, 2))
                .map(|_| {
                    let args = json!({"path": random_text(&mut rng, 6), "n": rng.range(0, 9)});
                    json!({"type": "function", "function": {"name": "ls", "arguments": args.to_string()}})
                })
                .collect();
            let mut a = json!({"role": "assistant", "content": random_text(&mut rng, 30)});
            if !calls.is_empty() {
                a["tool_calls"] = Value::Array(calls.clone());
            }
            messages.push(a);
            for _ in 0..calls.len() {
                messages.push(json!({"role": "tool", "content": random_text(&mut rng, 30)}));
            }
            if rng.chance(30) {
                messages.push(json!({"role": "user", "content": random_text(&mut rng, 10)}));
            }
        }
        let tools = if rng.chance(50) { tools() } else { json!([]) };
        let line = json!({"messages": messages, "tools": tools}).to_string();
        let first = import(&line, &ImportOptions::default())
            .unwrap_or_else(|e| panic!("seed {seed}: {e}\n{line}"));
        let mut out = Vec::new();
        export_jsonl(&mut out, &first, &byte(), &ChatTemplate::ChatMl)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}\n{line}"));
        let text = String::from_utf8(out).unwrap();
        let again = import(&text, &ImportOptions::default()).unwrap();
        assert_eq!(again[0].tokens(), first[0].tokens(), "seed {seed}");
        assert_eq!(again[0].turns, first[0].turns, "seed {seed}");
        // The assistant turns are exactly the assistant messages' text and calls.
        let n_assistant = messages.iter().filter(|m| m["role"] == "assistant").count();
        let exported: Value = serde_json::from_str(text.trim_end()).unwrap();
        let back = wire_to_chat(&exported["messages"]);
        assert_eq!(
            back,
            wire_to_chat(&Value::Array(messages.clone())),
            "seed {seed}"
        );
        assert_eq!(
            first[0].turns.iter().filter(|t| t.is_assistant()).count(),
            n_assistant,
            "seed {seed}"
        );
    }
}
