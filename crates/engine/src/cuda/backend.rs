//! The device side: a CUDA context with every kernel of `kernels/` loaded, and one
//! launcher per op. Buffers are cudarc `CudaSlice`s on the backend's stream; every op is
//! asynchronous on that stream, so a step's launches queue without host round trips.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute_enum as FnAttr;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};

use super::gemm::Gemm;
use super::kernels::{Arch, KernelCache, SOURCES};
use super::plan::{AttnPlan, MAX_HEAD_DIM, PARTITION};
use crate::cpu::attention::{AttnParams, SeqAttn};
use crate::cpu::ops::Rope;
use crate::error::{EngineError, Result};

fn dev(e: impl std::fmt::Display) -> EngineError {
    EngineError::Device(e.to_string())
}

/// Whether a CUDA driver library (libcuda.so) can be loaded on this machine.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// RMSNorm's shape and constants.
#[derive(Debug, Clone, Copy)]
pub struct Norm {
    pub dim: usize,
    pub eps: f32,
    /// 0 for Llama, 1 for Gemma (`w + offset`).
    pub offset: f32,
}

/// The CPU path's rotary tables, on the device.
pub struct DeviceRope {
    pub cos: CudaSlice<f32>,
    pub sin: CudaSlice<f32>,
    pub half: usize,
    pub interleaved: bool,
}

/// The LoRA adapters of a step: row segments and, per slot and site (`layer * 7 +
/// module`), the device address of each adapter's `A` (`[rank, in]`) and `Bᵀ`
/// (`[rank, out]`), its rank (0 where it leaves the site alone) and scale.
pub struct LoraBatch {
    pub seg_start: CudaSlice<i32>,
    pub seg_len: CudaSlice<i32>,
    pub seg_slot: CudaSlice<i32>,
    /// `[slots * sites]` each.
    pub a_ptrs: CudaSlice<u64>,
    pub bt_ptrs: CudaSlice<u64>,
    pub ranks: CudaSlice<i32>,
    pub scales: CudaSlice<f32>,
    pub sites: usize,
    pub num_segments: usize,
    pub max_rank: usize,
}

/// Where one LoRA application happens: its site index and the layer's shape.
#[derive(Debug, Clone, Copy)]
pub struct LoraSite {
    pub site: usize,
    pub in_dim: usize,
    pub out_dim: usize,
}

/// An attention plan uploaded for one launch.
pub struct DeviceAttnPlan {
    pub plan: AttnPlan,
    tiles: CudaSlice<i32>,
    query_start: CudaSlice<i32>,
    query_len: CudaSlice<i32>,
    context_len: CudaSlice<i32>,
    block_tables: CudaSlice<i32>,
}

/// An open device with its kernels loaded.
pub struct CudaBackend {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub arch: Arch,
    pub name: String,
    /// Streaming multiprocessors, for the attention split.
    pub sms: usize,
    /// cuBLASLt for every GEMM kind.
    pub gemm: Gemm,
    funcs: HashMap<&'static str, CudaFunction>,
}

