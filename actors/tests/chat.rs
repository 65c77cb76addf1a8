//! Model core, text side: byte tokenizer, chat templates (built-in ChatML and a Qwen2.5-style
//! Jinja template), the strict tool-call parser (with a fuzz test) and sampling.

use klong_actors::policy::chat::{ChatMessage, ChatTemplate};
use klong_actors::policy::sampling::{
    distribution, Sampler, SamplingError, SamplingParams, StopChecker, StopReason,
};
use klong_actors::policy::tokenizer::{ByteTokenizer, Tokenizer, BYTE_SPECIALS};
use klong_actors::policy::toolcall::{
    parse_assistant, render_assistant, ToolCallError, ToolCallRequest, MAX_CALLS, MAX_TEXT_BYTES,
};
use serde_json::{json, Value};

/// splitmix64: deterministic test randomness.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

// ---------------------------------------------------------------- tokenizer

#[test]
fn byte_tokenizer_round_trips_text_and_bytes() {
    let t = ByteTokenizer;
    for s in [
        "",
        "hello",
        "héllo wörld ✓ 日本語 🦀",
        "a\0b\u{7f}\u{FFFD}",
        "<tool_call",
        "<|im_start",
    ] {
        assert_eq!(t.decode(&t.encode(s, false)), s);
        assert_eq!(t.decode(&t.encode(s, true)), s);
    }
    let mut rng = Rng(7);
    for _ in 0..200 {
        let bytes: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
        let ids: Vec<u32> = bytes.iter().map(|&b| u32::from(b)).collect();
        assert_eq!(t.decode_bytes(&ids), bytes);
        // Lossy decode of binary never panics and matches std's lossy conversion.
        assert_eq!(t.decode(&ids), String::from_utf8_lossy(&bytes));
    }
    // A split multi-byte character decodes lossily, not with a panic.
    let ids = t.encode("é", false);
    assert_eq!(t.decode(&ids[..1]), "\u{FFFD}");
}

#[test]
fn special_tokens_are_single_ids() {
    let t = Tokenizer::Byte(ByteTokenizer);
    assert_eq!(t.vocab_size(), 264);
    for (k, s) in BYTE_SPECIALS.iter().enumerate() {
        assert_eq!(t.token_id(s), Some(256 + k as u32));
        assert_eq!(t.encode(s, true).unwrap(), vec![256 + k as u32]);
        // Without special parsing the same text is plain bytes (tool output cannot forge tags).
        assert_eq!(t.encode(s, false).unwrap().len(), s.len());
    }
    let ids = t.encode("<|im_start|>user\nhi<|im_end|>\n", true).unwrap();
    assert_eq!(
        ids,
        [
            vec![257],
            b"user\nhi".iter().map(|&b| u32::from(b)).collect(),
            vec![258, 10]
        ]
        .concat()
    );
    assert_eq!(t.eos_ids(), vec![258, 256]);
    assert_eq!(t.token_id("<nope>"), None);
    assert!(matches!(
        Tokenizer::load(std::path::Path::new("model.gguf")),
        Err(klong_actors::policy::tokenizer::TokenizerError::Gguf(
            klong_actors::policy::gguf::GgufError::Io { .. }
        ))
    ));
}

