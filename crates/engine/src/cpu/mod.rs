//! CPU kernels: the reference backend, always built.

/// Runs `tile::<MR, NR>` over the whole m x n output, with smaller tiles at the edges.
/// `w` is a strip whose column `j` is output column `j`.
macro_rules! tiled_driver {
    ($tile:ident, $mr:expr, $nr:expr, $x:ident, $m:ident, $k:ident, $w:ident, $n:ident, $y:ident, $ldy:ident) => {{
        let mut i = 0;
        while i < $m {
            let mr = ($m - i).min($mr);
            let mut j = 0;
            while j < $n {
                let nr = ($n - j).min($nr);
                let (xp, yp) = ($x.add(i * $k), $y.add(i * $ldy + j));
                match (mr, nr) {
                    ($mr, $nr) => $tile::<$mr, $nr, _>(xp, $k, $w, j, yp, $ldy),
                    (_, $nr) => match mr {
                        1 => $tile::<1, $nr, _>(xp, $k, $w, j, yp, $ldy),
                        2 => $tile::<2, $nr, _>(xp, $k, $w, j, yp, $ldy),
                        _ => $tile::<3, $nr, _>(xp, $k, $w, j, yp, $ldy),
                    },
                    _ => {
                        for r in 0..mr {
                            for c in 0..nr {
                                $tile::<1, 1, _>(xp.add(r * $k), $k, $w, j + c, yp.add(r * $ldy + c), $ldy);
                            }
                        }
                    }
                }
                j += nr;
            }
            i += mr;
        }
    }};
}

/// An output buffer shared with the pool's tasks, each of which writes a part no other
/// task writes (the caller states which, at the `unsafe` block that writes).
pub(crate) struct SyncPtr<T = f32>(pub *mut T);
// SAFETY: only the raw pointer crosses threads; callers write disjoint parts through it.
unsafe impl<T> Sync for SyncPtr<T> {}
unsafe impl<T> Send for SyncPtr<T> {}

pub mod act8;
pub mod attention;
pub mod matmul;
pub mod ops;
pub mod quant;
