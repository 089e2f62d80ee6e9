//! Vectors of integers modulo 2^modulus_bits, for any modulus from 2^8 to
//! 2^64, stored in the narrowest machine word that holds them.
//!
//! A 32-bit (or smaller) ring lives in `u32` words, a 33..=64-bit ring in
//! `u64` words; every hot loop (mask streaming, the server's running sum, the
//! wire packing) is generic over the word, so a 32-bit round costs exactly
//! what it did before the ring was widened. Arithmetic wraps in the word and
//! is reduced modulo 2^bits only where it matters (before anything leaves an
//! agent, and before decoding): 2^bits divides 2^32 or 2^64, so the reduction
//! commutes with the wrapping sums.
//!
//! On the wire an element takes ⌈bits/8⌉ little-endian bytes: 4 at 32 bits,
//! 8 at 64, 3 at 24.

use rayon::prelude::*;

use super::SecAggError;

/// A machine word the ring arithmetic runs in.
pub(crate) trait Word: Copy + Send + Sync + Default + Eq + 'static {
    /// Bytes of keystream (and of memory) per element.
    const BYTES: usize;
    /// Little-endian load of the first `B` ≤ `BYTES` bytes of `b`, the rest zero.
    fn load<const B: usize>(b: &[u8]) -> Self;
    /// Little-endian load of exactly `BYTES` bytes.
    fn load_full(b: &[u8]) -> Self;
    /// Little-endian store of the low `B` bytes.
    fn store<const B: usize>(self, out: &mut Vec<u8>);
    /// Addition modulo 2^(8·BYTES).
    fn wadd(self, o: Self) -> Self;
    /// Subtraction modulo 2^(8·BYTES).
    fn wsub(self, o: Self) -> Self;
    /// Truncating conversion from u64.
    fn from_u64(v: u64) -> Self;
    /// Widening conversion to u64.
    fn to_u64(self) -> u64;
    /// Bitwise and.
    fn and(self, o: Self) -> Self;
}

macro_rules! word {
    ($t:ty) => {
        impl Word for $t {
            const BYTES: usize = std::mem::size_of::<$t>();
            #[inline(always)]
            fn load<const B: usize>(b: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a[..B].copy_from_slice(&b[..B]);
                <$t>::from_le_bytes(a)
            }
            #[inline(always)]
            fn load_full(b: &[u8]) -> Self {
                Self::load::<{ std::mem::size_of::<$t>() }>(b)
            }
            #[inline(always)]
            fn store<const B: usize>(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes()[..B]);
            }
            #[inline(always)]
            fn wadd(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            #[inline(always)]
            fn wsub(self, o: Self) -> Self {
                self.wrapping_sub(o)
            }
            #[inline(always)]
            fn from_u64(v: u64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_u64(self) -> u64 {
                self as u64
            }
            #[inline(always)]
            fn and(self, o: Self) -> Self {
                self & o
            }
        }
    };
}
word!(u32);
word!(u64);

/// The words of a [`RingVec`]: u32 for rings of at most 32 bits, u64 above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Words {
    /// Modulus ≤ 2^32.
    U32(Vec<u32>),
    /// Modulus in 2^33..=2^64.
    U64(Vec<u64>),
}

/// Runs `$body` with `$v` bound to the typed word vector (`Vec<u32>` or
/// `Vec<u64>`), so a generic loop is monomorphised once per word type.
macro_rules! with_words {
    ($words:expr, $v:ident => $body:expr) => {
        match $words {
            Words::U32($v) => $body,
            Words::U64($v) => $body,
        }
    };
}
pub(crate) use with_words;

/// A vector of elements of Z/2^bits: a masked input, the running masked sum,
/// an encoded input or the unmasked sum. Elements are always reduced (below
/// 2^bits) when a `RingVec` is handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingVec {
    bits: u32,
    pub(crate) words: Words,
}

/// Bytes per element on the wire for a modulus of 2^bits: ⌈bits/8⌉.
pub fn bytes_per_element(bits: u32) -> usize {
    bits.div_ceil(8) as usize
}

