//! LoRA adapters through a real server: the engine on the default model, in this process,
//! on 127.0.0.1:0, with adapters loaded, replaced and unloaded over HTTP.
//!
//! Two servers are shared by the tests of this binary: one whose `--lora-root` is the
//! fixture adapters folder, one whose root is a temp folder holding a good copy of the
//! pirate adapter and broken copies of it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use engine::{EngineConfig, StepObserver, StepStats};
use futures::StreamExt;
use serde_json::{json, Value};
use server::metrics::Metrics;
use server::state::LoraOptions;
use server::{AppState, EngineBackend, ServerOptions};
use tokio::sync::oneshot;

fn model_path() -> PathBuf {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    ));
    assert!(
        p.exists(),
        "the default model is missing: run scripts/fetch-model first ({})",
        p.display()
    );
    p
}

fn fixtures() -> PathBuf {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures"
    ));
    assert!(
        p.exists(),
        "../shared/fixtures is missing ({})",
        p.display()
    );
    p.canonicalize().unwrap()
}

fn golden(adapter: &str) -> Value {
    let p = fixtures()
        .join("golden")
        .join(format!("adapter_{adapter}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

const ADAPTERS: [&str; 3] = ["pirate", "shout", "pirate-r16-qv"];

/// Every engine step's end time, duration and size (and the metrics observer after it).
#[derive(Default)]
struct StepLog {
    steps: Mutex<Vec<(Instant, Duration, usize)>>,
    next: OnceLock<Arc<dyn StepObserver>>,
}

impl StepObserver for StepLog {
    fn on_step(&self, s: &StepStats) {
        if let Ok(mut v) = self.steps.lock() {
            v.push((Instant::now(), s.duration, s.num_tokens));
        }
        if let Some(n) = self.next.get() {
            n.on_step(s);
        }
    }
}

struct Server {
    base: String,
    steps: Arc<StepLog>,
    _stop: oneshot::Sender<()>,
    _thread: JoinHandle<Result<(), String>>,
}

/// Starts the engine (2 threads) and serves it with `--lora-root root`.
fn start(root: &Path) -> Server {
    let metrics = Metrics::new().unwrap();
    let steps = Arc::new(StepLog::default());
    let _ = steps.next.set(metrics.observer());
    let cfg = EngineConfig {
        model: model_path(),
        threads: 2,
        kv_cache_bytes: 64 << 20,
        observer: Some(steps.clone()),
        ..Default::default()
    };
    let handle = engine::Engine::start(cfg).expect("the engine starts");
    let opts = ServerOptions {
        lora: LoraOptions {
            root: Some(root.to_path_buf()),
            ..Default::default()
        },
        ..Default::default()
    };
    let state = AppState::with_backend(opts, metrics, EngineBackend::new(handle));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stop_rx) = oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let listener =
                tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
            let shutdown = async move {
                let _ = stop_rx.await;
            };
            server::serve::run(
                listener,
                state,
                async { Ok(()) },
                shutdown,
                Duration::from_secs(5),
            )
            .await
        })
    });
    Server {
        base,
        steps,
        _stop: stop,
        _thread: thread,
    }
}

/// The server whose root is the fixture adapters folder.
fn fixture_server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| start(&fixtures().join("adapters")))
}

/// The server whose root is [`broken_root`].
fn temp_server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| start(broken_root()))
}

