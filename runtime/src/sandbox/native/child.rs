//! What runs between `clone` and `exec`: the sandbox's PID 1 (the *reaper*), the program
//! child it forks, and the `exec` helper that joins a running sandbox.
//!
//! The runtime is a multi-threaded process, so a cloned child may only make
//! async-signal-safe calls: no allocation, no locks, no panics. Everything here therefore
//! works on data prepared by the parent ([`ReaperArgs`], [`ExecArgs`]: C strings, pointer
//! arrays, the compiled seccomp programs, the Landlock ruleset fd) and makes raw system
//! calls. Failures are reported to the parent as fixed-size [`Report`] records on a pipe
//! (a stage number and `errno`), which the parent turns into error messages.
//!
//! # The reaper (PID 1 of the sandbox's PID namespace)
//! It is cloned by [`clone3_fork`] with the new namespaces (or into a pooled network
//! namespace), already inside the sandbox's cgroups. It
//! 1. moves its pipes to fixed descriptors, closes every other inherited descriptor, resets
//!    signal dispositions, arms the *lifeline* (SIGIO when the runtime's end of a pipe
//!    closes → exit), becomes non-dumpable and scrubs its command line (its memory is a
//!    copy of the runtime's), and empties its capability bounding set;
//! 2. replays the mount plan (binds, `/proc`, `pivot_root`, read-only root), sets the
//!    hostname, brings `lo` up, enters a fresh cgroup namespace, and sets
//!    `no_new_privs` and the seccomp filters — all while the parent writes the uid/gid maps
//!    and plumbs the network;
//! 3. waits on the sync pipe for the parent's go;
//! 4. starts the program child vfork-style (`CLONE_VM | CLONE_VFORK` on a stack prepared by
//!    the parent: no page-table copy). The child inherits the default dispositions, the
//!    empty bounding set, `no_new_privs` and the filters; it raises its `oom_score_adj` (so
//!    the kernel's OOM killer prefers it over the reaper, whose memory map is a copy of the
//!    runtime's), applies the rest of the confinement and `execve`s the program;
//! 5. reports STARTED, confines itself too, forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/
//!    SIGUSR2/SIGWINCH/SIGCONT to the program, reaps every orphan, and when the program
//!    ends reports its wait status and exits — which makes the kernel kill whatever else is
//!    left in the namespace.
//!
//! # Confinement
//! rlimits → empty bounding set → clear ambient → `setgroups([])` → `setresgid` /
//! `setresuid` to the sandbox user → `capset` all-zero (effective, permitted, inheritable)
//! → `PR_SET_NO_NEW_PRIVS` → Landlock `restrict_self` → the three seccomp filters. The
//! program child inherits the bounding set, `no_new_privs` and the filters from the reaper
//! and applies the rest itself; an `exec` command applies all of it.

use std::sync::atomic::{AtomicI32, Ordering};

use libc::{c_char, c_int, c_long, c_ulong, c_void};

/// Child-side descriptor of the program's stdin (read end).
pub const FD_STDIN: c_int = 0;
/// Child-side descriptor of the program's stdout (write end).
pub const FD_STDOUT: c_int = 1;
/// Child-side descriptor of the program's stderr (write end).
pub const FD_STDERR: c_int = 2;
/// Reaper: the sync pipe's read end.
pub const FD_SYNC: c_int = 3;
/// Reaper: the report pipe's write end.
pub const FD_REPORT: c_int = 4;
/// Reaper: the Landlock ruleset.
pub const FD_LANDLOCK: c_int = 5;
/// Reaper: the lifeline pipe's read end (EOF = the runtime is gone).
pub const FD_LIFELINE: c_int = 6;
/// Exec helper: the report pipe's write end.
pub const EXEC_FD_REPORT: c_int = 3;
/// Exec helper: the Landlock ruleset.
pub const EXEC_FD_LANDLOCK: c_int = 4;
/// Exec helper: first namespace descriptor.
pub const EXEC_FD_NS: c_int = 5;

/// Most descriptors a child receives.
pub const MAX_FDS: usize = 16;
/// Most rlimits applied.
pub const MAX_RLIMITS: usize = 8;
/// Most namespaces joined by the exec helper.
pub const MAX_NS: usize = 8;

