//! CPU kernels: the reference backend, always built.

pub mod attention;
pub mod matmul;
pub mod ops;