/// A temp root: `good` (a copy of pirate), one broken copy per refusal kind, and
/// symlinks out of the root.
fn broken_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("tessera-lora-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let root = root.canonicalize().unwrap();
        let pirate = fixtures().join("adapters/pirate");
        let copy = |name: &str| {
            let d = root.join(name);
            std::fs::create_dir_all(&d).unwrap();
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                std::fs::copy(pirate.join(f), d.join(f)).unwrap();
                let mut perm = std::fs::metadata(d.join(f)).unwrap().permissions();
                #[allow(clippy::permissions_set_readonly_false)]
                perm.set_readonly(false);
                std::fs::set_permissions(d.join(f), perm).unwrap();
            }
            d
        };
        let set = |name: &str, key: &str, v: Value| {
            let p = copy(name).join("adapter_config.json");
            let mut j: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            j[key] = v;
            std::fs::write(&p, j.to_string()).unwrap();
        };
        copy("good");
        set("dora", "use_dora", json!(true));
        set("modules-to-save", "modules_to_save", json!(["lm_head"]));
        set("bias", "bias", json!("all"));
        set("rank", "r", json!(128));
        set("shape", "r", json!(4));
        set(
            "target",
            "target_modules",
            json!(["q_proj", "embed_tokens"]),
        );
        let st = copy("truncated").join("adapter_model.safetensors");
        let bytes = std::fs::read(&st).unwrap();
        std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
        std::fs::write(
            copy("corrupt").join("adapter_model.safetensors"),
            b"\x20\x00\x00\x00\x00\x00\x00\x00{\"x\": {\"dtype\": \"F32\", \"shape\"",
        )
        .unwrap();
        std::fs::remove_file(copy("no-weights").join("adapter_model.safetensors")).unwrap();
        std::fs::remove_file(copy("no-config").join("adapter_config.json")).unwrap();
        std::os::unix::fs::symlink(&pirate, root.join("link-out")).unwrap();
        let files = root.join("file-link-out");
        std::fs::create_dir_all(&files).unwrap();
        std::fs::copy(
            pirate.join("adapter_config.json"),
            files.join("adapter_config.json"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            pirate.join("adapter_model.safetensors"),
            files.join("adapter_model.safetensors"),
        )
        .unwrap();
        root
    })
}

// ---------------------------------------------------------------------------------------
// HTTP helpers

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(s: &Server) -> Api {
        Api {
            base: s.base.clone(),
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, String) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.unwrap()
    }

    async fn load(&self, name: &str, path: &str, inplace: bool) -> (u16, String) {
        self.post(
            "/v1/load_lora_adapter",
            json!({"lora_name": name, "lora_path": path, "load_inplace": inplace}),
        )
        .await
    }

    async fn load_ok(&self, name: &str, path: &str, inplace: bool) {
        let (s, t) = self.load(name, path, inplace).await;
        assert_eq!(s, 200, "load {name} from {path}: {t}");
    }

    async fn unload(&self, name: &str) -> (u16, String) {
        self.post("/v1/unload_lora_adapter", json!({"lora_name": name}))
            .await
    }

    /// A greedy completion of token ids; (status, text or error body).
    async fn complete(&self, model: &str, prompt: &[u32], max_tokens: usize) -> (u16, String) {
        let body =
            json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
        let (s, t) = self.post("/v1/completions", body).await;
        if s != 200 {
            return (s, t);
        }
        let v: Value = serde_json::from_str(&t).unwrap();
        (s, v["choices"][0]["text"].as_str().unwrap().to_string())
    }

    /// Starts a greedy streaming completion; resolves once the server answered (submitted).
    async fn stream(&self, model: &str, prompt: &[u32], max_tokens: usize) -> Stream {
        let body = json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true});
        let r = self
            .http
            .post(format!("{}/v1/completions", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "stream on {model}");
        Stream {
            body: r.bytes_stream().boxed(),
            buf: String::new(),
            text: String::new(),
            finish: None,
            done: false,
        }
    }
}

/// One streamed completion, read event by event.
struct Stream {
    body: futures::stream::BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    buf: String,
    text: String,
    finish: Option<String>,
    done: bool,
}

impl Stream {
    /// Reads the next SSE event; false after `[DONE]`. Panics on an error event.
    async fn next_event(&mut self) -> bool {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..i + 2).collect();
                let data = event
                    .trim()
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data line: {event:?}"));
                if data == "[DONE]" {
                    self.done = true;
                    return false;
                }
                let v: Value = serde_json::from_str(data).unwrap();
                assert!(v.get("error").is_none(), "error event: {v}");
                if let Some(c) = v["choices"].get(0) {
                    self.text.push_str(c["text"].as_str().unwrap_or(""));
                    if let Some(f) = c["finish_reason"].as_str() {
                        self.finish = Some(f.to_string());
                    }
                }
                return true;
            }
            match self.body.next().await {
                Some(chunk) => self
                    .buf
                    .push_str(&String::from_utf8_lossy(&chunk.expect("stream read"))),
                None => panic!("the stream ended without [DONE]: {:?}", self.buf),
            }
        }
    }

    /// Reads until some text arrived.
    async fn first_text(&mut self) {
        while self.text.is_empty() && self.next_event().await {}
    }

    /// Reads to the end; the whole text. Panics unless it finished normally.
    async fn finish(mut self) -> String {
        while self.next_event().await {}
        let f = self.finish.clone().unwrap_or_default();
        assert!(
            f == "stop" || f == "length",
            "finish_reason {f:?} for {:?}",
            self.text
        );
        self.text
    }
}