/// Record kinds on the report pipe.
pub mod kind {
    /// A setup step failed: `a` = stage, `b` = errno.
    pub const SETUP_ERROR: u32 = 1;
    /// `execve` failed: `a` = errno.
    pub const EXEC_ERROR: u32 = 2;
    /// The program was exec'd: `a` = its pid (in the sandbox for the main program, on the
    /// host for `exec`).
    pub const STARTED: u32 = 3;
    /// The program ended: `a` = raw wait status.
    pub const EXITED: u32 = 4;
    /// A timing mark (only when requested): `a` = mark, `b` = CLOCK_MONOTONIC in µs
    /// (wrapping at 2^31).
    pub const TIMING: u32 = 5;
}

/// Timing marks reported when [`ReaperArgs::timing`] is set.
pub mod mark {
    /// Descriptors arranged, waiting for the parent.
    pub const READY: i32 = 1;
    /// The parent's go arrived.
    pub const GO: i32 = 2;
    /// Mount plan done (after pivot_root).
    pub const MOUNTED: i32 = 3;
    /// Hostname, loopback, cgroup namespace done; about to fork the program.
    pub const FORKING: i32 = 4;
    /// The program child is confined and about to execve.
    pub const EXECVE: i32 = 5;
    /// The reaper saw the exec succeed.
    pub const EXECED: i32 = 6;

    /// A name for a mark.
    pub fn name(m: i32) -> &'static str {
        match m {
            READY => "child ready",
            GO => "go received",
            MOUNTED => "mounts done",
            FORKING => "forking program",
            EXECVE => "program confined, execve",
            EXECED => "exec confirmed",
            _ => "?",
        }
    }
}

/// CLOCK_MONOTONIC in µs, wrapped to 31 bits (for [`kind::TIMING`]).
pub fn monotonic_us() -> i32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into `ts`; it is async-signal-safe.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ((ts.tv_sec * 1_000_000 + ts.tv_nsec / 1000) & 0x7fff_ffff) as i32
}

/// Setup stages named in [`kind::SETUP_ERROR`] records. Mount steps are `MOUNT_BASE + i`.
pub mod stage {
    /// Moving descriptors.
    pub const FDS: i32 = 1;
    /// Waiting for the parent.
    pub const SYNC: i32 = 2;
    /// `sethostname`.
    pub const HOSTNAME: i32 = 3;
    /// Bringing `lo` up.
    pub const LOOPBACK: i32 = 4;
    /// `unshare(CLONE_NEWCGROUP)`.
    pub const CGROUP_NS: i32 = 5;
    /// Opening `/dev/null`.
    pub const DEVNULL: i32 = 6;
    /// `fork`.
    pub const FORK: i32 = 7;
    /// `pipe2`.
    pub const PIPE: i32 = 8;
    /// `setsid`.
    pub const SETSID: i32 = 9;
    /// `oom_score_adj`.
    pub const OOM_ADJ: i32 = 10;
    /// `prlimit`.
    pub const RLIMIT: i32 = 11;
    /// `PR_CAPBSET_DROP`.
    pub const CAPBSET: i32 = 12;
    /// `PR_CAP_AMBIENT_CLEAR_ALL`.
    pub const AMBIENT: i32 = 13;
    /// `setgroups`.
    pub const SETGROUPS: i32 = 14;
    /// `setresgid`.
    pub const SETGID: i32 = 15;
    /// `setresuid`.
    pub const SETUID: i32 = 16;
    /// `capset`.
    pub const CAPSET: i32 = 17;
    /// `PR_SET_NO_NEW_PRIVS`.
    pub const NO_NEW_PRIVS: i32 = 18;
    /// `landlock_restrict_self`.
    pub const LANDLOCK: i32 = 19;
    /// Installing seccomp filters.
    pub const SECCOMP: i32 = 20;
    /// `chdir` to the working directory.
    pub const CHDIR: i32 = 21;
    /// Joining the cgroups (exec).
    pub const CGROUP_JOIN: i32 = 22;
    /// `setns` (exec); `b` carries errno, the namespace index is added: `SETNS + i`.
    pub const SETNS: i32 = 30;
    /// `PR_SET_PDEATHSIG`.
    pub const PDEATHSIG: i32 = 23;
    /// First mount step.
    pub const MOUNT_BASE: i32 = 1000;
}

/// One record on the report pipe (12 bytes, written atomically).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// One of [`kind`].
    pub kind: u32,
    /// First value.
    pub a: i32,
    /// Second value.
    pub b: i32,
}

/// Size of a [`Report`] on the wire.
pub const REPORT_LEN: usize = std::mem::size_of::<Report>();

