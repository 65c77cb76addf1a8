//! Synthetic in-context recall conversations: a warm-up that teaches a model trained from
//! scratch to copy values out of its context.
//!
//! Why it exists: every rubric leaf of a family task needs the exact simulator command, whose
//! parameters (a 5-digit seed among them) are read from a config file the episode shows once.
//! A tiny byte-level model trained from scratch on the expert's trajectories alone never learns
//! to copy them: it writes the most common values, and its loss stops at what the uncopied
//! values cost. Recall (as in the multi-query associative recall task of the Zoology and Based
//! papers, here over bytes) is the skill it lacks. It has to be learned at the distances a
//! task has: recall learned within a few hundred tokens fails outright when the records sit
//! after a few thousand bytes of other text (measured: loss 0.004 -> 7.4), and a task's config
//! comes ~1,500 tokens into its context. So a short-context stage first (the circuit forms
//! there quickly), then conversations with filler before the records, and some of those mixed
//! into the task's SFT (see `examples/sft_recall.ron` for what it measured).
//!
//! One conversation: the user message lists 3-12 records `key<sep>value` (sometimes after a
//! `#` comment line, as config files have), then asks for 1-6 of the keys in random order in
//! one of three answer formats; the assistant message is the answer:
//!
//! ```text
//! flags for: a, b   ->  run --a VA --b VB
//! values of: a, b   ->  a=VA\nb=VB
//! as json: a, b     ->  {"a": "VA", "b": "VB"}
//! ```
//!
//! Keys are distinct within a conversation; half are common config names ([`COMMON_KEYS`]:
//! `model`, `lr`, `steps`, `seed`, ...), the others 2-8 random lowercase letters (30% with `_`
//! and 2-5 more). The separator is one of ` = `, `: `, `=`, ` `. A value, whatever its key, is
//! an integer of 1-6 digits (45%), a decimal `0.` and 1-5 digits (25%), or 2-10 letters.
//! Conversation `i` of seed `s` depends on `(s, i)` alone (its own SplitMix64 stream), so a data
//! set is a pure function of its seed and any prefix of it is the same whatever the count.

use serde_json::Value;

use crate::environment::family::SplitMix64;
use crate::policy::chat::{ChatMessage, ChatTemplate};
use crate::policy::tokenizer::Tokenizer;
use crate::trajectory::{tokenize_conversation, ConversationError, PrefixRule, Trajectory};

/// Most records in one conversation.
pub const MAX_RECORDS: usize = 12;
/// Most keys asked for in one conversation.
pub const MAX_QUERIES: usize = 6;

/// Share of keys drawn from [`COMMON_KEYS`] rather than made of random letters.
pub const COMMON_KEY_SHARE: f64 = 0.5;
/// Key names that configuration files and command lines commonly use. Random letters alone
/// teach recall for keys never seen twice; a real config repeats the same few names with
/// different values, and a model that saw `steps` only next to the values of its task data
/// learns those values as a prior instead of copying. Here the common names come with random
/// values, so for them too the only way to the answer is to read it from the context.
pub const COMMON_KEYS: [&str; 40] = [
    "model",
    "lr",
    "steps",
    "seed",
    "batch_size",
    "dataset",
    "epochs",
    "optimizer",
    "dropout",
    "warmup",
    "layers",
    "hidden",
    "heads",
    "metric",
    "name",
    "path",
    "port",
    "host",
    "user",
    "timeout",
    "retries",
    "threads",
    "device",
    "mode",
    "level",
    "depth",
    "width",
    "rate",
    "size",
    "count",
    "limit",
    "version",
    "momentum",
    "decay",
    "eps",
    "beta",
    "gamma",
    "alpha",
    "temperature",
    "max_tokens",
];

const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const SEPARATORS: [&str; 4] = [" = ", ": ", "=", " "];

fn word(rng: &mut SplitMix64, min: usize, max: usize) -> String {
    let len = min + rng.below(max - min + 1);
    (0..len)
        .map(|_| char::from(LETTERS[rng.below(LETTERS.len())]))
        .collect()
}

fn digits(rng: &mut SplitMix64, len: usize) -> String {
    (0..len)
        .map(|_| char::from(b'0' + rng.below(10) as u8))
        .collect()
}

fn key(rng: &mut SplitMix64) -> String {
    if rng.unit() < COMMON_KEY_SHARE {
        return COMMON_KEYS[rng.below(COMMON_KEYS.len())].to_string();
    }
    let mut k = word(rng, 2, 8);
    if rng.unit() < 0.3 {
        k.push('_');
        k.push_str(&word(rng, 2, 5));
    }
    k
}

