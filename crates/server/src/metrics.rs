//! Prometheus metrics: vLLM's names and meanings under the prefix `tessera:`, plus HTTP
//! requests by route template and status. Every name, label and bucket list is here.
//!
//! Label sets are bounded: model name, finish reason, route template, method, status,
//! error type, adapter name (adapters are loaded by the operator); never a request id.
//!
//! `tessera:lora_requests_info` follows vLLM's `vllm:lora_requests_info`, which the Gateway
//! API Inference Extension reads for LoRA affinity: one gauge series whose labels carry
//! `max_lora` and the comma-joined, sorted names of the adapters of running and of waiting
//! requests, and whose value is the unix time (seconds) of the last change. tessera keeps
//! a single current series: when the adapters change (seen at scrape time), the old label
//! set is removed.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use engine::{FinishInfo, FinishReason, StepObserver, StepStats};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    Opts, Registry, TextEncoder,
};

use crate::backend::EngineLoad;

pub const NUM_REQUESTS_RUNNING: &str = "tessera:num_requests_running";
pub const NUM_REQUESTS_WAITING: &str = "tessera:num_requests_waiting";
pub const KV_CACHE_USAGE_PERC: &str = "tessera:kv_cache_usage_perc";
pub const PROMPT_TOKENS_TOTAL: &str = "tessera:prompt_tokens_total";
pub const GENERATION_TOKENS_TOTAL: &str = "tessera:generation_tokens_total";
pub const REQUEST_SUCCESS_TOTAL: &str = "tessera:request_success_total";
pub const NUM_PREEMPTIONS_TOTAL: &str = "tessera:num_preemptions_total";
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "tessera:time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY_SECONDS: &str = "tessera:inter_token_latency_seconds";
pub const E2E_REQUEST_LATENCY_SECONDS: &str = "tessera:e2e_request_latency_seconds";
pub const REQUEST_QUEUE_TIME_SECONDS: &str = "tessera:request_queue_time_seconds";
pub const ITERATION_TOKENS_TOTAL: &str = "tessera:iteration_tokens_total";
pub const HTTP_REQUESTS_TOTAL: &str = "tessera:http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "tessera:http_request_duration_seconds";
pub const HTTP_REQUEST_ERRORS_TOTAL: &str = "tessera:http_request_errors_total";
pub const LORA_REQUESTS_INFO: &str = "tessera:lora_requests_info";
pub const LORA_REQUESTS_TOTAL: &str = "tessera:lora_requests_total";
pub const LORA_PROMPT_TOKENS_TOTAL: &str = "tessera:lora_prompt_tokens_total";
pub const LORA_GENERATION_TOKENS_TOTAL: &str = "tessera:lora_generation_tokens_total";

pub const LABEL_MODEL_NAME: &str = "model_name";
pub const LABEL_FINISHED_REASON: &str = "finished_reason";
pub const LABEL_LORA_NAME: &str = "lora_name";
pub const LABEL_MAX_LORA: &str = "max_lora";
pub const LABEL_RUNNING_LORA_ADAPTERS: &str = "running_lora_adapters";
pub const LABEL_WAITING_LORA_ADAPTERS: &str = "waiting_lora_adapters";

/// vLLM's buckets.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
pub const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
pub const ITERATION_TOKENS_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];
pub const HTTP_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

const FINISH_REASONS: [FinishReason; 4] = [
    FinishReason::Stop,
    FinishReason::Length,
    FinishReason::Abort,
    FinishReason::Error,
];

/// All metric families, registered in one registry.
pub struct Metrics {
    registry: Registry,
    running: GaugeVec,
    waiting: GaugeVec,
    kv_usage: GaugeVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    success: IntCounterVec,
    preemptions: IntCounterVec,
    ttft: HistogramVec,
    itl: HistogramVec,
    e2e: HistogramVec,
    queue: HistogramVec,
    iteration_tokens: HistogramVec,
    http: HttpFamilies,
    lora: LoraFamilies,
    /// The per-model children, bound once the served model name is known.
    model: OnceLock<Arc<ModelMetrics>>,
}