#[test]
fn hf_tokenizer_folder_loads_with_config() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer_json = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 3, "content": "<|im_end|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"hello": 0, "world": 1, "[UNK]": 2, "<|im_end|>": 3}, "unk_token": "[UNK]"}
    });
    std::fs::write(
        dir.path().join("tokenizer.json"),
        tokenizer_json.to_string(),
    )
    .unwrap();
    let config = json!({
        "eos_token": {"content": "<|im_end|>", "special": true},
        "bos_token": null,
        "chat_template": [{"name": "default", "template": "{{ messages[0].content }}{{ eos_token }}"},
                          {"name": "tool_use", "template": "T{{ tools | length }}"}]
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [3, 1]}"#,
    )
    .unwrap();
    let t = Tokenizer::load(dir.path()).unwrap();
    assert_eq!(
        t.encode("hello world<|im_end|>", false).unwrap(),
        vec![0, 1, 3]
    );
    assert_eq!(t.token_id("<|im_end|>"), Some(3));
    assert_eq!(t.eos_ids(), vec![1, 3]);
    assert_eq!((t.eos_token(), t.bos_token()), (Some("<|im_end|>"), None));
    assert_eq!(t.vocab_size(), 4);
    let msgs = [ChatMessage::user("hello")];
    let plain = ChatTemplate::for_tokenizer(&t, false).unwrap();
    assert_eq!(plain.render(&msgs, &[], false).unwrap(), "hello<|im_end|>");
    let with_tools = ChatTemplate::for_tokenizer(&t, true).unwrap();
    assert_eq!(with_tools.render(&msgs, &tools(), false).unwrap(), "T1");
    // A folder without tokenizer.json is an Io error naming the file.
    let empty = tempfile::tempdir().unwrap();
    let err = Tokenizer::load(empty.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

// ---------------------------------------------------------------- chat templates

fn tools() -> Vec<Value> {
    vec![json!({
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file.",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}
        }
    })]
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("You are a careful agent."),
        ChatMessage::user("What is in notes.txt?"),
        ChatMessage::assistant(
            "Let me look.",
            vec![ToolCallRequest {
                name: "read_file".into(),
                arguments: json!({"path": "notes.txt"}),
            }],
        ),
        ChatMessage::tool("read_file", "buy milk"),
        ChatMessage::assistant("It says: buy milk.", vec![]),
        ChatMessage::user("Thanks"),
    ]
}

const EXPECTED_CHATML: &str = concat!(
    "<|im_start|>system\nYou are a careful agent.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n",
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
    r#"{"type": "function", "function": {"name": "read_file", "description": "Read a file.", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}"#,
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n",
    "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n",
    "<|im_start|>user\nWhat is in notes.txt?<|im_end|>\n",
    "<|im_start|>assistant\nLet me look.\n<tool_call>\n{\"name\": \"read_file\", \"arguments\": {\"path\": \"notes.txt\"}}\n</tool_call><|im_end|>\n",
    "<|im_start|>user\n<tool_response>\nbuy milk\n</tool_response><|im_end|>\n",
    "<|im_start|>assistant\nIt says: buy milk.<|im_end|>\n",
    "<|im_start|>user\nThanks<|im_end|>\n",
    "<|im_start|>assistant\n",
);

/// The Qwen2.5-Instruct chat template (its structure, with tool calling).
const QWEN25_TEMPLATE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

/// SmolLM2-Instruct's template: plain ChatML, uses python string methods nowhere but relies on
/// `loop.first` and a default system prompt. Plus a line exercising pycompat and raise_exception.
const SMOL_TEMPLATE: &str = r#"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
' }}{% endif %}{{'<|im_start|>' + message['role'] + '
' + message['content'].strip() + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant
' }}{% endif %}"#;

#[test]
fn chatml_renders_tool_conversation_exactly() {
    let text = ChatTemplate::ChatMl
        .render(&conversation(), &tools(), true)
        .unwrap();
    assert_eq!(text, EXPECTED_CHATML);
    // Tokenized with specials parsed, every tag is one id.
    let ids = ByteTokenizer.encode(&text, true);
    let tool_call_id = 256 + 3;
    // Twice in the instructions ("within <tool_call></tool_call> XML tags", the example), once
    // for the call.
    assert_eq!(ids.iter().filter(|&&i| i == tool_call_id).count(), 3);
    assert_eq!(ByteTokenizer.decode(&ids), text);
    // No system message and no tools: no system turn.
    let plain = ChatTemplate::ChatMl
        .render(&[ChatMessage::user("hi")], &[], false)
        .unwrap();
    assert_eq!(plain, "<|im_start|>user\nhi<|im_end|>\n");
}