fn value(rng: &mut SplitMix64) -> String {
    let t = rng.unit();
    if t < 0.45 {
        // No leading zero, except the integer 0 itself.
        let len = 1 + rng.below(6);
        let first = if len == 1 {
            rng.below(10)
        } else {
            1 + rng.below(9)
        };
        format!("{first}{}", digits(rng, len - 1))
    } else if t < 0.70 {
        let len = 1 + rng.below(5);
        format!("0.{}", digits(rng, len))
    } else {
        word(rng, 2, 10)
    }
}

/// Most bytes of filler text before the records.
pub const MAX_FILLER_BYTES: u32 = 16 * 1024;

/// Up to `max_bytes` (a uniform draw) of unrelated text: lines of 4-14 lowercase words, some
/// numbers among them. No word of it is one of `keys`, so it holds no answer, only things to
/// look past; numbers in it are digits the answer must not take.
fn filler(rng: &mut SplitMix64, max_bytes: u32, keys: &[String]) -> String {
    let target = rng.below(max_bytes as usize + 1);
    let mut text = String::with_capacity(target + 128);
    while text.len() < target {
        let words = 4 + rng.below(11);
        let line: Vec<String> = (0..words)
            .map(|_| {
                if rng.unit() < 0.15 {
                    let len = 1 + rng.below(5);
                    digits(rng, len)
                } else {
                    // Redrawn while it is a key: a draw collides with odds under 1 in 300 (a
                    // 2-letter word, 1 in 7, equal to one of at most 12 keys), so the bound of
                    // 17 draws is never reached in practice; it makes the loop finite.
                    (0..17)
                        .map(|_| word(rng, 2, 8))
                        .find(|w| !keys.contains(w))
                        .unwrap_or_else(|| digits(rng, 3))
                }
            })
            .collect();
        text.push_str(&line.join(" "));
        text.push('\n');
    }
    text
}

