//! The bpf(2) commands aya 0.14 does not wrap that the controller needs:
//! BPF_MAP_UPDATE_BATCH and BPF_MAP_LOOKUP_BATCH (Linux 5.6), which write a
//! whole Maglev ring or read a whole conn table in a few system calls
//! instead of one call per slot; and, for the offload flavor on a NIC,
//! device-bound map and program loads, the hardware-mode link, pins and
//! test runs of a program aya did not load.

use std::os::fd::{AsFd, AsRawFd};

/// bpf(2) with a command whose attributes are `attr` (the kernel may write
/// results back into it); returns what the call returns.
fn bpf_call<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as u32) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret)
}

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
        bpf_call(BPF_MAP_UPDATE_BATCH, &mut attr)?;
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
        let result = bpf_call(BPF_MAP_LOOKUP_BATCH, &mut attr);
        done += attr.count as usize;
        match result {
            Ok(_) => token_in = token_out,
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

/// bpf(2) with a command that returns a new file descriptor.
fn bpf_fd<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let fd = bpf_call(cmd, attr)?;
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
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
/// on failure, the end of the verifier's log joins the error.
pub fn load_xdp_program(name: &str, insns: &[u64], ifindex: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    let license = b"GPL\0";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name16(name),
        prog_ifindex: ifindex,
        ..ProgLoadAttr::default()
    };
    // Without a log first: a log too small for a program that loads
    // fails the load (ENOSPC).
    let error = match bpf_fd(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    let mut log = vec![0u8; 4 << 20];
    attr.log_level = 1;
    attr.log_size = log.len() as u32;
    attr.log_buf = log.as_mut_ptr() as u64;
    if let Ok(fd) = bpf_fd(BPF_PROG_LOAD, &mut attr) {
        return Ok(fd);
    }
    let text = String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(0)]).into_owned();
    let last: Vec<&str> = text.lines().rev().take(3).collect();
    if last.is_empty() {
        return Err(error);
    }
    Err(std::io::Error::new(error.kind(), format!("{error}: {}", last.join(" / "))))
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_XDP: u32 = 37;

/// `union bpf_attr` for BPF_OBJ_PIN / BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn c_path(path: &std::path::Path) -> std::io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)
}

/// Pins any BPF object (a link, a program, a map) at `path` on bpffs.
pub fn obj_pin(object: impl AsFd, path: &std::path::Path) -> std::io::Result<()> {
    let path = c_path(path)?;
    let mut attr =
        ObjAttr { pathname: path.as_ptr() as u64, bpf_fd: object.as_fd().as_raw_fd() as u32, ..ObjAttr::default() };
    bpf_call(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens a pinned BPF object.
pub fn obj_get(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
    let path = c_path(path)?;
    let mut attr = ObjAttr { pathname: path.as_ptr() as u64, ..ObjAttr::default() };
    bpf_fd(BPF_OBJ_GET, &mut attr)
}

/// `union bpf_attr` for BPF_LINK_CREATE (XDP needs no more than this).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 4],
}

/// Attaches an XDP program to an interface with `flags` (the mode) behind
/// a bpf_link: it stays attached while the link lives (an fd or a pin).
pub fn xdp_link_create(program: impl AsFd, ifindex: u32, flags: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_fd().as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags,
        ..LinkCreateAttr::default()
    };
    bpf_fd(BPF_LINK_CREATE, &mut attr)
}

/// `union bpf_attr` for BPF_LINK_UPDATE.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Replaces the program behind a link, atomically for packets.
pub fn link_update(link: impl AsFd, program: impl AsFd) -> std::io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_fd().as_raw_fd() as u32,
        new_prog_fd: program.as_fd().as_raw_fd() as u32,
        ..LinkUpdateAttr::default()
    };
    bpf_call(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// `union bpf_attr` for BPF_PROG_TEST_RUN, up to `duration`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
}

/// Runs one frame through a program loaded for the host: the XDP action
/// and the frame as it left.
pub fn test_run(program: impl AsFd, frame: &[u8]) -> std::io::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: program.as_fd().as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        ..TestRunAttr::default()
    };
    bpf_call(BPF_PROG_TEST_RUN, &mut attr)?;
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval, out))
}

/// The values of an array map made with `BPF_F_MMAPABLE`, mapped into this
/// process: a ring is written by one copy, not by a map update per element
/// (8.4 million of them for 512 VIPs' rings).
pub struct MappedArray {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// The mapping is plain memory shared with the kernel; whoever owns the
// `MappedArray` is its only writer here.
unsafe impl Send for MappedArray {}

impl MappedArray {
    /// Maps the `len` bytes of values of the array map `map` (EINVAL: the
    /// map was not made mmapable).
    pub fn new(map: impl AsFd, len: usize) -> std::io::Result<Self> {
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast()).expect("mmap gives no null mapping");
        Ok(Self { ptr, len })
    }

    /// Writes `values` from element `first` on (elements of `V`'s size).
    pub fn write<V: Copy>(&mut self, first: usize, values: &[V]) -> std::io::Result<()> {
        let size = std::mem::size_of::<V>();
        let start = first * size;
        let bytes = std::mem::size_of_val(values);
        if start.checked_add(bytes).is_none_or(|end| end > self.len) {
            return Err(std::io::Error::other(format!(
                "elements {first}..{} are beyond the map's {}",
                first + values.len(),
                self.len / size
            )));
        }
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr().cast::<u8>(), self.ptr.as_ptr().add(start), bytes) };
        Ok(())
    }

    /// The `count` elements of type `V` from element `first` on, if the
    /// mapping holds them.
    pub fn read<V: Copy + Default>(&self, first: usize, count: usize) -> Option<Vec<V>> {
        let size = std::mem::size_of::<V>();
        let end = (first + count).checked_mul(size)?;
        if end > self.len {
            return None;
        }
        let mut values = vec![V::default(); count];
        let src = unsafe { self.ptr.as_ptr().add(first * size) };
        unsafe { std::ptr::copy_nonoverlapping(src, values.as_mut_ptr().cast::<u8>(), count * size) };
        Some(values)
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