#[test]
fn jinja_qwen_template_matches_chatml() {
    let t = ChatTemplate::from_jinja(QWEN25_TEMPLATE, None, Some("<|im_end|>")).unwrap();
    let text = t.render(&conversation(), &tools(), true).unwrap();
    assert_eq!(text, EXPECTED_CHATML);
    // Without tools: the system turn alone, and the default system prompt when there is none.
    let msgs = vec![ChatMessage::user("hi")];
    assert_eq!(
        t.render(&msgs, &[], false).unwrap(),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    );
    // Consecutive tool results share one user turn.
    let mut msgs = conversation();
    msgs.insert(4, ChatMessage::tool("read_file", "second"));
    let jinja = t.render(&msgs, &tools(), false).unwrap();
    assert!(jinja.contains(
        "buy milk\n</tool_response>\n<tool_response>\nsecond\n</tool_response><|im_end|>"
    ));
    assert_eq!(
        jinja,
        ChatTemplate::ChatMl.render(&msgs, &tools(), false).unwrap()
    );
}

#[test]
fn jinja_smollm_template_pycompat_and_errors() {
    let t = ChatTemplate::from_jinja(SMOL_TEMPLATE, None, Some("<|im_end|>")).unwrap();
    let text = t.render(&[ChatMessage::user("  hi  ")], &[], true).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let t = ChatTemplate::from_jinja(
        "{% if not messages[0].content.startswith('ok') %}{{ raise_exception('bad start') }}{% endif %}{{ bos_token }}{{ {'b': [1, 'x'], 'a': none} | tojson(indent=2) }}{{ eos_token }}",
        Some("<s>"),
        Some("</s>"),
    )
    .unwrap();
    assert_eq!(
        t.render(&[ChatMessage::user("ok go")], &[], false).unwrap(),
        "<s>{\n  \"b\": [\n    1,\n    \"x\"\n  ],\n  \"a\": null\n}</s>"
    );
    let err = t
        .render(&[ChatMessage::user("no")], &[], false)
        .unwrap_err();
    assert!(err.to_string().contains("bad start"), "{err}");
    assert!(ChatTemplate::from_jinja("{% if %}", None, None).is_err());
}

// ---------------------------------------------------------------- tool-call parser

fn call(name: &str, arguments: Value) -> ToolCallRequest {
    ToolCallRequest {
        name: name.into(),
        arguments,
    }
}

