//! The offload checker: what a NIC's XDP JIT would refuse in a compiled
//! object, found before any NIC sees it. The rules are those of the one
//! upstream XDP offload JIT, the Netronome/Corigine nfp driver
//! (drivers/net/ethernet/netronome/nfp/bpf/: verifier.c, jit.c), and of the
//! kernel's offload core (kernel/bpf/offload.c). The driver decides some of
//! them on the kernel verifier's value ranges; this checker reads the
//! instructions alone, so it takes the conservative form of those (each
//! rule says which). Firmware limits (stack, program length) come from the
//! NIC; [`Limits`] holds the values checked against.

use std::collections::{BTreeMap, HashSet};

use aya_obj::generated::bpf_insn;

/// One BPF instruction, decoded (tests write them by hand).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

impl From<&bpf_insn> for Insn {
    fn from(i: &bpf_insn) -> Self {
        Insn { code: i.code, dst: i.dst_reg(), src: i.src_reg(), off: i.off, imm: i.imm }
    }
}

/// A map as the object defines it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapInfo {
    pub name: String,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// The NIC's firmware limits the checker compares against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Stack bytes (the firmware reports NFP_NET_CFG_BPF_STACK_SZ x 64).
    pub max_stack: u32,
    /// BPF instructions (the firmware caps the translated program at
    /// NFP_NET_CFG_BPF_MAX_LEN NFP instructions, at least one per BPF one).
    pub max_insns: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_stack: 512, max_insns: 4096 }
    }
}

/// What would be refused, where, and by which rule.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    /// The instruction index, when one instruction is at fault.
    pub at: Option<usize>,
    pub what: String,
    pub rule: &'static str,
}

pub const RULE_HELPER: &str = "nfp verifier.c nfp_bpf_check_helper_call: only map_lookup_elem, map_update_elem, \
                               map_delete_elem, xdp_adjust_head, xdp_adjust_tail, get_prandom_u32, perf_event_output";
pub const RULE_MAP_TYPE: &str =
    "kernel/bpf/offload.c bpf_map_offload_map_alloc: a device-bound map is BPF_MAP_TYPE_ARRAY or BPF_MAP_TYPE_HASH";
pub const RULE_MAP_FLAGS: &str = "nfp offload.c nfp_bpf_map_alloc: map flags are not supported (the loader drops \
                                  BPF_F_MMAPABLE from the NIC's copy of a map; no other flag is dropped)";
pub const RULE_MAP_ARG: &str =
    "nfp verifier.c nfp_bpf_stack_arg_ok: map helpers take their key and value from the stack";
pub const RULE_MAP_STORE: &str =
    "nfp verifier.c nfp_bpf_check_ptr: map writes not supported (a map value changes by atomic add only)";
pub const RULE_CTX_STORE: &str = "nfp verifier.c nfp_bpf_check_store: unsupported store to context field";
pub const RULE_ATOMIC: &str =
    "nfp verifier.c nfp_bpf_check_atomic: atomic add (no fetch, no other operation), to a map value only";
pub const RULE_MUL: &str = "nfp verifier.c nfp_bpf_check_alu: multiplier and multiplicand within u32 (checked \
                            here: each operand comes from a 32-bit operation, a 32-bit or narrower load, or a \
                            non-negative constant)";
pub const RULE_DIV: &str = "nfp verifier.c nfp_bpf_check_alu: division by a constant, within u32 only (checked \
                            here: 32-bit division and modulo by a constant)";
pub const RULE_OPCODE: &str = "nfp jit.c: no translation for this instruction (BPF ISA v4 sign extension, signed \
                               division, byte swap, long jump)";
pub const RULE_STACK: &str = "nfp verifier.c nfp_bpf_finalize: stack too large for the firmware";
pub const RULE_LENGTH: &str = "nfp offload: the program is longer than the firmware takes (NFP_NET_CFG_BPF_MAX_LEN)";

