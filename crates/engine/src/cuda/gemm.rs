//! Dense, INT8 and FP8 GEMMs through cuBLASLt: `y[m, n] = x[m, k] · w[n, k]ᵀ`, both
//! operands row-major as the CPU path stores them.
//!
//! In cuBLAS's column-major terms that is `Dᵀ[n, m] = op(A)[n, k] · B[k, m]` with A the
//! weight read transposed and B the activations as they are: the "TN" layout that
//! cuBLASLt requires for INT8 and FP8.
//!
//! | kind | A, B | C, D | compute | needs |
//! |---|---|---|---|---|
//! | F32  | f32  | f32 | 32F | |
//! | Bf16 | bf16 | f32 | 32F | |
//! | Int8 | i8   | i32 | 32I | k % 4 == 0 |
//! | Fp8  | E4M3 | f32 | 32F | sm_89+, k % 16 == 0 |
//!
//! Scales are applied by the epilogue kernels of `kernels/quant.cu` (per token and per
//! output channel), so every kind needs only cuBLASLt's plain alpha = 1, beta = 0.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::error::{EngineError, Result};

fn blas(e: lt::CublasError) -> EngineError {
    EngineError::Device(format!("cuBLASLt: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmKind {
    F32,
    Bf16,
    Int8,
    Fp8,
}

impl GemmKind {
    fn types(self) -> (sys::cudaDataType, sys::cudaDataType, sys::cublasComputeType_t, sys::cudaDataType) {
        use sys::cublasComputeType_t as C;
        use sys::cudaDataType as T;
        match self {
            GemmKind::F32 => (T::CUDA_R_32F, T::CUDA_R_32F, C::CUBLAS_COMPUTE_32F, T::CUDA_R_32F),
            GemmKind::Bf16 => (T::CUDA_R_16BF, T::CUDA_R_32F, C::CUBLAS_COMPUTE_32F, T::CUDA_R_32F),
            GemmKind::Int8 => (T::CUDA_R_8I, T::CUDA_R_32I, C::CUBLAS_COMPUTE_32I, T::CUDA_R_32I),
            GemmKind::Fp8 => (T::CUDA_R_8F_E4M3, T::CUDA_R_32F, C::CUBLAS_COMPUTE_32F, T::CUDA_R_32F),
        }
    }

    /// Why this kind cannot run a GEMM of inner size `k` on `sm_major.minor`, if it cannot.
    pub fn unsupported(self, k: usize, arch: (u32, u32)) -> Option<String> {
        match self {
            GemmKind::Int8 if !k.is_multiple_of(4) => Some(format!("INT8 GEMM needs k % 4 == 0 (k = {k})")),
            GemmKind::Fp8 if arch < (8, 9) => {
                Some(format!("FP8 GEMM needs sm_89 or newer (this device is sm_{}{})", arch.0, arch.1))
            }
            GemmKind::Fp8 if !k.is_multiple_of(16) => Some(format!("FP8 GEMM needs k % 16 == 0 (k = {k})")),
            _ => None,
        }
    }
}

/// A cuBLASLt handle with its workspace, on the backend's stream.
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
}

// SAFETY: the handle is only used through &self on the stream it was made for; cuBLASLt
// handles may be shared across threads.
unsafe impl Send for Gemm {}
unsafe impl Sync for Gemm {}

const WORKSPACE: usize = 32 << 20;

struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

impl Gemm {
    pub fn new(stream: Arc<CudaStream>) -> Result<Gemm> {
        // SAFETY: only checks that libcublasLt can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(EngineError::Device("cuBLASLt (libcublasLt.so.12) was not found".into()));
        }
        let handle = lt::create_handle().map_err(blas)?;
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE).map_err(|e| EngineError::Device(e.to_string()))?;
        Ok(Gemm { handle, workspace, stream })
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ`, element types as `kind` says.
    ///
    /// # Safety
    /// `x`, `w` and `y` must hold at least `m·k`, `n·k` and `m·n` elements of `kind`'s types.
    pub unsafe fn run<X, Y>(
        &self,
        kind: GemmKind,
        (m, n, k): (usize, usize, usize),
        x: &CudaSlice<X>,
        w: &CudaSlice<X>,
        y: &mut CudaSlice<Y>,
    ) -> Result<()> {
        let (ab, cd, compute, scale) = kind.types();
        let (m, n, k) = (m as u64, n as u64, k as u64);
        let a = Layout(lt::create_matrix_layout(ab, k, n, k as i64).map_err(blas)?);
        let b = Layout(lt::create_matrix_layout(ab, k, m, k as i64).map_err(blas)?);
        let c = Layout(lt::create_matrix_layout(cd, n, m, n as i64).map_err(blas)?);
        let desc = Desc(lt::create_matmul_desc(compute, scale).map_err(blas)?);
        let trans: i32 = 1; // CUBLAS_OP_T
        lt::set_matmul_desc_attribute(
            desc.0,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &trans as *const i32 as *const c_void,
            std::mem::size_of::<i32>(),
        )
        .map_err(blas)?;
        let pref = Pref(lt::create_matmul_pref().map_err(blas)?);
        lt::set_matmul_pref_attribute(
            pref.0,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &WORKSPACE as *const usize as *const c_void,
            std::mem::size_of::<usize>(),
        )
        .map_err(blas)?;
        let heur = lt::get_matmul_algo_heuristic(self.handle, desc.0, a.0, b.0, c.0, c.0, pref.0).map_err(|e| {
            EngineError::Device(format!("cuBLASLt has no {kind:?} GEMM for m={m} n={n} k={k}: {e}"))
        })?;
        let (one_f, zero_f, one_i, zero_i) = (1f32, 0f32, 1i32, 0i32);
        let (alpha, beta): (*const c_void, *const c_void) = if kind == GemmKind::Int8 {
            (&one_i as *const i32 as _, &zero_i as *const i32 as _)
        } else {
            (&one_f as *const f32 as _, &zero_f as *const f32 as _)
        };
        let (wp, _gw) = w.device_ptr(&self.stream);
        let (xp, _gx) = x.device_ptr(&self.stream);
        let (yp, _gy) = y.device_ptr_mut(&self.stream);
        let (ws, _gws) = self.workspace.device_ptr(&self.stream);
        lt::matmul(
            self.handle,
            desc.0,
            alpha,
            beta,
            wp as *const c_void,
            a.0,
            xp as *const c_void,
            b.0,
            yp as *const c_void,
            c.0,
            yp as *mut c_void,
            c.0,
            &heur.algo,
            ws as *mut c_void,
            WORKSPACE,
            self.stream.cu_stream() as _,
        )
        .map_err(blas)
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        // SAFETY: the handle was created in new and is destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}