impl Report {
    /// Decodes a record.
    pub fn from_bytes(b: &[u8; REPORT_LEN]) -> Self {
        let w = |i: usize| [b[i], b[i + 1], b[i + 2], b[i + 3]];
        Report {
            kind: u32::from_ne_bytes(w(0)),
            a: i32::from_ne_bytes(w(4)),
            b: i32::from_ne_bytes(w(8)),
        }
    }
}

/// One prepared mount step (pointers into C strings owned by the parent).
#[derive(Clone, Copy, Debug)]
pub struct RawMount {
    /// Source or null.
    pub source: *const c_char,
    /// Target; for a pivot, the new root.
    pub target: *const c_char,
    /// Filesystem type or null.
    pub fstype: *const c_char,
    /// `MS_*` flags.
    pub flags: c_ulong,
    /// True for the pivot step.
    pub pivot: bool,
}

/// What every sandboxed process applies to itself before `execve`.
#[derive(Clone, Copy, Debug)]
pub struct Confine {
    /// Sandbox uid (inside the user namespace).
    pub uid: u32,
    /// Sandbox gid.
    pub gid: u32,
    /// Highest capability number (`/proc/sys/kernel/cap_last_cap`).
    pub last_cap: u32,
    /// Child-side Landlock ruleset descriptor, or -1.
    pub landlock_fd: c_int,
    /// Seccomp programs.
    pub seccomp: [libc::sock_fprog; 3],
    /// rlimits to set: (resource, limit).
    pub rlimits: [(c_int, libc::rlimit64); MAX_RLIMITS],
    /// How many `rlimits` entries are used.
    pub n_rlimits: usize,
}

/// The program to exec.
#[derive(Clone, Copy, Debug)]
pub struct Program {
    /// Null-terminated list of paths to try.
    pub candidates: *const *const c_char,
    /// Null-terminated argv.
    pub argv: *const *const c_char,
    /// Null-terminated envp.
    pub envp: *const *const c_char,
    /// Working directory.
    pub workdir: *const c_char,
    /// Value written to `/proc/self/oom_score_adj`.
    pub oom_score_adj: *const c_char,
    /// Its length.
    pub oom_score_adj_len: usize,
}

/// Everything the reaper needs.
#[derive(Clone, Copy, Debug)]
pub struct ReaperArgs {
    /// Null-terminated list of cgroup v1 `tasks` files to join (empty on v2).
    pub cgroup_tasks: *const *const c_char,
    /// (parent fd, child fd) pairs; parent fd -1 closes the child fd.
    pub fds: [(c_int, c_int); MAX_FDS],
    /// Used entries in `fds`.
    pub n_fds: usize,
    /// Mount steps.
    pub mounts: *const RawMount,
    /// Number of mount steps.
    pub n_mounts: usize,
    /// Hostname (not NUL-terminated) and its length.
    pub hostname: *const c_char,
    /// Length of `hostname`.
    pub hostname_len: usize,
    /// The program.
    pub program: Program,
    /// Confinement.
    pub confine: Confine,
    /// Report [`kind::TIMING`] marks.
    pub timing: bool,
    /// The runtime's argv area (`/proc/self/stat` arg_start..arg_end), overwritten in the
    /// reaper's copy so the sandbox's `/proc/1/cmdline` does not show the runtime's
    /// command line. Null to leave it.
    pub argv_area: *mut u8,
    /// Its length.
    pub argv_area_len: usize,
    /// A stack for the program child, which shares the reaper's memory until it execs.
    pub stack: *mut u8,
    /// Its size.
    pub stack_len: usize,
}

/// Everything the exec helper needs.
#[derive(Clone, Copy, Debug)]
pub struct ExecArgs {
    /// Null-terminated list of cgroup v1 `tasks` files to join (empty on v2).
    pub cgroup_tasks: *const *const c_char,
    /// (parent fd, child fd) pairs.
    pub fds: [(c_int, c_int); MAX_FDS],
    /// Used entries in `fds`.
    pub n_fds: usize,
    /// (child fd, CLONE_NEW* type) of each namespace to join, user namespace first.
    pub namespaces: [(c_int, c_int); MAX_NS],
    /// Used entries in `namespaces`.
    pub n_namespaces: usize,
    /// The program.
    pub program: Program,
    /// Confinement.
    pub confine: Confine,
}

