//! `symbiont-guest`: the guest side of symbiont's microVM tier.
//!
//! The binary (`src/main.rs`) is the init process (PID 1) of every Tier3 microVM: it mounts
//! the pseudo file systems, loads the kernel modules the VM needs, prepares `/workspace`,
//! confines the agent's program in a memory/pids cgroup, starts it as an unprivileged user,
//! relays its stdio over one channel to the host, answers `exec` and statistics requests,
//! reports its exit status (including OOM kills) and powers the VM off.
//!
//! The library part is the [`protocol`] both sides speak, shared with the runtime so the
//! encoder and decoder can never drift apart.

pub mod protocol;
