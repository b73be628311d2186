//! Device access rules (`linux.resources.devices`) on cgroup v2.
//!
//! cgroup v2 has no `devices.allow`/`devices.deny` files: the kernel asks a
//! `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to the cgroup (attach type
//! `BPF_CGROUP_DEVICE`) each time a process in it opens or `mknod`s a device node. The program
//! gets a `struct bpf_cgroup_dev_ctx` (linux/bpf.h):
//!
//! ```text
//! offset 0  u32 access_type   low 16 bits: device type (1 block, 2 char)
//!                             high 16 bits: access (1 mknod, 2 read, 4 write)
//! offset 4  u32 major
//! offset 8  u32 minor
//! ```
//!
//! and returns 1 to allow, 0 to deny (the caller gets `EPERM`).
//!
//! Rules, as runc applies them: the spec's rules, then the default allow list every OCI
//! runtime gives ([`default_rules`]), so the defaults cannot be denied. Anything no rule allows
//! is denied. Among the rules, a later rule wins over an earlier one, **per access bit**: a
//! request for `rw` is allowed only if, for read and for write, the last rule that matches the
//! device and names that bit allows it. The program therefore walks the rules from the last
//! to the first, keeping the requested bits no rule has decided yet:
//!
//! ```text
//! undecided = request.access
//! for rule in rules, last first:
//!     if rule matches type, major, minor:
//!         deny rule:  if undecided & rule.access != 0  → return 0 (deny)
//!         allow rule: undecided &= !rule.access;  if undecided == 0 → return 1 (allow)
//! return 0
//! ```
//!
//! The program is written as raw BPF instructions ([`compile`]); no BPF toolchain or library
//! is needed, and the instruction set used is tiny (loads, AND, shift, compare-and-jump).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

use crate::Error;

/// Access bits, as in `bpf_cgroup_dev_ctx.access_type >> 16`.
pub(crate) const ACC_MKNOD: u32 = 1;
pub(crate) const ACC_READ: u32 = 2;
pub(crate) const ACC_WRITE: u32 = 4;
/// Device types, as in `bpf_cgroup_dev_ctx.access_type & 0xffff`.
pub(crate) const DEV_BLOCK: u32 = 1;
pub(crate) const DEV_CHAR: u32 = 2;

/// One device rule. `None` is a wildcard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeviceRule {
    pub allow: bool,
    /// [`DEV_BLOCK`] or [`DEV_CHAR`]; `None`: every type (`a`).
    pub kind: Option<u32>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// [`ACC_MKNOD`] | [`ACC_READ`] | [`ACC_WRITE`].
    pub access: u32,
}

impl DeviceRule {
    const fn allow_char(major: u32, minor: Option<u32>) -> Self {
        DeviceRule {
            allow: true,
            kind: Some(DEV_CHAR),
            major: Some(major),
            minor,
            access: ACC_MKNOD | ACC_READ | ACC_WRITE,
        }
    }
}

/// What every container may use whatever its spec says (runc's list): `mknod` of any node
/// (opening it is what the rules govern), /dev/null, zero, full, random, urandom, tty, ptmx and
/// the pty slaves /dev/pts/*.
pub(crate) fn default_rules() -> Vec<DeviceRule> {
    let mknod = |kind| DeviceRule {
        allow: true,
        kind: Some(kind),
        major: None,
        minor: None,
        access: ACC_MKNOD,
    };
    vec![
        mknod(DEV_CHAR),
        mknod(DEV_BLOCK),
        DeviceRule::allow_char(1, Some(3)), // null
        DeviceRule::allow_char(1, Some(5)), // zero
        DeviceRule::allow_char(1, Some(7)), // full
        DeviceRule::allow_char(1, Some(8)), // random
        DeviceRule::allow_char(1, Some(9)), // urandom
        DeviceRule::allow_char(5, Some(0)), // tty
        DeviceRule::allow_char(5, Some(2)), // ptmx
        DeviceRule::allow_char(136, None),  // pts/*
    ]
}