/// `struct clone_args` for `clone3`.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `clone3` without a new stack (fork semantics) returning a pidfd, optionally born into a
/// cgroup v2 directory (`CLONE_INTO_CGROUP`). Returns the child's pid
/// in the parent, 0 in the child, -1 on error (errno set).
///
/// # Safety
/// In the child only async-signal-safe code may run until `execve` or `_exit`.
pub unsafe fn clone3_fork(flags: u64, pidfd: &mut c_int, cgroup_fd: Option<c_int>) -> c_long {
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    let args = CloneArgs {
        flags: flags
            | libc::CLONE_PIDFD as u64
            | if cgroup_fd.is_some() {
                CLONE_INTO_CGROUP
            } else {
                0
            },
        pidfd: pidfd as *mut c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup_fd.unwrap_or(0) as u64,
        ..Default::default()
    };
    // SAFETY: the caller upholds the fork contract; args is a valid clone_args.
    unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    }
}

// ---- async-signal-safe helpers (child side) ------------------------------------------------

unsafe fn errno() -> c_int {
    // SAFETY: __errno_location returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() }
}

unsafe fn report_to(fd: c_int, kind: u32, a: i32, b: i32) {
    let r = Report { kind, a, b };
    // SAFETY: writes REPORT_LEN bytes from a live stack value.
    unsafe {
        libc::write(fd, &r as *const Report as *const c_void, REPORT_LEN);
    }
}

unsafe fn fail_to(fd: c_int, stage: i32) -> ! {
    // SAFETY: raw syscalls only.
    unsafe {
        let e = errno();
        report_to(fd, kind::SETUP_ERROR, stage, e);
        libc::_exit(1)
    }
}

unsafe fn mark_to(fd: c_int, on: bool, m: i32) {
    if on {
        // SAFETY: raw write of a stack record.
        unsafe { report_to(fd, kind::TIMING, m, monotonic_us()) }
    }
}

/// Moves the calling (single-threaded) process into the cgroups by writing `0` to each
/// `tasks` file. Returns false on failure.
unsafe fn join_cgroups(tasks: *const *const c_char) -> bool {
    // SAFETY: open/write/close on prepared, NUL-terminated paths.
    unsafe {
        let mut i = 0;
        loop {
            let path = *tasks.add(i);
            if path.is_null() {
                return true;
            }
            let fd = libc::open(path, libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return false;
            }
            let ok = libc::write(fd, c"0".as_ptr() as *const c_void, 1) == 1;
            libc::close(fd);
            if !ok {
                return false;
            }
            i += 1;
        }
    }
}

unsafe fn fork_raw() -> c_long {
    // SAFETY: clone with only SIGCHLD is fork; the child obeys the async-signal-safe rule.
    unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as c_ulong, 0, 0, 0, 0) }
}

/// Moves descriptors into place and closes every other one. Returns false on failure.
unsafe fn arrange_fds(fds: &[(c_int, c_int)]) -> bool {
    // SAFETY: raw descriptor syscalls on values prepared by the parent.
    unsafe {
        let mut first_free: c_int = 0;
        for (_, dst) in fds {
            first_free = first_free.max(dst + 1);
        }
        let mut tmp = [-1 as c_int; MAX_FDS];
        for (i, (src, _)) in fds.iter().enumerate() {
            if *src >= 0 {
                tmp[i] = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, first_free);
                if tmp[i] < 0 {
                    return false;
                }
            }
        }
        for (i, (_, dst)) in fds.iter().enumerate() {
            if tmp[i] >= 0 {
                if libc::dup2(tmp[i], *dst) < 0 {
                    return false;
                }
            } else {
                libc::close(*dst);
            }
        }
        libc::syscall(
            libc::SYS_close_range,
            first_free as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        );
        true
    }
}

static PROGRAM_PID: AtomicI32 = AtomicI32::new(0);

const FORWARDED: [c_int; 8] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGCONT,
];