/// 2^bits − 1 (all ones for 64 bits).
pub(crate) fn mask_u64(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Calls `$f::<W, B>(words, args..)` with B = the element width in bytes,
/// which fixes the word type: 1..=4 bytes are u32 words, 5..=8 bytes u64.
macro_rules! by_width {
    ($bytes:expr, $words:expr, $f:ident($($arg:expr),*)) => {
        match ($bytes, $words) {
            (1, Words::U32(v)) => $f::<_, 1>(v, $($arg),*),
            (2, Words::U32(v)) => $f::<_, 2>(v, $($arg),*),
            (3, Words::U32(v)) => $f::<_, 3>(v, $($arg),*),
            (4, Words::U32(v)) => $f::<_, 4>(v, $($arg),*),
            (5, Words::U64(v)) => $f::<_, 5>(v, $($arg),*),
            (6, Words::U64(v)) => $f::<_, 6>(v, $($arg),*),
            (7, Words::U64(v)) => $f::<_, 7>(v, $($arg),*),
            (8, Words::U64(v)) => $f::<_, 8>(v, $($arg),*),
            _ => unreachable!("the word type follows from the modulus"),
        }
    };
}

fn store_all<W: Word, const B: usize>(v: &[W], out: &mut Vec<u8>) {
    v.iter().for_each(|x| x.store::<B>(out));
}

fn add_all<W: Word, const B: usize>(v: &mut [W], body: &[u8]) {
    v.iter_mut()
        .zip(body.chunks_exact(B))
        .for_each(|(s, c)| *s = s.wadd(W::load::<B>(c)));
}

impl RingVec {
    /// The zero vector of `len` elements modulo 2^bits (bits in 1..=64).
    pub fn zeros(bits: u32, len: usize) -> Self {
        assert!(
            (1..=64).contains(&bits),
            "modulus bits {bits} not in 1..=64"
        );
        let words = if bits <= 32 {
            Words::U32(vec![0; len])
        } else {
            Words::U64(vec![0; len])
        };
        Self { bits, words }
    }

    /// Builds a vector from arbitrary u64 values, reduced modulo 2^bits.
    pub fn from_u64(bits: u32, values: &[u64]) -> Self {
        let mut v = Self::zeros(bits, 0);
        match &mut v.words {
            Words::U32(w) => w.extend(values.iter().map(|&x| x as u32)),
            Words::U64(w) => w.extend_from_slice(values),
        }
        v.reduce();
        v
    }

    /// Builds a vector from typed words; `pub(crate)` because the caller
    /// must pick the word type that matches `bits`.
    pub(crate) fn from_typed(bits: u32, words: Words) -> Self {
        debug_assert_eq!(bits <= 32, matches!(words, Words::U32(_)));
        let mut v = Self { bits, words };
        v.reduce();
        v
    }

    /// The modulus is 2^modulus_bits.
    pub fn modulus_bits(&self) -> u32 {
        self.bits
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        with_words!(&self.words, v => v.len())
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i`, as u64.
    pub fn get(&self, i: usize) -> u64 {
        with_words!(&self.words, v => v[i].to_u64())
    }

    /// All elements as u64 (a copy).
    pub fn to_u64_vec(&self) -> Vec<u64> {
        with_words!(&self.words, v => v.iter().map(|x| x.to_u64()).collect())
    }

    /// Bytes per element on the wire: ⌈bits/8⌉.
    pub fn bytes_per_element(&self) -> usize {
        bytes_per_element(self.bits)
    }

    /// Adds `other` element-wise modulo 2^bits (same modulus and length).
    pub fn wrapping_add_assign(&mut self, other: &RingVec) {
        assert_eq!(self.bits, other.bits, "adding vectors of different rings");
        assert_eq!(
            self.len(),
            other.len(),
            "adding vectors of different lengths"
        );
        match (&mut self.words, &other.words) {
            (Words::U32(a), Words::U32(b)) => add_slices(a, b),
            (Words::U64(a), Words::U64(b)) => add_slices(a, b),
            _ => unreachable!("the word type follows from the modulus"),
        }
        self.reduce();
    }

    /// Adds every vector of `others` (same modulus and length) in one pass
    /// split by coordinate range across rayon threads: a range of the sum
    /// stays in cache while the vectors stream through it, and the threads
    /// are woken once for all of them rather than once per vector.
    pub fn wrapping_add_all(&mut self, others: &[&RingVec]) {
        for other in others {
            assert_eq!(self.bits, other.bits, "adding vectors of different rings");
            assert_eq!(
                self.len(),
                other.len(),
                "adding vectors of different lengths"
            );
        }
        match &mut self.words {
            Words::U32(a) => add_all_slices(a, others, |o| match &o.words {
                Words::U32(b) => b.as_slice(),
                Words::U64(_) => unreachable!("the word type follows from the modulus"),
            }),
            Words::U64(a) => add_all_slices(a, others, |o| match &o.words {
                Words::U64(b) => b.as_slice(),
                Words::U32(_) => unreachable!("the word type follows from the modulus"),
            }),
        }
        self.reduce();
    }

    /// Adds the signed integers `delta` (modulo 2^bits) to elements
    /// `offset..offset + delta.len()`.
    pub(crate) fn add_signed(&mut self, offset: usize, delta: &[i64]) {
        with_words!(&mut self.words, v => {
            for (x, &d) in v[offset..offset + delta.len()].iter_mut().zip(delta) {
                *x = x.wadd(Word::from_u64(d as u64));
            }
        });
        self.reduce();
    }

    /// Reduces every element modulo 2^bits (a no-op at 32 and 64 bits).
    pub(crate) fn reduce(&mut self) {
        if self.bits == 32 || self.bits == 64 {
            return;
        }
        let m = mask_u64(self.bits);
        with_words!(&mut self.words, v => {
            let m = Word::from_u64(m);
            v.iter_mut().for_each(|x| *x = x.and(m));
        });
    }

    /// True when every element is below 2^bits.
    pub(crate) fn in_range(&self) -> bool {
        if self.bits == 32 || self.bits == 64 {
            // Every word is: no pass over the elements (a model-sized vector
            // per agent on the server's serial path).
            return true;
        }
        let m = !mask_u64(self.bits);
        with_words!(&self.words, v => v.iter().all(|x| x.to_u64() & m == 0))
    }

    /// Appends the elements as ⌈bits/8⌉ little-endian bytes each.
    pub(crate) fn write_le(&self, out: &mut Vec<u8>) {
        out.reserve(self.len() * self.bytes_per_element());
        by_width!(self.bytes_per_element(), &self.words, store_all(out))
    }

    /// Reads `body.len() / ⌈bits/8⌉` packed elements; the caller checked the
    /// length. Elements are not reduced: see [`packed_in_range`].
    pub(crate) fn read_le(bits: u32, body: &[u8]) -> Self {
        let b = bytes_per_element(bits);
        let mut out = Self::zeros(bits, body.len() / b);
        out.add_le(body);
        out
    }

    /// Adds packed little-endian elements (as written by `write_le`) into
    /// this vector without unpacking them into a vector first.
    pub(crate) fn add_le(&mut self, body: &[u8]) {
        let b = self.bytes_per_element();
        debug_assert_eq!(body.len(), self.len() * b);
        by_width!(b, &mut self.words, add_all(body))
    }
}

/// True when every packed element of `body` is below 2^bits (only the top
/// byte of each element can hold bits outside the modulus).
pub(crate) fn packed_in_range(bits: u32, body: &[u8]) -> bool {
    if bits.is_multiple_of(8) {
        return true;
    }
    let b = bytes_per_element(bits);
    let high = !((1u16 << (bits % 8)) - 1) as u8;
    body.chunks_exact(b).all(|c| c[b - 1] & high == 0)
}

fn add_slices<W: Word>(a: &mut [W], b: &[W]) {
    a.iter_mut().zip(b).for_each(|(x, y)| *x = x.wadd(*y));
}

/// [`RingVec::wrapping_add_all`] in one word type.
fn add_all_slices<W: Word>(a: &mut [W], others: &[&RingVec], words: fn(&RingVec) -> &[W]) {
    const CHUNK: usize = 1 << 14;
    a.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, a)| {
        let start = ci * CHUNK;
        for other in others {
            add_slices(a, &words(other)[start..start + a.len()]);
        }
    });
}

/// Checks a masked vector's modulus and length against what the round expects.
pub(crate) fn check_shape(
    v: &RingVec,
    what: &'static str,
    bits: u32,
    len: usize,
) -> Result<(), SecAggError> {
    if v.bits != bits {
        return Err(SecAggError::Malformed {
            what,
            detail: format!(
                "elements modulo 2^{}, the round uses 2^{bits}",
                v.modulus_bits()
            ),
        });
    }
    if v.len() != len {
        return Err(SecAggError::WrongLength {
            what,
            expected: len,
            got: v.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_uses_ceil_bits_over_8_bytes_and_round_trips() {
        for bits in [8, 12, 24, 32, 33, 40, 48, 63, 64] {
            let m = mask_u64(bits);
            let vals: Vec<u64> = (0..50u64)
                .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) & m)
                .collect();
            let v = RingVec::from_u64(bits, &vals);
            let mut bytes = Vec::new();
            v.write_le(&mut bytes);
            assert_eq!(bytes.len(), 50 * bits.div_ceil(8) as usize, "{bits} bits");
            assert!(packed_in_range(bits, &bytes));
            assert_eq!(RingVec::read_le(bits, &bytes).to_u64_vec(), vals);
        }
        assert_eq!(bytes_per_element(32), 4);
        assert_eq!(bytes_per_element(64), 8);
    }

    #[test]
    fn sums_wrap_modulo_two_to_the_bits() {
        let mut a = RingVec::from_u64(64, &[u64::MAX, 5]);
        a.wrapping_add_assign(&RingVec::from_u64(64, &[2, u64::MAX]));
        assert_eq!(a.to_u64_vec(), vec![1, 4]);
        let mut b = RingVec::from_u64(12, &[4095, 7]);
        b.wrapping_add_assign(&RingVec::from_u64(12, &[1, 4090]));
        assert_eq!(b.to_u64_vec(), vec![0, 4097 % 4096]);
        b.add_signed(0, &[-1, -2]);
        assert_eq!(b.to_u64_vec(), vec![4095, 4095]);
        assert!(!packed_in_range(12, &[0xff, 0x1f]));
        assert!(packed_in_range(12, &[0xff, 0x0f]));
    }
}