impl CudaBackend {
    /// Opens device `ordinal` and compiles (or takes from `cache`) every kernel for it.
    /// Without a driver, a device or NVRTC this is an error that says which is missing.
    pub fn open(ordinal: usize, cache: &KernelCache) -> Result<CudaBackend> {
        if !driver_available() {
            return Err(EngineError::Device(
                "no CUDA driver on this machine (libcuda.so could not be loaded)".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| dev(format!("cannot open device {ordinal}: {e}")))?;
        let (major, minor) = ctx.compute_capability().map_err(dev)?;
        if major < 8 {
            return Err(EngineError::Device(format!(
                "device {ordinal} is sm_{major}{minor}; tessera's CUDA kernels need Ampere (sm_80) or newer"
            )));
        }
        let arch = Arch { major: major as u32, minor: minor as u32 };
        let name = ctx.name().map_err(dev)?;
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(dev)? as usize;
        let nvrtc = super::kernels::nvrtc_version()?;
        let mut funcs = HashMap::new();
        for src in SOURCES {
            let ptx = cache.get(src, arch)?;
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(|e| {
                if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
                    dev(format!(
                        "the driver cannot load PTX from NVRTC {}.{}: use an NVRTC no newer than the driver's CUDA version",
                        nvrtc.0, nvrtc.1
                    ))
                } else {
                    dev(format!("loading kernels/{}.cu: {e}", src.family))
                }
            })?;
            for &f in src.functions {
                funcs.insert(f, module.load_function(f).map_err(dev)?);
            }
        }
        funcs["paged_attention"]
            .set_attribute(
                FnAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                AttnPlan::shared_bytes(MAX_HEAD_DIM) as i32,
            )
            .map_err(dev)?;
        let stream = ctx.default_stream();
        let gemm = Gemm::new(stream.clone())?;
        tracing::info!(device = %name, %arch, sms, "CUDA device ready");
        Ok(CudaBackend { ctx, stream, arch, name, sms, gemm, funcs })
    }

    fn f(&self, name: &str) -> &CudaFunction {
        &self.funcs[name]
    }

    pub fn upload<T: DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(v).map_err(dev)
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(n).map_err(dev)
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, s: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(s).map_err(dev)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(dev)
    }

