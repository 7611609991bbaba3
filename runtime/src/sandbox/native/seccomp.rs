//! The native sandbox's seccomp policy, compiled once with `seccompiler`.
//!
//! The policy is a deny list on top of an allow-by-default filter (the program is an
//! arbitrary Linux binary, so an allow list would break ordinary tools). It is installed as
//! three stacked filters, because seccompiler gives one filter one match action:
//!
//! 1. **ABI guard** (hand-assembled, five instructions): any architecture other than x86_64
//!    kills the process, and x32 system calls (`nr | 0x4000_0000`, which would dodge a deny
//!    list keyed on x86_64 numbers) fail with `ENOSYS`.
//! 2. **Deny list** → `EPERM`: mounting, `pivot_root`, `ptrace` and cross-process memory
//!    access, `kexec_*`, `bpf`, module loading, the keyring, `reboot`, namespace escapes
//!    (`unshare`, `setns`, and `clone` with any `CLONE_NEW*` flag), `perf_event_open`,
//!    `userfaultfd`, `open_by_handle_at`, swap, `acct`, `syslog`, clock setting, `io_uring`,
//!    port I/O, quota, `fanotify`, `kcmp`, `pidfd_getfd`.
//! 3. **`clone3` → `ENOSYS`**: its flags live in memory a filter cannot read, so it is refused
//!    as "not implemented", which makes libc fall back to `clone`, where rule 2 applies.
//!
//! The kernel runs every stacked filter and takes the most severe verdict, so the order of
//! installation does not matter.

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use crate::sandbox::SandboxError;

/// `AUDIT_ARCH_X86_64`.
pub const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
/// The bit that marks an x32 system call number.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// `CLONE_NEW*` flags (and `CLONE_NEWTIME`, which only `clone3`/`unshare` honour).
pub const NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// System calls refused outright with `EPERM`, with the reason each is dangerous.
pub const DENIED: &[(i64, &str)] = &[
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_pivot_root, "pivot_root"),
    (libc::SYS_move_mount, "move_mount"),
    (libc::SYS_open_tree, "open_tree"),
    (libc::SYS_fsopen, "fsopen"),
    (libc::SYS_fsconfig, "fsconfig"),
    (libc::SYS_fsmount, "fsmount"),
    (libc::SYS_fspick, "fspick"),
    (libc::SYS_mount_setattr, "mount_setattr"),
    (libc::SYS_chroot, "chroot"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_process_madvise, "process_madvise"),
    (libc::SYS_pidfd_getfd, "pidfd_getfd"),
    (libc::SYS_kcmp, "kcmp"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_kexec_file_load, "kexec_file_load"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_request_key, "request_key"),
    (libc::SYS_reboot, "reboot"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at"),
    (libc::SYS_name_to_handle_at, "name_to_handle_at"),
    (libc::SYS_swapon, "swapon"),
    (libc::SYS_swapoff, "swapoff"),
    (libc::SYS_acct, "acct"),
    (libc::SYS_syslog, "syslog"),
    (libc::SYS_settimeofday, "settimeofday"),
    (libc::SYS_clock_settime, "clock_settime"),
    (libc::SYS_clock_adjtime, "clock_adjtime"),
    (libc::SYS_adjtimex, "adjtimex"),
    (libc::SYS_iopl, "iopl"),
    (libc::SYS_ioperm, "ioperm"),
    (libc::SYS_quotactl, "quotactl"),
    (libc::SYS_quotactl_fd, "quotactl_fd"),
    (libc::SYS_lookup_dcookie, "lookup_dcookie"),
    (libc::SYS_vhangup, "vhangup"),
    (libc::SYS_uselib, "uselib"),
    (libc::SYS_personality, "personality"),
    (libc::SYS_fanotify_init, "fanotify_init"),
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_io_uring_enter, "io_uring_enter"),
    (libc::SYS_io_uring_register, "io_uring_register"),
    (libc::SYS_mbind, "mbind"),
    (libc::SYS_migrate_pages, "migrate_pages"),
    (libc::SYS_move_pages, "move_pages"),
    (libc::SYS_set_mempolicy, "set_mempolicy"),
    (libc::SYS_nfsservctl, "nfsservctl"),
];