/// The spec's rules, checked. FIFO rules (`p`) are dropped: the device cgroup does not govern
/// FIFOs. An empty or missing access is `rwm`, a negative major or minor a wildcard (as runc).
pub(crate) fn rules_from_spec(devices: &[LinuxDeviceCgroup]) -> Result<Vec<DeviceRule>, Error> {
    let mut rules = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let bad =
            |msg: String| Error::InvalidSpec(format!("linux.resources.devices[{i}] ({d}): {msg}"));
        let kind = match d.typ().unwrap_or(LinuxDeviceType::A) {
            LinuxDeviceType::A => None,
            LinuxDeviceType::B => Some(DEV_BLOCK),
            LinuxDeviceType::C | LinuxDeviceType::U => Some(DEV_CHAR),
            LinuxDeviceType::P => continue,
        };
        let number = |v: Option<i64>, what: &str| match v {
            None => Ok(None),
            Some(n) if n < 0 => Ok(None),
            // Kept below 2^31: the program compares them as sign-extended 32-bit immediates.
            Some(n) if n <= i64::from(i32::MAX) => Ok(Some(n as u32)),
            Some(n) => Err(bad(format!("{what} {n} is out of range"))),
        };
        let major = number(d.major(), "major")?;
        let minor = number(d.minor(), "minor")?;
        let mut access = 0;
        for c in d.access().as_deref().unwrap_or("").chars() {
            access |= match c {
                'r' => ACC_READ,
                'w' => ACC_WRITE,
                'm' => ACC_MKNOD,
                other => return Err(bad(format!("access {other:?} is not one of r, w, m"))),
            };
        }
        if access == 0 {
            access = ACC_MKNOD | ACC_READ | ACC_WRITE;
        }
        rules.push(DeviceRule {
            allow: d.allow(),
            kind,
            major,
            minor,
            access,
        });
    }
    Ok(rules)
}

/// One BPF instruction (`struct bpf_insn`): opcode, destination and source registers (4 bits
/// each, destination in the low bits), a signed 16-bit offset, a signed 32-bit immediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct Insn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

// Opcodes used (linux/bpf_common.h, linux/bpf.h): class | operation | source.
/// `dst = *(u32 *)(src + off)`: BPF_LDX | BPF_MEM | BPF_W.
pub(crate) const LDX_W: u8 = 0x61;
/// `dst &= imm` (64-bit): BPF_ALU64 | BPF_AND | BPF_K.
pub(crate) const AND_K: u8 = 0x57;
/// `dst >>= imm` (64-bit, logical): BPF_ALU64 | BPF_RSH | BPF_K.
pub(crate) const RSH_K: u8 = 0x77;
/// `dst = imm`: BPF_ALU64 | BPF_MOV | BPF_K.
pub(crate) const MOV_K: u8 = 0xb7;
/// `dst = src`: BPF_ALU64 | BPF_MOV | BPF_X.
pub(crate) const MOV_X: u8 = 0xbf;
/// `goto +off`: BPF_JMP | BPF_JA.
pub(crate) const JA: u8 = 0x05;
/// `if dst != imm goto +off`: BPF_JMP | BPF_JNE | BPF_K.
pub(crate) const JNE_K: u8 = 0x55;
/// `if dst & imm goto +off`: BPF_JMP | BPF_JSET | BPF_K.
pub(crate) const JSET_K: u8 = 0x45;
/// `return r0`: BPF_JMP | BPF_EXIT.
pub(crate) const EXIT: u8 = 0x95;

// Registers. r1 holds the context pointer on entry; r0 the return value at exit.
const R0: u8 = 0;
const R1: u8 = 1;
const R_ACCESS_TYPE: u8 = 2;
const R_TYPE: u8 = 3;
const R_UNDECIDED: u8 = 4;
const R_MAJOR: u8 = 5;
const R_MINOR: u8 = 6;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