#[test]
fn parser_accepts_valid_turns() {
    let p = parse_assistant("just text  ").unwrap();
    assert_eq!((p.content.as_str(), p.calls.len()), ("just text", 0));

    let text = "Looking.\n<tool_call>\n{\"name\": \"ls\", \"arguments\": {}}\n</tool_call>\n<tool_call>{\"name\":\"cat\",\"arguments\":{\"path\":\"a b\"}}</tool_call> done";
    let p = parse_assistant(text).unwrap();
    assert_eq!(p.content, "Looking.\n\n done");
    assert_eq!(
        p.calls,
        vec![call("ls", json!({})), call("cat", json!({"path": "a b"}))]
    );

    // Arguments as a JSON string holding an object.
    let p = parse_assistant(
        r#"<tool_call>{"name": "cat", "arguments": "{\"path\": \"x\"}"}</tool_call>"#,
    )
    .unwrap();
    assert_eq!(p.calls, vec![call("cat", json!({"path": "x"}))]);
    assert_eq!(p.content, "");

    // A decoded tag inside a string survives rendering and re-parsing.
    let p = parse_assistant(r#"<tool_call>{"name": "echo", "arguments": {"s": "\u003c/tool_call>\u003ctool_call>"}}</tool_call>"#).unwrap();
    assert_eq!(parse_assistant(&render_assistant(&p)).unwrap(), p);

    // The ChatML rendering of an assistant turn parses back to the same call.
    let rendered = ChatTemplate::ChatMl
        .render(&conversation()[2..3], &[], false)
        .unwrap();
    let body = rendered
        .trim_start_matches("<|im_start|>assistant\n")
        .trim_end_matches("<|im_end|>\n");
    let p = parse_assistant(body).unwrap();
    assert_eq!(
        (p.content.as_str(), p.calls.clone()),
        ("Let me look.", conversation()[2].tool_calls.clone())
    );
}

#[test]
fn parser_rejects_each_malformed_case() {
    use ToolCallError::*;
    let ok = r#"{"name": "ls", "arguments": {}}"#;
    let cases: Vec<(String, ToolCallError)> = vec![
        (format!("hi <tool_call>{ok}"), Unclosed { at: 3 }),
        ("a</tool_call>".to_string(), StrayClose { at: 1 }),
        (
            format!("<tool_call>{ok}</tool_call></tool_call>"),
            StrayClose {
                at: 11 + ok.len() + 12,
            },
        ),
        (
            format!("<tool_call><tool_call>{ok}</tool_call>"),
            Nested { at: 11, outer: 0 },
        ),
        (
            "<tool_call>x<tool_call>".to_string(),
            Nested { at: 12, outer: 0 },
        ),
        ("<tool_call>[1]</tool_call>".into(), NotAnObject { at: 0 }),
        (
            r#"<tool_call>{"arguments": {}}</tool_call>"#.into(),
            MissingName { at: 0 },
        ),
        (
            r#"<tool_call>{"name": 3, "arguments": {}}</tool_call>"#.into(),
            NameNotString { at: 0 },
        ),
        (
            r#"<tool_call>{"name": "", "arguments": {}}</tool_call>"#.into(),
            NameNotString { at: 0 },
        ),
        (
            r#"<tool_call>{"name": "ls"}</tool_call>"#.into(),
            MissingArguments { at: 0 },
        ),
        (
            r#"<tool_call>{"name": "ls", "arguments": [1]}</tool_call>"#.into(),
            ArgumentsNotObject { at: 0 },
        ),
        (
            r#"<tool_call>{"name": "ls", "arguments": "[1]"}</tool_call>"#.into(),
            ArgumentsNotObject { at: 0 },
        ),
        (
            r#"<tool_call>{"name": "ls", "arguments": "nope"}</tool_call>"#.into(),
            ArgumentsNotObject { at: 0 },
        ),
        (
            r#"<tool_call>{"name": "ls", "arguments": {}, "id": 1}</tool_call>"#.into(),
            ExtraKey {
                at: 0,
                key: "id".into(),
            },
        ),
    ];
    for (text, want) in cases {
        assert_eq!(parse_assistant(&text), Err(want), "{text}");
    }
    assert!(matches!(
        parse_assistant("<tool_call>{\"name\": </tool_call>"),
        Err(InvalidJson { at: 0, .. })
    ));
    let many = format!("<tool_call>{ok}</tool_call>").repeat(MAX_CALLS + 1);
    let at = MAX_CALLS * (11 + ok.len() + 12);
    assert_eq!(
        parse_assistant(&many),
        Err(TooManyCalls { max: MAX_CALLS, at })
    );
    assert!(parse_assistant(&format!("<tool_call>{ok}</tool_call>").repeat(MAX_CALLS)).is_ok());
    let long = "x".repeat(MAX_TEXT_BYTES + 1);
    assert_eq!(
        parse_assistant(&long),
        Err(TooLong {
            len: MAX_TEXT_BYTES + 1,
            max: MAX_TEXT_BYTES
        })
    );
}

#[test]
fn parser_fuzz_never_panics_and_ok_round_trips() {
    let seeds = [
        "Sure.\n<tool_call>\n{\"name\": \"cat\", \"arguments\": {\"path\": \"a.txt\"}}\n</tool_call>",
        "<tool_call>{\"name\": \"ls\", \"arguments\": \"{}\"}</tool_call><tool_call>{\"name\": \"x\", \"arguments\": {\"n\": [1, 2.5, null, true]}}</tool_call> tail ✓",
        "plain text with é and <tags>",
        "<tool_call>{\"name\": \"w\", \"arguments\": {\"s\": \"q\\\"\\u00e9\\n\", \"o\": {\"k\": {}}}}</tool_call>",
    ];
    let inserts = [
        "<tool_call>",
        "</tool_call>",
        "{",
        "}",
        "\"",
        ":",
        ",",
        "\\",
        "é",
        "\u{0}",
        "[",
        "\"name\"",
        "\"arguments\"",
    ];
    let mut rng = Rng(2026);
    let (mut oks, mut errs) = (0, 0);
    for _ in 0..50_000 {
        let mut bytes = seeds[rng.below(seeds.len())].as_bytes().to_vec();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(bytes.len() + 1);
            match rng.below(4) {
                0 if !bytes.is_empty() => {
                    let i = rng.below(bytes.len());
                    bytes[i] ^= 1 << rng.below(8);
                }
                1 => bytes.truncate(at),
                2 => {
                    let ins = inserts[rng.below(inserts.len())].as_bytes();
                    bytes.splice(at..at, ins.iter().copied());
                }
                _ if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => {}
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        match parse_assistant(&text) {
            Ok(p) => {
                oks += 1;
                let again = parse_assistant(&render_assistant(&p));
                assert_eq!(again.as_ref(), Ok(&p), "input {text:?}");
                assert!(p.calls.iter().all(|c| c.arguments.is_object()));
            }
            Err(_) => errs += 1,
        }
    }
    // The mutations must exercise both paths.
    assert!(oks > 1000 && errs > 1000, "oks {oks} errs {errs}");
}

// ---------------------------------------------------------------- sampling

fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        ..SamplingParams::default()
    }
}