/// Conversation `index` of the data set `seed`: a user message and the assistant's answer.
/// With `filler_bytes` > 0 the records come after up to that many bytes of unrelated text
/// ([`filler`]), so that recall is learned at the distances a task's context has, not only
/// within a few hundred tokens. The filler is drawn last: the records, the ask and the answer
/// are the same whatever `filler_bytes` is.
pub fn recall_conversation(seed: u64, index: u64, filler_bytes: u32) -> [ChatMessage; 2] {
    // One stream per conversation, started at a hash of (seed, index): streams started at
    // `base + index * step` would overlap, SplitMix64's state advancing by a fixed step.
    let base = SplitMix64::new(seed ^ 0x7265_6361_6C6C_0001).next_u64();
    let mut rng = SplitMix64::new(SplitMix64::new(base ^ index).next_u64());
    let records = 3 + rng.below(MAX_RECORDS - 2);
    let mut keys: Vec<String> = Vec::with_capacity(records);
    while keys.len() < records {
        let k = key(&mut rng);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let values: Vec<String> = keys.iter().map(|_| value(&mut rng)).collect();
    let sep = SEPARATORS[rng.below(SEPARATORS.len())];
    let mut lines: Vec<String> = Vec::with_capacity(records + 1);
    if rng.unit() < 0.3 {
        let words: Vec<String> = (0..1 + rng.below(5))
            .map(|_| word(&mut rng, 2, 8))
            .collect();
        lines.push(format!("# {}", words.join(" ")));
    }
    lines.extend(
        keys.iter()
            .zip(&values)
            .map(|(k, v)| format!("{k}{sep}{v}")),
    );

    // The asked keys: a random order of a random subset (a partial Fisher-Yates shuffle).
    let asked = 1 + rng.below(records.min(MAX_QUERIES));
    let mut order: Vec<usize> = (0..records).collect();
    for i in 0..asked {
        let j = i + rng.below(records - i);
        order.swap(i, j);
    }
    let asked = &order[..asked];
    let names: Vec<&str> = asked.iter().map(|&j| keys[j].as_str()).collect();
    // Each asked record written with `pair`, joined by `sep`.
    let pairs = |pair: fn(&str, &str) -> String, sep: &str| {
        asked
            .iter()
            .map(|&j| pair(&keys[j], &values[j]))
            .collect::<Vec<_>>()
            .join(sep)
    };
    let (request, answer) = match rng.below(3) {
        0 => (
            "flags for",
            format!("run {}", pairs(|k, v| format!("--{k} {v}"), " ")),
        ),
        1 => ("values of", pairs(|k, v| format!("{k}={v}"), "\n")),
        // Keys and values are letters, digits, `_` and `.`: nothing to escape.
        _ => (
            "as json",
            format!("{{{}}}", pairs(|k, v| format!("\"{k}\": \"{v}\""), ", ")),
        ),
    };
    let mut user = String::new();
    // Drawn last, so that nothing else depends on it.
    if filler_bytes > 0 {
        let text = filler(&mut rng, filler_bytes.min(MAX_FILLER_BYTES), &keys);
        if !text.is_empty() {
            user.push_str(&text);
            user.push('\n');
        }
    }
    user.push_str(&format!(
        "{}\n\n{request}: {}",
        lines.join("\n"),
        names.join(", ")
    ));
    [
        ChatMessage::user(user),
        ChatMessage::assistant(answer, Vec::new()),
    ]
}

/// `count` conversations of the data set `seed`, tokenized with the chat template (the user
/// message is the pinned prefix; the answer is the one assistant turn, the only loss).
pub fn recall_trajectories(
    seed: u64,
    count: u64,
    filler_bytes: u32,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
) -> Result<Vec<Trajectory>, ConversationError> {
    let tools: [Value; 0] = [];
    let mut out = Vec::with_capacity(count.min(1 << 20) as usize);
    for i in 0..count {
        let messages = recall_conversation(seed, i, filler_bytes);
        let (prefix, turns) = tokenize_conversation(
            &messages,
            &tools,
            tokenizer,
            template,
            &PrefixRule::BeforeFirstAssistant,
        )?;
        let traj = Trajectory {
            id: format!("recall-{seed}-{i}"),
            task: None,
            tools: Vec::new(),
            prefix,
            turns,
            outcome: None,
        };
        traj.validate()?;
        out.push(traj);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tokenizer::ByteTokenizer;

    /// Parses a user message back into its records and asked keys.
    fn parse(user: &str) -> (Vec<(String, String)>, String, Vec<String>) {
        let (records, request) = user
            .rsplit_once("\n\n")
            .expect("a blank line before the ask");
        // Filler, if any, ends in a blank line before the records.
        let records = records.rsplit_once("\n\n").map_or(records, |(_, r)| r);
        let sep = [" = ", ": ", "=", " "]
            .into_iter()
            .find(|s| {
                records
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .all(|l| l.contains(s))
            })
            .expect("one separator");
        let records = records
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (k, v) = l.split_once(sep).expect("key sep value");
                (k.to_string(), v.to_string())
            })
            .collect();
        let (kind, keys) = request.split_once(": ").expect("kind: keys");
        (
            records,
            kind.to_string(),
            keys.split(", ").map(str::to_string).collect(),
        )
    }

    #[test]
    fn answers_give_the_asked_values_in_the_asked_order() {
        let mut kinds = std::collections::BTreeSet::new();
        for i in 0..500 {
            let [user, answer] = recall_conversation(3, i, 0);
            let (records, kind, asked) = parse(&user.content);
            assert!(
                (3..=MAX_RECORDS).contains(&records.len()),
                "{}",
                user.content
            );
            assert!((1..=MAX_QUERIES).contains(&asked.len()));
            let lookup = |k: &str| {
                let hits: Vec<&String> = records
                    .iter()
                    .filter(|(key, _)| key == k)
                    .map(|(_, v)| v)
                    .collect();
                assert_eq!(hits.len(), 1, "key {k} once in {}", user.content);
                hits[0].clone()
            };
            let expected = match kind.as_str() {
                "flags for" => format!(
                    "run {}",
                    asked
                        .iter()
                        .map(|k| format!("--{k} {}", lookup(k)))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                "values of" => asked
                    .iter()
                    .map(|k| format!("{k}={}", lookup(k)))
                    .collect::<Vec<_>>()
                    .join("\n"),
                "as json" => {
                    let parsed: serde_json::Map<String, Value> =
                        serde_json::from_str(&answer.content).expect("json answer");
                    assert_eq!(parsed.len(), asked.len());
                    for k in &asked {
                        assert_eq!(parsed[k.as_str()], Value::String(lookup(k)));
                    }
                    answer.content.clone()
                }
                other => panic!("unknown request {other:?}"),
            };
            assert_eq!(answer.content, expected, "{}", user.content);
            kinds.insert(kind);
        }
        assert_eq!(kinds.len(), 3, "all three answer formats occur");
    }

    #[test]
    fn conversations_are_a_function_of_seed_and_index() {
        let a = recall_conversation(5, 17, 0);
        assert_eq!(a, recall_conversation(5, 17, 0));
        assert_ne!(a, recall_conversation(5, 18, 0));
        assert_ne!(a, recall_conversation(6, 17, 0));
    }

    #[test]
    fn values_mix_integers_decimals_and_words() {
        let (mut ints, mut decimals, mut words, mut five_digit) = (0, 0, 0, 0);
        for i in 0..400 {
            let [user, _] = recall_conversation(9, i, 0);
            for (_, v) in parse(&user.content).0 {
                if v.starts_with("0.") {
                    decimals += 1;
                } else if v.bytes().all(|b| b.is_ascii_digit()) {
                    assert!(v == "0" || !v.starts_with('0'), "leading zero in {v}");
                    ints += 1;
                    five_digit += usize::from(v.len() == 5);
                } else {
                    assert!(v.bytes().all(|b| b.is_ascii_lowercase()), "{v}");
                    words += 1;
                }
            }
        }
        let total = f64::from(ints + decimals + words);
        for (share, want) in [(ints, 0.45), (decimals, 0.25), (words, 0.30)] {
            assert!(
                (f64::from(share) / total - want).abs() < 0.03,
                "{share}/{total}"
            );
        }
        assert!(five_digit > 100, "{five_digit}");
    }

    #[test]
    fn half_the_keys_are_common_names_with_values_of_any_kind() {
        let (mut common, mut total) = (0usize, 0usize);
        let mut steps_values = std::collections::BTreeSet::new();
        for i in 0..400 {
            let [user, _] = recall_conversation(11, i, 0);
            for (k, v) in parse(&user.content).0 {
                total += 1;
                if COMMON_KEYS.contains(&k.as_str()) {
                    common += 1;
                }
                if k == "steps" {
                    steps_values.insert(v);
                }
            }
        }
        let share = common as f64 / total as f64;
        // Random keys can also spell a common name, so the share is a little over the draw's.
        assert!((share - COMMON_KEY_SHARE).abs() < 0.04, "{common}/{total}");
        // A common name is no hint of its value: `steps` takes many different values.
        assert!(steps_values.len() > 20, "{steps_values:?}");
    }

    #[test]
    fn filler_comes_before_the_same_records_and_holds_no_key() {
        let mut longest = 0;
        for i in 0..200 {
            let [plain_user, plain_answer] = recall_conversation(4, i, 0);
            let [user, answer] = recall_conversation(4, i, 2048);
            // The records, the ask and the answer are those of the conversation without filler.
            assert_eq!(answer, plain_answer);
            assert!(
                user.content.ends_with(&plain_user.content),
                "{}",
                user.content
            );
            let filler = &user.content[..user.content.len() - plain_user.content.len()];
            assert!(filler.len() <= 2048 + 128, "{}", filler.len());
            longest = longest.max(filler.len());
            let (records, _, _) = parse(&plain_user.content);
            for w in filler.split_whitespace() {
                assert!(records.iter().all(|(k, _)| k != w), "key {w} in filler");
            }
        }
        assert!(longest > 1500, "{longest}");
    }

    #[test]
    fn trajectories_carry_loss_on_the_answer_only() {
        let tok = Tokenizer::Byte(ByteTokenizer);
        let template = ChatTemplate::for_tokenizer(&tok, true).expect("template");
        let trajs = recall_trajectories(1, 20, 0, &tok, &template).expect("tokenizes");
        assert_eq!(trajs.len(), 20);
        for (i, t) in trajs.iter().enumerate() {
            let [user, answer] = recall_conversation(1, i as u64, 0);
            let answers: Vec<_> = t.all_turns().filter_map(|x| x.as_assistant()).collect();
            assert_eq!(answers.len(), 1, "one assistant turn");
            let turn = answers[0];
            let text = tok.decode(&turn.tokens).expect("decodes");
            assert!(text.starts_with(&answer.content), "{text:?}");
            let prefix: Vec<u32> = t.prefix.iter().flat_map(|p| p.tokens().to_vec()).collect();
            assert!(tok
                .decode(&prefix)
                .expect("decodes")
                .contains(&user.content));
        }
    }
}
