//! Classifies 64 bytes of text at once into bit masks (bit `i` is byte `i`):
//! ASCII letters, digits, spaces, and the "special" bytes that must be read
//! one character at a time (controls, non-ASCII bytes and, inside a JSON
//! string, `"` and `\`). Every other byte is an ASCII symbol.
//!
//! Three implementations give the same masks: wasm `simd128` (the filter's
//! build, as Envoy's V8 runs it), x86-64 SSE2 (native builds: tests, the
//! CLI), and 64-bit arithmetic on eight bytes at a time (any other target;
//! also the reference the other two are tested against).

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Masks {
    pub(super) letter: u64,
    pub(super) digit: u64,
    pub(super) blank: u64,
    pub(super) special: u64,
}

impl Masks {
    /// ASCII punctuation and DEL: whatever is nothing else.
    pub(super) fn symbol(&self) -> u64 {
        !(self.letter | self.digit | self.blank | self.special)
    }

    /// The masks seen from byte `a` (0..64) on.
    pub(super) fn shifted(&self, a: u32) -> Masks {
        let a = a.min(63);
        Masks {
            letter: self.letter >> a,
            digit: self.digit >> a,
            blank: self.blank >> a,
            special: self.special >> a,
        }
    }
}

/// Whether `classify` is a SIMD implementation on this target (the property
/// tests then hold it against [`scalar`]).
#[cfg(test)]
pub(super) const SIMD: bool = cfg!(any(
    all(target_arch = "wasm32", target_feature = "simd128"),
    all(target_arch = "x86_64", target_feature = "sse2")
));

#[cfg(any(
    all(target_arch = "wasm32", target_feature = "simd128"),
    all(target_arch = "x86_64", target_feature = "sse2")
))]
pub(super) use simd::classify;

#[cfg(not(any(
    all(target_arch = "wasm32", target_feature = "simd128"),
    all(target_arch = "x86_64", target_feature = "sse2")
)))]
pub(super) use swar::scalar as classify;

/// The scalar classifier; on SIMD targets only the tests use it.
#[cfg_attr(
    any(
        all(target_arch = "wasm32", target_feature = "simd128"),
        all(target_arch = "x86_64", target_feature = "sse2")
    ),
    allow(dead_code)
)]
mod swar {
    use super::Masks;

    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;

    /// Eight bytes at a time in a u64: each test leaves a byte's high bit set
    /// where it holds. Bytes are first reduced to their low 7 bits, so adding a
    /// constant below 0x81 never carries into the next byte.
    pub(in super::super) fn scalar(w: &[u8; 64], json: bool) -> Masks {
        let mut m = Masks::default();
        for (k, chunk) in w.chunks_exact(8).enumerate() {
            let Ok(eight) = <[u8; 8]>::try_from(chunk) else {
                continue;
            };
            let x = u64::from_le_bytes(eight);
            let low = x & !HIGH;
            let ascii = !x & HIGH;
            // Case folded: letters are 0x61..=0x7a.
            let folded = low | (ONES * 0x20);
            let letter =
                folded.wrapping_add(ONES * 0x1f) & !folded.wrapping_add(ONES * 0x05) & ascii;
            let digit = low.wrapping_add(ONES * 0x50) & !low.wrapping_add(ONES * 0x46) & ascii;
            let blank = eq(x, b' ');
            let control = !low.wrapping_add(ONES * 0x60) & ascii;
            let mut special = (x & HIGH) | control;
            if json {
                special |= eq(x, b'"') | eq(x, b'\\');
            }
            let at = 8 * k as u32;
            m.letter |= pack(letter) << at;
            m.digit |= pack(digit) << at;
            m.blank |= pack(blank) << at;
            m.special |= pack(special) << at;
        }
        m
    }

    /// High bit of each byte of `x` set where the byte equals `c`.
    fn eq(x: u64, c: u8) -> u64 {
        let t = x ^ (ONES * u64::from(c));
        // A byte's high bit ends up set iff the byte of `t` is non-zero.
        let nonzero = ((t & !HIGH).wrapping_add(!HIGH) | t) & HIGH;
        !nonzero & HIGH
    }