#[test]
fn greedy_topk1_and_tiny_topp_pick_argmax() {
    let logits = [0.5f32, 3.0, -1.0, 2.9, f32::NEG_INFINITY];
    let mut s = Sampler::new(1);
    assert_eq!(
        s.sample(&logits, &SamplingParams::greedy()).unwrap(),
        (1, 0.0)
    );
    for seed in 0..50 {
        let mut s = Sampler::new(seed);
        assert_eq!(s.sample(&logits, &params(1.0, 1, 1.0)).unwrap().0, 1);
        assert_eq!(s.sample(&logits, &params(0.7, 0, 1e-6)).unwrap().0, 1);
    }
    // Ties go to the lowest id.
    assert_eq!(
        Sampler::new(0)
            .sample(&[2.0, 2.0], &SamplingParams::greedy())
            .unwrap()
            .0,
        0
    );
}

#[test]
fn seeds_reproduce_and_differ() {
    let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
    let p = params(1.0, 0, 1.0);
    let run = |seed| {
        let mut s = Sampler::new(seed);
        (0..64)
            .map(|_| s.sample(&logits, &p).unwrap().0)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

#[test]
fn temperature_matches_hand_computed_probabilities() {
    // logits [0, ln 2, ln 4] at T = 1: p = 1/7, 2/7, 4/7; at T = 0.5: logits doubled, p ∝ 1, 4, 16.
    let logits = [0.0f32, 2f32.ln(), 4f32.ln()];
    let d = distribution(&logits, &params(1.0, 0, 1.0)).unwrap();
    for ((_, lp), want) in d.iter().zip([1.0 / 7.0, 2.0 / 7.0, 4.0 / 7.0]) {
        assert!((lp.exp() - want).abs() < 1e-6);
    }
    let d = distribution(&logits, &params(0.5, 0, 1.0)).unwrap();
    for ((_, lp), want) in d.iter().zip([1.0 / 21.0, 4.0 / 21.0, 16.0 / 21.0]) {
        assert!((lp.exp() - want).abs() < 1e-6);
    }
    // top-k 2 renormalises over {1, 2}: 2/6, 4/6 at T = 1, and sample() reports that logprob.
    let d = distribution(&logits, &params(1.0, 2, 1.0)).unwrap();
    assert_eq!(d.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2]);
    assert!((d[0].1.exp() - 1.0 / 3.0).abs() < 1e-6);
    let (tok, lp) = Sampler::new(3)
        .sample(&logits, &params(1.0, 2, 1.0))
        .unwrap();
    let want = if tok == 1 {
        (1.0f32 / 3.0).ln()
    } else {
        (2.0f32 / 3.0).ln()
    };
    assert!((lp - want).abs() < 1e-5);
    // top-p 0.6 keeps 4/7 (0.571 < 0.6) then 2/7: tokens {1, 2}.
    let d = distribution(&logits, &params(1.0, 0, 0.6)).unwrap();
    assert_eq!(d.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2]);
}