/// The program for `rules` (in spec order; see the module documentation).
pub(crate) fn compile(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut prog = vec![
        // The context fields into registers.
        insn(LDX_W, R_ACCESS_TYPE, R1, 0, 0),
        insn(LDX_W, R_MAJOR, R1, 4, 0),
        insn(LDX_W, R_MINOR, R1, 8, 0),
        // type = access_type & 0xffff; undecided = access_type >> 16.
        insn(MOV_X, R_TYPE, R_ACCESS_TYPE, 0, 0),
        insn(AND_K, R_TYPE, 0, 0, 0xffff),
        insn(MOV_X, R_UNDECIDED, R_ACCESS_TYPE, 0, 0),
        insn(RSH_K, R_UNDECIDED, 0, 0, 16),
    ];
    for rule in rules.iter().rev() {
        // Each rule is one block; a mismatch jumps to the next block. Jumps are patched once
        // the block's length is known (`NEXT` marks them).
        const NEXT: i16 = i16::MIN;
        let mut block = Vec::new();
        if let Some(kind) = rule.kind {
            block.push(insn(JNE_K, R_TYPE, 0, NEXT, kind as i32));
        }
        if let Some(major) = rule.major {
            block.push(insn(JNE_K, R_MAJOR, 0, NEXT, major as i32));
        }
        if let Some(minor) = rule.minor {
            block.push(insn(JNE_K, R_MINOR, 0, NEXT, minor as i32));
        }
        if rule.allow {
            // The rule decides its bits (allowed); allow once no requested bit is left.
            block.push(insn(AND_K, R_UNDECIDED, 0, 0, !(rule.access as i32)));
            block.push(insn(JNE_K, R_UNDECIDED, 0, NEXT, 0));
            block.push(insn(MOV_K, R0, 0, 0, 1));
        } else {
            // Deny if the rule names any bit still undecided.
            block.push(insn(JSET_K, R_UNDECIDED, 0, 1, rule.access as i32));
            block.push(insn(JA, 0, 0, NEXT, 0));
            block.push(insn(MOV_K, R0, 0, 0, 0));
        }
        block.push(insn(EXIT, 0, 0, 0, 0));
        let len = block.len();
        for (i, ins) in block.iter_mut().enumerate() {
            if ins.off == NEXT {
                // Relative to the instruction after the jump: land just past the block.
                ins.off = (len - i - 1) as i16;
            }
        }
        prog.extend(block);
    }
    // No rule allowed every requested bit: deny.
    prog.push(insn(MOV_K, R0, 0, 0, 0));
    prog.push(insn(EXIT, 0, 0, 0, 0));
    prog
}

// bpf(2) commands, program and attach types, flags (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
/// Other programs may stay attached (a parent's, or the one being replaced); all must allow.
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD (the kernel accepts a shorter
/// attribute and treats the rest as zero).
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
}

/// `union bpf_attr` for BPF_PROG_ATTACH / BPF_PROG_DETACH.
#[repr(C)]
#[derive(Default)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, initialised `repr(C)` prefix of `union bpf_attr` for `cmd`,
    // and its size is passed along; pointers inside it point to live buffers of the caller.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Loads the program; on a verifier rejection the error carries the verifier's log.
fn load(prog: &[Insn]) -> io::Result<OwnedFd> {
    let license = c"Apache-2.0";
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"microvm_dev");
    let attempt = |log: Option<&mut Vec<u8>>| {
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
            insn_cnt: prog.len() as u32,
            insns: prog.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            ..Default::default()
        };
        if let Some(log) = log {
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
        }
        bpf(BPF_PROG_LOAD, &mut attr)
    };
    match attempt(None) {
        // SAFETY: BPF_PROG_LOAD returned a new file descriptor that nothing else owns.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(e)
            if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EINVAL) =>
        {
            let mut log = vec![0u8; 64 * 1024];
            let _ = attempt(Some(&mut log));
            let end = log.iter().position(|b| *b == 0).unwrap_or(0);
            let text = String::from_utf8_lossy(&log[..end]);
            let last = text.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
            Err(io::Error::new(e.kind(), format!("{e}; verifier: {last}")))
        }
        Err(e) => Err(e),
    }
}

/// A device filter attached to a cgroup; the program fd is kept to detach it on replace.
#[derive(Debug)]
pub(crate) struct AttachedFilter {
    prog: OwnedFd,
}

/// Whether the "no bpf() in this kernel" warning was logged already.
static WARNED_NO_BPF: AtomicBool = AtomicBool::new(false);