const ALLOWED_HELPERS: [(u32, &str); 7] = [
    (1, "map_lookup_elem"),
    (2, "map_update_elem"),
    (3, "map_delete_elem"),
    (7, "get_prandom_u32"),
    (25, "perf_event_output"),
    (44, "xdp_adjust_head"),
    (65, "xdp_adjust_tail"),
];

/// What one program uses, and what an offload JIT would refuse in it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProgramReport {
    pub name: String,
    pub instructions: usize,
    pub stack_depth: u32,
    /// Helper id -> call sites.
    pub helpers: BTreeMap<u32, usize>,
    pub maps: Vec<MapInfo>,
    pub violations: Vec<Violation>,
}

/// Checks every program of a compiled object.
pub fn check_object(bytes: &[u8], limits: &Limits) -> Result<Vec<ProgramReport>, String> {
    let mut obj = aya_obj::Object::parse(bytes).map_err(|e| format!("parsing the object: {e}"))?;
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    // Number the maps as if they were file descriptors, so that each map
    // load says which map it loads (and whether it is a global variable's).
    let maps: Vec<(String, aya_obj::Map)> = obj.maps.iter().map(|(n, m)| (n.clone(), m.clone())).collect();
    obj.relocate_maps(maps.iter().enumerate().map(|(i, (n, m))| (n.as_str(), i as i32 + 1, m)), &text_sections)
        .map_err(|e| format!("relocating maps: {e}"))?;
    obj.relocate_calls(&text_sections).map_err(|e| format!("relocating calls: {e}"))?;
    let mut infos: Vec<MapInfo> = maps
        .iter()
        .map(|(name, m)| MapInfo {
            name: name.clone(),
            map_type: m.map_type(),
            key_size: m.key_size(),
            value_size: m.value_size(),
            max_entries: m.max_entries(),
            flags: m.map_flags(),
        })
        .collect();
    infos.sort_by(|a, b| a.name.cmp(&b.name));
    let mut reports = Vec::new();
    let mut names: Vec<&String> = obj.programs.keys().collect();
    names.sort();
    for name in names {
        let program = &obj.programs[name];
        let function = obj.functions.get(&program.function_key()).ok_or(format!("program {name} has no code"))?;
        let insns: Vec<Insn> = function.instructions.iter().map(Insn::from).collect();
        reports.push(check_program(name, &insns, &infos, limits));
    }
    Ok(reports)
}

/// Checks one program's instructions and its object's maps.
pub fn check_program(name: &str, insns: &[Insn], maps: &[MapInfo], limits: &Limits) -> ProgramReport {
    let mut violations = Vec::new();
    for m in maps {
        if m.map_type != MAP_ARRAY && m.map_type != MAP_HASH {
            violations.push(Violation {
                at: None,
                what: format!("map {} is of type {} ({})", m.name, m.map_type, map_type_name(m.map_type)),
                rule: RULE_MAP_TYPE,
            });
        }
        // The loader makes the NIC's copy of a map without BPF_F_MMAPABLE
        // (only the host's copy is mapped); any other flag would be refused.
        let flags = m.flags & !lb_common::BPF_F_MMAPABLE;
        if flags != 0 {
            violations.push(Violation {
                at: None,
                what: format!("map {} has flags {flags:#x}", m.name),
                rule: RULE_MAP_FLAGS,
            });
        }
    }
    let mut helpers = BTreeMap::new();
    let mut stack_depth = 0u32;
    for (at, i) in insns.iter().enumerate() {
        if let Some(v) = opcode_violation(at, i) {
            violations.push(v);
        }
        if i.code == CALL && i.src == 0 {
            *helpers.entry(i.imm as u32).or_insert(0) += 1;
            if !ALLOWED_HELPERS.iter().any(|(id, _)| *id == i.imm as u32) {
                violations.push(Violation { at: Some(at), what: format!("calls helper {}", i.imm), rule: RULE_HELPER });
            }
        }
        stack_depth = stack_depth.max(stack_use(insns, at));
    }
    violations.extend(pointer_violations(insns));
    if stack_depth > limits.max_stack {
        violations.push(Violation {
            at: None,
            what: format!("uses {stack_depth} stack bytes, the firmware {}", limits.max_stack),
            rule: RULE_STACK,
        });
    }
    if insns.len() > limits.max_insns {
        violations.push(Violation {
            at: None,
            what: format!("{} instructions, the firmware takes {}", insns.len(), limits.max_insns),
            rule: RULE_LENGTH,
        });
    }
    violations.sort_by_key(|v| v.at.unwrap_or(usize::MAX));
    ProgramReport {
        name: name.to_string(),
        instructions: insns.len(),
        stack_depth,
        helpers,
        maps: maps.to_vec(),
        violations,
    }
}