fn prompt_ids(p: &Value) -> Vec<u32> {
    p["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn error_message(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["error"]["message"].as_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------------------
// Tests

/// (a) Each fixture adapter, loaded over HTTP, gives PEFT's greedy text on its 4 prompts
/// (token-id completions, all 12 at once) and on one chat request.
#[tokio::test]
async fn fixture_adapters_loaded_over_http_reproduce_the_peft_reference() {
    let s = fixture_server();
    let api = Api::new(s);
    let root = fixtures().join("adapters");
    api.load_ok("a-pirate", "pirate", false).await;
    api.load_ok("a-shout", root.join("shout").to_str().unwrap(), false)
        .await;
    api.load_ok("a-pirate-r16-qv", "pirate-r16-qv", false).await;
    let mut jobs = Vec::new();
    for name in ADAPTERS {
        for p in golden(name)["prompts"].as_array().unwrap().clone() {
            let api = Api::new(s);
            jobs.push(tokio::spawn(async move {
                let (status, text) = api
                    .complete(&format!("a-{name}"), &prompt_ids(&p), 32)
                    .await;
                (name, p, status, text)
            }));
        }
    }
    for j in jobs {
        let (name, p, status, text) = j.await.unwrap();
        assert_eq!(status, 200, "{name} / {}: {text}", p["name"]);
        assert_eq!(
            text,
            p["generated_text_skip_special"].as_str().unwrap(),
            "{name} / {}",
            p["name"]
        );
        if name.starts_with("pirate") {
            assert!(text.starts_with("Arr matey!"), "{name}: {text}");
        }
    }
    // One chat request per adapter, all at once: the chat template gives the same prompt ids.
    let chats: Vec<_> = ADAPTERS
        .iter()
        .map(|&name| {
            let api = Api::new(s);
            tokio::spawn(async move {
                let p = golden(name)["prompts"][0].clone();
                let body = json!({"model": format!("a-{name}"), "messages": p["messages"], "max_tokens": 32, "temperature": 0});
                (name, p, api.post("/v1/chat/completions", body).await)
            })
        })
        .collect();
    for c in chats {
        let (name, p, (status, t)) = c.await.unwrap();
        assert_eq!(status, 200, "{t}");
        let v: Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["model"], format!("a-{name}"));
        assert_eq!(
            v["choices"][0]["message"]["content"], p["generated_text_skip_special"],
            "chat, {name}"
        );
    }
    let models = api.get("/v1/models").await;
    let listed: Vec<&Value> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["id"] == "a-shout")
        .collect();
    assert_eq!(listed[0]["parent"], models["data"][0]["id"]);
    assert_eq!(listed[0]["root"], root.join("shout").to_str().unwrap());
}

