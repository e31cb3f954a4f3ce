//! CPU matmul for GGUF's 32-weight block types Q4_1, Q5_0 and Q8_0 (AVX2).
//!
//! Why our own: Candle 0.11's CPU `vec_dot` for Q4_1 and Q5_0 is scalar (3-4 GB/s of
//! weights here), and they are what the default model (SmolLM2 Q4_1) and parts of
//! Qwen2.5 Q4_K_M are made of; its Q8_0 kernel (SmolLM2's tied embeddings/LM head) is
//! vectorized but takes one activation row at a time. The arithmetic is llama.cpp's
//! (`ggml_vec_dot_q4_1_q8_1`, `ggml_vec_dot_q5_0_q8_0`, `ggml_vec_dot_q8_0_q8_0`):
//! activations quantized per 32 values to 8 bits with an f16 scale, integer dot products
//! per block, f32 accumulation, so results stay within float rounding of llama.cpp's. The
//! kernel is batch-aware: each block of weights is unpacked once into a register and
//! multiplied with up to [`ROWS`] activation rows, so a batched decode step reads and
//! unpacks every weight once, not once per sequence; the per-block scale products of all
//! those rows take one vector multiply, so the per-row work is four vector instructions
//! per block (a batched step on two cores is bound by these, not by memory).
//!
//! Other types, and CPUs without AVX2, stay on Candle's `QMatMul`.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;

use crate::error::Result;

const QK: usize = 32;
/// Activation rows one kernel call handles per weight block (register budget: one
/// accumulator per row plus the unpacked weights fit AVX2's 16 registers; also the lanes
/// of one f32 vector, which holds the rows' per-block scales).
const ROWS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// d: f16, m: f16, 16 bytes of nibbles; w = d * q + m.
    Q4_1,
    /// d: f16, 4 bytes of high bits, 16 bytes of nibbles; w = d * (q - 16).
    Q5_0,
    /// d: f16, 32 signed bytes; w = d * q.
    Q8_0,
}

impl Kind {
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_1 => 20,
            Kind::Q5_0 => 22,
            Kind::Q8_0 => 34,
        }
    }
}

/// A quantized `[n, k]` weight matrix (rows = output features) in GGUF's block layout.
pub struct QMat {
    kind: Kind,
    n: usize,
    k: usize,
    data: Vec<u8>,
}

/// Activations quantized to 8 bits per 32-value block, one row per token.
struct Act {
    k: usize,
    qs: Vec<i8>,
    /// Rows rounded up to [`ROWS`]: the row stride of `dt` and `st`.
    mp: usize,
    /// Per block, then row (`[k / 32][mp]`, so one load takes [`ROWS`] rows): the scale,
    /// rounded through f16 like the GGUF block would store it.
    dt: Vec<f32>,
    /// Likewise: d * sum(qs) rounded through f16 (Q8_1's `s`, used by Q4_1's offset).
    st: Vec<f32>,
    /// With AVX-512 VNNI, per row and block, eight i32 lanes: minus the weight type's
    /// unsigned offset (128 for Q8_0, 16 for Q5_0) times the sum of each lane's four
    /// activations. `vpdpbusd` multiplies unsigned by signed bytes; started from these,
    /// it sums (w + offset) * x into exactly w * x. Empty where unused.
    init: Vec<i32>,
}