pub const MAP_HASH: u32 = 1;
pub const MAP_ARRAY: u32 = 2;

pub fn map_type_name(t: u32) -> &'static str {
    match t {
        1 => "hash",
        2 => "array",
        4 => "perf event array",
        5 => "per-CPU hash",
        6 => "per-CPU array",
        9 => "LRU hash",
        10 => "LRU per-CPU hash",
        12 => "array of maps",
        13 => "hash of maps",
        27 => "ring buffer",
        _ => "other",
    }
}

pub fn helper_name(id: u32) -> String {
    match ALLOWED_HELPERS.iter().find(|(h, _)| *h == id) {
        Some((_, name)) => name.to_string(),
        None => match id {
            5 => "ktime_get_ns".into(),
            6 => "trace_printk".into(),
            8 => "get_smp_processor_id".into(),
            69 => "fib_lookup".into(),
            84 => "sk_release".into(),
            99 => "skc_lookup_tcp".into(),
            100 => "tcp_check_syncookie".into(),
            130 => "ringbuf_output".into(),
            131 => "ringbuf_reserve".into(),
            132 => "ringbuf_submit".into(),
            133 => "ringbuf_discard".into(),
            other => format!("helper {other}"),
        },
    }
}

// Opcode fields (include/uapi/linux/bpf.h).
const CLASS_LD: u8 = 0x00;
const CLASS_LDX: u8 = 0x01;
const CLASS_ST: u8 = 0x02;
const CLASS_STX: u8 = 0x03;
const CLASS_ALU: u8 = 0x04;
const CLASS_JMP: u8 = 0x05;
const CLASS_JMP32: u8 = 0x06;
const CLASS_ALU64: u8 = 0x07;
const MODE_MEM: u8 = 0x60;
const MODE_MEMSX: u8 = 0x80;
const MODE_ATOMIC: u8 = 0xc0;
const OP_ADD: u8 = 0x00;
const OP_SUB: u8 = 0x10;
const OP_MUL: u8 = 0x20;
const OP_AND: u8 = 0x50;
const OP_RSH: u8 = 0x70;
const OP_DIV: u8 = 0x30;
const OP_MOD: u8 = 0x90;
const OP_MOV: u8 = 0xb0;
const OP_END: u8 = 0xd0;
const SRC_X: u8 = 0x08;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_IMM64: u8 = 0x18;
const PSEUDO_MAP_FD: u8 = 1;
const PSEUDO_MAP_VALUE: u8 = 2;
const PSEUDO_CALL: u8 = 1;

fn class(code: u8) -> u8 {
    code & 0x07
}