extern "C" fn forward_signal(sig: c_int) {
    let pid = PROGRAM_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

unsafe fn block_all_signals() {
    // SAFETY: sigset operations on a stack value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

unsafe fn unblock_all_signals() {
    // SAFETY: sigset operations on a stack value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// Every signal back to its default disposition (the runtime ignores SIGPIPE, for one; the
/// reaper handles SIGIO).
unsafe fn reset_signal_dispositions() {
    // SAFETY: sigaction with a zeroed (SIG_DFL) action.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigemptyset(&mut sa.sa_mask);
        for sig in 1..65 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    }
}

extern "C" fn lifeline_signal(_sig: c_int) {
    let mut b = 0u8;
    // SAFETY: a non-blocking read and _exit are async-signal-safe.
    unsafe {
        if libc::read(FD_LIFELINE, &mut b as *mut u8 as *mut c_void, 1) == 0 {
            // The runtime is gone: as PID 1, exiting takes the whole sandbox down.
            libc::_exit(137);
        }
    }
}

/// Arms the lifeline: O_ASYNC delivery of SIGIO to us when the write end closes. Returns
/// false when the runtime is already gone.
unsafe fn arm_lifeline() -> bool {
    // SAFETY: fcntl/sigaction/read on our own descriptor.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = lifeline_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGIO, &sa, std::ptr::null_mut());
        let fl = libc::fcntl(FD_LIFELINE, libc::F_GETFL);
        if fl < 0
            || libc::fcntl(FD_LIFELINE, libc::F_SETOWN, libc::getpid()) != 0
            || libc::fcntl(
                FD_LIFELINE,
                libc::F_SETFL,
                fl | libc::O_ASYNC | libc::O_NONBLOCK,
            ) != 0
        {
            return false;
        }
        // It may have closed before O_ASYNC was set.
        let mut b = 0u8;
        libc::read(FD_LIFELINE, &mut b as *mut u8 as *mut c_void, 1) != 0
    }
}

unsafe fn install_forwarders() {
    // SAFETY: installs an async-signal-safe handler.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = forward_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        for sig in FORWARDED {
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Empties the capability bounding set (needs CAP_SETPCAP in the user namespace).
unsafe fn drop_bounding_set(last_cap: u32) -> Result<(), i32> {
    // SAFETY: prctl with integer arguments.
    unsafe {
        for cap in 0..=last_cap {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as c_ulong, 0, 0, 0) != 0
                && errno() != libc::EINVAL
            {
                return Err(stage::CAPBSET);
            }
        }
        Ok(())
    }
}

/// Installs the seccomp programs (needs `no_new_privs` or CAP_SYS_ADMIN).
unsafe fn install_seccomp(c: &Confine) -> Result<(), i32> {
    // SAFETY: prctl with pointers to prepared sock_fprog structures.
    unsafe {
        for prog in &c.seccomp {
            if prog.len == 0 {
                continue;
            }
            if libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as c_ulong,
                prog as *const libc::sock_fprog as c_ulong,
                0,
                0,
            ) != 0
            {
                return Err(stage::SECCOMP);
            }
        }
        Ok(())
    }
}

/// Applies [`Confine`] to the calling process. Returns the failed stage on error.
/// `inherited`: the bounding set is already empty and the seccomp filters are already
/// installed (both inherited from the reaper).
unsafe fn confine(c: &Confine, inherited: bool) -> Result<(), i32> {
    // SAFETY: raw syscalls on prepared values.
    unsafe {
        for (res, lim) in &c.rlimits[..c.n_rlimits] {
            if libc::prlimit64(0, *res as _, lim, std::ptr::null_mut()) != 0 {
                return Err(stage::RLIMIT);
            }
        }
        if !inherited {
            drop_bounding_set(c.last_cap)?;
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return Err(stage::AMBIENT);
        }
        // Raw system calls: glibc's wrappers broadcast credential changes to every thread
        // it believes exists (signalling the parent's stale thread list), which is neither
        // needed nor async-signal-safe in a cloned child.
        if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0 {
            return Err(stage::SETGROUPS);
        }
        if libc::syscall(libc::SYS_setresgid, c.gid, c.gid, c.gid) != 0 {
            return Err(stage::SETGID);
        }
        if libc::syscall(libc::SYS_setresuid, c.uid, c.uid, c.uid) != 0 {
            return Err(stage::SETUID);
        }
        let hdr = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) != 0 {
            return Err(stage::CAPSET);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as c_ulong, 0, 0, 0) != 0 {
            return Err(stage::NO_NEW_PRIVS);
        }
        if c.landlock_fd >= 0
            && libc::syscall(libc::SYS_landlock_restrict_self, c.landlock_fd, 0_u32) != 0
        {
            return Err(stage::LANDLOCK);
        }
        if !inherited {
            install_seccomp(c)?;
        }
        Ok(())
    }
}

unsafe fn write_oom_score_adj(p: &Program) -> bool {
    // SAFETY: open/write/close on a static path.
    unsafe {
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return false;
        }
        let ok = libc::write(fd, p.oom_score_adj as *const c_void, p.oom_score_adj_len)
            == p.oom_score_adj_len as isize;
        libc::close(fd);
        ok
    }
}