#[test]
fn logprobs_sum_to_one_and_are_stable() {
    let mut rng = Rng(5);
    for case in 0..200 {
        let logits: Vec<f32> = (0..1 + rng.below(300))
            .map(|_| (rng.below(20_000) as f32 - 10_000.0) * 0.01)
            .collect();
        let p = params(
            0.1 + (case % 7) as f32 * 0.3,
            rng.below(5),
            [1.0, 0.9, 0.5][case % 3],
        );
        let d = distribution(&logits, &p).unwrap();
        let total: f64 = d.iter().map(|c| c.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-9, "case {case}: {total}");
    }
    // Huge logits do not overflow.
    let d = distribution(&[1e30, 1e30 - 1.0, -1e30], &params(1.0, 0, 1.0)).unwrap();
    assert!(d.iter().all(|c| c.1.is_finite()));
}

#[test]
fn bad_logits_and_params_are_typed_errors() {
    let mut s = Sampler::new(0);
    let p = params(1.0, 0, 1.0);
    assert_eq!(s.sample(&[], &p), Err(SamplingError::Empty));
    assert!(matches!(
        s.sample(&[0.0, f32::NAN], &p),
        Err(SamplingError::NonFinite { index: 1, .. })
    ));
    assert!(matches!(
        s.sample(&[f32::INFINITY], &p),
        Err(SamplingError::NonFinite { index: 0, .. })
    ));
    assert_eq!(
        s.sample(&[f32::NEG_INFINITY; 3], &p),
        Err(SamplingError::NoSupport)
    );
    assert_eq!(
        s.sample(&[f32::NEG_INFINITY; 3], &SamplingParams::greedy()),
        Err(SamplingError::NoSupport)
    );
    assert!(matches!(
        s.sample(&[0.0], &params(-1.0, 0, 1.0)),
        Err(SamplingError::InvalidParams(_))
    ));
    assert!(matches!(
        s.sample(&[0.0], &params(f32::NAN, 0, 1.0)),
        Err(SamplingError::InvalidParams(_))
    ));
    assert!(matches!(
        s.sample(&[0.0], &params(1.0, 0, 0.0)),
        Err(SamplingError::InvalidParams(_))
    ));
    // -inf is a mask: never sampled.
    for _ in 0..1000 {
        assert_ne!(s.sample(&[0.0, f32::NEG_INFINITY, 0.0], &p).unwrap().0, 1);
    }
}

#[test]
fn empirical_frequencies_match_softmax() {
    let logits = [1.0f32, 0.0, 2.0, -1.0, 0.5];
    let p = params(0.8, 0, 1.0);
    let d = distribution(&logits, &p).unwrap();
    let mut counts = [0usize; 5];
    let mut s = Sampler::new(99);
    let n = 20_000;
    for _ in 0..n {
        let (tok, lp) = s.sample(&logits, &p).unwrap();
        counts[tok as usize] += 1;
        assert!((f64::from(lp) - d[tok as usize].1).abs() < 1e-6);
    }
    for (i, &(_, lp)) in d.iter().enumerate() {
        let want = lp.exp();
        let got = counts[i] as f64 / n as f64;
        // 5 standard deviations of a binomial proportion.
        let tol = 5.0 * (want * (1.0 - want) / n as f64).sqrt();
        assert!((got - want).abs() < tol, "token {i}: {got} vs {want}");
    }
}

#[test]
fn stop_checker_eos_strings_and_budget() {
    let p = SamplingParams {
        max_new_tokens: 5,
        stop_strings: vec!["STOP".into(), "\n\n".into()],
        ..SamplingParams::default()
    };
    let mut c = StopChecker::new(&[258], &p);
    assert_eq!(c.check(1, "ab"), None);
    assert_eq!(c.check(258, "ab"), Some(StopReason::Eos(258)));
    // A stop string split across tokens is found, at its first byte.
    let mut c = StopChecker::new(&[258], &p);
    assert_eq!(c.check(1, "xx ST"), None);
    assert_eq!(
        c.check(2, "xx STOP"),
        Some(StopReason::StopString {
            stop: "STOP".into(),
            at: 3
        })
    );
    let mut c = StopChecker::new(&[], &p);
    for i in 0..4 {
        assert_eq!(c.check(i, "é"), None);
    }
    assert_eq!(c.check(9, "éé"), Some(StopReason::MaxTokens));
}
