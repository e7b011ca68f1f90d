//! The bpf(2) commands aya 0.14 does not wrap that the controller needs:
//! BPF_MAP_UPDATE_BATCH and BPF_MAP_LOOKUP_BATCH (Linux 5.6), which write a
//! whole Maglev ring or read a whole conn table in a few system calls
//! instead of one call per slot.

use std::os::fd::{AsFd, AsRawFd};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `union bpf_attr`'s `batch` member (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// bpf(2) with a batch command; the kernel updates `attr.count`.
fn batch_call(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>() as u32) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `keys[i] -> values[i]` (any map type that supports batches:
/// arrays and hash maps).
pub fn update_batch<K, V>(map: impl AsFd, keys: &[K], values: &[V]) -> std::io::Result<()> {
    assert_eq!(keys.len(), values.len());
    let mut done = 0usize;
    // The kernel may stop early (it reports how many it wrote); go on from there.
    while done < values.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: (values.len() - done) as u32,
            map_fd: map.as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        batch_call(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        if attr.count == 0 {
            return Err(std::io::Error::other("BPF_MAP_UPDATE_BATCH wrote nothing"));
        }
        done += attr.count as usize;
    }
    Ok(())
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Every value of an array map, in index order, read in batches
/// (BPF_MAP_LOOKUP_BATCH, Linux 5.6): a few hundred system calls for a
/// table of millions of entries instead of one call per entry.
pub fn array_values<V: Copy + Default>(map: impl AsFd, len: u32) -> std::io::Result<Vec<V>> {
    const BATCH: u32 = 8192;
    let mut values = vec![V::default(); len as usize];
    let mut keys = vec![0u32; BATCH as usize];
    // The batch token is the next index (a u32).
    let mut token_in = 0u32;
    let mut token_out = 0u32;
    let mut done = 0usize;
    while done < values.len() {
        let mut attr = BatchAttr {
            in_batch: if done == 0 { 0 } else { &token_in as *const u32 as u64 },
            out_batch: &mut token_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values[done..].as_mut_ptr() as u64,
            count: BATCH.min((values.len() - done) as u32),
            map_fd: map.as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = batch_call(BPF_MAP_LOOKUP_BATCH, &mut attr);
        done += attr.count as usize;
        match result {
            Ok(()) => token_in = token_out,
            // ENOENT: the last batch (still counted above).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        if attr.count == 0 {
            return Err(std::io::Error::other("BPF_MAP_LOOKUP_BATCH read nothing"));
        }
    }
    Ok(values)
}
