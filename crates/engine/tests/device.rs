//! `--device`: asking for CUDA where this build or machine cannot give it fails at start
//! with the reason; `auto` falls back to the CPU and serves.

mod common;

use common::*;
use engine::{Device, Engine, EngineConfig, SamplingParams};

#[test]
fn device_cuda_without_a_backend_fails_at_start_and_auto_runs_on_the_cpu() {
    let cuda = Engine::start(EngineConfig { model: model_path(), device: Device::Cuda, ..default_cfg() });
    #[cfg(not(feature = "cuda"))]
    {
        let msg = cuda.err().expect("a build without CUDA cannot start on CUDA").to_string();
        assert!(msg.contains("no CUDA backend") && msg.contains("--features cuda"), "{msg}");
    }
    // A CUDA build fails the same way where no driver is installed (a GPU machine starts).
    #[cfg(feature = "cuda")]
    if !engine::cuda::driver_available() {
        let msg = cuda.err().expect("no driver: no CUDA").to_string();
        assert!(msg.contains("no CUDA driver"), "{msg}");
    }
    let h = start(EngineConfig { device: Device::Auto, ..default_cfg() });
    let done = run(&h, vec![1, 2, 3], SamplingParams { ignore_eos: true, ..SamplingParams::greedy(4) });
    assert_eq!(done.ids.len(), 4);
    assert!("cpu".parse::<Device>().is_ok() && "CUDA".parse::<Device>() == Ok(Device::Cuda));
    assert!("gpu".parse::<Device>().unwrap_err().contains("expected cpu, cuda or auto"));
}
