//! The conn table: a set-associative flow cache in an array map, which the
//! kernel inlines (no helper call, no lock, no per-entry allocation).
//!
//! A flow is named by its 64-bit digest ([`crate::hash::flow_digest`], whose
//! low half is the flow hash). The digest's high half picks a bucket of
//! [`CONN_WAYS`] slots (one 64-byte cache line); slot 0 is the most recently
//! used. A hit in a later slot moves the flow to the front; a new flow goes
//! to the front and the last slot falls out when the bucket is full: LRU
//! per bucket.
//!
//! Slots are written without locks by every CPU. Each holds the packed
//! value and `digest ^ value`, both 64-bit words (single loads and stores):
//! a reader takes a slot only when the two words agree with its digest, so
//! a slot torn by a concurrent write is a miss (the flow is picked from the
//! ring again), never another flow's backend. Two CPUs writing one bucket
//! at once may lose one entry the same way.

use crate::ConnValue;

/// Slots per bucket: 4 x 16 bytes, one cache line.
pub const CONN_WAYS: usize = 4;

/// One flow: its packed value, and the digest folded with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnSlot {
    pub check: u64,
    pub value: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnBucket {
    pub slots: [ConnSlot; CONN_WAYS],
}

/// Conn-table flag: the flow's VIP encapsulates in GUE.
pub const CONN_F_GUE: u8 = 1;
/// Conn-table flag: the flow's hash (outer source bits) is its source's.
pub const CONN_F_SOURCE_HASH: u8 = 2;
/// Conn-table flag: the flow sent more than its SYN (an ACK, data), so a
/// SYN for it again opens a new connection on the same ports; without it,
/// that SYN is the client's retransmission (the passive signal).
pub const CONN_F_PAST_SYN: u8 = 4;

const _: () = assert!(crate::MAX_BACKENDS <= 1 << 16 && crate::MAX_VIPS <= 1 << 12);

/// Packs a value into 64 bits: cookie (32), backend id (16), VIP id (12),
/// flags (4). The hash is not stored: it follows from the flow.
#[inline(always)]
pub fn pack(v: &ConnValue) -> u64 {
    v.cookie as u64
        | ((v.backend_id as u64 & 0xffff) << 32)
        | ((v.vip_id as u64 & 0xfff) << 48)
        | ((v.flags as u64 & 0xf) << 60)
}

/// The value of a packed word; `hash` is the flow's (see [`CONN_F_SOURCE_HASH`]).
#[inline(always)]
pub fn unpack(word: u64, hash: u32) -> ConnValue {
    ConnValue {
        backend_id: ((word >> 32) & 0xffff) as u32,
        cookie: word as u32,
        vip_id: ((word >> 48) & 0xfff) as u16,
        flags: (word >> 60) as u8,
        _pad: 0,
        hash,
    }
}

/// The bucket of a digest among `buckets` (multiply-shift: no division).
#[inline(always)]
pub fn bucket_index(digest: u64, buckets: u32) -> u32 {
    (((digest >> 32) * buckets as u64) >> 32) as u32
}

/// The slot that holds `digest`, and its packed value. Every word is read
/// once (volatile), so the check and the value used are the same loads.
#[inline(always)]
pub fn find(bucket: &ConnBucket, digest: u64) -> Option<(usize, u64)> {
    for way in 0..CONN_WAYS {
        let slot = &bucket.slots[way];
        let value = unsafe { core::ptr::read_volatile(&slot.value) };
        let check = unsafe { core::ptr::read_volatile(&slot.check) };
        if value != 0 && check ^ value == digest {
            return Some((way, value));
        }
    }
    None
}

/// Puts `digest -> value` in slot 0, moving slots `0..from` one down: slot
/// `from` (where the flow was, the first empty one, or the last) is
/// overwritten.
#[inline(always)]
pub fn put_front(bucket: &mut ConnBucket, from: usize, digest: u64, value: u64) {
    let mut way = if from < CONN_WAYS { from } else { CONN_WAYS - 1 };
    while way > 0 {
        let above = bucket.slots[way - 1];
        write(&mut bucket.slots[way], above);
        way -= 1;
    }
    write(&mut bucket.slots[0], ConnSlot { check: digest ^ value, value });
}

/// Remembers a flow: where it is already (a new SYN replaces it), else in
/// the first empty slot, else in place of the least recently used.
/// Returns the value it replaced for this flow, if there was one.
#[inline(always)]
pub fn insert(bucket: &mut ConnBucket, digest: u64, value: u64) -> Option<u64> {
    let (from, old) = match find(bucket, digest) {
        Some((way, old)) => (way, Some(old)),
        None => (first_empty(bucket), None),
    };
    put_front(bucket, from, digest, value);
    old
}

/// The first slot without a flow ([`CONN_WAYS`] when all hold one).
#[inline(always)]
fn first_empty(bucket: &ConnBucket) -> usize {
    for way in 0..CONN_WAYS {
        if unsafe { core::ptr::read_volatile(&bucket.slots[way].value) } == 0 {
            return way;
        }
    }
    CONN_WAYS
}

#[inline(always)]
fn write(slot: &mut ConnSlot, new: ConnSlot) {
    unsafe {
        core::ptr::write_volatile(&mut slot.value, new.value);
        core::ptr::write_volatile(&mut slot.check, new.check);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(cookie: u32) -> u64 {
        pack(&ConnValue { backend_id: 7, cookie, vip_id: 3, flags: CONN_F_GUE, _pad: 0, hash: 0 })
    }

    #[test]
    fn a_value_survives_packing() {
        let v = ConnValue { backend_id: 8191, cookie: 0xdead_beef, vip_id: 1023, flags: 3, _pad: 0, hash: 9 };
        assert_eq!(unpack(pack(&v), 9), v);
    }

    #[test]
    fn a_full_bucket_evicts_its_least_recently_used_flow() {
        let mut b = ConnBucket::default();
        for d in 1..=4u64 {
            insert(&mut b, d, value(d as u32));
        }
        // Flow 1 is used again: it moves to the front, flow 2 is now the oldest.
        let (way, _) = find(&b, 1).unwrap();
        assert_eq!(way, 3);
        put_front(&mut b, way, 1, value(1));
        insert(&mut b, 5, value(5));
        assert!(find(&b, 2).is_none(), "the least recently used flow fell out");
        for d in [1, 3, 4, 5] {
            assert_eq!(find(&b, d).map(|(_, v)| v), Some(value(d as u32)));
        }
        assert_eq!(find(&b, 5).unwrap().0, 0);
    }

    #[test]
    fn inserting_a_known_flow_replaces_it_without_evicting_another() {
        let mut b = ConnBucket::default();
        for d in 1..=4u64 {
            assert_eq!(insert(&mut b, d, value(d as u32)), None, "a new flow replaces none of its own");
        }
        assert_eq!(insert(&mut b, 2, value(20)), Some(value(2)), "the value it replaced");
        assert_eq!(find(&b, 2), Some((0, value(20))));
        for d in [1, 3, 4] {
            assert!(find(&b, d).is_some());
        }
    }

    #[test]
    fn a_torn_slot_is_a_miss_not_another_flow() {
        let mut b = ConnBucket::default();
        insert(&mut b, 0x1111, value(1));
        // Another CPU has written its value but not yet its check word.
        b.slots[0].value = value(2);
        assert_eq!(find(&b, 0x1111), None);
    }
}
