//! Network plumbing for native sandboxes that hold `Capability::Network`.
//!
//! Every sandbox has its own network namespace. Without the capability it only has `lo`
//! (brought up by the child), so nothing outside is reachable. With it, the parent adds:
//!
//! - a veth pair `symb<N>h` (host) / `symb<N>s` (moved into the sandbox and renamed `eth0`)
//!   on a private /30 carved from `[sandbox.native] subnet`: host `.1`, sandbox `.2`, default
//!   route via the host. Links, addresses and routes are made over netlink (`rtnetlink`);
//!   the sandbox side from a thread that has `setns`'d into the sandbox's namespace.
//! - `route_localnet=1` on the host end and an iptables `DNAT` of everything arriving on it
//!   for the host address to `127.0.0.1`, so a server the host runs on `127.0.0.1:PORT` is
//!   reachable at `$SYMBIONT_HOST_ADDR:PORT`. `INPUT` drops anything else arriving on the
//!   veth, `FORWARD` drops everything from/to it: the sandbox reaches its host's loopback
//!   services and nothing else (not other sandboxes, not the host's other addresses).
//! - `network_io_mbps` as a token-bucket (`tbf`) qdisc on both veth ends (host end: traffic
//!   into the sandbox; sandbox end: traffic out of it).
//!
//! `rtnetlink` has no `tbf` or netfilter support, so qdiscs use `tc` (run inside the sandbox's
//! namespace via `setns` in `pre_exec`) and NAT uses `iptables -w`; both come from iproute2 /
//! iptables and are used for network plumbing only. Every rule carries the comment
//! `symbiont:<sandbox-id>` and is deleted on teardown with the veth.
//!
//! The pair's index `N` is leased atomically by creating the link: the kernel refuses a
//! duplicate name (EEXIST), so two runtimes on one host never share a /30.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use futures::TryStreamExt;
use rtnetlink::{LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::sandbox::SandboxError;

/// The name prefix of every veth the native tier creates.
pub const IF_PREFIX: &str = "symb";

/// A parsed IPv4 CIDR pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    /// Network address.
    pub base: Ipv4Addr,
    /// Prefix length (at most 29, so it holds at least two /30s).
    pub prefix: u8,
}

impl Pool {
    /// Parses `a.b.c.d/len`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a CIDR (a.b.c.d/len)"))?;
        let base: Ipv4Addr = a.parse().map_err(|e| format!("`{a}`: {e}"))?;
        let prefix: u8 = p.parse().map_err(|e| format!("`{p}`: {e}"))?;
        if !(8..=29).contains(&prefix) {
            return Err(format!("prefix /{prefix} must be between /8 and /29"));
        }
        let mask = u32::MAX << (32 - prefix);
        if u32::from(base) & !mask != 0 {
            return Err(format!("`{s}` has host bits set"));
        }
        Ok(Self { base, prefix })
    }

    /// Number of /30 blocks.
    pub fn blocks(&self) -> u32 {
        1u32 << (30 - self.prefix)
    }

    /// (host address, sandbox address) of block `i`.
    pub fn block(&self, i: u32) -> (Ipv4Addr, Ipv4Addr) {
        let b = u32::from(self.base) + 4 * i;
        (Ipv4Addr::from(b + 1), Ipv4Addr::from(b + 2))
    }
}

/// Interface names of block `i`.
pub fn if_names(i: u32) -> (String, String) {
    (format!("{IF_PREFIX}{i}h"), format!("{IF_PREFIX}{i}s"))
}

/// `tc` arguments for a token bucket of `mbps` megabits per second on `dev`: enough burst for
/// one GSO super-packet and a few timer ticks (10 ms of traffic, at least 64 KiB), small next
/// to the rate over any real transfer; a queue of 100 ms.
pub fn tbf_args(dev: &str, mbps: u64) -> Vec<String> {
    tbf_args_shaped(dev, mbps, 10, 100)
}

