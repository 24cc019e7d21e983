//! Shared helpers of tessera's end-to-end tests (the test files are in `tests/tests/`).
//!
//! ```text
//! fixtures   the default model and the reference generations (../shared/fixtures/golden)
//! server     TestServer: a real server on 127.0.0.1:0, in this process, over the real engine
//! api        Api: a reqwest client with JSON helpers; the OpenAI error shape check
//! sse        a strict server-sent-events reader and the folding of chunks into answers
//! prom       the Prometheus text exposition as samples; `promtool check metrics`
//! process    ServerProcess: the `tessera` binary as a child process (signals, exit codes)
//! ```
//!
//! Everything runs against the default model; a missing model or fixture fails the test
//! with the command that fixes it, it never skips.

pub mod api;
pub mod fixtures;
pub mod process;
pub mod prom;
pub mod server;
pub mod sse;

pub use api::{assert_error_shape, error_shape, Api};
pub use fixtures::{golden, model_path, GoldenPrompt};
pub use process::ServerProcess;
pub use prom::{promtool_check, Samples};
pub use server::{ServerSpec, TestServer};
pub use sse::{ChoiceSummary, SseParser, SseStream, StreamKind, StreamSummary};

use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it returns `Some`, for at most `timeout`; `None` on time-out.
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