/// Confines and execs the program. Returns only on failure, having reported it on
/// `report_fd`. `from_reaper`: the reaper already reset signal dispositions and emptied
/// the bounding set, which the child inherited.
unsafe fn exec_program(
    p: &Program,
    c: &Confine,
    report_fd: c_int,
    timing: bool,
    pdeathsig: bool,
    from_reaper: bool,
) {
    // SAFETY: raw syscalls on prepared values.
    unsafe {
        if !from_reaper {
            reset_signal_dispositions();
        }
        let fail = |stage: i32| {
            let e = errno();
            report_to(report_fd, kind::SETUP_ERROR, stage, e);
        };
        if libc::setsid() < 0 {
            return fail(stage::SETSID);
        }
        if !write_oom_score_adj(p) {
            return fail(stage::OOM_ADJ);
        }
        if let Err(st) = confine(c, from_reaper) {
            return fail(st);
        }
        // After the uid change (which clears it): die with the exec helper.
        if pdeathsig && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as c_ulong, 0, 0, 0) != 0
        {
            return fail(stage::PDEATHSIG);
        }
        if libc::chdir(p.workdir) != 0 {
            return fail(stage::CHDIR);
        }
        // Everything but stdio closes on exec (the report pipe included).
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        mark_to(report_fd, timing, mark::EXECVE);
        unblock_all_signals();
        let mut err = libc::ENOENT;
        let mut i = 0;
        loop {
            let cand = *p.candidates.add(i);
            if cand.is_null() {
                break;
            }
            libc::execve(cand, p.argv, p.envp);
            let e = errno();
            if e != libc::ENOENT && e != libc::ENOTDIR {
                err = e;
            }
            i += 1;
        }
        report_to(report_fd, kind::EXEC_ERROR, err, 0);
    }
}

/// Shared between the reaper and its program child (which runs on its own stack in the
/// reaper's memory until it execs).
struct ProgramCtx {
    args: *const ReaperArgs,
    failed: c_int,
}

extern "C" fn program_entry(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the reaper's ProgramCtx; the reaper is suspended (CLONE_VFORK) until
    // we exec or exit, so nothing else touches it.
    unsafe {
        let ctx = arg as *mut ProgramCtx;
        let a = &*(*ctx).args;
        exec_program(&a.program, &a.confine, FD_REPORT, a.timing, false, true);
        std::ptr::write_volatile(&mut (*ctx).failed, 1);
        libc::_exit(127)
    }
}

/// Brings `lo` of the calling thread's network namespace up (nothing to do when it already
/// is, as in namespaces from the pre-created pool). Async-signal-safe.
pub fn loopback_up() -> bool {
    // SAFETY: ioctl on a fresh socket with a zeroed ifreq.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return false;
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as c_char;
        ifr.ifr_name[1] = b'o' as c_char;
        let up = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        let ok = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr) == 0
            && (ifr.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short != 0 || {
                ifr.ifr_ifru.ifru_flags |= up;
                libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr) == 0
            });
        libc::close(s);
        ok
    }
}

unsafe fn pivot(new_root: *const c_char) -> bool {
    // SAFETY: the classic pivot_root(".", ".") sequence.
    unsafe {
        libc::chdir(new_root) == 0
            && libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0
            && libc::umount2(c".".as_ptr(), libc::MNT_DETACH) == 0
            && libc::chdir(c"/".as_ptr()) == 0
    }
}

