//! A real tessera server in this process: the engine over the default model, the router,
//! graceful shutdown, on 127.0.0.1:0.
//!
//! The server runs on a thread with its own tokio runtime, so it outlives the runtime of
//! any one `#[tokio::test]`: [`TestServer::shared`] is one server for every test of a test
//! binary (the engine batches their requests; batching does not change results).

use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use engine::tokenizer::Tokenizer;
use engine::{EngineConfig, ModelInfo};
use server::metrics::Metrics;
use server::{AppState, EngineBackend, ServerOptions};
use tokio::sync::oneshot;

use crate::api::Api;
use crate::fixtures::model_path;

/// How to start a [`TestServer`]; `engine.model` and `engine.observer` are filled in.
#[derive(Clone)]
pub struct ServerSpec {
    pub engine: EngineConfig,
    pub opts: ServerOptions,
    /// `--shutdown-timeout`.
    pub shutdown_timeout: Duration,
}

impl Default for ServerSpec {
    fn default() -> Self {
        ServerSpec {
            engine: EngineConfig {
                threads: 2,
                kv_cache_bytes: 64 << 20,
                ..Default::default()
            },
            opts: ServerOptions::default(),
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

pub struct TestServer {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// The served model name (the model's own name unless the spec overrides it).
    pub model_name: String,
    pub info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl TestServer {
    /// A server with the default spec (2 threads, 64 MiB of KV cache).
    pub fn start() -> TestServer {
        Self::start_with(ServerSpec::default())
    }

    /// Loads the model and serves it; returns once the port is bound and the model loaded.
    pub fn start_with(spec: ServerSpec) -> TestServer {
        let metrics = Metrics::new().expect("metrics registry");
        let engine_cfg = EngineConfig {
            model: model_path(),
            observer: Some(metrics.observer()),
            ..spec.engine
        };
        let handle = engine::Engine::start(engine_cfg).expect("the engine starts");
        let info = handle.info().clone();
        let tokenizer = handle.tokenizer().clone();
        let model_name = spec
            .opts
            .served_model_name
            .clone()
            .unwrap_or_else(|| info.name.clone());
        let state = AppState::with_backend(spec.opts, metrics, EngineBackend::new(handle));
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        std_listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let base = format!("http://{}", std_listener.local_addr().unwrap());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let timeout = spec.shutdown_timeout;
        let thread = std::thread::Builder::new()
            .name("test-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(|e| format!("runtime: {e}"))?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(std_listener)
                        .map_err(|e| format!("listener: {e}"))?;
                    // A dropped sender (the TestServer dropped) also stops the server.
                    let shutdown = async move {
                        let _ = stop_rx.await;
                    };
                    server::serve::run(listener, state, async { Ok(()) }, shutdown, timeout).await
                })
            })
            .expect("spawn the server thread");
        TestServer {
            base,
            model_name,
            info,
            tokenizer,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// One server for all tests of this test binary, started on first use.
    pub fn shared() -> &'static TestServer {
        static SHARED: OnceLock<TestServer> = OnceLock::new();
        SHARED.get_or_init(TestServer::start)
    }

    /// A client of this server (make one per test: a client belongs to one runtime).
    pub fn api(&self) -> Api {
        Api::new(&self.base)
    }

    /// The model's tokenizer, to count tokens as the server does.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of `text` as a completion prompt (the model's default BOS handling).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.tokenizer
            .encode(text, self.tokenizer.add_bos_default())
            .expect("tokenize")
    }

    /// The text of one token as the API reports it in logprobs.
    pub fn token_text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.tokenizer.token_bytes(id)).into_owned()
    }

    /// Graceful shutdown (drain, then stop the engine); the result of `serve::run`.
    pub fn stop(mut self) -> Result<(), String> {
        self.stop.take().map(|s| s.send(()));
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("the server thread panicked".into()),
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    /// Starts the shutdown and leaves the thread to finish on its own.
    fn drop(&mut self) {
        self.stop.take().map(|s| s.send(()));
    }
}