/// ALU rules (multiply, divide) and instructions the JIT cannot translate.
fn opcode_violation(at: usize, i: &Insn) -> Option<Violation> {
    let c = class(i.code);
    let op = i.code & 0xf0;
    let v = |what: String, rule| Some(Violation { at: Some(at), what, rule });
    if c == CLASS_ALU || c == CLASS_ALU64 {
        if op == OP_DIV || op == OP_MOD {
            if c == CLASS_ALU64 || i.code & SRC_X != 0 || i.imm <= 0 {
                return v("division or modulo that is not 32-bit by a positive constant".into(), RULE_DIV);
            }
            if i.off != 0 {
                return v("signed division".into(), RULE_OPCODE);
            }
        }
        if (op == OP_MOV && i.off != 0) || (op == OP_END && c == CLASS_ALU64) {
            return v(format!("instruction {:#04x} (ISA v4)", i.code), RULE_OPCODE);
        }
    }
    if c == CLASS_LDX && i.code & 0xe0 == MODE_MEMSX {
        return v("sign-extending load (ISA v4)".into(), RULE_OPCODE);
    }
    if c == CLASS_JMP32 && i.code & 0xf0 == 0x00 {
        return v("32-bit jump offset (ISA v4)".into(), RULE_OPCODE);
    }
    if c == CLASS_STX && i.code & 0xe0 == MODE_ATOMIC && i.imm != OP_ADD as i32 {
        return v(format!("atomic operation {:#x}", i.imm), RULE_ATOMIC);
    }
    None
}

/// Stack bytes an instruction reaches below the frame pointer (r10).
fn stack_use(insns: &[Insn], at: usize) -> u32 {
    let i = &insns[at];
    let mem = matches!(class(i.code), CLASS_LDX | CLASS_ST | CLASS_STX);
    let base = if class(i.code) == CLASS_LDX { i.src } else { i.dst };
    if mem && base == 10 && i.off < 0 {
        return (-(i.off as i32)) as u32;
    }
    // `rX = r10; rX += -N`: a pointer to the stack (a helper argument).
    if i.code == (CLASS_ALU64 | OP_ADD) && i.imm < 0 && at > 0 {
        let prev = &insns[at - 1];
        if prev.code == (CLASS_ALU64 | OP_MOV | SRC_X) && prev.src == 10 && prev.dst == i.dst {
            return (-i.imm) as u32;
        }
    }
    0
}

// What a register or stack slot may hold (bits).
const K_CTX: u8 = 1;
const K_STACK: u8 = 2;
const K_PACKET: u8 = 4;
const K_MAP_VALUE: u8 = 8;
const K_SCALAR: u8 = 16;
const K_MAP: u8 = 32;
const POINTERS: u8 = K_CTX | K_STACK | K_PACKET | K_MAP_VALUE | K_MAP;

#[derive(Clone, PartialEq, Eq)]
struct State {
    regs: [u8; 11],
    /// 8-byte slots below r10 (spilled registers), by offset: what they
    /// may hold, and whether it fits in 32 bits.
    slots: BTreeMap<i16, (u8, bool)>,
    /// Bit r: register r holds a value that fits in 32 bits on every path.
    narrow: u16,
}

impl State {
    fn entry(r1: u8) -> Self {
        let mut regs = [K_SCALAR; 11];
        regs[1] = r1;
        regs[10] = K_STACK;
        State { regs, slots: BTreeMap::new(), narrow: 0 }
    }

    fn is_narrow(&self, r: usize) -> bool {
        self.narrow & (1 << r) != 0
    }

    fn set_narrow(&mut self, r: usize, narrow: bool) {
        if narrow {
            self.narrow |= 1 << r;
        } else {
            self.narrow &= !(1 << r);
        }
    }

    /// Widens `self` by `other`; whether anything changed.
    fn join(&mut self, other: &State) -> bool {
        let mut changed = false;
        for (a, b) in self.regs.iter_mut().zip(other.regs) {
            changed |= *a | b != *a;
            *a |= b;
        }
        for (off, (kind, narrow)) in &other.slots {
            let slot = self.slots.entry(*off).or_insert((K_SCALAR, false));
            let joined = (slot.0 | kind, slot.1 && *narrow);
            changed |= joined != *slot;
            *slot = joined;
        }
        let narrow = self.narrow & other.narrow;
        changed |= narrow != self.narrow;
        self.narrow = narrow;
        changed
    }
}

