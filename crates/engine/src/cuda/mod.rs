//! tessera's CUDA backend (feature `cuda`): cudarc with dynamic loading, so the binary
//! builds without a CUDA toolkit and starts, with a clear error instead of a panic, on a
//! machine without a driver. Kernels are `kernels/*.cu`, one file per op family, compiled
//! by NVRTC at start-up for the device's architecture ([`kernels`]); [`backend`] launches
//! them; [`plan`] is the host side of paged attention.
//!
//! Every op here has a CPU counterpart (`cpu::ops`, `cpu::attention`, `cpu::quant`,
//! `lora::apply`) and is checked against it on a device by `tests/cuda.rs`.

pub mod backend;
pub mod gemm;
pub mod kernels;
pub mod linear;
pub mod model;
pub mod plan;

pub use backend::{driver_available, CudaBackend};