    /// The eight high bits of `v` as the low 8 bits (byte 0 as bit 0): each
    /// product term lands on its own bit, so nothing carries.
    fn pack(v: u64) -> u64 {
        (v >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56
    }
}

#[cfg_attr(
    any(
        all(target_arch = "wasm32", target_feature = "simd128"),
        all(target_arch = "x86_64", target_feature = "sse2")
    ),
    allow(unused_imports)
)]
pub(super) use swar::scalar;

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd {
    use super::Masks;
    use core::arch::wasm32::*;

    /// 16 bytes per v128. Unsigned ranges are tested with one signed
    /// compare: `b - (lo + 0x80)` is below `-128 + len` (as i8) exactly
    /// when `b` is in `lo..lo + len`. Letters and spaces come first: a
    /// window of nothing else (much of a prompt) needs no other test, which
    /// took a third off a 900 KB prompt's estimate in V8.
    pub(in super::super) fn classify(w: &[u8; 64], json: bool) -> Masks {
        let [q0, q1, q2, q3] = quarters(w);
        let special = |x: v128| {
            // Signed: bytes from 0x80 are negative, so one compare finds
            // controls and non-ASCII bytes.
            let s = i8x16_lt(x, i8x16_splat(0x20));
            if json {
                v128_or(
                    s,
                    v128_or(
                        u8x16_eq(x, u8x16_splat(b'"')),
                        u8x16_eq(x, u8x16_splat(b'\\')),
                    ),
                )
            } else {
                s
            }
        };
        let (s0, s1, s2, s3) = (special(q0), special(q1), special(q2), special(q3));
        let letter = |x: v128| {
            i8x16_lt(
                u8x16_sub(v128_or(x, u8x16_splat(0x20)), u8x16_splat(b'a' + 0x80)),
                i8x16_splat(-128 + 26),
            )
        };
        let digit = |x: v128| {
            i8x16_lt(
                u8x16_sub(x, u8x16_splat(b'0' + 0x80)),
                i8x16_splat(-128 + 10),
            )
        };
        let blank = |x: v128| u8x16_eq(x, u8x16_splat(b' '));
        let letter = join(letter(q0), letter(q1), letter(q2), letter(q3));
        let blank = join(blank(q0), blank(q1), blank(q2), blank(q3));
        if letter | blank == u64::MAX {
            return Masks {
                letter,
                blank,
                ..Masks::default()
            };
        }
        Masks {
            letter,
            digit: join(digit(q0), digit(q1), digit(q2), digit(q3)),
            blank,
            special: join_any(s0, s1, s2, s3),
        }
    }

    /// [`join`] for special bytes, which most windows of a prompt have none
    /// of: one test of the four quarters saves four bitmasks.
    fn join_any(a: v128, b: v128, c: v128, d: v128) -> u64 {
        if v128_any_true(v128_or(v128_or(a, b), v128_or(c, d))) {
            join(a, b, c, d)
        } else {
            0
        }
    }

    /// The window as four v128s.
    fn quarters(w: &[u8; 64]) -> [v128; 4] {
        let mut q = [u8x16_splat(0); 4];
        for (v, chunk) in q.iter_mut().zip(w.chunks_exact(16)) {
            if let Ok(&[b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15]) =
                <&[u8; 16]>::try_from(chunk)
            {
                *v = u8x16(
                    b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15,
                );
            }
        }
        q
    }

    /// The bit masks of four quarters' lanes as one u64 (quarter 0 low).
    fn join(a: v128, b: v128, c: v128, d: v128) -> u64 {
        u64::from(u8x16_bitmask(a))
            | u64::from(u8x16_bitmask(b)) << 16
            | u64::from(u8x16_bitmask(c)) << 32
            | u64::from(u8x16_bitmask(d)) << 48
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
mod simd {
    use super::Masks;
    use core::arch::x86_64::*;

    /// The wasm version's compares, in SSE2.
    pub(in super::super) fn classify(w: &[u8; 64], json: bool) -> Masks {
        // SAFETY: SSE2 is part of the x86-64 baseline, and this module is
        // only compiled when the build enables it (`target_feature`).
        unsafe { sse2(w, json) }
    }

    #[target_feature(enable = "sse2")]
    fn sse2(w: &[u8; 64], json: bool) -> Masks {
        let [q0, q1, q2, q3] = quarters(w);
        let special = |x: __m128i| {
            let s = _mm_cmplt_epi8(x, _mm_set1_epi8(0x20));
            if json {
                _mm_or_si128(
                    s,
                    _mm_or_si128(
                        _mm_cmpeq_epi8(x, _mm_set1_epi8(b'"' as i8)),
                        _mm_cmpeq_epi8(x, _mm_set1_epi8(b'\\' as i8)),
                    ),
                )
            } else {
                s
            }
        };
        let (s0, s1, s2, s3) = (special(q0), special(q1), special(q2), special(q3));
        let letter = |x: __m128i| {
            _mm_cmplt_epi8(
                _mm_sub_epi8(
                    _mm_or_si128(x, _mm_set1_epi8(0x20)),
                    _mm_set1_epi8((b'a' + 0x80) as i8),
                ),
                _mm_set1_epi8(-128 + 26),
            )
        };
        let digit = |x: __m128i| {
            _mm_cmplt_epi8(
                _mm_sub_epi8(x, _mm_set1_epi8((b'0' + 0x80) as i8)),
                _mm_set1_epi8(-128 + 10),
            )
        };
        let blank = |x: __m128i| _mm_cmpeq_epi8(x, _mm_set1_epi8(b' ' as i8));
        let letter = join(letter(q0), letter(q1), letter(q2), letter(q3));
        let blank = join(blank(q0), blank(q1), blank(q2), blank(q3));
        if letter | blank == u64::MAX {
            return Masks {
                letter,
                blank,
                ..Masks::default()
            };
        }
        let any_special = _mm_or_si128(_mm_or_si128(s0, s1), _mm_or_si128(s2, s3));
        Masks {
            letter,
            digit: join(digit(q0), digit(q1), digit(q2), digit(q3)),
            blank,
            special: if _mm_movemask_epi8(any_special) != 0 {
                join(s0, s1, s2, s3)
            } else {
                0
            },
        }
    }

    #[target_feature(enable = "sse2")]
    fn quarters(w: &[u8; 64]) -> [__m128i; 4] {
        let mut q = [_mm_setzero_si128(); 4];
        for (v, chunk) in q.iter_mut().zip(w.chunks_exact(16)) {
            if let Ok(&[b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15]) =
                <&[u8; 16]>::try_from(chunk)
            {
                *v = _mm_set_epi8(
                    b15 as i8, b14 as i8, b13 as i8, b12 as i8, b11 as i8, b10 as i8, b9 as i8,
                    b8 as i8, b7 as i8, b6 as i8, b5 as i8, b4 as i8, b3 as i8, b2 as i8, b1 as i8,
                    b0 as i8,
                );
            }
        }
        q
    }

    #[target_feature(enable = "sse2")]
    fn join(a: __m128i, b: __m128i, c: __m128i, d: __m128i) -> u64 {
        let mask = |v: __m128i| u64::from(_mm_movemask_epi8(v) as u16);
        mask(a) | mask(b) << 16 | mask(c) << 32 | mask(d) << 48
    }
}