/// `tc qdisc replace dev <dev> root tbf` arguments for `mbps` megabits per second, with a
/// bucket of `burst_ms` of traffic (at least 64 KiB, so GSO-sized packets pass) and a queue of
/// `latency_ms`. Shared by every tier that shapes a veth.
pub fn tbf_args_shaped(dev: &str, mbps: u64, burst_ms: u64, latency_ms: u64) -> Vec<String> {
    let bytes_per_sec = mbps.saturating_mul(1_000_000) / 8;
    let burst = (bytes_per_sec.saturating_mul(burst_ms) / 1000).max(64 * 1024);
    vec![
        "qdisc".into(),
        "replace".into(),
        "dev".into(),
        dev.into(),
        "root".into(),
        "tbf".into(),
        "rate".into(),
        format!("{mbps}mbit"),
        "burst".into(),
        burst.to_string(),
        "latency".into(),
        format!("{latency_ms}ms"),
    ]
}

/// `tc` arguments removing the root qdisc of `dev` (unlimited).
pub fn tbf_del_args(dev: &str) -> Vec<String> {
    ["qdisc", "del", "dev", dev, "root"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The iptables rules of one sandbox as (table, chain, rule) — added with `-I`, removed with
/// `-D`.
pub fn iptables_rules(id: &str, host_if: &str, host_addr: Ipv4Addr) -> Vec<Vec<String>> {
    let comment = format!("symbiont:{id}");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        s(&[
            "-t",
            "nat",
            "PREROUTING",
            "-i",
            host_if,
            "-d",
            &host_addr.to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            "127.0.0.1",
            "-m",
            "comment",
            "--comment",
            &comment,
        ]),
        s(&[
            "-t",
            "filter",
            "INPUT",
            "-i",
            host_if,
            "!",
            "-d",
            "127.0.0.1",
            "-j",
            "DROP",
            "-m",
            "comment",
            "--comment",
            &comment,
        ]),
        s(&[
            "-t",
            "filter",
            "FORWARD",
            "-i",
            host_if,
            "-j",
            "DROP",
            "-m",
            "comment",
            "--comment",
            &comment,
        ]),
        s(&[
            "-t",
            "filter",
            "FORWARD",
            "-o",
            host_if,
            "-j",
            "DROP",
            "-m",
            "comment",
            "--comment",
            &comment,
        ]),
    ]
}

/// Turns a rule from [`iptables_rules`] into an argv for `iptables` with `action` (`-I`/`-D`).
fn iptables_argv(rule: &[String], action: &str) -> Vec<String> {
    // rule = ["-t", table, chain, rest...]
    let mut v = vec!["-w".to_string(), rule[0].clone(), rule[1].clone()];
    v.push(action.to_string());
    v.extend(rule[2..].iter().cloned());
    v
}

fn net_err(what: &str, e: impl std::fmt::Display) -> SandboxError {
    SandboxError::op("network setup", format!("{what}: {e}"))
}

fn run(cmd: &mut Command, what: &str) -> Result<(), SandboxError> {
    let out = cmd.output().map_err(|e| {
        net_err(
            what,
            format!("{e} (install iproute2 and iptables: run `bash scripts/setup.sh`)"),
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(net_err(
            what,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Runs `tc args` inside the network namespace `netns` (or the host's when `None`).
pub fn tc(netns: Option<&OwnedFd>, args: &[String]) -> Result<(), SandboxError> {
    let mut cmd = Command::new("tc");
    cmd.args(args);
    if let Some(ns) = netns {
        let fd = ns.as_raw_fd();
        // SAFETY: pre_exec runs in the forked child before exec; setns is async-signal-safe
        // and `fd` stays open in the child until exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    run(&mut cmd, &format!("tc {}", args.join(" ")))
}

/// One sandbox's network attachment.
#[derive(Debug)]
pub struct NetAttachment {
    /// Sandbox id (names the iptables comments).
    pub id: String,
    /// Pool block index.
    pub index: u32,
    /// Host-side veth.
    pub host_if: String,
    /// The host's address on the veth (`SYMBIONT_HOST_ADDR`).
    pub host_addr: Ipv4Addr,
    /// The sandbox's address.
    pub sandbox_addr: Ipv4Addr,
    /// Sandbox-side veth name on the host (before it moves and becomes `eth0`).
    pub peer: String,
    /// The sandbox's network namespace once connected.
    pub netns: Option<OwnedFd>,
    rules: Vec<Vec<String>>,
}

async fn host_handle() -> Result<rtnetlink::Handle, SandboxError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| net_err("netlink", e))?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn link_index(h: &rtnetlink::Handle, name: &str) -> Result<u32, SandboxError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(l.header.index),
        Ok(None) => Err(net_err("link lookup", format!("{name} not found"))),
        Err(e) => Err(net_err(&format!("link lookup {name}"), e)),
    }
}

fn is_eexist(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

/// Leases a /30 by creating its veth pair (both ends still on the host). Call
/// [`NetAttachment::connect`] once the sandbox process exists.
pub async fn lease(id: &str, pool: Pool) -> Result<NetAttachment, SandboxError> {
    let h = host_handle().await?;
    let blocks = pool.blocks();
    let start = (uuid::Uuid::new_v4().as_u128() % blocks as u128) as u32;
    for k in 0..blocks {
        let i = (start + k) % blocks;
        let (host_if, peer) = if_names(i);
        match h
            .link()
            .add(LinkVeth::new(&host_if, &peer).build())
            .execute()
            .await
        {
            Ok(()) => {
                let (host_addr, sandbox_addr) = pool.block(i);
                return Ok(NetAttachment {
                    id: id.to_string(),
                    index: i,
                    host_if,
                    peer,
                    host_addr,
                    sandbox_addr,
                    netns: None,
                    rules: Vec::new(),
                });
            }
            Err(e) if is_eexist(&e) => continue,
            Err(e) => return Err(net_err("veth create", e)),
        }
    }
    Err(net_err(
        "address pool",
        format!("all {blocks} /30 blocks of the pool are in use"),
    ))
}

impl NetAttachment {
    /// Moves the sandbox end into the namespace of `pid` (the sandbox's PID 1), configures
    /// both ends, NAT and the rate limit.
    pub async fn connect(
        &mut self,
        pid: u32,
        netns: OwnedFd,
        mbps: u64,
    ) -> Result<(), SandboxError> {
        self.netns = Some(netns);
        let h = host_handle().await?;
        configure(&h, self, pid, mbps).await
    }
}

async fn configure(
    h: &rtnetlink::Handle,
    att: &mut NetAttachment,
    pid: u32,
    mbps: u64,
) -> Result<(), SandboxError> {
    let peer = att.peer.clone();
    let peer_idx = link_index(h, &peer).await?;
    h.link()
        .set(
            LinkUnspec::new_with_index(peer_idx)
                .setns_by_pid(pid)
                .build(),
        )
        .execute()
        .await
        .map_err(|e| net_err("move veth into the sandbox", e))?;
    let host_idx = link_index(h, &att.host_if).await?;
    h.address()
        .add(host_idx, att.host_addr.into(), 30)
        .execute()
        .await
        .map_err(|e| net_err("host address", e))?;
    h.link()
        .set(LinkUnspec::new_with_index(host_idx).up().build())
        .execute()
        .await
        .map_err(|e| net_err("host link up", e))?;
    std::fs::write(
        format!("/proc/sys/net/ipv4/conf/{}/route_localnet", att.host_if),
        "1",
    )
    .map_err(|e| net_err("route_localnet", e))?;
    for rule in iptables_rules(&att.id, &att.host_if, att.host_addr) {
        run(
            Command::new("iptables").args(iptables_argv(&rule, "-I")),
            "iptables",
        )?;
        att.rules.push(rule);
    }
    // The sandbox side, from a thread inside its network namespace.
    let ns = att
        .netns
        .as_ref()
        .ok_or_else(|| net_err("netns", "not connected"))?
        .try_clone()
        .map_err(|e| net_err("dup netns", e))?;
    let (peer_name, sandbox_addr, host_addr) = (peer.to_string(), att.sandbox_addr, att.host_addr);
    let inner = std::thread::spawn(move || -> Result<(), SandboxError> {
        // SAFETY: setns on this thread only; the fd is a valid netns descriptor.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(net_err("setns", std::io::Error::last_os_error()));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| net_err("runtime", e))?;
        rt.block_on(async move {
            let h = host_handle().await?;
            let idx = link_index(&h, &peer_name).await?;
            h.link()
                .set(LinkUnspec::new_with_index(idx).name("eth0").build())
                .execute()
                .await
                .map_err(|e| net_err("rename eth0", e))?;
            h.address()
                .add(idx, sandbox_addr.into(), 30)
                .execute()
                .await
                .map_err(|e| net_err("sandbox address", e))?;
            h.link()
                .set(LinkUnspec::new_with_index(idx).up().build())
                .execute()
                .await
                .map_err(|e| net_err("sandbox link up", e))?;
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(host_addr)
                .build();
            h.route()
                .add(route)
                .execute()
                .await
                .map_err(|e| net_err("default route", e))?;
            Ok(())
        })
    });
    inner
        .join()
        .map_err(|_| net_err("sandbox side", "configuration thread panicked"))??;
    set_rate(att, mbps)?;
    Ok(())
}

/// Applies (or, with 0, removes) the bandwidth limit on both ends.
pub fn set_rate(att: &NetAttachment, mbps: u64) -> Result<(), SandboxError> {
    if mbps == 0 {
        // Removing a qdisc that is not there fails harmlessly.
        let _ = tc(None, &tbf_del_args(&att.host_if));
        let _ = tc(att.netns.as_ref(), &tbf_del_args("eth0"));
        return Ok(());
    }
    tc(None, &tbf_args(&att.host_if, mbps))?;
    tc(att.netns.as_ref(), &tbf_args("eth0", mbps))
}

impl NetAttachment {
    /// Host-side interface counters (rx, tx) — the sandbox's tx and rx respectively.
    pub fn host_counters(&self) -> (u64, u64) {
        let rd = |f: &str| {
            std::fs::read_to_string(format!("/sys/class/net/{}/statistics/{f}", self.host_if))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        (rd("rx_bytes"), rd("tx_bytes"))
    }

    /// Removes the iptables rules and the veth pair. Idempotent; errors are logged.
    pub async fn detach(&mut self) {
        for rule in self.rules.drain(..) {
            if let Err(e) = run(
                Command::new("iptables").args(iptables_argv(&rule, "-D")),
                "iptables -D",
            ) {
                tracing::warn!(sandbox = %self.id, error = %e, "removing iptables rule");
            }
        }
        if let Ok(h) = host_handle().await {
            if let Ok(idx) = link_index(&h, &self.host_if).await {
                if let Err(e) = h.link().del(idx).execute().await {
                    tracing::warn!(sandbox = %self.id, error = %e, "deleting veth");
                }
            }
        }
    }

    /// Synchronous best-effort cleanup for `Drop` paths: rules via iptables, the veth via
    /// `ip link del` (deleting one end removes the pair).
    pub fn detach_blocking(&mut self) {
        for rule in self.rules.drain(..) {
            let _ = Command::new("iptables")
                .args(iptables_argv(&rule, "-D"))
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// Deletes every iptables rule tagged `symbiont:<id>` for which `stale(id)` holds (leftovers
/// of a runtime that died). Returns how many were deleted.
pub fn sweep_rules(stale: impl Fn(&str) -> bool) -> usize {
    let mut n = 0;
    for table in ["nat", "filter"] {
        let Ok(out) = Command::new("iptables")
            .args(["-w", "-t", table, "-S"])
            .output()
        else {
            return n;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(id) = line
                .split_whitespace()
                .find_map(|w| w.trim_matches('"').strip_prefix("symbiont:"))
            else {
                continue;
            };
            if !stale(id) {
                continue;
            }
            let Some(rest) = line.strip_prefix("-A ") else {
                continue;
            };
            let mut args = vec!["-w".to_string(), "-t".into(), table.into(), "-D".into()];
            args.extend(
                rest.split_whitespace()
                    .map(|w| w.trim_matches('"').to_string()),
            );
            if run(Command::new("iptables").args(&args), "iptables -D").is_ok() {
                n += 1;
            }
        }
    }
    n
}

/// Network namespaces created ahead of time, with `lo` up, so that starting a sandbox does
/// not pay for creating one (the most expensive namespace by far). A background thread keeps
/// `target` of them ready; each is handed out once. They are owned by the host's user
/// namespace, so root inside a sandbox cannot reconfigure its own network at all.
#[derive(Debug)]
pub struct NetnsPool {
    state: std::sync::Arc<(std::sync::Mutex<Vec<OwnedFd>>, std::sync::Condvar)>,
}

static POOL: std::sync::OnceLock<NetnsPool> = std::sync::OnceLock::new();

impl NetnsPool {
    /// The process-wide pool, started on first use with `target` namespaces (0 disables it).
    pub fn global(target: usize) -> Option<&'static NetnsPool> {
        if target == 0 {
            return None;
        }
        Some(POOL.get_or_init(|| {
            let state =
                std::sync::Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Condvar::new()));
            let s2 = state.clone();
            let spawned = std::thread::Builder::new()
                .name("symbiont-netns-pool".into())
                .spawn(move || refill(s2, target));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the network namespace pool");
            }
            NetnsPool { state }
        }))
    }

    /// How many namespaces are ready now.
    pub fn available(&self) -> usize {
        self.state.0.lock().map(|q| q.len()).unwrap_or(0)
    }

    /// A fresh namespace, or `None` when the pool is momentarily empty.
    pub fn take(&self) -> Option<OwnedFd> {
        let (lock, cv) = &*self.state;
        let ns = lock.lock().ok()?.pop();
        cv.notify_one();
        ns
    }
}

fn refill(
    state: std::sync::Arc<(std::sync::Mutex<Vec<OwnedFd>>, std::sync::Condvar)>,
    target: usize,
) {
    let (lock, cv) = &*state;
    loop {
        {
            let Ok(mut q) = lock.lock() else { return };
            while q.len() >= target {
                q = match cv.wait(q) {
                    Ok(q) => q,
                    Err(_) => return,
                };
            }
        }
        match create_netns() {
            Ok(ns) => {
                if let Ok(mut q) = lock.lock() {
                    q.push(ns);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Other => {
                tracing::error!(error = %e, "network namespace pool stopped");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "network namespace pool: creation failed; retrying in 1s");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}

/// Creates a network namespace with `lo` up (on the calling thread, which returns home).
fn create_netns() -> std::io::Result<OwnedFd> {
    let home = std::fs::File::open("/proc/thread-self/ns/net")?;
    // SAFETY: unshare/setns affect only this thread's network namespace.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let made = (|| {
        if !super::child::loopback_up() {
            return Err(std::io::Error::last_os_error());
        }
        std::fs::File::open("/proc/thread-self/ns/net").map(OwnedFd::from)
    })();
    // SAFETY: back to the namespace we came from.
    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        // A pool thread stuck in a foreign namespace must not create more.
        return Err(std::io::Error::other(format!(
            "cannot return to the host network namespace: {}",
            std::io::Error::last_os_error()
        )));
    }
    made.map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// True when a host interface with this name exists.
pub fn interface_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_carves_slash30_blocks() {
        let p = Pool::parse("10.213.0.0/16").expect("pool");
        assert_eq!(p.blocks(), 16384);
        assert_eq!(
            p.block(0),
            (
                "10.213.0.1".parse().expect("ip"),
                "10.213.0.2".parse().expect("ip")
            )
        );
        assert_eq!(
            p.block(3),
            (
                "10.213.0.13".parse().expect("ip"),
                "10.213.0.14".parse().expect("ip")
            )
        );
        assert!(Pool::parse("10.213.0.1/16").is_err());
        assert!(Pool::parse("10.213.0.0/30").is_err());
        assert!(Pool::parse("nonsense").is_err());
    }

    #[test]
    fn interface_names_fit_ifnamsiz() {
        let (h, s) = if_names(16383);
        assert!(h.len() < 16 && s.len() < 16, "{h} {s}");
        assert_ne!(h, s);
    }

    #[test]
    fn tbf_uses_megabits_and_a_sane_burst() {
        let a = tbf_args("symb1h", 8);
        assert_eq!(a[5], "tbf");
        assert_eq!(a[7], "8mbit");
        let burst: u64 = a[9].parse().expect("burst");
        assert!((64 * 1024..=1_000_000).contains(&burst), "{burst}");
    }

    #[test]
    fn iptables_rules_are_tagged_and_reversible() {
        let rules = iptables_rules("sbx-1", "symb7h", "10.213.0.29".parse().expect("ip"));
        assert_eq!(rules.len(), 4);
        for r in &rules {
            assert!(r.contains(&"symbiont:sbx-1".to_string()));
            let add = iptables_argv(r, "-I");
            let del = iptables_argv(r, "-D");
            assert_eq!(add[3], "-I");
            assert_eq!(del[3], "-D");
            assert_eq!(add[4..], del[4..]);
        }
        assert!(rules[0].contains(&"DNAT".to_string()));
        assert!(rules[0].contains(&"127.0.0.1".to_string()));
    }
}