/// The LoRA families: the info gauge and the per-adapter counters.
#[derive(Clone)]
struct LoraFamilies {
    info: GaugeVec,
    /// The label values of the one current `lora_requests_info` series.
    info_current: Arc<Mutex<Option<[String; 3]>>>,
    requests: IntCounterVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
}

impl LoraFamilies {
    fn new(r: &Registry) -> prometheus::Result<Self> {
        let info = GaugeVec::new(
            Opts::new(
                LORA_REQUESTS_INFO,
                "Running and waiting LoRA adapters (comma-joined names); the value is the unix time of the last change.",
            ),
            &[
                LABEL_MAX_LORA,
                LABEL_RUNNING_LORA_ADAPTERS,
                LABEL_WAITING_LORA_ADAPTERS,
            ],
        )?;
        r.register(Box::new(info.clone()))?;
        let per_adapter = [LABEL_MODEL_NAME, LABEL_LORA_NAME];
        Ok(LoraFamilies {
            info,
            info_current: Arc::default(),
            requests: counter(
                r,
                LORA_REQUESTS_TOTAL,
                "Finished requests per LoRA adapter by finish reason.",
                &[LABEL_MODEL_NAME, LABEL_LORA_NAME, LABEL_FINISHED_REASON],
            )?,
            prompt_tokens: counter(
                r,
                LORA_PROMPT_TOKENS_TOTAL,
                "Prompt tokens of requests per LoRA adapter.",
                &per_adapter,
            )?,
            generation_tokens: counter(
                r,
                LORA_GENERATION_TOKENS_TOTAL,
                "Generated tokens per LoRA adapter.",
                &per_adapter,
            )?,
        })
    }

    /// Keeps one series: a change of label values removes the old series and stamps the
    /// new one with the current time.
    fn set_info(&self, max_lora: usize, running: &[String], waiting: &[String]) {
        let labels = [max_lora.to_string(), running.join(","), waiting.join(",")];
        let Ok(mut current) = self.info_current.lock() else {
            return;
        };
        if current.as_ref() == Some(&labels) {
            return;
        }
        if let Some(old) = current.take() {
            let old: Vec<&str> = old.iter().map(String::as_str).collect();
            let _ = self.info.remove_label_values(&old);
        }
        let new: Vec<&str> = labels.iter().map(String::as_str).collect();
        self.info.with_label_values(&new).set(unix_time_f64());
        *current = Some(labels);
    }
}

fn unix_time_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// HTTP requests by route template (bounded: unmatched paths share one label).
struct HttpFamilies {
    requests: IntCounterVec,
    duration: HistogramVec,
    errors: IntCounterVec,
}

impl HttpFamilies {
    fn new(r: &Registry) -> prometheus::Result<Self> {
        Ok(HttpFamilies {
            requests: counter(
                r,
                HTTP_REQUESTS_TOTAL,
                "HTTP requests by route template, method and status.",
                &["route", "method", "status"],
            )?,
            duration: histogram(
                r,
                HTTP_REQUEST_DURATION_SECONDS,
                "HTTP request duration (until the response head) in seconds.",
                &["route", "method"],
                HTTP_DURATION_BUCKETS,
            )?,
            errors: counter(
                r,
                HTTP_REQUEST_ERRORS_TOTAL,
                "HTTP error responses by route template and error type.",
                &["route", "error_type"],
            )?,
        })
    }
}

/// The children of the model metrics for the one served model.
pub struct ModelMetrics {
    pub model_name: String,
    /// `--max-loras`, the `max_lora` label of `tessera:lora_requests_info`.
    pub max_lora: usize,
    lora: LoraFamilies,
    running: Gauge,
    waiting: Gauge,
    kv_usage: Gauge,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    success: Vec<(FinishReason, IntCounter)>,
    preemptions: IntCounter,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
    iteration_tokens: Histogram,
}