/// Compiles `rules` + the defaults, loads the program and attaches it to `cgroup_dir`, then
/// detaches `previous` (so there is never a moment without a filter). Returns `None` when the
/// kernel has no `bpf()` (built without `CONFIG_BPF_SYSCALL`): devices are then not filtered,
/// which is logged once.
pub(crate) fn apply(
    cgroup_dir: &Path,
    spec_rules: &[DeviceRule],
    previous: Option<AttachedFilter>,
) -> Result<Option<AttachedFilter>, Error> {
    let mut rules = spec_rules.to_vec();
    rules.extend(default_rules());
    let prog = compile(&rules);
    let fd = match load(&prog) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            if !WARNED_NO_BPF.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "this kernel has no bpf() (CONFIG_BPF_SYSCALL): device rules are not enforced"
                );
            }
            return Ok(previous);
        }
        Err(e) => {
            return Err(Error::cgroup(
                cgroup_dir,
                "loading the device filter (BPF)",
                e,
            ))
        }
    };
    let dir = std::fs::File::open(cgroup_dir)
        .map_err(|e| Error::cgroup(cgroup_dir, "opening the cgroup directory", e))?;
    let mut attach = AttachAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: fd.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
    };
    bpf(BPF_PROG_ATTACH, &mut attach)
        .map_err(|e| Error::cgroup(cgroup_dir, "attaching the device filter (BPF)", e))?;
    if let Some(old) = previous {
        let mut detach = AttachAttr {
            target_fd: dir.as_raw_fd() as u32,
            attach_bpf_fd: old.prog.as_raw_fd() as u32,
            attach_type: BPF_CGROUP_DEVICE,
            attach_flags: 0,
        };
        bpf(BPF_PROG_DETACH, &mut detach).map_err(|e| {
            Error::cgroup(cgroup_dir, "detaching the previous device filter (BPF)", e)
        })?;
    }
    tracing::debug!(cgroup = %cgroup_dir.display(), rules = rules.len(), insns = prog.len(), "device filter attached");
    Ok(Some(AttachedFilter { prog: fd }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a program of the opcodes [`compile`] emits on (type, major, minor, access), as the
    /// kernel would; also checks that every jump stays inside the program.
    fn run(prog: &[Insn], kind: u32, major: u32, minor: u32, access: u32) -> u64 {
        let ctx = [(access << 16) | kind, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        for _ in 0..10_000 {
            let i = prog[pc];
            let (dst, src) = ((i.regs & 0x0f) as usize, (i.regs >> 4) as usize);
            let imm = i.imm as i64 as u64;
            let mut next = pc + 1;
            let jump = |cond: bool| {
                if cond {
                    (pc as i64 + 1 + i64::from(i.off)) as usize
                } else {
                    pc + 1
                }
            };
            match i.code {
                LDX_W => {
                    assert_eq!(src, 1, "loads only from the context");
                    r[dst] = u64::from(ctx[i.off as usize / 4]);
                }
                AND_K => r[dst] &= imm,
                RSH_K => r[dst] >>= imm,
                MOV_K => r[dst] = imm,
                MOV_X => r[dst] = r[src],
                JA => next = jump(true),
                JNE_K => next = jump(r[dst] != imm),
                JSET_K => next = jump(r[dst] & imm != 0),
                EXIT => return r[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
            assert!(next < prog.len(), "jump out of the program at {pc}");
            pc = next;
        }
        panic!("no exit");
    }

    fn rules(json: &str) -> Vec<DeviceRule> {
        let spec: Vec<LinuxDeviceCgroup> = serde_json::from_str(json).unwrap();
        let mut r = rules_from_spec(&spec).unwrap();
        r.extend(default_rules());
        r
    }

    const RW: u32 = ACC_READ | ACC_WRITE;

    #[test]
    fn defaults_allow_the_standard_devices_only() {
        let p = compile(&rules(r#"[{"allow": false, "access": "rwm"}]"#));
        for (major, minor) in [
            (1, 3),
            (1, 5),
            (1, 7),
            (1, 8),
            (1, 9),
            (5, 0),
            (5, 2),
            (136, 7),
        ] {
            assert_eq!(run(&p, DEV_CHAR, major, minor, RW), 1, "c {major}:{minor}");
        }
        assert_eq!(run(&p, DEV_CHAR, 10, 237, ACC_READ), 0, "loop-control");
        assert_eq!(run(&p, DEV_BLOCK, 1, 3, ACC_READ), 0, "a block device 1:3");
        assert_eq!(run(&p, DEV_BLOCK, 254, 0, ACC_WRITE), 0, "vda");
        // mknod of anything is fine; opening it is what counts.
        assert_eq!(run(&p, DEV_CHAR, 10, 237, ACC_MKNOD), 1);
        assert_eq!(run(&p, DEV_BLOCK, 254, 0, ACC_MKNOD), 1);
        assert_eq!(run(&p, DEV_CHAR, 10, 237, ACC_MKNOD | ACC_READ), 0);
        // No spec rules at all: the same.
        let p = compile(&rules("[]"));
        assert_eq!(run(&p, DEV_CHAR, 1, 3, RW), 1);
        assert_eq!(run(&p, DEV_CHAR, 1, 11, ACC_WRITE), 0);
    }

    #[test]
    fn later_rules_win_per_access_bit() {
        // Allow kmsg for writing only.
        let p = compile(&rules(
            r#"[{"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 1, "minor": 11, "access": "w"}]"#,
        ));
        assert_eq!(run(&p, DEV_CHAR, 1, 11, ACC_WRITE), 1);
        assert_eq!(run(&p, DEV_CHAR, 1, 11, ACC_READ), 0);
        assert_eq!(run(&p, DEV_CHAR, 1, 11, RW), 0);
        assert_eq!(run(&p, DEV_CHAR, 1, 12, ACC_WRITE), 0);
        // Read and write allowed by two separate rules: rw is allowed.
        let p = compile(&rules(
            r#"[{"allow": false, "access": "rwm"},
                {"allow": true, "type": "c", "major": 10, "minor": 200, "access": "r"},
                {"allow": true, "type": "c", "major": 10, "minor": 200, "access": "w"}]"#,
        ));
        assert_eq!(run(&p, DEV_CHAR, 10, 200, RW), 1);
        // A later deny of one bit overrides an earlier allow of it, not of the other bit.
        let p = compile(&rules(
            r#"[{"allow": true, "type": "b", "access": "rwm"},
                {"allow": false, "type": "b", "major": 7, "access": "w"}]"#,
        ));
        assert_eq!(run(&p, DEV_BLOCK, 7, 1, ACC_READ), 1);
        assert_eq!(run(&p, DEV_BLOCK, 7, 1, ACC_WRITE), 0);
        assert_eq!(run(&p, DEV_BLOCK, 7, 1, RW), 0);
        assert_eq!(run(&p, DEV_BLOCK, 8, 0, RW), 1, "other majors stay allowed");
        assert_eq!(
            run(&p, DEV_CHAR, 7, 1, ACC_READ),
            0,
            "a block rule is not a char rule"
        );
        // Allow everything ("a", wildcards): the defaults do not narrow it.
        let p = compile(&rules(r#"[{"allow": true, "access": "rwm"}]"#));
        assert_eq!(run(&p, DEV_BLOCK, 254, 0, RW | ACC_MKNOD), 1);
        // The defaults come last: a spec cannot deny /dev/null (as with runc).
        let p = compile(&rules(
            r#"[{"allow": false, "type": "c", "major": 1, "minor": 3, "access": "rwm"}]"#,
        ));
        assert_eq!(run(&p, DEV_CHAR, 1, 3, RW), 1);
    }

    #[test]
    fn spec_rules_are_checked() {
        let parse = |json: &str| {
            rules_from_spec(&serde_json::from_str::<Vec<LinuxDeviceCgroup>>(json).unwrap())
        };
        let r = parse(r#"[{"allow": true, "type": "c", "major": -1, "minor": -1}]"#).unwrap();
        assert_eq!(
            r,
            vec![DeviceRule {
                allow: true,
                kind: Some(DEV_CHAR),
                major: None,
                minor: None,
                access: ACC_MKNOD | ACC_READ | ACC_WRITE,
            }]
        );
        assert!(parse(r#"[{"allow": true, "type": "p", "access": "rw"}]"#)
            .unwrap()
            .is_empty());
        assert!(matches!(
            parse(r#"[{"allow": true, "access": "rx"}]"#),
            Err(Error::InvalidSpec(_))
        ));
        assert!(matches!(
            parse(r#"[{"allow": true, "major": 4294967296}]"#),
            Err(Error::InvalidSpec(_))
        ));
    }

    #[test]
    fn instructions_are_encoded_as_the_kernel_reads_them() {
        assert_eq!(std::mem::size_of::<Insn>(), 8);
        let i = insn(LDX_W, R_MAJOR, R1, 4, 0);
        assert_eq!(i.regs, 0x15, "src in the high nibble, dst in the low one");
        assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 64);
    }
}
