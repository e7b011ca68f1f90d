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

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_XDP: u32 = 6;

/// `union bpf_attr` for BPF_MAP_CREATE, up to `map_extra`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    map_ifindex: u32,
    btf_fd: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
    btf_vmlinux_value_type_id: u32,
    map_extra: u64,
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

fn bpf_fd<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as u32) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(ret as i32) })
}

fn name16(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().zip(name.bytes().filter(|b| b.is_ascii_alphanumeric() || *b == b'_').take(15)) {
        *o = b;
    }
    out
}

/// A map created on a network device (offloaded; `ifindex` 0: on the host).
pub fn create_map(
    name: &str,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
    ifindex: u32,
) -> std::io::Result<std::os::fd::OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: flags,
        map_name: name16(name),
        map_ifindex: ifindex,
        ..MapCreateAttr::default()
    };
    bpf_fd(BPF_MAP_CREATE, &mut attr)
}

/// An XDP program loaded for a network device (`ifindex` 0: for the host);
/// on failure, the verifier's log joins the error.
pub fn load_xdp_program(name: &str, insns: &[u64], ifindex: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    let license = b"GPL\0";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name16(name),
        prog_ifindex: ifindex,
        ..ProgLoadAttr::default()
    };
    bpf_fd(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let text = String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(0)]).into_owned();
        let last: Vec<&str> = text.lines().rev().take(3).collect();
        if last.is_empty() {
            e
        } else {
            std::io::Error::new(e.kind(), format!("{e}: {}", last.join(" / ")))
        }
    })
}
