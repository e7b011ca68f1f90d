//! The flow hash: the program picks a ring slot with it, userspace uses it to
//! explain where a flow goes, and every LB host must compute the same value.
//! It is a few 64-bit multiply-xorshift rounds (cheap in BPF: no helper, no
//! loop) ended by MurmurHash3's fmix64 finalizer so that flows differing in
//! one port bit land on unrelated ring slots.

const SEED: u64 = 0x6c62_5f66_6c6f_7731; // "lb_flow1"
const K: u64 = 0x9e37_79b9_7f4a_7c15;

#[inline(always)]
fn mix(h: u64, v: u64) -> u64 {
    let x = (h ^ v).wrapping_mul(K);
    x ^ (x >> 29)
}

#[inline(always)]
fn finish(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

#[inline(always)]
fn pair(a: &[u32; 4], i: usize) -> u64 {
    ((a[i] as u64) << 32) | a[i + 1] as u64
}

/// Hash of a 5-tuple. Addresses and ports are raw wire words
/// (see [`crate::addr_words_v4`]); IPv4 leaves words 1..3 zero.
#[inline(always)]
pub fn flow_hash(src: &[u32; 4], dst: &[u32; 4], src_port: u16, dst_port: u16, proto: u8) -> u32 {
    flow_digest(src, dst, src_port, dst_port, proto) as u32
}

/// The 64 bits the flow hash is the low half of: the flow's name in the
/// conn table (`crate::conntrack`).
#[inline(always)]
pub fn flow_digest(src: &[u32; 4], dst: &[u32; 4], src_port: u16, dst_port: u16, proto: u8) -> u64 {
    let mut h = SEED ^ proto as u64;
    h = mix(h, pair(src, 0));
    h = mix(h, pair(src, 2));
    h = mix(h, pair(dst, 0));
    h = mix(h, pair(dst, 2));
    h = mix(h, ((src_port as u64) << 16) | dst_port as u64);
    finish(h)
}

/// Hash of the source address alone: session affinity, where every flow of
/// a client goes to one backend.
#[inline(always)]
pub fn source_hash(src: &[u32; 4]) -> u32 {
    let mut h = SEED;
    h = mix(h, pair(src, 0));
    h = mix(h, pair(src, 2));
    finish(h) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_bit_changes_about_half_the_hash_bits() {
        let src = [0x0102_0304, 0, 0, 0];
        let dst = [0x0506_0708, 0, 0, 0];
        let mut total = 0u32;
        for port in 0..1000u16 {
            let a = flow_hash(&src, &dst, port, 80, 6);
            let b = flow_hash(&src, &dst, port ^ 1, 80, 6);
            total += (a ^ b).count_ones();
        }
        let mean = total as f64 / 1000.0;
        assert!((12.0..20.0).contains(&mean), "mean flipped bits {mean}");
    }

    #[test]
    fn fields_are_not_interchangeable() {
        let a = [1, 0, 0, 0];
        let b = [2, 0, 0, 0];
        assert_ne!(flow_hash(&a, &b, 1, 2, 6), flow_hash(&b, &a, 1, 2, 6));
        assert_ne!(flow_hash(&a, &b, 1, 2, 6), flow_hash(&a, &b, 2, 1, 6));
        assert_ne!(flow_hash(&a, &b, 1, 2, 6), flow_hash(&a, &b, 1, 2, 17));
        assert_ne!(source_hash(&a), source_hash(&b));
    }
}