impl QMat {
    /// Takes the matrix over when it is a CPU Q4_1/Q5_0/Q8_0 tensor and this CPU has AVX2;
    /// `None` leaves it to Candle.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        if !cfg!(all(target_arch = "x86_64", target_feature = "avx2")) {
            return Ok(None);
        }
        let kind = match t.dtype() {
            GgmlDType::Q4_1 => Kind::Q4_1,
            GgmlDType::Q5_0 => Kind::Q5_0,
            GgmlDType::Q8_0 => Kind::Q8_0,
            _ => return Ok(None),
        };
        if !matches!(t.device(), Device::Cpu) {
            return Ok(None);
        }
        let (n, k) = match t.shape().dims() {
            &[n, k] => (n, k),
            _ => return Ok(None),
        };
        if k % QK != 0 {
            return Ok(None);
        }
        let data = t.data()?.into_owned();
        debug_assert_eq!(data.len(), n * k / QK * kind.block_bytes());
        Ok(Some(Self { kind, n, k, data }))
    }

    /// `x [.., k]` (f32) times the transposed matrix: `[.., n]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let m = x.elem_count() / self.k;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let act = quantize(&xs, m, self.k, self.kind);
        let mut out_t = vec![0f32; self.n * m]; // [n, m]: a task owns whole weight rows
        let row_bytes = self.k / QK * self.kind.block_bytes();
        let out_ptr = out_t.as_mut_ptr() as usize;
        // Candle's own spinning worker pool: the threads are already awake between the
        // ops of a step (a sleeping pool costs tens of microseconds per wake-up).
        candle_core::utils::barrier_pool().execute_chunked(self.n, |rows| {
            // SAFETY: execute_chunked hands out disjoint row ranges, so each task writes
            // its own `[rows, m]` slice of out_t, which outlives the call.
            let out = unsafe {
                std::slice::from_raw_parts_mut(
                    (out_ptr as *mut f32).add(rows.start * m),
                    rows.len() * m,
                )
            };
            for (j, o) in rows.zip(out.chunks_mut(m)) {
                let w = &self.data[j * row_bytes..(j + 1) * row_bytes];
                let mut r = 0;
                while r < m {
                    let take = (m - r).min(ROWS);
                    self.dot_rows(w, &act, r, take, &mut o[r..r + take]);
                    r += take;
                }
            }
        });
        let mut out = vec![0f32; m * self.n];
        for (j, col) in out_t.chunks(m).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                out[r * self.n + j] = v;
            }
        }
        let mut shape = dims;
        *shape.last_mut().unwrap() = self.n;
        Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
    }

    fn dot_rows(&self, w: &[u8], act: &Act, r0: usize, rows: usize, out: &mut [f32]) {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
        {
            macro_rules! go {
                ($r:literal) => {
                    // SAFETY: AVX2 is enabled at compile time (cfg above); `w` holds
                    // k/32 whole blocks and `act` has `rows` rows from `r0` (checked by
                    // the callers' arithmetic: r0 + rows <= m).
                    unsafe {
                        match self.kind {
                            Kind::Q4_1 => avx2::q4_1::<$r>(w, act, r0, out),
                            Kind::Q5_0 => avx2::q5_0::<$r>(w, act, r0, out),
                            Kind::Q8_0 => avx2::q8_0::<$r>(w, act, r0, out),
                        }
                    }
                };
            }
            match rows {
                8 => go!(8),
                7 => go!(7),
                6 => go!(6),
                5 => go!(5),
                4 => go!(4),
                3 => go!(3),
                2 => go!(2),
                _ => go!(1),
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
        {
            // from_qtensor never builds a QMat here.
            let _ = (w, act, r0, rows, out);
            unreachable!("QMat needs AVX2");
        }
    }
}

/// llama.cpp's `quantize_row_q8_1` (AVX2 flavour): scale = amax / 127, values rounded to
/// nearest even, `s` = scale * sum of the quantized values.
fn quantize(xs: &[f32], m: usize, k: usize, kind: Kind) -> Act {
    let nb = k / QK;
    let mp = m.div_ceil(ROWS) * ROWS;
    let mut act = Act {
        k,
        qs: vec![0; m * k],
        mp,
        dt: vec![0.0; nb * mp],
        st: vec![0.0; nb * mp],
        init: Vec::new(),
    };
    for (i, (x, q)) in xs.chunks(QK).zip(act.qs.chunks_mut(QK)).enumerate() {
        let (r, b) = (i / nb, i % nb);
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (qi, &xi) in q.iter_mut().zip(x) {
            *qi = (xi * id).round_ties_even() as i8;
            sum += *qi as i32;
        }
        act.dt[b * mp + r] = f16::from_f32(d).to_f32();
        act.st[b * mp + r] = f16::from_f32(d * sum as f32).to_f32();
    }
    let offset = match kind {
        Kind::Q4_1 => 0,
        Kind::Q5_0 => 16,
        Kind::Q8_0 => 128,
    };
    if cfg!(all(
        target_feature = "avx512vnni",
        target_feature = "avx512vl"
    )) && offset != 0
    {
        act.init = act
            .qs
            .chunks(4)
            .map(|q| -offset * q.iter().map(|&v| v as i32).sum::<i32>())
            .collect();
    }
    act
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[allow(clippy::needless_range_loop)] // row index r addresses both the accumulators and the activations
mod avx2 {
    use super::{Act, QK};
    use half::f16;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn f16_at(p: *const u8) -> f32 {
        f16::from_bits(u16::from_le_bytes([*p, *p.add(1)])).to_f32()
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 16 bytes of nibbles -> 32 bytes: low nibbles (weights 0..16), then high (16..32).
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let qs = _mm_loadu_si128(p as *const __m128i);
        let m4 = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(qs, m4);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), m4);
        _mm256_set_m128i(hi, lo)
    }

    /// 32 bits -> 32 bytes, 0xFF where the bit is set (bit j -> byte j).
    #[inline(always)]
    unsafe fn bits_to_bytes(x: u32) -> __m256i {
        let shuf = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
        let bit = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe_u64 as i64);
        _mm256_cmpeq_epi8(_mm256_or_si256(bytes, bit), _mm256_set1_epi64x(-1))
    }

    /// This block's weight scale times each row's activation scale, for the `ROWS` rows
    /// from `r0` (one vector multiply), to be broadcast per row from `dd`.
    #[inline(always)]
    unsafe fn scales(d: f32, a: &Act, b: usize, r0: usize, dd: &mut [f32; 8]) {
        let ad = _mm256_loadu_ps(a.dt.as_ptr().add(b * a.mp + r0));
        _mm256_storeu_ps(dd.as_mut_ptr(), _mm256_mul_ps(_mm256_set1_ps(d), ad));
    }

    /// Eight i32 lanes, each the sum of four products of `w`'s unsigned and `x`'s signed
    /// bytes, added to `init`: one `vpdpbusd` with AVX-512 VNNI, else AVX2's
    /// `vpmaddubsw` + `vpmaddwd` (whose 16-bit pair sums cannot saturate here: weights are
    /// at most 31, or 128 in magnitude against activations of at most 127).
    #[inline(always)]
    unsafe fn dot(init: __m256i, w: __m256i, x: __m256i) -> __m256i {
        #[cfg(all(target_feature = "avx512vnni", target_feature = "avx512vl"))]
        {
            _mm256_dpbusd_epi32(init, w, x)
        }
        #[cfg(not(all(target_feature = "avx512vnni", target_feature = "avx512vl")))]
        {
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
            _mm256_add_epi32(init, p)
        }
    }

    const VNNI: bool = cfg!(all(
        target_feature = "avx512vnni",
        target_feature = "avx512vl"
    ));

    /// The offset correction of row `row`, block `b` (see `Act::init`).
    #[inline(always)]
    unsafe fn init(a: &Act, row: usize, b: usize) -> __m256i {
        _mm256_loadu_si256(a.init.as_ptr().add((row * (a.k / QK) + b) * 8) as *const __m256i)
    }

    /// Row `row`'s 32 quantized activations of block `b`.
    #[inline(always)]
    unsafe fn act(a: &Act, row: usize, b: usize) -> __m256i {
        _mm256_loadu_si256(a.qs.as_ptr().add(row * a.k + b * QK) as *const __m256i)
    }

    #[inline(always)]
    unsafe fn finish<const R: usize>(acc: &[__m256; R], extra: __m256, out: &mut [f32]) {
        let mut e = [0f32; 8];
        _mm256_storeu_ps(e.as_mut_ptr(), extra);
        for r in 0..R {
            out[r] = hsum(acc[r]) + e[r];
        }
    }

    /// One block of signed weights `x` times each row's activations, added to `acc` with
    /// the block's scales `dd`. With VNNI the weights go unsigned as `x + offset` (16 for
    /// Q5_0's 5-bit values, 128 for Q8_0: a byte addition), corrected by `Act::init`;
    /// with AVX2 the sign moves to the activations (`vpsignb`) as llama.cpp does.
    #[inline(always)]
    unsafe fn signed_block<const R: usize>(
        x: __m256i,
        offset: i8,
        a: &Act,
        r0: usize,
        b: usize,
        dd: &[f32; 8],
        acc: &mut [__m256; R],
    ) {
        let fma = |acc: &mut __m256, r: usize, p: __m256i| {
            *acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&dd[r]), _mm256_cvtepi32_ps(p), *acc);
        };
        if VNNI {
            let q = _mm256_add_epi8(x, _mm256_set1_epi8(offset));
            for r in 0..R {
                fma(
                    &mut acc[r],
                    r,
                    dot(init(a, r0 + r, b), q, act(a, r0 + r, b)),
                );
            }
            return;
        }
        let ax = _mm256_sign_epi8(x, x);
        for r in 0..R {
            let sy = _mm256_sign_epi8(act(a, r0 + r, b), x);
            fma(&mut acc[r], r, dot(_mm256_setzero_si256(), ax, sy));
        }
    }

    pub(super) unsafe fn q4_1<const R: usize>(w: &[u8], a: &Act, r0: usize, out: &mut [f32]) {
        let nb = a.k / QK;
        let mut acc = [_mm256_setzero_ps(); R];
        // the offset term m * s of every row at once (lanes = rows)
        let mut summ = _mm256_setzero_ps();
        let mut dd = [0f32; 8];
        let wp = w.as_ptr();
        for b in 0..nb {
            let blk = wp.add(b * 20);
            scales(f16_at(blk), a, b, r0, &mut dd);
            let sv = _mm256_loadu_ps(a.st.as_ptr().add(b * a.mp + r0));
            summ = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(blk.add(2))), sv, summ);
            let q4 = nibbles(blk.add(4));
            for r in 0..R {
                let p = dot(_mm256_setzero_si256(), q4, act(a, r0 + r, b));
                acc[r] =
                    _mm256_fmadd_ps(_mm256_broadcast_ss(&dd[r]), _mm256_cvtepi32_ps(p), acc[r]);
            }
        }
        finish(&acc, summ, out);
    }

    pub(super) unsafe fn q5_0<const R: usize>(w: &[u8], a: &Act, r0: usize, out: &mut [f32]) {
        let nb = a.k / QK;
        let high = _mm256_set1_epi8(0xF0_u8 as i8);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut dd = [0f32; 8];
        let wp = w.as_ptr();
        for b in 0..nb {
            let blk = wp.add(b * 22);
            scales(f16_at(blk), a, b, r0, &mut dd);
            let qh = u32::from_le_bytes([*blk.add(2), *blk.add(3), *blk.add(4), *blk.add(5)]);
            // q - 16 as a signed byte: the nibble, with 0xF0 or-ed in where the 5th bit is 0.
            let x = _mm256_or_si256(
                nibbles(blk.add(6)),
                _mm256_andnot_si256(bits_to_bytes(qh), high),
            );
            signed_block(x, 16, a, r0, b, &dd, &mut acc);
        }
        finish(&acc, _mm256_setzero_ps(), out);
    }

    pub(super) unsafe fn q8_0<const R: usize>(w: &[u8], a: &Act, r0: usize, out: &mut [f32]) {
        let nb = a.k / QK;
        let mut acc = [_mm256_setzero_ps(); R];
        let mut dd = [0f32; 8];
        let wp = w.as_ptr();
        for b in 0..nb {
            let blk = wp.add(b * 34);
            scales(f16_at(blk), a, b, r0, &mut dd);
            let x = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            signed_block(x, -128, a, r0, b, &dd, &mut acc);
        }
        finish(&acc, _mm256_setzero_ps(), out);
    }
}