/// The sandbox's PID 1. Never returns.
///
/// # Safety
/// Must only be called in the child of [`clone3_fork`], with `a` pointing at data prepared
/// by the parent.
pub unsafe fn reaper_main(a: &ReaperArgs) -> ! {
    // SAFETY: the whole function is raw syscalls on prepared data.
    unsafe {
        if !arrange_fds(&a.fds[..a.n_fds]) {
            libc::_exit(2);
        }
        // Into the sandbox's cgroups before anything else (still host root, still seeing
        // the host's cgroupfs).
        if !join_cgroups(a.cgroup_tasks) {
            fail_to(FD_REPORT, stage::CGROUP_JOIN);
        }
        // Default dispositions for everything (inherited from the runtime: SIGPIPE ignored,
        // tokio's handlers); the program child inherits them.
        reset_signal_dispositions();
        // Die with the runtime: SIGIO arrives when the lifeline's write end closes.
        if !arm_lifeline() {
            libc::_exit(3);
        }
        // Nobody may read our memory (a copy of the runtime's) through /proc or ptrace.
        libc::prctl(libc::PR_SET_DUMPABLE, 0 as c_ulong, 0, 0, 0);
        // Nor our command line and thread name.
        const NAME: &[u8] = b"symbiont-init\0";
        if !a.argv_area.is_null() && a.argv_area_len >= NAME.len() {
            std::ptr::write_bytes(a.argv_area, 0, a.argv_area_len);
            std::ptr::copy_nonoverlapping(NAME.as_ptr(), a.argv_area, NAME.len());
        }
        libc::prctl(libc::PR_SET_NAME, NAME.as_ptr() as c_ulong, 0, 0, 0);
        // Work the program child would otherwise do on the critical path, done here while
        // the parent is busy; the child inherits both.
        if let Err(st) = drop_bounding_set(a.confine.last_cap) {
            fail_to(FD_REPORT, st);
        }
        mark_to(FD_REPORT, a.timing, mark::READY);
        // The filesystem setup needs no uid map (binds are done with the host root's kuid,
        // which owns the runtime's state directory), so it overlaps with the parent writing
        // the maps and plumbing the network.
        for i in 0..a.n_mounts {
            let m = &*a.mounts.add(i);
            let ok = if m.pivot {
                pivot(m.target)
            } else {
                libc::mount(m.source, m.target, m.fstype, m.flags, std::ptr::null()) == 0
            };
            if !ok {
                fail_to(FD_REPORT, stage::MOUNT_BASE + i as i32);
            }
        }
        mark_to(FD_REPORT, a.timing, mark::MOUNTED);
        if libc::sethostname(a.hostname, a.hostname_len) != 0 {
            fail_to(FD_REPORT, stage::HOSTNAME);
        }
        if !loopback_up() {
            fail_to(FD_REPORT, stage::LOOPBACK);
        }
        if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
            fail_to(FD_REPORT, stage::CGROUP_NS);
        }
        let devnull = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if devnull < 0 {
            fail_to(FD_REPORT, stage::DEVNULL);
        }
        // No more mounts or namespace changes from here on: install the syscall filter now,
        // off the critical path; the program child inherits it.
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as c_ulong, 0, 0, 0) != 0 {
            fail_to(FD_REPORT, stage::NO_NEW_PRIVS);
        }
        if let Err(st) = install_seccomp(&a.confine) {
            fail_to(FD_REPORT, st);
        }
        // Wait for the parent: uid/gid maps written, network plumbed.
        let mut go = 0u8;
        loop {
            let n = libc::read(FD_SYNC, &mut go as *mut u8 as *mut c_void, 1);
            if n == 1 {
                break;
            }
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            // The parent gave up (or died): leave quietly.
            libc::_exit(3);
        }
        libc::close(FD_SYNC);
        mark_to(FD_REPORT, a.timing, mark::GO);
        mark_to(FD_REPORT, a.timing, mark::FORKING);
        block_all_signals();
        // vfork-style: the child borrows our memory (no page-table copy) on its own stack
        // and we sleep until it has exec'd or died.
        let mut ctx = ProgramCtx {
            args: a as *const ReaperArgs,
            failed: 0,
        };
        let top = ((a.stack as usize + a.stack_len) & !15usize) as *mut c_void;
        let pid = libc::clone(
            program_entry,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &mut ctx as *mut ProgramCtx as *mut c_void,
        );
        if pid < 0 {
            fail_to(FD_REPORT, stage::FORK);
        }
        if std::ptr::read_volatile(&ctx.failed) != 0 {
            // The child reported why; reap it and leave.
            let mut st: c_int = 0;
            libc::waitpid(pid, &mut st, 0);
            libc::_exit(1);
        }
        mark_to(FD_REPORT, a.timing, mark::EXECED);
        PROGRAM_PID.store(pid, Ordering::SeqCst);
        install_forwarders();
        unblock_all_signals();
        libc::dup2(devnull, 0);
        libc::dup2(devnull, 1);
        libc::dup2(devnull, 2);
        libc::close(devnull);
        report_to(FD_REPORT, kind::STARTED, pid, 0);
        // Now confine ourselves too (off the program's critical path; the program, a
        // different user, cannot touch us meanwhile).
        if let Err(st) = confine(&a.confine, true) {
            libc::kill(pid, libc::SIGKILL);
            fail_to(FD_REPORT, st);
        }
        libc::prctl(libc::PR_SET_DUMPABLE, 0 as c_ulong, 0, 0, 0);
        loop {
            let mut status: c_int = 0;
            let r = libc::waitpid(-1, &mut status, 0);
            if r == pid {
                report_to(FD_REPORT, kind::EXITED, status, 0);
                libc::_exit(0);
            }
            if r < 0 && errno() != libc::EINTR {
                // No children left: cannot happen while the program lives.
                libc::_exit(4);
            }
        }
    }
}

