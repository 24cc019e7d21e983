//! The `tessera` binary as a child process, for what only a real process shows: signals,
//! draining and the exit status.
//!
//! The binary is `target/release/tessera`, next to the test executable's target dir; the
//! tests do not build it (scripts/test builds every target first, or run
//! `cargo build --release -p tessera-server --bin tessera`). A binary older than the
//! server or engine sources fails the test instead of testing stale code.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::api::Api;
use crate::fixtures::model_path;

const BUILD_HINT: &str = "build it first: cargo build --release -p tessera-server --bin tessera \
                          (scripts/test builds every target before testing)";

/// `target/release/tessera` for the running test executable (`target/release/deps/x-hash`).
pub fn tessera_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lies in <target>/<profile>/deps");
    let bin = dir.join("tessera");
    assert!(bin.exists(), "{} is missing: {BUILD_HINT}", bin.display());
    let built = modified(&bin);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut sources = vec![root.join("Cargo.lock")];
    for dir in ["crates/server/src", "crates/engine/src"] {
        collect_rs(&root.join(dir), &mut sources);
    }
    if let Some(newer) = sources.iter().find(|p| modified(p) > built) {
        panic!(
            "{} is older than {}: {BUILD_HINT}",
            bin.display(),
            newer.display()
        );
    }
    bin
}

fn modified(p: &Path) -> SystemTime {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_rs(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A running `tessera serve` on 127.0.0.1, port chosen by the OS (`--port 0`); its
/// address is read from its JSON log. Killed when dropped if it is still running.
pub struct ServerProcess {
    child: Child,
    pub base: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl ServerProcess {
    /// Starts `tessera serve --model <default> --host 127.0.0.1 --port 0 --threads 2
    /// --log-format json <extra...>` and waits for its listening address.
    pub fn spawn(extra: &[&str]) -> ServerProcess {
        let bin = tessera_binary();
        let model = model_path();
        let mut child = Command::new(&bin)
            .arg("serve")
            .arg("--model")
            .arg(&model)
            .args(["--host", "127.0.0.1", "--port", "0", "--threads", "2"])
            .args(["--log-format", "json"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = listening_addr(&line) {
                    let _ = addr_tx.send(addr);
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut p = ServerProcess {
            child,
            base: String::new(),
            logs,
        };
        match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => p.base = format!("http://{addr}"),
            Err(_) => panic!(
                "tessera did not log its address in 30 s; log:\n{}",
                p.logs()
            ),
        }
        p
    }

    pub fn api(&self) -> Api {
        Api::new(&self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log lines so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) {
        let api = self.api();
        let ready = crate::poll_until(timeout, || async {
            let res = api.client.get(api.url("/ready")).send().await.ok()?;
            res.status().is_success().then_some(())
        })
        .await;
        assert!(
            ready.is_some(),
            "not ready within {timeout:?}; log:\n{}",
            self.logs()
        );
    }

    /// `kill -TERM <pid>`.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(
            status.success(),
            "kill -TERM {} failed: {status}",
            self.pid()
        );
    }

    /// The exit status, waiting at most `timeout` (then it panics with the log).
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "tessera still running {timeout:?} after the signal; log:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `addr` of the "listening" line of the JSON log.
fn listening_addr(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    let msg = fields.get("message")?.as_str()?;
    if !msg.starts_with("listening") {
        return None;
    }
    Some(fields.get("addr")?.as_str()?.to_string())
}
