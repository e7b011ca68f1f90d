//! The one bpf(2) command aya 0.14 does not wrap that the controller needs:
//! BPF_MAP_UPDATE_BATCH (Linux 5.6), which writes a whole Maglev ring in one
//! system call instead of one call per slot (65,537 of them).

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
/// arrays and hash maps, LRU included).
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

/// Counts the entries of a hash map by reading it in batches
/// (BPF_MAP_LOOKUP_BATCH, Linux 5.6); a 1M-entry table takes a few hundred
/// system calls instead of a million BPF_MAP_GET_NEXT_KEY calls.
pub fn count_entries(map: impl AsFd, key_size: usize, value_size: usize) -> std::io::Result<u64> {
    const BATCH: usize = 8192;
    let mut keys = vec![0u8; BATCH * key_size];
    let mut values = vec![0u8; BATCH * value_size];
    // For hash maps the batch token is a bucket index (a u32).
    let mut token_in = 0u64;
    let mut token_out = 0u64;
    let mut first = true;
    let mut total = 0u64;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &token_in as *const u64 as u64 },
            out_batch: &mut token_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: map.as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = batch_call(BPF_MAP_LOOKUP_BATCH, &mut attr);
        total += attr.count as u64;
        if let Err(e) = result {
            // ENOENT: the walk is over (the last batch still counts).
            return if e.raw_os_error() == Some(libc::ENOENT) { Ok(total) } else { Err(e) };
        }
        token_in = token_out;
        first = false;
    }
}