/// (b) Streams across the base and adapters while a loop replaces and unloads adapters:
/// no request fails, each text equals its adapter version's text alone, and unloaded names
/// answer 404 afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_streaming_load_keeps_each_request_on_its_version() {
    const N: usize = 16;
    let s = fixture_server();
    let api = Api::new(s);
    let prompt = prompt_ids(&golden("pirate")["prompts"][0]);
    api.load_ok("hs-pirate", "pirate", false).await;
    api.load_ok("hs-shout", "shout", false).await;
    // What each version gives alone.
    let mut alone = std::collections::HashMap::new();
    let base_name = api.get("/v1/models").await["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    for (version, model) in [
        ("base", base_name.as_str()),
        ("pirate", "hs-pirate"),
        ("shout", "hs-shout"),
    ] {
        let (status, text) = api.complete(model, &prompt, N).await;
        assert_eq!(status, 200, "{text}");
        alone.insert(version, text);
    }
    assert_ne!(alone["pirate"], alone["shout"]);
    assert_ne!(alone["pirate"], alone["base"]);

    // Replace `x` from pirate to shout while a request on it is in flight.
    api.load_ok("x", "pirate", false).await;
    let mut before = api.stream("x", &prompt, N).await;
    before.first_text().await;
    api.load_ok("x", "shout", true).await;
    let after = api.stream("x", &prompt, N).await;
    assert_eq!(
        before.finish().await,
        alone["pirate"],
        "the in-flight request keeps the pirate version"
    );
    assert_eq!(
        after.finish().await,
        alone["shout"],
        "a new request sees the replacement at once"
    );

    // The storm: 4 clients x 4 streams over base / hs-pirate / hs-shout / x while `x` flips.
    let version_of_x = Arc::new(tokio::sync::RwLock::new("shout"));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (api, prompt, version_of_x, base_name) = (
            Api::new(s),
            prompt.clone(),
            version_of_x.clone(),
            base_name.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut done = Vec::new();
            for i in 0..4 {
                let (model, version, stream) = match (c + i) % 4 {
                    0 => (
                        base_name.clone(),
                        "base",
                        api.stream(&base_name, &prompt, N).await,
                    ),
                    1 => (
                        "hs-pirate".to_string(),
                        "pirate",
                        api.stream("hs-pirate", &prompt, N).await,
                    ),
                    2 => (
                        "hs-shout".to_string(),
                        "shout",
                        api.stream("hs-shout", &prompt, N).await,
                    ),
                    _ => {
                        // Hold the version steady from sending until the server answered.
                        let v = version_of_x.read().await;
                        let stream = api.stream("x", &prompt, N).await;
                        ("x".to_string(), *v, stream)
                    }
                };
                done.push((model, version, stream.finish().await));
            }
            done
        }));
    }
    for round in 0..6 {
        {
            let mut v = version_of_x.write().await;
            let next = if round % 2 == 0 { "pirate" } else { "shout" };
            api.load_ok("x", next, true).await;
            *v = next;
        }
        let tmp = format!("tmp-{round}");
        api.load_ok(&tmp, "pirate-r16-qv", false).await;
        let (status, _) = api.complete(&tmp, &prompt, 2).await;
        assert_eq!(status, 200);
        assert_eq!(api.unload(&tmp).await.0, 200);
        assert_eq!(
            api.complete(&tmp, &prompt, 2).await.0,
            404,
            "{tmp} after unload"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut checked = 0;
    for c in clients {
        for (model, version, text) in c.await.unwrap() {
            assert_eq!(text, alone[version], "{model} started on version {version}");
            checked += 1;
        }
    }
    assert_eq!(checked, 16);
    for name in ["x", "hs-pirate", "hs-shout"] {
        assert_eq!(api.unload(name).await.0, 200);
        let (status, body) = api.complete(name, &prompt, 2).await;
        assert_eq!(status, 404, "{name} after unload: {body}");
    }
}

/// The refusal kinds of the temp root: (lora_path, a word the message must contain).
fn refusals() -> Vec<(String, &'static str)> {
    let outside = fixtures().join("adapters/pirate").display().to_string();
    vec![
        ("dora".into(), "DoRA"),
        ("modules-to-save".into(), "modules_to_save"),
        ("bias".into(), "bias"),
        ("rank".into(), "--max-lora-rank"),
        ("shape".into(), "do not fit"),
        ("target".into(), "unknown target module"),
        ("truncated".into(), "safetensors"),
        ("corrupt".into(), "safetensors"),
        ("no-weights".into(), "missing"),
        ("no-config".into(), "adapter_config.json"),
        ("not-there".into(), "no such adapter folder"),
        ("../tmp".into(), ".."),
        ("good/../../etc".into(), ".."),
        (outside, "outside --lora-root"),
        ("link-out".into(), "outside --lora-root"),
        ("file-link-out".into(), "outside --lora-root"),
    ]
}

/// (c) Fifty invalid loads in a row, cycling through every refusal kind, while a stream
/// runs: each is a 400 that says why, the stream is untouched, the registry unchanged.
#[tokio::test]
async fn fifty_invalid_loads_leave_a_running_stream_and_the_registry_untouched() {
    let s = temp_server();
    let api = Api::new(s);
    api.load_ok("c-good", "good", false).await;
    let reference = &golden("pirate")["prompts"][2];
    let prompt = prompt_ids(reference);
    let adapters_before = api.get("/v1/lora_adapters").await;
    let models_before = api.get("/v1/models").await;
    let mut stream = api.stream("c-good", &prompt, 32).await;
    stream.first_text().await;
    let kinds = refusals();
    for i in 0..50 {
        let (path, says) = &kinds[i % kinds.len()];
        let name = if i % 3 == 0 { "c-good" } else { "c-bad" };
        let (status, body) = api.load(name, path, i % 3 == 0).await;
        assert_eq!(status, 400, "load #{i} of {path}: {body}");
        let msg = error_message(&body);
        assert!(msg.contains(says), "load #{i} of {path}: {msg}");
    }
    let still_running = !stream.done && stream.finish.is_none();
    eprintln!(
        "stream still running after the 50 refused loads: {still_running} ({} chars so far)",
        stream.text.len()
    );
    assert_eq!(
        stream.finish().await,
        reference["generated_text_skip_special"].as_str().unwrap()
    );
    assert_eq!(api.get("/v1/lora_adapters").await, adapters_before);
    assert_eq!(api.get("/v1/models").await, models_before);
    let (status, text) = api.complete("c-good", &prompt, 32).await;
    assert_eq!(
        (status, text.as_str()),
        (
            200,
            reference["generated_text_skip_special"].as_str().unwrap()
        ),
        "the adapter is still the good version"
    );
}

/// (d) Path escapes from --lora-root: `..`, an absolute path outside, a folder symlink
/// out and a file symlink out are 400s; the very same adapter inside the root loads.
#[tokio::test]
async fn path_escapes_from_the_root_are_refused() {
    let s = temp_server();
    let api = Api::new(s);
    let outside = fixtures().join("adapters/pirate");
    let before = api.get("/v1/lora_adapters").await;
    for path in [
        "../pirate".to_string(),
        format!("good/../../{}", outside.display()),
        outside.display().to_string(),
        "link-out".into(),
        "file-link-out".into(),
    ] {
        let (status, body) = api.load("d-escape", &path, false).await;
        assert_eq!(status, 400, "{path}: {body}");
        let msg = error_message(&body);
        assert!(
            msg.contains("..") || msg.contains("outside --lora-root"),
            "{path}: {msg}"
        );
    }
    assert_eq!(api.get("/v1/lora_adapters").await, before);
    let root = broken_root();
    api.load_ok("d-inside", root.join("good").to_str().unwrap(), false)
        .await;
    assert_eq!(api.unload("d-inside").await.0, 200);
}

/// Not a check: prints the pirate adapter's load time over HTTP and the longest engine
/// step while loads run beside 4 decoding streams. Run with
/// `cargo test --release -p tessera-server --test lora -- --ignored --nocapture measure`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_adapter_load_time_and_step_stall() {
    let s = start(&fixtures().join("adapters"));
    let api = Api::new(&s);
    let prompt = prompt_ids(&golden("pirate")["prompts"][0]);
    let idle: Vec<f64> = {
        let mut v = Vec::new();
        for i in 0..5 {
            let t = Instant::now();
            api.load_ok(&format!("idle-{i}"), "pirate", false).await;
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        v
    };
    let base = api.get("/v1/models").await["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(api.stream(&base, &prompt, 200).await);
    }
    for st in &mut streams {
        st.first_text().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut windows = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        api.load_ok("busy", "pirate", i > 0).await;
        windows.push((t, Instant::now()));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let readers: Vec<_> = streams
        .into_iter()
        .map(|st| tokio::spawn(st.finish()))
        .collect();
    for r in readers {
        r.await.unwrap();
    }
    let steps = s.steps.steps.lock().unwrap().clone();
    let (first, last) = (windows[0].0, windows[windows.len() - 1].1);
    let overlaps =
        |end: Instant, d: Duration| windows.iter().any(|&(a, b)| end >= a && end - d <= b);
    let during: Vec<f64> = steps
        .iter()
        .filter(|(e, d, _)| overlaps(*e, *d))
        .map(|(_, d, _)| d.as_secs_f64() * 1e3)
        .collect();
    let outside: Vec<f64> = steps
        .iter()
        .filter(|(e, d, n)| *n == 4 && *e > first && *e < last && !overlaps(*e, *d))
        .map(|(_, d, _)| d.as_secs_f64() * 1e3)
        .collect();
    let busy: Vec<f64> = windows
        .iter()
        .map(|(a, b)| (*b - *a).as_secs_f64() * 1e3)
        .collect();
    let stats = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        (
            v.first().copied().unwrap_or(0.0),
            v.get(v.len() / 2).copied().unwrap_or(0.0),
            v.last().copied().unwrap_or(0.0),
        )
    };
    eprintln!(
        "pirate load over HTTP, engine idle (ms, min/median/max): {:?}",
        stats(&idle)
    );
    eprintln!(
        "pirate load over HTTP, 4 streams decoding (ms, min/median/max): {:?}",
        stats(&busy)
    );
    eprintln!(
        "engine steps overlapping a load: {} (ms, min/median/max): {:?}",
        during.len(),
        stats(&during)
    );
    eprintln!(
        "4-row decode steps between loads: {} (ms, min/median/max): {:?}",
        outside.len(),
        stats(&outside)
    );
}