fn gauge(reg: &Registry, name: &str, help: &str) -> prometheus::Result<GaugeVec> {
    let g = GaugeVec::new(Opts::new(name, help), &[LABEL_MODEL_NAME])?;
    reg.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )?;
    reg.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Arc<Self>> {
        let r = Registry::new();
        let m = [LABEL_MODEL_NAME];
        let lat = REQUEST_LATENCY_BUCKETS;
        Ok(Arc::new(Metrics {
            running: gauge(
                &r,
                NUM_REQUESTS_RUNNING,
                "Number of requests in model execution batches.",
            )?,
            waiting: gauge(
                &r,
                NUM_REQUESTS_WAITING,
                "Number of requests waiting to be processed.",
            )?,
            kv_usage: gauge(
                &r,
                KV_CACHE_USAGE_PERC,
                "KV-cache usage. 1 means 100 percent usage.",
            )?,
            prompt_tokens: counter(
                &r,
                PROMPT_TOKENS_TOTAL,
                "Number of prefill tokens processed.",
                &m,
            )?,
            generation_tokens: counter(
                &r,
                GENERATION_TOKENS_TOTAL,
                "Number of generation tokens processed.",
                &m,
            )?,
            success: counter(
                &r,
                REQUEST_SUCCESS_TOTAL,
                "Count of finished requests by finish reason.",
                &[LABEL_MODEL_NAME, LABEL_FINISHED_REASON],
            )?,
            preemptions: counter(
                &r,
                NUM_PREEMPTIONS_TOTAL,
                "Cumulative number of preemptions.",
                &m,
            )?,
            ttft: histogram(
                &r,
                TIME_TO_FIRST_TOKEN_SECONDS,
                "Time to first token in seconds.",
                &m,
                TTFT_BUCKETS,
            )?,
            itl: histogram(
                &r,
                INTER_TOKEN_LATENCY_SECONDS,
                "Inter-token latency in seconds.",
                &m,
                ITL_BUCKETS,
            )?,
            e2e: histogram(
                &r,
                E2E_REQUEST_LATENCY_SECONDS,
                "End-to-end request latency in seconds.",
                &m,
                lat,
            )?,
            queue: histogram(
                &r,
                REQUEST_QUEUE_TIME_SECONDS,
                "Time spent waiting in the queue in seconds.",
                &m,
                lat,
            )?,
            iteration_tokens: histogram(
                &r,
                ITERATION_TOKENS_TOTAL,
                "Number of tokens per engine step.",
                &m,
                ITERATION_TOKENS_BUCKETS,
            )?,
            http: HttpFamilies::new(&r)?,
            lora: LoraFamilies::new(&r)?,
            registry: r,
            model: OnceLock::new(),
        }))
    }

    /// Creates the per-model children (so they appear at 0) and the LoRA info series;
    /// later calls keep the first name.
    pub fn bind_model(&self, model_name: &str, max_lora: usize) -> Arc<ModelMetrics> {
        self.model
            .get_or_init(|| {
                self.lora.set_info(max_lora, &[], &[]);
                Arc::new(self.children(model_name, max_lora))
            })
            .clone()
    }

    fn children(&self, name: &str, max_lora: usize) -> ModelMetrics {
        let l = [name];
        ModelMetrics {
            model_name: name.to_string(),
            max_lora,
            lora: self.lora.clone(),
            running: self.running.with_label_values(&l),
            waiting: self.waiting.with_label_values(&l),
            kv_usage: self.kv_usage.with_label_values(&l),
            prompt_tokens: self.prompt_tokens.with_label_values(&l),
            generation_tokens: self.generation_tokens.with_label_values(&l),
            success: FINISH_REASONS
                .iter()
                .map(|&r| (r, self.success.with_label_values(&[name, r.as_str()])))
                .collect(),
            preemptions: self.preemptions.with_label_values(&l),
            ttft: self.ttft.with_label_values(&l),
            itl: self.itl.with_label_values(&l),
            e2e: self.e2e.with_label_values(&l),
            queue: self.queue.with_label_values(&l),
            iteration_tokens: self.iteration_tokens.with_label_values(&l),
        }
    }

    pub fn model(&self) -> Option<&Arc<ModelMetrics>> {
        self.model.get()
    }

    /// The step observer to hand to the engine; it records once the model is bound.
    pub fn observer(self: &Arc<Self>) -> Arc<dyn StepObserver> {
        Arc::new(MetricsObserver(self.clone()))
    }

    pub fn record_http(
        &self,
        route: &str,
        method: &str,
        status: u16,
        elapsed: Duration,
        error_type: Option<&str>,
    ) {
        let status = status.to_string();
        self.http
            .requests
            .with_label_values(&[route, method, status.as_str()])
            .inc();
        self.http
            .duration
            .with_label_values(&[route, method])
            .observe(elapsed.as_secs_f64());
        if let Some(t) = error_type {
            self.http.errors.with_label_values(&[route, t]).inc();
        }
    }

    /// The text exposition, with the engine gauges read now.
    pub fn render(&self, load: Option<EngineLoad>) -> Result<String, prometheus::Error> {
        if let (Some(m), Some(load)) = (self.model.get(), load) {
            m.running.set(load.running as f64);
            m.waiting.set(load.waiting as f64);
            m.kv_usage.set(load.kv_cache_usage.clamp(0.0, 1.0));
            self.lora
                .set_info(m.max_lora, &load.lora.running, &load.lora.waiting);
        }
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// The counters of one adapter (children of the per-adapter families).
pub struct LoraMetrics {
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    requests: Vec<(FinishReason, IntCounter)>,
}

impl LoraMetrics {
    pub fn on_submitted(&self, prompt_tokens: usize) {
        self.prompt_tokens.inc_by(prompt_tokens as u64);
    }

    pub fn on_tokens(&self, n: usize) {
        self.generation_tokens.inc_by(n as u64);
    }

    pub fn on_finished(&self, f: &FinishInfo) {
        if let Some((_, c)) = self.requests.iter().find(|(r, _)| *r == f.reason) {
            c.inc();
        }
    }

    /// A request dropped by its client before it finished.
    pub fn on_aborted(&self) {
        if let Some((_, c)) = self.requests.iter().find(|(r, _)| *r == FinishReason::Abort) {
            c.inc();
        }
    }
}

impl ModelMetrics {
    /// The counters of adapter `lora_name` (created at 0 on first use; they outlive an
    /// unload, as counters should).
    pub fn lora(&self, lora_name: &str) -> LoraMetrics {
        let l = [self.model_name.as_str(), lora_name];
        LoraMetrics {
            prompt_tokens: self.lora.prompt_tokens.with_label_values(&l),
            generation_tokens: self.lora.generation_tokens.with_label_values(&l),
            requests: FINISH_REASONS
                .iter()
                .map(|&r| {
                    let labels = [self.model_name.as_str(), lora_name, r.as_str()];
                    (r, self.lora.requests.with_label_values(&labels))
                })
                .collect(),
        }
    }

    pub fn on_submitted(&self, prompt_tokens: usize) {
        self.prompt_tokens.inc_by(prompt_tokens as u64);
    }

    /// `gap`: time since the previous token of the same request (None for the first).
    pub fn on_tokens(&self, n: usize, gap: Option<Duration>) {
        self.generation_tokens.inc_by(n as u64);
        if let (Some(gap), true) = (gap, n > 0) {
            let per_token = gap.as_secs_f64() / n as f64;
            for _ in 0..n {
                self.itl.observe(per_token);
            }
        }
    }

    /// A request dropped by its client before it finished: `finished_reason="abort"`.
    pub fn on_aborted(&self) {
        if let Some((_, c)) = self.success.iter().find(|(r, _)| *r == FinishReason::Abort) {
            c.inc();
        }
    }

    pub fn on_finished(&self, f: &FinishInfo) {
        if let Some((_, c)) = self.success.iter().find(|(r, _)| *r == f.reason) {
            c.inc();
        }
        if let Some(t) = f.first_token {
            self.ttft
                .observe(t.saturating_duration_since(f.arrived).as_secs_f64());
        }
        if let Some(t) = f.first_scheduled {
            self.queue
                .observe(t.saturating_duration_since(f.arrived).as_secs_f64());
        }
        self.e2e.observe(
            f.finished
                .saturating_duration_since(f.arrived)
                .as_secs_f64(),
        );
    }
}

struct MetricsObserver(Arc<Metrics>);

impl StepObserver for MetricsObserver {
    fn on_step(&self, s: &StepStats) {
        if let Some(m) = self.0.model.get() {
            if s.num_tokens > 0 {
                m.iteration_tokens.observe(s.num_tokens as f64);
            }
            m.preemptions.inc_by(s.num_preempted as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_model_metric_once_bound() {
        let m = Metrics::new().unwrap();
        m.bind_model("smol", 8);
        m.observer().on_step(&StepStats {
            num_tokens: 7,
            num_preempted: 2,
            ..Default::default()
        });
        let text = m
            .render(Some(EngineLoad {
                running: 3,
                waiting: 1,
                kv_cache_usage: 0.25,
                ..Default::default()
            }))
            .unwrap();
        for name in [
            NUM_REQUESTS_RUNNING,
            NUM_REQUESTS_WAITING,
            KV_CACHE_USAGE_PERC,
            PROMPT_TOKENS_TOTAL,
            GENERATION_TOKENS_TOTAL,
            REQUEST_SUCCESS_TOTAL,
            NUM_PREEMPTIONS_TOTAL,
            TIME_TO_FIRST_TOKEN_SECONDS,
            INTER_TOKEN_LATENCY_SECONDS,
            E2E_REQUEST_LATENCY_SECONDS,
            REQUEST_QUEUE_TIME_SECONDS,
            ITERATION_TOKENS_TOTAL,
            LORA_REQUESTS_INFO,
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing in\n{text}"
            );
        }
        assert!(
            text.contains(r#"tessera:num_requests_running{model_name="smol"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tessera:kv_cache_usage_perc{model_name="smol"} 0.25"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tessera:num_preemptions_total{model_name="smol"} 2"#),
            "{text}"
        );
        assert!(text.contains(
            r#"tessera:request_success_total{finished_reason="abort",model_name="smol"} 0"#
        ));
    }

    fn info_series(m: &Metrics) -> Vec<String> {
        m.render(None)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with(LORA_REQUESTS_INFO))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn lora_info_keeps_one_series_stamped_with_the_last_change() {
        let m = Metrics::new().unwrap();
        let model = m.bind_model("smol", 4);
        let series = info_series(&m);
        assert_eq!(series.len(), 1, "{series:?}");
        assert!(series[0].starts_with(
            r#"tessera:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} "#
        ));
        let activity = |running: &[&str], waiting: &[&str]| EngineLoad {
            lora: engine::handle::LoraActivity {
                running: running.iter().map(|s| s.to_string()).collect(),
                waiting: waiting.iter().map(|s| s.to_string()).collect(),
            },
            ..Default::default()
        };
        m.render(Some(activity(&["a", "b"], &["c"]))).unwrap();
        let series = info_series(&m);
        assert_eq!(series.len(), 1, "{series:?}");
        let (labels, value) = series[0].rsplit_once(' ').unwrap();
        assert_eq!(
            labels,
            r#"tessera:lora_requests_info{max_lora="4",running_lora_adapters="a,b",waiting_lora_adapters="c"}"#
        );
        let stamp: f64 = value.parse().unwrap();
        assert!((stamp - unix_time_f64()).abs() < 60.0, "{stamp}");
        m.render(Some(activity(&["a", "b"], &["c"]))).unwrap();
        assert_eq!(info_series(&m), series, "no change, same stamp");
        let lora = model.lora("a");
        lora.on_submitted(5);
        lora.on_tokens(2);
        let text = m.render(None).unwrap();
        assert!(
            text.contains(r#"tessera:lora_prompt_tokens_total{lora_name="a",model_name="smol"} 5"#)
        );
        assert!(text.contains(
            r#"tessera:lora_generation_tokens_total{lora_name="a",model_name="smol"} 2"#
        ));
    }
}