#[cfg(all(test, target_arch = "x86_64", target_feature = "avx2"))]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    /// Plain scalar dot products on the same quantized activations: the kernel must equal
    /// this up to f32 summation order.
    fn scalar(q: &QMat, xs: &[f32], m: usize) -> Vec<f32> {
        let act = quantize(xs, m, q.k, q.kind);
        let nb = q.k / QK;
        let bb = q.kind.block_bytes();
        let mut out = vec![0f32; m * q.n];
        for r in 0..m {
            for j in 0..q.n {
                let mut acc = 0f64;
                for b in 0..nb {
                    let blk = &q.data[(j * nb + b) * bb..(j * nb + b + 1) * bb];
                    let d = f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32() as f64;
                    let a = &act.qs[r * q.k + b * QK..r * q.k + (b + 1) * QK];
                    let ad = act.dt[b * act.mp + r] as f64;
                    match q.kind {
                        Kind::Q4_1 => {
                            let mm = f16::from_bits(u16::from_le_bytes([blk[2], blk[3]])).to_f32();
                            let mut s = 0i32;
                            for i in 0..16 {
                                s += (blk[4 + i] & 15) as i32 * a[i] as i32;
                                s += (blk[4 + i] >> 4) as i32 * a[i + 16] as i32;
                            }
                            acc += d * ad * s as f64 + mm as f64 * act.st[b * act.mp + r] as f64;
                        }
                        Kind::Q5_0 => {
                            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                            let mut s = 0i32;
                            for i in 0..16 {
                                let lo = (blk[6 + i] & 15) as i32 | (((qh >> i) & 1) << 4) as i32;
                                let hi =
                                    (blk[6 + i] >> 4) as i32 | (((qh >> (i + 16)) & 1) << 4) as i32;
                                s += (lo - 16) * a[i] as i32 + (hi - 16) * a[i + 16] as i32;
                            }
                            acc += d * ad * s as f64;
                        }
                        Kind::Q8_0 => {
                            let s: i32 =
                                (0..QK).map(|i| blk[2 + i] as i8 as i32 * a[i] as i32).sum();
                            acc += d * ad * s as f64;
                        }
                    }
                }
                out[r * q.n + j] = acc as f32;
            }
        }
        out
    }

    fn flat(t: Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn rel(a: &[f32], b: &[f32]) -> f32 {
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f32 = b.iter().map(|y| y * y).sum();
        (num / den).sqrt()
    }

    #[test]
    fn kernels_match_scalar_and_candle_for_every_batch_size() {
        let (n, k) = (37, 256);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        for dt in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0] {
            let qt = QTensor::quantize(&w, dt).unwrap();
            let q = QMat::from_qtensor(&qt)
                .unwrap()
                .expect("AVX2 build takes Q4_1/Q5_0/Q8_0");
            let candle = QMatMul::from_qtensor(qt).unwrap();
            for m in [1, 2, 5, 8, 9, 17] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let ours = flat(q.forward(&x).unwrap());
                let want = scalar(&q, &xs, m);
                assert!(
                    rel(&ours, &want) < 1e-6,
                    "{dt:?} m={m}: {}",
                    rel(&ours, &want)
                );
                // Candle's kernel quantizes the activations its own way (scale rounding,
                // ties): equal to a few 1e-3, which catches any layout mistake (those give ~1).
                let c = flat(candle.forward(&x).unwrap());
                assert!(
                    rel(&ours, &c) < 5e-3,
                    "{dt:?} m={m} vs candle: {}",
                    rel(&ours, &c)
                );
            }
        }
    }
}
