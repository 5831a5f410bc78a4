//! The seccomp filter every builder runs under, as in Nix's sandbox: a builder may not set the
//! setuid or setgid bit on any file (`chmod`, `fchmod`, `fchmodat`, `fchmodat2` fail with `EPERM`),
//! so nothing it makes can run with its owner's privileges while the build lasts; nor set extended
//! attributes (the `setxattr` family fails with `ENOTSUP`: a NAR cannot carry them).
//!
//! The program is written here instruction by instruction rather than with seccompiler's rule
//! builder, because that one kills every process of another architecture, and i686 builders on
//! x86_64 hosts (arm on aarch64) must run: each architecture the kernel may report gets the
//! system call numbers of its own ABI. seccompiler installs it (after `PR_SET_NO_NEW_PRIVS`).

use seccompiler::sock_filter;

// BPF opcodes (linux/bpf_common.h): class | size | mode, or class | operation | source.
/// BPF_LD | BPF_W | BPF_ABS
const LD_W_ABS: u16 = 0x20;
/// BPF_ALU | BPF_AND | BPF_K
const ALU_AND_K: u16 = 0x54;
/// BPF_JMP | BPF_JEQ | BPF_K
const JMP_JEQ_K: u16 = 0x15;
/// BPF_JMP | BPF_JSET | BPF_K
const JMP_JSET_K: u16 = 0x45;
/// BPF_RET | BPF_K
const RET_K: u16 = 0x06;

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const EPERM: u32 = 1;
const ENOTSUP: u32 = 95;

const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;

// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
/// The low 32 bits of argument `i` (the mode is a 32-bit `mode_t`).
const fn arg(i: u32) -> u32 {
    if cfg!(target_endian = "little") { 16 + 8 * i } else { 16 + 8 * i + 4 }
}

/// One ABI: its `AUDIT_ARCH_*`, a mask for the system call number (x32 calls carry bit 30 on
/// x86_64), the mode-setting calls with the index of their mode argument, and the xattr setters.
struct Abi {
    arch: u32,
    nr_mask: u32,
    chmods: &'static [(u32, u32)],
    setxattrs: &'static [u32],
}

const ABIS: &[Abi] = &[
    // x86_64 (and x32): chmod, fchmod, fchmodat, fchmodat2; setxattr, lsetxattr, fsetxattr, setxattrat.
    Abi {
        arch: 0xc000_003e,
        nr_mask: !0x4000_0000,
        chmods: &[(90, 1), (91, 1), (268, 2), (452, 2)],
        setxattrs: &[188, 189, 190, 463],
    },
    // i386
    Abi {
        arch: 0x4000_0003,
        nr_mask: !0,
        chmods: &[(15, 1), (94, 1), (306, 2), (452, 2)],
        setxattrs: &[226, 227, 228, 463],
    },
    // aarch64 (no chmod)
    Abi { arch: 0xc000_00b7, nr_mask: !0, chmods: &[(52, 1), (53, 2), (452, 2)], setxattrs: &[5, 6, 7, 463] },
    // arm
    Abi {
        arch: 0x4000_0028,
        nr_mask: !0,
        chmods: &[(15, 1), (94, 1), (333, 2), (452, 2)],
        setxattrs: &[226, 227, 228, 463],
    },
];

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The filter's BPF program.
pub fn program() -> Vec<sock_filter> {
    let mut program = Vec::new();
    for abi in ABIS {
        let load_nr = |block: &mut Vec<sock_filter>| {
            block.push(stmt(LD_W_ABS, NR));
            if abi.nr_mask != !0 {
                block.push(stmt(ALU_AND_K, abi.nr_mask));
            }
        };
        let mut block = Vec::new();
        for &(nr, mode) in abi.chmods {
            load_nr(&mut block);
            block.push(jump(JMP_JEQ_K, nr, 0, 3));
            block.push(stmt(LD_W_ABS, arg(mode)));
            block.push(jump(JMP_JSET_K, S_ISUID | S_ISGID, 0, 1));
            block.push(stmt(RET_K, RET_ERRNO | EPERM));
        }
        for &nr in abi.setxattrs {
            load_nr(&mut block);
            block.push(jump(JMP_JEQ_K, nr, 0, 1));
            block.push(stmt(RET_K, RET_ERRNO | ENOTSUP));
        }
        block.push(stmt(RET_K, RET_ALLOW));
        program.push(stmt(LD_W_ABS, ARCH));
        // Another architecture skips this one's block; the block is far shorter than 256.
        program.push(jump(JMP_JEQ_K, abi.arch, 0, u8::try_from(block.len()).unwrap_or(u8::MAX)));
        program.extend(block);
    }
    program.push(stmt(RET_K, RET_ALLOW));
    program
}

/// Put the calling thread, and every process it starts from now on, under the filter.
pub fn apply() -> std::io::Result<()> {
    seccompiler::apply_filter(&program())
        .map_err(|e| std::io::Error::other(format!("installing the seccomp filter: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program_and_every_path_returns() {
        let p = program();
        assert!(p.len() < 4096, "BPF_MAXINSNS");
        for (i, ins) in p.iter().enumerate() {
            if ins.code & 0x07 == 0x05 {
                assert!(i + 1 + usize::from(ins.jt.max(ins.jf)) < p.len(), "jump at {i} leaves the program");
            }
        }
        assert_eq!(p.last().map(|i| (i.code, i.k)), Some((RET_K, RET_ALLOW)));
    }
}
