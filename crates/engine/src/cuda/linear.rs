//! A linear layer on the device, in the format `--quantize` chose:
//! `y[m, n] = x[m, k] · Wᵀ (+ bias)`, x and y f32.
//!
//! - `F32`: cuBLASLt 32F (what `--quantize none` keeps exact to the CPU path).
//! - `Bf16`: weights bf16; activations rounded to bf16 on the fly; f32 output.
//! - `Int8`: weights symmetric INT8 per output channel (the CPU's `quantize_row`);
//!   activations INT8 per token (`quantize_int8_rows`); int32 sums scaled back by
//!   `dequant_i32`. The CPU path quantizes activations per group of 32 with outliers
//!   apart; this is per token, as cuBLASLt's INT8 GEMM has one scale per row.
//! - `Fp8`: E4M3 weights with per-channel scales (the CPU's `F8Weight`), activations E4M3
//!   per token, `scale_rows_cols` after the GEMM. Needs sm_89+.

use cudarc::driver::CudaSlice;

use super::backend::CudaBackend;
use super::gemm::GemmKind;
use crate::cpu::quant::{quantize_row, F8Weight};
use crate::error::{EngineError, Result};

pub enum DeviceWeight {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
    Int8 { w: CudaSlice<i8>, scale: CudaSlice<f32> },
    Fp8 { w: CudaSlice<u8>, scale: CudaSlice<f32> },
}

pub struct DeviceLinear {
    pub weight: DeviceWeight,
    pub bias: Option<CudaSlice<f32>>,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
}

impl DeviceLinear {
    /// Uploads `w[n, k]` (f32, row-major) converted to `kind`.
    pub fn new(b: &CudaBackend, w: &[f32], (n, k): (usize, usize), bias: Option<&[f32]>, kind: GemmKind) -> Result<Self> {
        assert_eq!(w.len(), n * k);
        if let Some(why) = kind.unsupported(k, (b.arch.major, b.arch.minor)) {
            return Err(EngineError::Device(why));
        }
        let weight = match kind {
            GemmKind::F32 => DeviceWeight::F32(b.upload(w)?),
            GemmKind::Bf16 => {
                let bits: Vec<u16> = w.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
                DeviceWeight::Bf16(b.upload(&bits)?)
            }
            GemmKind::Int8 => {
                let mut q = vec![0i8; n * k];
                let scale: Vec<f32> =
                    w.chunks_exact(k).zip(q.chunks_exact_mut(k)).map(|(row, q)| quantize_row(row, q)).collect();
                DeviceWeight::Int8 { w: b.upload(&q)?, scale: b.upload(&scale)? }
            }
            GemmKind::Fp8 => {
                let f = F8Weight::quantize(w, n, k);
                DeviceWeight::Fp8 { w: b.upload(&f.q)?, scale: b.upload(&f.scale)? }
            }
        };
        let bias = bias.map(|v| b.upload(v)).transpose()?;
        Ok(DeviceLinear { weight, bias, n, k })
    }

    pub fn kind(&self) -> GemmKind {
        match self.weight {
            DeviceWeight::F32(_) => GemmKind::F32,
            DeviceWeight::Bf16(_) => GemmKind::Bf16,
            DeviceWeight::Int8 { .. } => GemmKind::Int8,
            DeviceWeight::Fp8 { .. } => GemmKind::Fp8,
        }
    }

    /// `y[m, n] = x[m, k] · Wᵀ (+ bias)`; `m = x.len() / k`.
    pub fn forward(&self, b: &CudaBackend, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        let m = x.len() / self.k;
        let shape = (m, self.n, self.k);
        // SAFETY (each run): the buffers hold m·k, n·k and m·n elements of the kind's types.
        match &self.weight {
            DeviceWeight::F32(w) => unsafe { b.gemm.run(GemmKind::F32, shape, x, w, y)? },
            DeviceWeight::Bf16(w) => {
                let mut xb = b.zeros::<u16>(x.len())?;
                b.f32_to_bf16(x, &mut xb)?;
                unsafe { b.gemm.run(GemmKind::Bf16, shape, &xb, w, y)? }
            }
            DeviceWeight::Int8 { w, scale } => {
                let mut xq = b.zeros::<i8>(x.len())?;
                let mut sx = b.zeros::<f32>(m)?;
                b.quantize_int8_rows(x, &mut xq, &mut sx)?;
                let mut acc = b.zeros::<i32>(m * self.n)?;
                unsafe { b.gemm.run(GemmKind::Int8, shape, &xq, w, &mut acc)? };
                b.dequant_i32(&acc, &sx, scale, y)?;
            }
            DeviceWeight::Fp8 { w, scale } => {
                let mut xq = b.zeros::<u8>(x.len())?;
                let mut sx = b.zeros::<f32>(m)?;
                b.quantize_fp8_rows(x, &mut xq, &mut sx)?;
                unsafe { b.gemm.run(GemmKind::Fp8, shape, &xq, w, y)? };
                b.scale_rows_cols(y, &sx, scale)?;
            }
        }
        if let Some(bias) = &self.bias {
            b.add_bias(y, bias)?;
        }
        Ok(())
    }
}