/// The compiled filters, ready for `prctl(PR_SET_SECCOMP)` in a cloned child.
#[derive(Clone, Debug)]
pub struct SeccompPrograms {
    /// Architecture / x32 guard.
    pub guard: BpfProgram,
    /// The deny list (EPERM).
    pub deny: BpfProgram,
    /// `clone3` → ENOSYS.
    pub clone3: BpfProgram,
}

impl SeccompPrograms {
    /// The three programs in installation order.
    pub fn all(&self) -> [&BpfProgram; 3] {
        [&self.guard, &self.deny, &self.clone3]
    }
}

fn err(e: impl std::fmt::Display) -> SandboxError {
    SandboxError::op("seccomp compile", e)
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// `BPF_LD | BPF_W | BPF_ABS`.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;

/// The ABI guard: wrong architecture → kill, x32 → ENOSYS, else allow.
pub fn abi_guard() -> BpfProgram {
    vec![
        stmt(BPF_LD_W_ABS, 4), // arch
        jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, 0), // nr
        jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// The deny-list rules, keyed by syscall number (empty rule list = unconditional).
pub fn deny_rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, _) in DENIED {
        rules.insert(*nr, Vec::new());
    }
    // clone(flags, ...): refuse when any namespace flag is set — one rule per flag, any
    // matching rule triggers the action.
    let mut clone_rules = Vec::new();
    for flag in NAMESPACE_FLAGS {
        let cond = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )
        .map_err(err)?;
        clone_rules.push(SeccompRule::new(vec![cond]).map_err(err)?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    Ok(rules)
}

/// Compiles the three programs.
pub fn compile() -> Result<SeccompPrograms, SandboxError> {
    let deny = SeccompFilter::new(
        deny_rules()?,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(err)?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(err)?;
    Ok(SeccompPrograms {
        guard: abi_guard(),
        deny: BpfProgram::try_from(deny).map_err(err)?,
        clone3: BpfProgram::try_from(clone3).map_err(err)?,
    })
}

/// A classic-BPF interpreter for the instructions seccomp filters use, so the compiled
/// policy can be checked without installing it. Returns the filter's verdict for
/// (`arch`, `nr`, `args`).
pub fn evaluate(prog: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> Option<u32> {
    // struct seccomp_data { int nr; u32 arch; u64 ip; u64 args[6]; }
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_ne_bytes());
    data[4..8].copy_from_slice(&arch.to_ne_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
    }
    let (mut acc, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
    let mut pc = 0usize;
    while pc < prog.len() {
        let ins = &prog[pc];
        let class = ins.code & 0x07;
        match class {
            0x00 => {
                // LD
                match ins.code & 0xe0 {
                    0x20 => {
                        let off = ins.k as usize;
                        let b = data.get(off..off + 4)?;
                        acc = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                    }
                    0x00 => acc = ins.k,
                    0x60 => acc = *mem.get(ins.k as usize)?,
                    _ => return None,
                }
            }
            0x01 => match ins.code & 0xe0 {
                // LDX
                0x00 => x = ins.k,
                0x60 => x = *mem.get(ins.k as usize)?,
                _ => return None,
            },
            0x02 => *mem.get_mut(ins.k as usize)? = acc,
            0x03 => *mem.get_mut(ins.k as usize)? = x,
            0x04 => {
                let operand = if ins.code & 0x08 != 0 { x } else { ins.k };
                acc = match ins.code & 0xf0 {
                    0x00 => acc.wrapping_add(operand),
                    0x10 => acc.wrapping_sub(operand),
                    0x20 => acc.wrapping_mul(operand),
                    0x40 => acc | operand,
                    0x50 => acc & operand,
                    0x60 => acc.wrapping_shl(operand),
                    0x70 => acc.wrapping_shr(operand),
                    0x80 => acc.wrapping_neg(),
                    0xa0 => acc ^ operand,
                    _ => return None,
                };
            }
            0x05 => {
                let operand = if ins.code & 0x08 != 0 { x } else { ins.k };
                let op = ins.code & 0xf0;
                if op == 0x00 {
                    pc += ins.k as usize + 1;
                    continue;
                }
                let taken = match op {
                    0x10 => acc == operand,
                    0x20 => acc > operand,
                    0x30 => acc >= operand,
                    0x40 => acc & operand != 0,
                    _ => return None,
                };
                pc += 1 + if taken { ins.jt } else { ins.jf } as usize;
                continue;
            }
            0x06 => {
                return Some(if ins.code & 0x18 == 0x10 { acc } else { ins.k });
            }
            0x07 => {
                if ins.code & 0xf8 == 0x00 {
                    x = acc;
                } else {
                    acc = x;
                }
            }
            _ => return None,
        }
        pc += 1;
    }
    None
}

/// The verdict of all stacked programs: the most severe action wins (lowest action value;
/// seccomp's `SECCOMP_RET_ACTION_FULL` ordering).
pub fn evaluate_all(progs: &SeccompPrograms, arch: u32, nr: u32, args: [u64; 6]) -> Option<u32> {
    let mut verdict: Option<u32> = None;
    for p in progs.all() {
        let v = evaluate(p, arch, nr, args)?;
        verdict = Some(match verdict {
            None => v,
            Some(cur) => {
                let rank = |r: u32| (r & 0xffff_0000) as i32; // signed: KILL_PROCESS < 0
                if rank(v) < rank(cur) {
                    v
                } else {
                    cur
                }
            }
        });
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;

    fn verdict(nr: i64, args: [u64; 6]) -> u32 {
        let p = compile().expect("compile");
        evaluate_all(&p, AUDIT_ARCH_X86_64, nr as u32, args).expect("verdict")
    }

    #[test]
    fn required_syscalls_are_denied_with_eperm() {
        for nr in [
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_ptrace,
            libc::SYS_kexec_load,
            libc::SYS_kexec_file_load,
            libc::SYS_bpf,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_delete_module,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_reboot,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_perf_event_open,
            libc::SYS_userfaultfd,
            libc::SYS_open_by_handle_at,
            libc::SYS_swapon,
            libc::SYS_swapoff,
            libc::SYS_acct,
            libc::SYS_syslog,
            libc::SYS_io_uring_setup,
        ] {
            assert_eq!(verdict(nr, [0; 6]), EPERM, "syscall {nr}");
        }
    }

    #[test]
    fn ordinary_syscalls_are_allowed() {
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_wait4,
            libc::SYS_exit_group,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_mmap,
        ] {
            assert_eq!(verdict(nr, [0; 6]), ALLOW, "syscall {nr}");
        }
    }

    #[test]
    fn clone_with_namespace_flags_is_denied_but_fork_and_threads_work() {
        let fork = libc::SIGCHLD as u64;
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        assert_eq!(verdict(libc::SYS_clone, [fork, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(verdict(libc::SYS_clone, [thread, 0, 0, 0, 0, 0]), ALLOW);
        for flag in NAMESPACE_FLAGS {
            assert_eq!(
                verdict(libc::SYS_clone, [fork | flag, 0, 0, 0, 0, 0]),
                EPERM,
                "flag {flag:#x}"
            );
        }
    }

    #[test]
    fn clone3_is_enosys_so_libc_falls_back() {
        assert_eq!(verdict(libc::SYS_clone3, [0; 6]), ENOSYS);
    }

    #[test]
    fn x32_and_foreign_architectures_cannot_dodge_the_list() {
        let p = compile().expect("compile");
        let x32_mount = X32_SYSCALL_BIT | libc::SYS_mount as u32;
        assert_eq!(
            evaluate_all(&p, AUDIT_ARCH_X86_64, x32_mount, [0; 6]),
            Some(ENOSYS)
        );
        const AUDIT_ARCH_I386: u32 = 3 | 0x4000_0000;
        assert_eq!(
            evaluate_all(&p, AUDIT_ARCH_I386, 1, [0; 6]),
            Some(libc::SECCOMP_RET_KILL_PROCESS)
        );
    }

    #[test]
    fn every_denied_entry_is_unique() {
        let mut seen = std::collections::HashSet::new();
        for (nr, name) in DENIED {
            assert!(seen.insert(nr), "{name} listed twice");
        }
    }
}