    /// The raw device address of a buffer (for pointer tables such as LoRA's slots).
    pub fn address<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    fn rows(n: usize, dim: usize, threads: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (threads.min(dim.next_multiple_of(32) as u32).max(32), 1, 1), shared_mem_bytes: 0 }
    }

    fn elems(n: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    /// `out[t] = rms_norm(x[t]) * (w + offset)` for every row.
    pub fn rms_norm(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, out: &mut CudaSlice<f32>, n: Norm) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let (dim, rows) = (n.dim as i32, x.len() / n.dim);
        let mut b = self.stream.launch_builder(self.f("rms_norm"));
        b.arg(x).arg(w).arg(out).arg(&dim).arg(&n.eps).arg(&n.offset);
        // SAFETY: the argument list matches the kernel's signature; sizes from the slices.
        unsafe { b.launch(Self::rows(rows, n.dim, 256)) }.map_err(dev)?;
        Ok(())
    }

    /// `residual += x; out = rms_norm(residual)`.
    pub fn add_rms_norm(
        &self,
        residual: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        n: Norm,
    ) -> Result<()> {
        if residual.is_empty() {
            return Ok(());
        }
        let (dim, rows) = (n.dim as i32, residual.len() / n.dim);
        let mut b = self.stream.launch_builder(self.f("add_rms_norm"));
        b.arg(residual).arg(x).arg(w).arg(out).arg(&dim).arg(&n.eps).arg(&n.offset);
        // SAFETY: as above.
        unsafe { b.launch(Self::rows(rows, n.dim, 256)) }.map_err(dev)?;
        Ok(())
    }

    pub fn upload_rope(&self, r: &Rope) -> Result<DeviceRope> {
        Ok(DeviceRope { cos: self.upload(&r.cos)?, sin: self.upload(&r.sin)?, half: r.half, interleaved: r.interleaved })
    }

    /// Rotates every head of `x` (`[tokens, heads * head_dim]`) in place.
    pub fn rope(&self, x: &mut CudaSlice<f32>, positions: &CudaSlice<i32>, r: &DeviceRope, head_dim: usize) -> Result<()> {
        if positions.is_empty() {
            return Ok(());
        }
        let tokens = positions.len();
        let heads = (x.len() / tokens / head_dim) as i32;
        let (hd, half, il) = (head_dim as i32, r.half as i32, r.interleaved as i32);
        let mut b = self.stream.launch_builder(self.f("rope"));
        b.arg(x).arg(positions).arg(&r.cos).arg(&r.sin).arg(&heads).arg(&hd).arg(&half).arg(&il);
        // SAFETY: as above; positions are below the table's length (checked by the scheduler).
        unsafe { b.launch(Self::rows(tokens, heads as usize * r.half, 256)) }.map_err(dev)?;
        Ok(())
    }

    fn gated(&self, name: &str, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>) -> Result<()> {
        if gate.is_empty() {
            return Ok(());
        }
        let n = gate.len() as i64;
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(gate).arg(up).arg(&n);
        // SAFETY: as above.
        unsafe { b.launch(Self::elems(n as usize)) }.map_err(dev)?;
        Ok(())
    }

    /// `gate = silu(gate) * up` (SwiGLU).
    pub fn silu_mul(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>) -> Result<()> {
        self.gated("silu_mul", gate, up)
    }

    /// `gate = gelu_tanh(gate) * up` (GeGLU).
    pub fn gelu_tanh_mul(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>) -> Result<()> {
        self.gated("gelu_tanh_mul", gate, up)
    }

    /// `x = cap * tanh(x / cap)`.
    pub fn softcap(&self, x: &mut CudaSlice<f32>, cap: f32) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let n = x.len() as i64;
        let mut b = self.stream.launch_builder(self.f("softcap"));
        b.arg(x).arg(&cap).arg(&n);
        // SAFETY: as above.
        unsafe { b.launch(Self::elems(n as usize)) }.map_err(dev)?;
        Ok(())
    }

    /// `out[t] = table[ids[t]] * scale`.
    pub fn embedding(&self, table: &CudaSlice<f32>, ids: &CudaSlice<i32>, out: &mut CudaSlice<f32>, scale: f32) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let dim = out.len() / ids.len();
        let d = dim as i32;
        let mut b = self.stream.launch_builder(self.f("embedding"));
        b.arg(table).arg(ids).arg(out).arg(&d).arg(&scale);
        // SAFETY: as above; ids were checked against the vocabulary on the host.
        unsafe { b.launch(Self::rows(ids.len(), dim, 256)) }.map_err(dev)?;
        Ok(())
    }

    /// Writes the step's K/V rows into their cache slots (`slot < 0` skips a row).
    pub fn reshape_and_cache(
        &self,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        cache: (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        slots: &CudaSlice<i32>,
    ) -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        let kv_dim = k.len() / slots.len();
        let d = kv_dim as i32;
        let mut b = self.stream.launch_builder(self.f("reshape_and_cache"));
        b.arg(k).arg(v).arg(cache.0).arg(cache.1).arg(slots).arg(&d);
        // SAFETY: as above; slots lie inside the cache (the block pool hands them out).
        unsafe { b.launch(Self::rows(slots.len(), kv_dim, 256)) }.map_err(dev)?;
        Ok(())
    }

    /// Per-token symmetric INT8 of `x[rows, k]`: codes and `amax / 127` per row.
    pub fn quantize_int8_rows(&self, x: &CudaSlice<f32>, q: &mut CudaSlice<i8>, scale: &mut CudaSlice<f32>) -> Result<()> {
        self.quantize_rows("quantize_int8_rows", x, q, scale)
    }

    /// Per-token E4M3 of `x[rows, k]`: codes and `amax / 448` per row.
    pub fn quantize_fp8_rows(&self, x: &CudaSlice<f32>, q: &mut CudaSlice<u8>, scale: &mut CudaSlice<f32>) -> Result<()> {
        self.quantize_rows("quantize_fp8_rows", x, q, scale)
    }

    fn quantize_rows<T: DeviceRepr>(&self, name: &str, x: &CudaSlice<f32>, q: &mut CudaSlice<T>, scale: &mut CudaSlice<f32>) -> Result<()> {
        if scale.is_empty() {
            return Ok(());
        }
        let rows = scale.len();
        let k = x.len() / rows;
        let ki = k as i32;
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(x).arg(q).arg(scale).arg(&ki);
        // SAFETY: as above.
        unsafe { b.launch(Self::rows(rows, k, 256)) }.map_err(dev)?;
        Ok(())
    }

    /// `y[r, c] = acc[r, c] * sx[r] * sw[c]` after an INT8 GEMM.
    pub fn dequant_i32(&self, acc: &CudaSlice<i32>, sx: &CudaSlice<f32>, sw: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
        if sx.is_empty() {
            return Ok(());
        }
        let n = sw.len() as i32;
        let mut b = self.stream.launch_builder(self.f("dequant_i32"));
        b.arg(acc).arg(sx).arg(sw).arg(y).arg(&n);
        // SAFETY: as above.
        unsafe { b.launch(Self::rows(sx.len(), sw.len(), 256)) }.map_err(dev)?;
        Ok(())
    }

    /// `y[r, c] *= sx[r] * sw[c]` after an FP8 GEMM.
    pub fn scale_rows_cols(&self, y: &mut CudaSlice<f32>, sx: &CudaSlice<f32>, sw: &CudaSlice<f32>) -> Result<()> {
        if sx.is_empty() {
            return Ok(());
        }
        let n = sw.len() as i32;
        let mut b = self.stream.launch_builder(self.f("scale_rows_cols"));
        b.arg(y).arg(sx).arg(sw).arg(&n);
        // SAFETY: as above.
        unsafe { b.launch(Self::rows(sx.len(), sw.len(), 256)) }.map_err(dev)?;
        Ok(())
    }

    /// bf16 bits of `x` (round to nearest even): activations for the bf16 GEMM.
    pub fn f32_to_bf16(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<u16>) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let n = x.len() as i64;
        let mut b = self.stream.launch_builder(self.f("f32_to_bf16"));
        b.arg(x).arg(y).arg(&n);
        // SAFETY: as above.
        unsafe { b.launch(Self::elems(n as usize)) }.map_err(dev)?;
        Ok(())
    }

    /// `y[r, c] += bias[c]`.
    pub fn add_bias(&self, y: &mut CudaSlice<f32>, bias: &CudaSlice<f32>) -> Result<()> {
        if y.is_empty() {
            return Ok(());
        }
        let n = bias.len() as i32;
        let rows = y.len() / bias.len();
        let mut b = self.stream.launch_builder(self.f("add_bias"));
        b.arg(y).arg(bias).arg(&n);
        // SAFETY: as above.
        unsafe { b.launch(Self::rows(rows, bias.len(), 256)) }.map_err(dev)?;
        Ok(())
    }

    /// Adds every segment's adapter delta at `at`: `y[rows] += scale (x A^T) B^T`. `t` is
    /// scratch of at least `[tokens, max_rank]`.
    pub fn lora(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, t: &mut CudaSlice<f32>, l: &LoraBatch, at: LoraSite) -> Result<()> {
        if l.num_segments == 0 || l.max_rank == 0 {
            return Ok(());
        }
        let (ind, outd, mr) = (at.in_dim as i32, at.out_dim as i32, l.max_rank as i32);
        let (site, sites) = (at.site as i32, l.sites as i32);
        let mut b = self.stream.launch_builder(self.f("lora_shrink"));
        b.arg(x).arg(&ind).arg(&l.seg_start).arg(&l.seg_len).arg(&l.seg_slot).arg(&l.a_ptrs).arg(&l.ranks);
        b.arg(&l.scales).arg(&site).arg(&sites).arg(&mut *t).arg(&mr);
        let cfg = LaunchConfig { grid_dim: (l.num_segments as u32, l.max_rank as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: as above; the pointer tables hold live buffers of the step's adapters.
        unsafe { b.launch(cfg) }.map_err(dev)?;
        let mut b = self.stream.launch_builder(self.f("lora_expand"));
        b.arg(&*t).arg(&mr).arg(&l.seg_start).arg(&l.seg_len).arg(&l.seg_slot).arg(&l.bt_ptrs).arg(&l.ranks);
        b.arg(&site).arg(&sites).arg(y).arg(&outd);
        let cfg = LaunchConfig {
            grid_dim: (l.num_segments as u32, at.out_dim.div_ceil(256) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above.
        unsafe { b.launch(cfg) }.map_err(dev)?;
        Ok(())
    }

    /// Tiles the batch (see [`AttnPlan`]) and uploads its tables.
    pub fn plan_attention(&self, seqs: &[SeqAttn<'_>], p: &AttnParams<'_>) -> Result<DeviceAttnPlan> {
        if p.head_dim > MAX_HEAD_DIM {
            return Err(EngineError::Device(format!("head_dim {} is above the CUDA kernel's {MAX_HEAD_DIM}", p.head_dim)));
        }
        let plan = AttnPlan::new(seqs, p, self.sms);
        Ok(DeviceAttnPlan {
            tiles: self.upload(&plan.tiles)?,
            query_start: self.upload(&plan.query_start)?,
            query_len: self.upload(&plan.query_len)?,
            context_len: self.upload(&plan.context_len)?,
            block_tables: self.upload(&plan.block_tables)?,
            plan,
        })
    }

    /// Paged attention of every query row of the plan into `out` (`[tokens, heads * D]`).
    /// `alibi`, when the layer has slopes, holds one per query head.
    pub fn paged_attention(
        &self,
        q: &CudaSlice<f32>,
        cache: (&CudaSlice<f32>, &CudaSlice<f32>),
        plan: &DeviceAttnPlan,
        p: &AttnParams<'_>,
        alibi: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let parts = plan.plan.num_partitions;
        // Every row of q, whatever gaps the batch leaves between sequences.
        let num_tokens = q.len() / (p.num_heads * p.head_dim);
        if num_tokens == 0 || plan.plan.num_tiles() == 0 {
            return Ok(());
        }
        let rows = num_tokens * p.num_heads;
        // Partial sums only when the key range is split; with one partition the kernel
        // gets null pointers there and writes `out` itself.
        let part = if parts > 1 {
            Some((self.zeros::<f32>(rows * parts * p.head_dim)?, self.zeros::<f32>(rows * parts * 2)?))
        } else {
            None
        };
        let ints = [plan.plan.max_blocks, p.num_heads, p.num_kv_heads, p.head_dim, p.block_size].map(|v| v as i32);
        let window = p.sliding_window.unwrap_or(0) as i32;
        let softcap = p.softcap.unwrap_or(0.0);
        let (psize, nparts) = (PARTITION as i32, parts as i32);
        let null = 0u64;
        let mut b = self.stream.launch_builder(self.f("paged_attention"));
        b.arg(q).arg(cache.0).arg(cache.1).arg(&plan.tiles).arg(&plan.query_start).arg(&plan.query_len);
        b.arg(&plan.context_len).arg(&plan.block_tables);
        for v in &ints {
            b.arg(v);
        }
        b.arg(&p.scale).arg(&window).arg(&softcap);
        match alibi {
            Some(a) => b.arg(a),
            None => b.arg(&null),
        };
        b.arg(&psize).arg(&nparts).arg(&mut *out);
        match &part {
            Some((o, ml)) => b.arg(o).arg(ml),
            None => b.arg(&null).arg(&null),
        };
        let cfg = LaunchConfig {
            grid_dim: (plan.plan.num_tiles() as u32, p.num_kv_heads as u32, parts as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: AttnPlan::shared_bytes(p.head_dim) as u32,
        };
        // SAFETY: the argument list matches the kernel; the tables index inside q, the
        // cache and out (built from the same batch).
        unsafe { b.launch(cfg) }.map_err(dev)?;
        if let Some((part_o, part_ml)) = &part {
            let (h, d) = (p.num_heads as i32, p.head_dim as i32);
            let mut b = self.stream.launch_builder(self.f("attention_reduce"));
            b.arg(part_o).arg(part_ml).arg(out).arg(&h).arg(&d).arg(&nparts);
            let cfg = LaunchConfig {
                grid_dim: (num_tokens as u32, p.num_heads as u32, 1),
                block_dim: (p.head_dim.next_multiple_of(32).min(1024) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as above.
            unsafe { b.launch(cfg) }.map_err(dev)?;
        }
        Ok(())
    }
}
