//! The CUDA C sources of `kernels/`, compiled by NVRTC for the device's architecture and
//! cached on disk by source hash, architecture and NVRTC version.
//!
//! NVRTC gets no include paths: `kernels/common.cuh` (warp and block reductions) is
//! prepended to each family's source, so no CUDA header has to be present.

use std::path::{Path, PathBuf};

use crate::error::{EngineError, Result};

/// One op family: a `kernels/*.cu` file and the `extern "C"` kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    pub family: &'static str,
    pub source: &'static str,
    pub functions: &'static [&'static str],
}

const COMMON: &str = include_str!("../../../../kernels/common.cuh");

macro_rules! family {
    ($name:literal, [$($f:literal),+ $(,)?]) => {
        KernelSource {
            family: $name,
            source: include_str!(concat!("../../../../kernels/", $name, ".cu")),
            functions: &[$($f),+],
        }
    };
}

/// Every kernel tessera launches, by family.
pub const SOURCES: &[KernelSource] = &[
    family!("attention", ["paged_attention", "attention_reduce"]),
    family!("cache", ["reshape_and_cache"]),
    family!("norm", ["rms_norm", "add_rms_norm"]),
    family!("rope", ["rope"]),
    family!("activation", ["silu_mul", "gelu_tanh_mul", "softcap"]),
    family!("embedding", ["embedding"]),
    family!("quant", ["quantize_int8_rows", "quantize_fp8_rows", "dequant_i32", "scale_rows_cols", "f32_to_bf16", "add_bias"]),
    family!("lora", ["lora_shrink", "lora_expand"]),
];

impl KernelSource {
    /// The text NVRTC compiles: the shared helpers, then the family's file.
    pub fn full_source(&self) -> String {
        format!("{COMMON}\n#line 1 \"{}.cu\"\n{}", self.family, self.source)
    }
}

/// A compute capability, e.g. `(9, 0)` for Hopper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// Whether libnvrtc can be loaded (from `LD_LIBRARY_PATH` or the system's library paths).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        return Err(EngineError::Device(
            "NVRTC (libnvrtc.so.12) was not found; install the nvidia-cuda-nvrtc-cu12 package or a CUDA toolkit and add its lib folder to LD_LIBRARY_PATH".into(),
        ));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; the call writes two ints.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(EngineError::Device(format!("nvrtcVersion failed: {r:?}")));
    }
    Ok((major, minor))
}

/// Compiles one family to PTX for `arch`.
pub fn compile(src: &KernelSource, arch: Arch) -> Result<String> {
    nvrtc_version()?;
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some(format!("{}.cu", src.family)),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(src.full_source(), opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => Err(EngineError::Device(format!(
            "NVRTC could not compile kernels/{}.cu for {arch}:\n{}",
            src.family,
            log.to_string_lossy()
        ))),
        Err(e) => Err(EngineError::Device(format!("NVRTC failed on kernels/{}.cu for {arch}: {e}", src.family))),
    }
}

/// FNV-1a, 64 bits: a hash that stays the same across builds and toolchains.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// PTX of compiled families on disk: `<dir>/<family>-<arch>-<hash>.ptx`, where the hash
/// covers the source, the architecture and NVRTC's version. A corrupt or missing file is
/// compiled again; a cache folder that cannot be written only costs the compile.
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: Option<PathBuf>,
}

impl KernelCache {
    pub fn new(dir: Option<&Path>) -> KernelCache {
        KernelCache { dir: dir.map(Path::to_path_buf) }
    }

    pub fn path(&self, src: &KernelSource, arch: Arch, nvrtc: (i32, i32)) -> Option<PathBuf> {
        let v = format!("{}.{}", nvrtc.0, nvrtc.1);
        let h = fnv1a(&[src.full_source().as_bytes(), arch.to_string().as_bytes(), v.as_bytes()]);
        self.dir.as_ref().map(|d| d.join(format!("{}-{arch}-{h:016x}.ptx", src.family)))
    }

    /// The family's PTX, from the cache or freshly compiled (and then stored).
    pub fn get(&self, src: &KernelSource, arch: Arch) -> Result<String> {
        let path = self.path(src, arch, nvrtc_version()?);
        if let Some(p) = &path {
            if let Ok(ptx) = std::fs::read_to_string(p) {
                if src.functions.iter().all(|f| ptx.contains(&format!(".entry {f}("))) {
                    return Ok(ptx);
                }
            }
        }
        let ptx = compile(src, arch)?;
        if let Some(p) = &path {
            if let Err(e) = store(p, &ptx) {
                tracing::warn!(path = %p.display(), error = %e, "could not cache compiled kernels");
            }
        }
        Ok(ptx)
    }
}

fn store(path: &Path, ptx: &str) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, ptx)?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_names_kernels_its_source_defines() {
        for s in SOURCES {
            for f in s.functions {
                assert!(s.source.contains(&format!(" {f}(")) || s.source.contains(&format!("\n{f}(")), "{}: {f}", s.family);
            }
        }
    }

    #[test]
    fn cache_paths_change_with_source_arch_and_version() {
        let c = KernelCache::new(Some(Path::new("/c")));
        let a = Arch { major: 9, minor: 0 };
        let p = c.path(&SOURCES[0], a, (12, 9)).unwrap();
        assert!(p.to_str().unwrap().starts_with("/c/attention-sm_90-"));
        assert_ne!(p, c.path(&SOURCES[0], Arch { major: 8, minor: 0 }, (12, 9)).unwrap());
        assert_ne!(p, c.path(&SOURCES[0], a, (12, 8)).unwrap());
        assert_ne!(p, c.path(&SOURCES[1], a, (12, 9)).unwrap());
        assert_eq!(p, c.path(&SOURCES[0], a, (12, 9)).unwrap());
    }
}