/// The exec helper: joins the sandbox's cgroups and namespaces, forks the command into the
/// sandbox's PID namespace, reports its host pid and wait status. Never returns.
///
/// # Safety
/// Must only be called in the child of [`clone3_fork`], with `a` pointing at data prepared
/// by the parent.
pub unsafe fn exec_main(a: &ExecArgs) -> ! {
    // SAFETY: raw syscalls on prepared data.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as c_ulong, 0, 0, 0);
        if !arrange_fds(&a.fds[..a.n_fds]) {
            libc::_exit(2);
        }
        if !join_cgroups(a.cgroup_tasks) {
            fail_to(EXEC_FD_REPORT, stage::CGROUP_JOIN);
        }
        for (i, (fd, nstype)) in a.namespaces[..a.n_namespaces].iter().enumerate() {
            if libc::setns(*fd, *nstype) != 0 {
                fail_to(EXEC_FD_REPORT, stage::SETNS + i as i32);
            }
            libc::close(*fd);
        }
        block_all_signals();
        let pid = fork_raw();
        if pid < 0 {
            fail_to(EXEC_FD_REPORT, stage::FORK);
        }
        if pid == 0 {
            // In the sandbox's PID namespace now.
            exec_program(&a.program, &a.confine, EXEC_FD_REPORT, false, true, false);
            libc::_exit(127);
        }
        let pid = pid as c_int;
        libc::close(0);
        libc::close(1);
        libc::close(2);
        report_to(EXEC_FD_REPORT, kind::STARTED, pid, 0);
        loop {
            let mut status: c_int = 0;
            let r = libc::waitpid(pid, &mut status, 0);
            if r == pid {
                report_to(EXEC_FD_REPORT, kind::EXITED, status, 0);
                libc::_exit(0);
            }
            if r < 0 && errno() != libc::EINTR {
                libc::_exit(4);
            }
        }
    }
}

/// A human-readable name for a setup stage.
pub fn stage_name(stage: i32) -> &'static str {
    match stage {
        stage::FDS => "arranging descriptors",
        stage::SYNC => "waiting for the parent",
        stage::HOSTNAME => "sethostname",
        stage::LOOPBACK => "bringing lo up",
        stage::CGROUP_NS => "unshare(CLONE_NEWCGROUP)",
        stage::DEVNULL => "opening /dev/null",
        stage::FORK => "fork",
        stage::PIPE => "pipe2",
        stage::SETSID => "setsid",
        stage::OOM_ADJ => "writing oom_score_adj",
        stage::RLIMIT => "setting rlimits",
        stage::CAPBSET => "dropping the capability bounding set",
        stage::AMBIENT => "clearing ambient capabilities",
        stage::SETGROUPS => "setgroups",
        stage::SETGID => "setresgid",
        stage::SETUID => "setresuid",
        stage::CAPSET => "capset",
        stage::NO_NEW_PRIVS => "PR_SET_NO_NEW_PRIVS",
        stage::LANDLOCK => "landlock_restrict_self",
        stage::SECCOMP => "installing seccomp filters",
        stage::CHDIR => "chdir to the working directory",
        stage::CGROUP_JOIN => "joining the cgroups",
        stage::PDEATHSIG => "PR_SET_PDEATHSIG",
        s if (stage::SETNS..stage::SETNS + MAX_NS as i32).contains(&s) => "setns",
        _ => "setup",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_roundtrips() {
        let r = Report {
            kind: kind::EXITED,
            a: 0x0900,
            b: -3,
        };
        // SAFETY: Report is repr(C) plain data.
        let bytes: [u8; REPORT_LEN] = unsafe { std::mem::transmute(r) };
        assert_eq!(Report::from_bytes(&bytes), r);
    }

    #[test]
    fn stage_names_cover_setns_range() {
        assert_eq!(stage_name(stage::SETNS + 3), "setns");
        assert_eq!(stage_name(stage::LANDLOCK), "landlock_restrict_self");
    }
}