/// Follows what each register may point to through every path (a small
/// abstract interpretation: moves, pointer arithmetic, stack spills, map
/// lookups), and reports stores to map values or the context, atomics not
/// on a map value, and map helpers whose key or value is not on the stack.
fn pointer_violations(insns: &[Insn]) -> Vec<Violation> {
    let mut states: Vec<Option<State>> = vec![None; insns.len() + 1];
    let mut work = vec![0usize];
    states[0] = Some(State::entry(K_CTX));
    let mut found: BTreeMap<usize, Violation> = BTreeMap::new();
    while let Some(at) = work.pop() {
        let Some(i) = insns.get(at) else { continue };
        let mut s = states[at].clone().expect("queued with a state");
        let mut next = vec![at + 1];
        let c = class(i.code);
        let (dst, src) = (i.dst as usize % 11, i.src as usize % 11);
        let report = |found: &mut BTreeMap<usize, Violation>, what: &str, rule| {
            found.entry(at).or_insert(Violation { at: Some(at), what: what.into(), rule });
        };
        match c {
            CLASS_ALU | CLASS_ALU64 => {
                let op = i.code & 0xf0;
                let from_src = if i.code & SRC_X != 0 { s.regs[src] } else { K_SCALAR };
                let src_narrow = if i.code & SRC_X != 0 { s.is_narrow(src) } else { i.imm >= 0 };
                if op == OP_MUL && c == CLASS_ALU64 && !(s.is_narrow(dst) && src_narrow) {
                    report(&mut found, "64-bit multiply of an operand that may exceed 32 bits", RULE_MUL);
                }
                // What fits in 32 bits afterwards: any 32-bit result (zero
                // extended), a move of a narrow value, a right shift by 32
                // or more, a mask by a non-negative constant, a product of
                // two narrow values shifted right by 32.
                let narrow = c == CLASS_ALU
                    || match op {
                        OP_MOV => src_narrow,
                        OP_RSH => i.code & SRC_X == 0 && i.imm >= 32 || s.is_narrow(dst),
                        OP_AND => i.code & SRC_X == 0 && i.imm >= 0 || s.is_narrow(dst) || src_narrow,
                        _ => false,
                    };
                s.set_narrow(dst, narrow);
                s.regs[dst] = match op {
                    OP_MOV if c == CLASS_ALU64 => from_src,
                    OP_ADD | OP_SUB if c == CLASS_ALU64 && (s.regs[dst] | from_src) & POINTERS != 0 => {
                        (s.regs[dst] | from_src) & POINTERS
                    }
                    _ => K_SCALAR,
                };
            }
            CLASS_LD if i.code == LD_IMM64 => {
                s.set_narrow(dst, false);
                s.regs[dst] = match i.src {
                    PSEUDO_MAP_FD => K_MAP,
                    PSEUDO_MAP_VALUE => K_MAP_VALUE,
                    _ => K_SCALAR,
                };
                next = vec![at + 2];
            }
            CLASS_LDX => {
                let base = s.regs[src];
                let spilled = if src == 10 && i.code & 0x18 == 0x18 { s.slots.get(&i.off).copied() } else { None };
                s.set_narrow(dst, i.code & 0x18 != 0x18 || spilled.is_some_and(|(_, narrow)| narrow));
                s.regs[dst] = if let Some((kind, _)) = spilled {
                    kind
                } else if src == 10 && i.code & 0x18 == 0x18 {
                    K_SCALAR
                } else if base & K_CTX != 0 && (0..=8).contains(&i.off) {
                    // xdp_md: data, data_end, data_meta.
                    K_PACKET | K_SCALAR
                } else {
                    K_SCALAR
                };
            }
            CLASS_ST | CLASS_STX => {
                let target = s.regs[dst];
                let atomic = c == CLASS_STX && i.code & 0xe0 == MODE_ATOMIC;
                if atomic {
                    if target != K_MAP_VALUE && target != (K_MAP_VALUE | K_SCALAR) {
                        report(&mut found, "atomic add to something other than a map value", RULE_ATOMIC);
                    }
                } else if i.code & 0xe0 == MODE_MEM {
                    if target & K_MAP_VALUE != 0 {
                        report(&mut found, "store to a map value", RULE_MAP_STORE);
                    }
                    if target & K_CTX != 0 {
                        report(&mut found, "store to the context", RULE_CTX_STORE);
                    }
                    if dst == 10 {
                        let value = if c == CLASS_STX && i.code & 0x18 == 0x18 {
                            (s.regs[src], s.is_narrow(src))
                        } else {
                            (K_SCALAR, false)
                        };
                        s.slots.insert(i.off, value);
                    }
                }
            }
            CLASS_JMP | CLASS_JMP32 => {
                if i.code == EXIT {
                    next.clear();
                } else if i.code == CALL && i.src == PSEUDO_CALL {
                    // A BPF-to-BPF call: the callee starts with our r1-r5.
                    let mut callee = State::entry(K_SCALAR);
                    callee.regs[1..6].copy_from_slice(&s.regs[1..6]);
                    let target = (at as i64 + 1 + i.imm as i64) as usize;
                    enqueue(&mut states, &mut work, target, &callee);
                    s.regs[0] = K_SCALAR;
                    s.regs[1..6].fill(K_SCALAR);
                    s.narrow &= !0b11_1111;
                } else if i.code == CALL {
                    if (1..=3).contains(&i.imm) && s.regs[2] != K_STACK {
                        report(&mut found, "map helper key not on the stack", RULE_MAP_ARG);
                    }
                    if i.imm == 2 && s.regs[3] != K_STACK {
                        report(&mut found, "map_update_elem value not on the stack", RULE_MAP_ARG);
                    }
                    s.regs[0] = if i.imm == 1 { K_MAP_VALUE | K_SCALAR } else { K_SCALAR };
                    s.regs[1..6].fill(K_SCALAR);
                    s.narrow &= !0b11_1111;
                } else {
                    let target = (at as i64 + 1 + i.off as i64) as usize;
                    if i.code & 0xf0 == 0x00 {
                        next = vec![target];
                    } else {
                        next.push(target);
                    }
                }
            }
            _ => {}
        }
        for n in next {
            enqueue(&mut states, &mut work, n, &s);
        }
    }
    found.into_values().collect()
}

