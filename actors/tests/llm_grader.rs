//! The LLM grader against a real HTTP server on loopback: an axum server answering
//! `POST /v1/chat/completions` from a script per test, counting requests, capturing their
//! bodies and Authorization headers, and tracking how many are in flight at once.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use klong_actors::judge::llm::{LeafRequest, LlmError, LlmGrader, LlmJudgeSettings, Verdict};
use klong_actors::judge::rubric::TaskCategory;
use serde_json::{json, Value};

/// Each test must finish well within this.
const TEST_BOUND: Duration = Duration::from_secs(8);

/// One scripted answer of the server.
#[derive(Clone)]
struct Reply {
    status: u16,
    body: String,
    delay: Duration,
}

impl Reply {
    /// A 200 chat completion whose assistant text is `content`.
    fn content(content: &str) -> Self {
        let body = json!({
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }],
        });
        Reply {
            status: 200,
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }

    fn verdict(score: u8, explanation: &str) -> Self {
        let answer = json!({
            "expectations": "a results file with the measured values",
            "reality": "results.csv holds them",
            "score": score,
            "explanation": explanation,
        });
        Reply::content(&answer.to_string())
    }

    fn status(status: u16, body: &str) -> Self {
        Reply {
            status,
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

struct Captured {
    authorization: Option<String>,
    body: Value,
}

struct Script {
    replies: Mutex<VecDeque<Reply>>,
    /// Answer once the queue is empty.
    fallback: Reply,
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    captured: Mutex<Vec<Captured>>,
}

impl Script {
    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Decrements the in-flight count even when the handler is dropped (client gone).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn chat(State(script): State<Arc<Script>>, headers: HeaderMap, body: String) -> Response {
    script.requests.fetch_add(1, Ordering::SeqCst);
    let now = script.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let _guard = InFlight(&script.in_flight);
    script.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let reply = script
        .replies
        .lock()
        .expect("script lock")
        .pop_front()
        .unwrap_or_else(|| script.fallback.clone());
    script
        .captured
        .lock()
        .expect("capture lock")
        .push(Captured {
            authorization: headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: serde_json::from_str(&body).unwrap_or(Value::Null),
        });
    tokio::time::sleep(reply.delay).await;
    let status = StatusCode::from_u16(reply.status).expect("scripted status");
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        reply.body,
    )
        .into_response()
}

/// Starts the scripted server on 127.0.0.1 (port 0) and returns its base URL.
async fn serve(replies: Vec<Reply>, fallback: Reply) -> (String, Arc<Script>) {
    let script = Arc::new(Script {
        replies: Mutex::new(replies.into()),
        fallback,
        requests: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
        captured: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .with_state(script.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/v1"), script)
}

/// Settings for a test: short timeout and backoff, a key variable of the test's own (tests
/// run in parallel threads of one process, so they must not share one variable).
fn settings(base_url: &str, key_var: &str) -> LlmJudgeSettings {
    std::env::set_var(key_var, format!("sk-test-{key_var}"));
    LlmJudgeSettings {
        base_url: base_url.into(),
        model: "judge-model-test".into(),
        api_key_env: key_var.into(),
        timeout: Duration::from_secs(2),
        max_retries: 2,
        backoff: Duration::from_millis(10),
        max_concurrent: 4,
        max_paper_bytes: 16 << 10,
        max_file_bytes: 4 << 10,
        max_prompt_bytes: 64 << 10,
        cache_dir: None,
        max_cached: 1000,
    }
}

fn request(final_state_hash: &str) -> LeafRequest {
    LeafRequest {
        rubric_hash: "rubric-abc".into(),
        leaf_id: "exp-3-recorded".into(),
        requirements: "Experiment 3's result is recorded in results.csv as `exp3,<value>`.".into(),
        category: TaskCategory::ResultAnalysis,
        paper: "# A small paper\nRun experiments 1 to 5 and record each result.".into(),
        files: vec![
            ("results.csv".into(), "exp1,0.5\nexp3,0.731\n".into()),
            ("report.md".into(), "Experiment 3 gave 0.731.".into()),
        ],
        final_state_hash: final_state_hash.into(),
    }
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_BOUND, f)
        .await
        .expect("the test ran past its time bound")
}

fn user_message(body: &Value) -> &str {
    body["messages"][1]["content"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_good_answer_is_a_verdict_and_the_request_carries_the_evidence() {
    bounded(async {
        let (url, script) = serve(vec![], Reply::verdict(1, "exp3 is recorded as 0.731")).await;
        let grader = LlmGrader::new(settings(&url, "KLONG_TEST_KEY_GOOD")).expect("grader");
        let verdict = grader.grade(&request("state-1")).await.expect("verdict");
        assert_eq!(
            verdict,
            Verdict {
                score: 1,
                explanation: "exp3 is recorded as 0.731".into(),
                cached: false
            }
        );
        assert_eq!(script.requests(), 1);
        assert!(
            !format!("{grader:?}").contains("sk-test"),
            "the key never reaches Debug output"
        );

        let captured = script.captured.lock().expect("capture lock");
        let sent = &captured[0];
        assert_eq!(
            sent.authorization.as_deref(),
            Some("Bearer sk-test-KLONG_TEST_KEY_GOOD")
        );
        assert_eq!(sent.body["model"], "judge-model-test");
        assert_eq!(sent.body["messages"][0]["role"], "system");
        let user = user_message(&sent.body);
        assert!(
            user.contains("Experiment 3's result is recorded in results.csv"),
            "{user}"
        );
        assert!(
            user.contains("exp3,0.731"),
            "the file content is in the prompt: {user}"
        );
        assert!(user.contains("results.csv") && user.contains("report.md"));
        assert!(
            user.contains("Run experiments 1 to 5"),
            "the paper is in the prompt"
        );
        assert!(user.contains("Result Analysis"), "the category is named");
        assert!(user.contains("\"score\""), "the answer format is asked for");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_in_fences_with_a_boolean_score_is_accepted() {
    bounded(async {
        let fenced = "Here is my verdict:\n```json\n{\"expectations\": \"e\", \"reality\": \"r\", \
                      \"score\": false, \"explanation\": \"exp3 is missing\"}\n```";
        let (url, _script) = serve(vec![], Reply::content(fenced)).await;
        let grader = LlmGrader::new(settings(&url, "KLONG_TEST_KEY_FENCED")).expect("grader");
        let verdict = grader.grade(&request("state-1")).await.expect("verdict");
        assert_eq!(verdict.score, 0);
        assert_eq!(verdict.explanation, "exp3 is missing");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_answer_is_retried_then_a_typed_failure() {
    bounded(async {
        // Prose, then a score that is neither 0 nor 1: both malformed.
        let replies = vec![Reply::content("I think it deserves full marks.")];
        let fallback = Reply::content("{\"score\": 2, \"explanation\": \"great\"}");
        let (url, script) = serve(replies, fallback).await;
        let s = settings(&url, "KLONG_TEST_KEY_MALFORMED");
        let retries = s.max_retries as usize;
        let grader = LlmGrader::new(s).expect("grader");
        let err = grader
            .grade(&request("state-1"))
            .await
            .expect_err("malformed");
        assert!(matches!(err, LlmError::Malformed { .. }), "{err:?}");
        assert!(err.to_string().contains("0 or 1"), "{err}");
        assert_eq!(script.requests(), retries + 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_answer_then_a_good_one_succeeds() {
    bounded(async {
        let replies = vec![Reply::content("```json\n{\"score\": 1,\n```")];
        let (url, script) = serve(replies, Reply::verdict(1, "recorded")).await;
        let grader =
            LlmGrader::new(settings(&url, "KLONG_TEST_KEY_MALFORMED_THEN_GOOD")).expect("grader");
        let verdict = grader.grade(&request("state-1")).await.expect("verdict");
        assert_eq!(verdict.score, 1);
        assert_eq!(script.requests(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_answer_times_out() {
    bounded(async {
        let slow = Reply::verdict(1, "too late").delayed(Duration::from_secs(5));
        let (url, script) = serve(vec![], slow).await;
        let mut s = settings(&url, "KLONG_TEST_KEY_SLOW");
        s.timeout = Duration::from_millis(200);
        s.max_retries = 1;
        let grader = LlmGrader::new(s).expect("grader");
        let started = Instant::now();
        let err = grader
            .grade(&request("state-1"))
            .await
            .expect_err("timeout");
        let took = started.elapsed();
        match err {
            LlmError::Timeout { after } => assert_eq!(after, Duration::from_millis(200)),
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert_eq!(script.requests(), 2, "a timeout is retried");
        assert!(took < Duration::from_millis(1500), "took {took:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_error_then_a_good_answer_succeeds() {
    bounded(async {
        let replies = vec![
            Reply::status(500, "{\"error\": \"overloaded\"}"),
            Reply::status(429, "{\"error\": \"slow down\"}"),
        ];
        let (url, script) = serve(replies, Reply::verdict(0, "not recorded")).await;
        let grader = LlmGrader::new(settings(&url, "KLONG_TEST_KEY_500")).expect("grader");
        let verdict = grader.grade(&request("state-1")).await.expect("verdict");
        assert_eq!(verdict.score, 0);
        assert_eq!(script.requests(), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_request_is_not_retried() {
    bounded(async {
        let (url, script) = serve(
            vec![Reply::status(400, "{\"error\": \"unknown model\"}")],
            Reply::verdict(1, "never reached"),
        )
        .await;
        let grader = LlmGrader::new(settings(&url, "KLONG_TEST_KEY_400")).expect("grader");
        let err = grader.grade(&request("state-1")).await.expect_err("400");
        match err {
            LlmError::Http {
                status,
                body_snippet,
            } => {
                assert_eq!(status, 400);
                assert!(body_snippet.contains("unknown model"), "{body_snippet}");
            }
            other => panic!("expected an HTTP error, got {other:?}"),
        }
        assert_eq!(script.requests(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_identical_call_is_a_cache_hit_and_another_state_is_not() {
    bounded(async {
        let (url, script) = serve(vec![], Reply::verdict(1, "recorded")).await;
        let grader = LlmGrader::new(settings(&url, "KLONG_TEST_KEY_CACHE")).expect("grader");
        let first = grader.grade(&request("state-1")).await.expect("first");
        assert!(!first.cached);
        let second = grader.grade(&request("state-1")).await.expect("second");
        assert!(second.cached);
        assert_eq!((second.score, &second.explanation), (1, &first.explanation));
        assert_eq!(script.requests(), 1, "a hit makes no request");

        let other = grader
            .grade(&request("state-2"))
            .await
            .expect("other state");
        assert!(!other.cached);
        assert_eq!(script.requests(), 2, "another final state is graded anew");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_disk_cache_survives_a_new_grader() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache: PathBuf = dir.path().join("verdicts");
        let (url, script) = serve(vec![], Reply::verdict(1, "recorded")).await;
        let mut s = settings(&url, "KLONG_TEST_KEY_DISK");
        s.cache_dir = Some(cache.clone());

        let grader = LlmGrader::new(s.clone()).expect("grader");
        assert!(
            !grader
                .grade(&request("state-1"))
                .await
                .expect("first")
                .cached
        );
        drop(grader);
        let files: Vec<_> = std::fs::read_dir(&cache)
            .expect("cache dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            files.len(),
            1,
            "one file per verdict, no temporaries: {files:?}"
        );
        assert!(
            files[0].ends_with(".json") && files[0].len() == 64 + 5,
            "{files:?}"
        );

        let fresh = LlmGrader::new(s.clone()).expect("second grader");
        let verdict = fresh.grade(&request("state-1")).await.expect("from disk");
        assert!(verdict.cached);
        assert_eq!(verdict.score, 1);
        assert_eq!(script.requests(), 1);

        // Another judge model is another key.
        s.model = "another-judge".into();
        let other = LlmGrader::new(s).expect("third grader");
        assert!(
            !other
                .grade(&request("state-1"))
                .await
                .expect("other")
                .cached
        );
        assert_eq!(script.requests(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_is_bounded_across_grades() {
    bounded(async {
        let slow = Reply::verdict(1, "recorded").delayed(Duration::from_millis(100));
        let (url, script) = serve(vec![], slow).await;
        let mut s = settings(&url, "KLONG_TEST_KEY_CONCURRENCY");
        s.max_concurrent = 2;
        let grader = Arc::new(LlmGrader::new(s).expect("grader"));
        let mut tasks = Vec::new();
        for i in 0..6 {
            let grader = grader.clone();
            tasks.push(tokio::spawn(async move {
                grader.grade(&request(&format!("state-{i}"))).await
            }));
        }
        for task in tasks {
            let verdict = task.await.expect("task").expect("verdict");
            assert!(!verdict.cached);
        }
        assert_eq!(script.requests(), 6);
        assert_eq!(script.max_in_flight.load(Ordering::SeqCst), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_api_key_fails_without_a_request() {
    bounded(async {
        let (url, script) = serve(vec![], Reply::verdict(1, "never reached")).await;
        let mut s = settings(&url, "KLONG_TEST_KEY_PRESENT");
        s.api_key_env = "KLONG_TEST_KEY_NEVER_SET_7f3a".into();
        let err = LlmGrader::new(s).expect_err("no key");
        match err {
            LlmError::MissingApiKey { var } => assert_eq!(var, "KLONG_TEST_KEY_NEVER_SET_7f3a"),
            other => panic!("expected MissingApiKey, got {other:?}"),
        }
        assert_eq!(script.requests(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_paper_and_files_are_cut_to_the_prompt_bound() {
    bounded(async {
        let (url, script) = serve(vec![], Reply::verdict(1, "recorded")).await;
        let mut s = settings(&url, "KLONG_TEST_KEY_BOUNDS");
        s.max_prompt_bytes = 16 << 10;
        s.max_paper_bytes = 6 << 10;
        s.max_file_bytes = 2 << 10;
        let max_prompt = s.max_prompt_bytes;
        let grader = LlmGrader::new(s).expect("grader");
        let mut req = request("state-1");
        // Multi-byte characters, so cuts must respect character boundaries.
        req.paper = "é paper line\n".repeat(5000);
        req.files = (0..40)
            .map(|i| {
                (
                    format!("out/{i}.log"),
                    format!("log line {i} ü\n").repeat(500),
                )
            })
            .collect();
        grader.grade(&req).await.expect("verdict");

        let captured = script.captured.lock().expect("capture lock");
        let body = &captured[0].body;
        let system = body["messages"][0]["content"].as_str().unwrap_or_default();
        let user = user_message(body);
        assert!(
            system.len() + user.len() <= max_prompt,
            "{}",
            system.len() + user.len()
        );
        assert!(user.contains("truncated"), "a cut is marked");
        assert!(
            user.contains("more file(s) not shown"),
            "omitted files are counted"
        );
        assert!(user.contains("out/0.log"));
        assert!(
            user.contains("Experiment 3's result"),
            "the criterion always fits"
        );
    })
    .await;
}

#[test]
fn settings_parse_with_units_defaults_and_no_unknown_fields() {
    let parsed: LlmJudgeSettings = serde_json::from_value(json!({
        "base_url": "http://127.0.0.1:8000/v1",
        "model": "local-judge",
        "timeout": "45s",
        "backoff": "250ms",
        "max_paper_bytes": "32KiB",
        "cache_dir": "/tmp/verdicts",
    }))
    .expect("settings");
    assert_eq!(parsed.timeout, Duration::from_secs(45));
    assert_eq!(parsed.backoff, Duration::from_millis(250));
    assert_eq!(parsed.max_paper_bytes, 32 << 10);
    assert_eq!(parsed.cache_dir, Some(PathBuf::from("/tmp/verdicts")));
    let defaults = LlmJudgeSettings::default();
    assert_eq!(parsed.api_key_env, defaults.api_key_env);
    assert_eq!(parsed.max_concurrent, defaults.max_concurrent);
    assert!(parsed.validate().is_ok());
    assert!(defaults.validate().is_ok());

    let unknown = serde_json::from_value::<LlmJudgeSettings>(json!({"api_key": "sk-oops"}));
    assert!(
        unknown.is_err(),
        "an unknown field (like a pasted key) is refused"
    );
    let bare = serde_json::from_value::<LlmJudgeSettings>(json!({"timeout": 30}));
    assert!(bare.is_err(), "a duration needs units");

    let bad = LlmJudgeSettings {
        max_concurrent: 0,
        ..LlmJudgeSettings::default()
    };
    assert!(matches!(
        LlmGrader::new(bad),
        Err(LlmError::Settings { .. })
    ));
}
