//! The flow hash: the program picks a ring slot with it, userspace uses it to
//! explain where a flow goes, and every LB host must compute the same value.
//! It is a few 32-bit multiply-xorshift rounds (cheap in BPF: no helper, no
//! loop) ended by MurmurHash3's fmix32 finalizer so that flows differing in
//! one port bit land on unrelated ring slots.

// 32-bit operations only: the same hash must run on a NIC whose offload
// JIT multiplies within 32 bits and cannot divide by a variable (the nfp).
const SEED: u32 = 0x6c62_5f66; // "lb_f"
const SEED_HIGH: u32 = 0x6c6f_7732; // "low2": the digest's other half
const SEED_CID: u32 = 0x7175_6963; // "quic"
const K: u32 = 0x9e37_79b1;

/// One word into the state: xor, multiply, xorshift (a bijection of `h`).
#[inline(always)]
fn mix(h: u32, w: u32) -> u32 {
    let x = (h ^ w).wrapping_mul(K);
    x ^ (x >> 15)
}

/// MurmurHash3's fmix32: every input bit reaches every output bit.
#[inline(always)]
fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// One lane of the flow hash. IPv4 flows (words 1..3 zero) skip the words
/// only IPv6 addresses have.
#[inline(always)]
fn lane(seed: u32, src: &[u32; 4], dst: &[u32; 4], ports: u32, proto: u8) -> u32 {
    let mut h = seed ^ proto as u32;
    h = mix(h, src[0]);
    h = mix(h, dst[0]);
    if src[1] | src[2] | src[3] | dst[1] | dst[2] | dst[3] != 0 {
        for i in 1..4 {
            h = mix(h, src[i]);
            h = mix(h, dst[i]);
        }
    }
    finish(mix(h, ports))
}

/// Hash of a 5-tuple. Addresses and ports are raw wire words
/// (see [`crate::addr_words_v4`]); IPv4 leaves words 1..3 zero.
#[inline(always)]
pub fn flow_hash(src: &[u32; 4], dst: &[u32; 4], src_port: u16, dst_port: u16, proto: u8) -> u32 {
    lane(SEED, src, dst, ((src_port as u32) << 16) | dst_port as u32, proto)
}

/// The flow's name in the conn table (`crate::conntrack`): the flow hash
/// in the low half, a second lane with another seed in the high half.
#[inline(always)]
pub fn flow_digest(src: &[u32; 4], dst: &[u32; 4], src_port: u16, dst_port: u16, proto: u8) -> u64 {
    let ports = ((src_port as u32) << 16) | dst_port as u32;
    let high = lane(SEED_HIGH, src, dst, ports, proto);
    ((high as u64) << 32) | lane(SEED, src, dst, ports, proto) as u64
}

/// Hash of the source address alone: session affinity, where every flow of
/// a client goes to one backend.
#[inline(always)]
pub fn source_hash(src: &[u32; 4]) -> u32 {
    let mut h = SEED;
    for w in src {
        h = mix(h, *w);
    }
    finish(h)
}

/// The hash of a QUIC connection ID chosen by a client (its first
/// packets' destination CID): up to 20 octets as five native words, zero
/// past `len`. The client's addresses are left out, so its Initials meet
/// at one backend even when its address changes.
#[inline(always)]
pub fn cid_hash(words: &[u32; 5], len: u8) -> u32 {
    let mut h = SEED_CID ^ len as u32;
    for w in words {
        h = mix(h, *w);
    }
    finish(h)
}

/// The ring slot of a hash: multiply and shift, not a modulo (a NIC's JIT
/// cannot divide by a variable; this is also cheaper), uniform over
/// `0..ring_size` for a uniform hash.
#[inline(always)]
pub fn ring_slot(hash: u32, ring_size: u32) -> u32 {
    ((hash as u64 * ring_size as u64) >> 32) as u32
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
    fn ring_slots_are_uniform_and_in_range() {
        let size = 65537u32;
        let mut counts = [0u32; 16];
        for port in 0..60000u16 {
            let slot = ring_slot(flow_hash(&[0x0102_0304, 0, 0, 0], &[0x0506_0708, 0, 0, 0], port, 80, 6), size);
            assert!(slot < size);
            counts[(slot as u64 * 16 / size as u64) as usize] += 1;
        }
        // 3750 per sixteenth expected; a uniform draw stays within 10%.
        assert!(counts.iter().all(|c| (3375..=4125).contains(c)), "{counts:?}");
        assert_eq!(ring_slot(u32::MAX, size), size - 1);
        assert_eq!(ring_slot(0, size), 0);
    }

    #[test]
    fn the_digest_halves_are_independent_lanes() {
        let (a, b) = ([1, 0, 0, 0], [2, 0, 0, 0]);
        let d = flow_digest(&a, &b, 1, 2, 6);
        assert_eq!(d as u32, flow_hash(&a, &b, 1, 2, 6));
        assert_ne!((d >> 32) as u32, d as u32);
        let v6 = flow_hash(&[1, 0, 0, 1], &b, 1, 2, 6);
        assert_ne!(v6, flow_hash(&a, &b, 1, 2, 6), "IPv6 words count");
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