fn enqueue(states: &mut [Option<State>], work: &mut Vec<usize>, at: usize, s: &State) {
    let Some(slot) = states.get_mut(at) else { return };
    let changed = match slot {
        Some(existing) => existing.join(s),
        None => {
            *slot = Some(s.clone());
            true
        }
    };
    if changed {
        work.push(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn { code, dst, src, off, imm }
    }
    const EXIT_I: Insn = Insn { code: EXIT, dst: 0, src: 0, off: 0, imm: 0 };
    fn mov64_imm(dst: u8, imm: i32) -> Insn {
        insn(CLASS_ALU64 | OP_MOV, dst, 0, 0, imm)
    }
    fn mov64_reg(dst: u8, src: u8) -> Insn {
        insn(CLASS_ALU64 | OP_MOV | SRC_X, dst, src, 0, 0)
    }
    fn add64_imm(dst: u8, imm: i32) -> Insn {
        insn(CLASS_ALU64 | OP_ADD, dst, 0, 0, imm)
    }
    fn call(id: i32) -> Insn {
        insn(CALL, 0, 0, 0, id)
    }
    /// `r1 = map; r2 = r10 - 8; *(u32 *)(r10 - 8) = 0; r0 = lookup(r1, r2);
    /// if r0 == 0 goto exit`: a map value pointer in r0.
    fn lookup() -> Vec<Insn> {
        vec![
            insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, 1),
            insn(0, 0, 0, 0, 0),
            insn(CLASS_ST | MODE_MEM, 10, 0, -8, 0),
            mov64_reg(2, 10),
            add64_imm(2, -8),
            call(1),
        ]
    }
    fn array(name: &str) -> MapInfo {
        MapInfo { name: name.into(), map_type: MAP_ARRAY, key_size: 4, value_size: 8, max_entries: 1, flags: 0 }
    }
    fn rules(insns: &[Insn], maps: &[MapInfo]) -> Vec<&'static str> {
        check_program("p", insns, maps, &Limits::default()).violations.iter().map(|v| v.rule).collect()
    }

    #[test]
    fn an_offloadable_program_passes() {
        // Lookup, then an atomic add to the value, then XDP_PASS.
        let mut p = lookup();
        p.push(mov64_imm(1, 1));
        p.push(insn(CLASS_STX | MODE_ATOMIC | 0x18, 0, 1, 0, 0));
        p.extend([mov64_imm(0, 2), EXIT_I]);
        let report = check_program("p", &p, &[array("m")], &Limits::default());
        assert_eq!(report.violations, vec![]);
        assert_eq!(report.stack_depth, 8);
        assert_eq!(report.helpers, BTreeMap::from([(1, 1)]));
    }

    #[test]
    fn each_rule_can_fail() {
        let plain = |body: Vec<Insn>| {
            let mut p = lookup();
            p.extend(body);
            p.extend([mov64_imm(0, 2), EXIT_I]);
            p
        };
        let m = [array("m")];
        // A helper the JIT does not have (ktime_get_ns).
        assert_eq!(rules(&plain(vec![call(5)]), &m), [RULE_HELPER]);
        // An LRU map, a per-CPU array.
        for t in [9, 6] {
            assert_eq!(rules(&plain(vec![]), &[MapInfo { map_type: t, ..array("m") }]), [RULE_MAP_TYPE]);
        }
        // BPF_F_NO_PREALLOC (0x1) is refused; BPF_F_MMAPABLE (0x400) the loader drops.
        assert_eq!(rules(&plain(vec![]), &[MapInfo { flags: 0x1, ..array("m") }]), [RULE_MAP_FLAGS]);
        assert!(rules(&plain(vec![]), &[MapInfo { flags: 0x400, ..array("m") }]).is_empty());
        // A plain store to the looked-up value, also after a spill to the stack.
        assert_eq!(rules(&plain(vec![insn(CLASS_ST | MODE_MEM | 0x18, 0, 0, 0, 1)]), &m), [RULE_MAP_STORE]);
        let spilled = vec![
            insn(CLASS_STX | MODE_MEM | 0x18, 10, 0, -16, 0),
            insn(CLASS_LDX | MODE_MEM | 0x18, 3, 10, -16, 0),
            add64_imm(3, 4),
            insn(CLASS_ST | MODE_MEM, 3, 0, 0, 1),
        ];
        assert_eq!(rules(&plain(spilled), &m), [RULE_MAP_STORE]);
        // A store to the context (r1 at entry).
        assert_eq!(rules(&[insn(CLASS_ST | MODE_MEM, 1, 0, 0, 0), mov64_imm(0, 2), EXIT_I], &m), [RULE_CTX_STORE]);
        // Atomic fetch-add; atomic add to the stack.
        assert_eq!(rules(&plain(vec![insn(CLASS_STX | MODE_ATOMIC | 0x18, 0, 1, 0, 1)]), &m), [RULE_ATOMIC]);
        assert_eq!(rules(&plain(vec![insn(CLASS_STX | MODE_ATOMIC | 0x18, 10, 1, -8, 0)]), &m), [RULE_ATOMIC]);
        // A map lookup whose key is a map value.
        let key_from_map = vec![mov64_reg(2, 0), insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, 1), insn(0, 0, 0, 0, 0), call(1)];
        assert_eq!(rules(&plain(key_from_map), &m), [RULE_MAP_ARG]);
        // 64-bit multiply of a 64-bit value (r3 = r10 is an address), and of
        // two 32-bit ones (fine: the multiply-shift of a ring slot).
        let wide = vec![mov64_reg(3, 10), insn(CLASS_ALU64 | OP_MUL, 3, 0, 0, 3)];
        assert_eq!(rules(&plain(wide), &m), [RULE_MUL]);
        let narrow = vec![
            insn(CLASS_LDX | MODE_MEM, 3, 10, -8, 0),
            insn(CLASS_ALU | OP_MOV, 4, 0, 0, 7),
            insn(CLASS_ALU64 | OP_MUL | SRC_X, 3, 4, 0, 0),
            insn(CLASS_ALU64 | OP_RSH, 3, 0, 0, 32),
            insn(CLASS_ALU64 | OP_MUL, 3, 0, 0, 5),
        ];
        assert!(rules(&plain(narrow), &m).is_empty());
        // Division by a register; ISA v4 sign-extending move.
        assert_eq!(rules(&plain(vec![insn(CLASS_ALU | OP_DIV | SRC_X, 3, 4, 0, 0)]), &m), [RULE_DIV]);
        assert!(rules(&plain(vec![insn(CLASS_ALU | OP_MUL, 3, 0, 0, 3)]), &m).is_empty(), "32-bit multiply is fine");
        assert!(rules(&plain(vec![insn(CLASS_ALU | OP_MOD, 3, 0, 0, 7)]), &m).is_empty(), "modulo by a constant");
        assert_eq!(rules(&plain(vec![insn(CLASS_ALU64 | OP_MOV | SRC_X, 3, 4, 8, 0)]), &m), [RULE_OPCODE]);
        // Stack and length limits.
        let deep = plain(vec![insn(CLASS_ST | MODE_MEM, 10, 0, -600, 0)]);
        assert_eq!(rules(&deep, &m), [RULE_STACK]);
        let long: Vec<Insn> = plain((0..5000).map(|_| mov64_imm(3, 1)).collect());
        assert_eq!(rules(&long, &m), [RULE_LENGTH]);
    }

    #[test]
    fn a_store_on_one_branch_only_is_found() {
        // if r3 == 0 goto +1; r0 = r10 (stack) ... one path has r0 still the map value.
        let mut p = lookup();
        p.extend([
            insn(CLASS_JMP | 0x10, 3, 0, 1, 0),
            mov64_reg(0, 10),
            insn(CLASS_ST | MODE_MEM, 0, 0, -32, 1),
            mov64_imm(0, 2),
            EXIT_I,
        ]);
        assert_eq!(rules(&p, &[array("m")]), [RULE_MAP_STORE]);
    }
}

#[cfg(test)]
mod objects {
    use super::*;

    #[test]
    fn the_full_balancer_is_refused_and_says_why() {
        let reports = check_object(crate::object::BALANCER, &Limits::default()).unwrap();
        let balancer = reports.iter().find(|r| r.name == "lb_balancer").expect("the balancer program");
        // Per-CPU stats and the log ring buffer, counters written in place,
        // the 64-bit flow hash, the clock and ring-buffer helpers.
        let refused: HashSet<&str> = balancer.violations.iter().map(|v| v.rule).collect();
        for rule in [RULE_MAP_TYPE, RULE_MAP_STORE, RULE_MUL, RULE_HELPER] {
            assert!(refused.contains(rule), "{rule}");
        }
        assert!(balancer.maps.iter().any(|m| m.name == "GLOBAL_STATS" && m.map_type == 6));
        assert!(balancer.helpers.contains_key(&44), "xdp_adjust_head is counted");
    }
}
