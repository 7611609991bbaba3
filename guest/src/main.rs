//! The init process (PID 1) of symbiont's Tier3 microVMs.
//!
//! Boot sequence: mount `/proc`, `/sys`, `/dev` and `/tmp`; read [`GuestConfig`] from the
//! initramfs; then three threads share the single vCPU, so that the waits of one (disk I/O,
//! RCU grace periods) are filled by the work of another: the main thread loads the kernel
//! modules the config lists (passing `module.param=value` options from the kernel command
//! line, as `modprobe` would), configures `eth0` when the agent has network and opens the
//! channel to the host (a virtio-serial port or a vsock connection, chosen by
//! `symbiont.channel=` on the command line); the workspace thread mounts the workspace disk
//! (or a tmpfs) on `/workspace` as soon as its device appears; the system thread mounts the
//! cgroup2 hierarchy, creates the program's cgroup with its memory and pids limits and brings
//! up `lo`. Then: copy the agent's files into the workspace; start the program as the
//! unprivileged uid; relay its stdio; answer exec/signal/stats requests; report its exit
//! status (with OOM kills); power off. `symbiont.debug` on the command line prints the time
//! of each stage on the console.
//!
//! Outside a VM (`pid != 1`) it prints its version and exits, so the host can check the
//! binary it is about to embed.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use symbiont_guest::protocol::{
    split_frame, GuestConfig, GuestExit, GuestMsg, GuestStats, HostMsg, CMDLINE_CHANNEL,
    CONFIG_PATH, FILES_DIR, MAX_CHUNK, VIRTIO_PORT_NAME, VSOCK_PORT,
};

/// The program's cgroup (cgroup v2, mounted by us).
const AGENT_CGROUP: &str = "/sys/fs/cgroup/agent";
/// Largest output kept from one exec'd command, per stream.
const EXEC_OUTPUT_CAP: usize = 16 << 20;

type Result<T> = std::result::Result<T, String>;

/// The channel to the host, once opened (used to report fatal errors).
static CHANNEL: OnceLock<Arc<Channel>> = OnceLock::new();

fn main() {
    if std::process::id() != 1 {
        println!("symbiont-guest {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let halt = match run() {
        Ok(halt) => halt,
        Err(e) => {
            eprintln!("symbiont-guest: fatal: {e}");
            if let Some(ch) = CHANNEL.get() {
                let _ = ch.send(&GuestMsg::Error(e));
            }
            thread::sleep(Duration::from_millis(100));
            Halt::PowerOff
        }
    };
    halt_now(halt);
}

#[derive(Clone, Copy)]
enum Halt {
    PowerOff,
    Reboot,
}

fn halt_now(halt: Halt) -> ! {
    // SAFETY: sync(2) and reboot(2) take no pointers; as PID 1 we own the machine.
    unsafe {
        libc::sync();
        libc::reboot(match halt {
            Halt::PowerOff => libc::RB_POWER_OFF,
            Halt::Reboot => libc::RB_AUTOBOOT,
        });
    }
    // reboot(2) does not return on success; if it failed there is nothing left to do.
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

fn os_err(what: impl std::fmt::Display) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> Result<()> {
    let _ = fs::create_dir_all(target);
    let (s, t, f, d) = (cstr(src)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if rc != 0 {
        return Err(os_err(format!("mount {fstype} on {target}")));
    }
    Ok(())
}

fn write_file(path: &str, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|e| format!("write {value:?} to {path}: {e}"))
}

/// `key=value` (and bare `key`) tokens of the kernel command line.
fn parse_cmdline(cmdline: &str) -> Vec<(String, String)> {
    cmdline
        .split_whitespace()
        .map(|tok| match tok.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (tok.to_string(), String::new()),
        })
        .collect()
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Whether `symbiont.debug` is on the kernel command line (stage timings on the console).
static DEBUG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Seconds since the guest kernel booted (CLOCK_BOOTTIME, the clock of the kernel's log).
fn uptime() -> f64 {
    // SAFETY: timespec is plain old data; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a pointer to our timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn stage(name: &str) {
    if DEBUG.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!("symbiont-guest: {name} at {:.3}s", uptime());
    }
}

fn run() -> Result<Halt> {
    mount("proc", "/proc", "proc", 0, "")?;
    let entered = uptime();
    mount("sysfs", "/sys", "sysfs", 0, "")?;
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    mount("devpts", "/dev/pts", "devpts", libc::MS_NOSUID, "mode=0620")?;
    // The kernel's OOM killer must never pick us.
    let _ = write_file("/proc/self/oom_score_adj", "-1000");
    // No module autoloading: the guest has no modprobe (we load what the host chose), and a
    // request for one (e.g. opening a block device that is not live yet) would otherwise
    // make the kernel try to start the missing helper each time.
    write_file("/proc/sys/kernel/modprobe", "\n")?;

    let cmdline = fs::read_to_string("/proc/cmdline").map_err(|e| format!("/proc/cmdline: {e}"))?;
    let params = parse_cmdline(&cmdline);
    DEBUG.store(
        param(&params, "symbiont.debug").is_some(),
        std::sync::atomic::Ordering::Relaxed,
    );
    stage(&format!("entered at {entered:.3}s,"));
    stage("mounted");
    let halt = match param(&params, "symbiont.halt") {
        Some("reboot") => Halt::Reboot,
        _ => Halt::PowerOff,
    };
    let raw = fs::read(CONFIG_PATH).map_err(|e| format!("{CONFIG_PATH}: {e}"))?;
    let cfg = GuestConfig::decode(&raw).map_err(|e| e.to_string())?;

    // SIGCHLD is consumed by the reaper thread with sigtimedwait; block it before any thread
    // exists so every thread inherits the mask (children get an empty mask from std).
    block_sigchld()?;

    // The workspace disk is mounted by its own thread as soon as its device appears (when
    // the block driver below has probed it): the disk I/O then overlaps the rest of the
    // boot instead of adding to it.
    let workspace = {
        let device = cfg.workspace_device.clone();
        thread::spawn(move || mount_workspace(device.as_deref()))
    };
    // The program's cgroup and `lo` are set up by a third thread: both wait for RCU grace
    // periods, which the module loading below fills.
    let system = {
        let (memory, pids) = (cfg.memory_limit_bytes, cfg.pids_limit);
        thread::spawn(move || -> Result<()> {
            setup_cgroup(memory, pids)?;
            stage("cgroup ready");
            set_link_up("lo")?;
            stage("lo up");
            Ok(())
        })
    };
    for module in &cfg.modules {
        load_module(module, &params)?;
        stage(module);
    }
    stage("modules loaded");
    setup_network(&cfg)?;
    stage("network ready");
    let channel = Arc::new(open_channel(&params)?);
    stage("channel open");
    let _ = CHANNEL.set(channel.clone());
    for (name, thread) in [("system", system), ("workspace", workspace)] {
        thread
            .join()
            .map_err(|_| format!("the {name} setup thread panicked"))??;
    }
    populate_workspace(&cfg)?;
    stage("workspace ready");

    let reaper = Reaper::start();
    let confinement = Confinement::new(&cfg)?;
    let env = program_env(&cfg);

    let mut cmd = Command::new(&cfg.argv[0]);
    cmd.args(&cfg.argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(&cfg.workdir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let spawned = reaper.spawn(&mut cmd, &confinement);
    let (mut child, status_rx) = match spawned {
        Ok(x) => x,
        Err(e) => {
            let msg = format!("cannot start {}: {e}", cfg.argv[0]);
            channel
                .send(&GuestMsg::Error(msg.clone()))
                .map_err(|e| format!("channel: {e}"))?;
            return Err(msg);
        }
    };
    let pid = child.id();
    stage("program started");
    channel
        .send(&GuestMsg::Started { pid })
        .map_err(|e| format!("channel: {e}"))?;

    let mut relays = Vec::new();
    if let Some(out) = child.stdout.take() {
        relays.push(relay_output(out, channel.clone(), false));
    }
    if let Some(err) = child.stderr.take() {
        relays.push(relay_output(err, channel.clone(), true));
    }
    let (stdin_tx, stdin_rx) = mpsc::sync_channel::<Option<Vec<u8>>>(256);
    if let Some(stdin) = child.stdin.take() {
        thread::spawn(move || feed_stdin(stdin, stdin_rx));
    }
    let (shutdown_tx, shutdown_rx) = mpsc::channel::<()>();
    {
        let ctx = ReaderCtx {
            channel: channel.clone(),
            reaper: reaper.clone(),
            confinement,
            env,
            workdir: cfg.workdir.clone(),
            pid,
            stdin: Some(stdin_tx),
            shutdown: shutdown_tx,
        };
        let reader = channel.reader()?;
        thread::spawn(move || read_host(reader, ctx, halt));
    }

    let status = status_rx
        .recv()
        .map_err(|_| "reaper stopped before the program ended".to_string())?;
    let exit = classify(status);
    // The sandbox ends with its main program: nothing it left behind survives.
    let _ = write_file(&format!("{AGENT_CGROUP}/cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(2);
    for relay in relays {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = relay.recv_timeout(left);
    }
    channel
        .send(&GuestMsg::Exit(exit))
        .map_err(|e| format!("channel: {e}"))?;
    // Wait until the host acknowledges, so nothing is lost in flight when we power off.
    let _ = shutdown_rx.recv_timeout(Duration::from_secs(5));
    Ok(halt)
}

fn classify(status: libc::c_int) -> GuestExit {
    let (code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    };
    let oom_kills = fs::read_to_string(format!("{AGENT_CGROUP}/memory.events"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    GuestExit {
        code,
        signal,
        oom_killed: oom_kills > 0 && signal == Some(libc::SIGKILL),
    }
}

fn load_module(path: &str, params: &[(String, String)]) -> Result<()> {
    let name = Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".ko").replace('-', "_"))
        .unwrap_or_default();
    // Options given on the kernel command line as `name.key=value` (e.g. Firecracker's
    // `virtio_mmio.device=...`) are passed to the module, as modprobe does.
    let prefix = format!("{name}.");
    let opts: Vec<String> = params
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(&prefix).map(|key| {
                if v.is_empty() {
                    key.to_string()
                } else {
                    format!("{key}={v}")
                }
            })
        })
        .collect();
    let opts = cstr(&opts.join(" "))?;
    let file = File::open(path).map_err(|e| format!("module {path}: {e}"))?;
    // SAFETY: finit_module takes an open fd, a NUL-terminated option string and flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            opts.as_ptr(),
            0 as libc::c_int,
        )
    };
    if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
        return Err(os_err(format!("load module {path}")));
    }
    Ok(())
}

/// The byte stream to the host. Writes are whole frames under a lock.
struct Channel {
    writer: Mutex<File>,
}

impl Channel {
    fn send(&self, msg: &GuestMsg) -> io::Result<()> {
        let bytes = msg.encode();
        let mut w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        w.write_all(&bytes)
    }

    fn reader(&self) -> Result<File> {
        let w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        w.try_clone().map_err(|e| format!("channel clone: {e}"))
    }
}

fn open_channel(params: &[(String, String)]) -> Result<Channel> {
    let deadline = Instant::now() + Duration::from_secs(10);
    match param(params, CMDLINE_CHANNEL).unwrap_or("virtio-serial") {
        "vsock" => loop {
            match connect_vsock(VSOCK_PORT) {
                Ok(f) => {
                    return Ok(Channel {
                        writer: Mutex::new(f),
                    })
                }
                Err(e) if Instant::now() > deadline => return Err(format!("vsock connect: {e}")),
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        },
        _ => loop {
            if let Some(dev) = find_virtio_port(VIRTIO_PORT_NAME) {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&dev)
                    .map_err(|e| format!("{dev}: {e}"))?;
                return Ok(Channel {
                    writer: Mutex::new(f),
                });
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "virtio-serial port {VIRTIO_PORT_NAME} did not appear"
                ));
            }
            thread::sleep(Duration::from_millis(2));
        },
    }
}

fn find_virtio_port(name: &str) -> Option<String> {
    for entry in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let port_name = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            let dev = format!("/dev/{}", entry.file_name().to_string_lossy());
            if Path::new(&dev).exists() {
                return Some(dev);
            }
        }
    }
    None
}

fn connect_vsock(port: u32) -> io::Result<File> {
    // SAFETY: plain socket(2) call; the fd is owned by the File below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; zero is a valid initial value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_HOST;
    addr.svm_port = port;
    // SAFETY: addr is a valid sockaddr_vm and its size is passed alongside.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

fn block_sigchld() -> Result<()> {
    // SAFETY: the sigset is initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err("cannot block SIGCHLD".into());
        }
    }
    Ok(())
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(|e| format!("chown {}: {e}", path.display()))
}

fn copy_tree(src: &Path, dst: &Path, uid: u32, gid: u32) -> Result<()> {
    let entries = match fs::read_dir(src) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", src.display())),
    };
    for entry in entries.flatten() {
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let meta = entry
            .metadata()
            .map_err(|e| format!("{}: {e}", from.display()))?;
        if meta.is_dir() {
            fs::create_dir_all(&to).map_err(|e| format!("{}: {e}", to.display()))?;
            chown(&to, uid, gid)?;
            copy_tree(&from, &to, uid, gid)?;
        } else {
            fs::copy(&from, &to).map_err(|e| format!("copy {}: {e}", to.display()))?;
            fs::set_permissions(&to, fs::Permissions::from_mode(meta.permissions().mode()))
                .map_err(|e| format!("chmod {}: {e}", to.display()))?;
            chown(&to, uid, gid)?;
        }
    }
    Ok(())
}

fn wait_for_path(path: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while !Path::new(path).exists() {
        if Instant::now() > deadline {
            return Err(format!("{path} did not appear within {within:?}"));
        }
        thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Mounts the workspace on `/workspace`: the ext4 disk `device` once it appears, else a
/// tmpfs.
fn mount_workspace(device: Option<&str>) -> Result<()> {
    let ws = "/workspace";
    let flags = libc::MS_NOSUID | libc::MS_NODEV;
    match device {
        Some(dev) => {
            // The device node appears while the driver is still registering the disk, and
            // opening it fails with ENXIO until the disk is live: poll with open(2), which
            // fails quietly (a failed mount would log an error on the console).
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match File::open(dev) {
                    Ok(_) => break,
                    Err(e)
                        if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENXIO))
                            && Instant::now() < deadline =>
                    {
                        thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => return Err(format!("workspace disk {dev}: {e}")),
                }
            }
            // The image is a fresh sparse file: its inode tables already read as zeros, so
            // the kernel's background zeroing thread would only compete with the agent for
            // the vCPU and the disk budget.
            mount(dev, ws, "ext4", flags, "noinit_itable")?;
            // Small requests keep the VMM's bandwidth throttling precise (its leaky bucket
            // admits a whole request whenever it is not yet full).
            if let Some(name) = Path::new(dev).file_name().and_then(|n| n.to_str()) {
                let _ = write_file(&format!("/sys/block/{name}/queue/max_sectors_kb"), "64");
            }
            let _ = fs::remove_dir(format!("{ws}/lost+found"));
            stage("workspace disk mounted");
        }
        None => mount("tmpfs", ws, "tmpfs", flags, "mode=0755")?,
    }
    Ok(())
}

/// Hands the mounted workspace to the agent's uid and copies the agent's files into it.
fn populate_workspace(cfg: &GuestConfig) -> Result<()> {
    let ws = "/workspace";
    chown(Path::new(ws), cfg.uid, cfg.gid)?;
    copy_tree(Path::new(FILES_DIR), Path::new(ws), cfg.uid, cfg.gid)?;
    if !Path::new(&cfg.workdir).exists() {
        fs::create_dir_all(&cfg.workdir).map_err(|e| format!("{}: {e}", cfg.workdir))?;
        chown(Path::new(&cfg.workdir), cfg.uid, cfg.gid)?;
    }
    Ok(())
}

fn set_link_up(name: &str) -> Result<()> {
    // SAFETY: a datagram socket only used for the interface ioctls below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os_err("socket"));
    }
    // SAFETY: fd is a fresh socket we own.
    let _sock = unsafe { File::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
        req.ifr_name[i] = b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we pass.
    unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(os_err(format!("SIOCGIFFLAGS {name}")));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(os_err(format!("SIOCSIFFLAGS {name}")));
        }
    }
    Ok(())
}

fn busybox(args: &[&str]) -> Result<()> {
    let out = Command::new("/bin/busybox")
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("busybox {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "busybox {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Configures `eth0` when the agent has network (`lo` is brought up by the system thread).
fn setup_network(cfg: &GuestConfig) -> Result<()> {
    let Some(net) = &cfg.network else {
        return Ok(());
    };
    wait_for_path("/sys/class/net/eth0", Duration::from_secs(10))?;
    busybox(&["ip", "addr", "add", &net.address, "dev", "eth0"])?;
    set_link_up("eth0")?;
    busybox(&["ip", "route", "add", "default", "via", &net.gateway])?;
    if net.rate_bps > 0 {
        netlimit::apply("eth0", net.rate_bps)?;
    }
    Ok(())
}

/// Mounts the cgroup2 hierarchy and creates the program's cgroup with its memory ceiling and
/// task limit (0 = none).
fn setup_cgroup(memory_limit_bytes: u64, pids_limit: u64) -> Result<()> {
    // favordynmods: enabling controllers and migrating the program into its cgroup then
    // skip an RCU grace period each (this thread waits for one at mount time instead);
    // forks pay a little more, and the guest forks rarely.
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, "favordynmods")
        .or_else(|_| mount("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, ""))?;
    // One write enables both controllers (each write of subtree_control is a cgroup
    // reconfiguration); one at a time if the kernel lacks one of them. CPU time is read from
    // cpu.stat, which needs no controller.
    let control = "/sys/fs/cgroup/cgroup.subtree_control";
    if write_file(control, "+memory +pids").is_err() {
        for ctrl in ["+memory", "+pids"] {
            let _ = write_file(control, ctrl);
        }
    }
    fs::create_dir_all(AGENT_CGROUP).map_err(|e| format!("{AGENT_CGROUP}: {e}"))?;
    if memory_limit_bytes > 0 {
        write_file(
            &format!("{AGENT_CGROUP}/memory.max"),
            &memory_limit_bytes.to_string(),
        )?;
        let _ = write_file(&format!("{AGENT_CGROUP}/memory.swap.max"), "0");
        // An OOM kill takes the whole agent down, like a container's.
        let _ = write_file(&format!("{AGENT_CGROUP}/memory.oom.group"), "1");
    }
    if pids_limit > 0 {
        write_file(&format!("{AGENT_CGROUP}/pids.max"), &pids_limit.to_string())?;
    }
    Ok(())
}

fn program_env(cfg: &GuestConfig) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), "/bin:/sbin:/usr/bin:/usr/sbin".into()),
        ("HOME".into(), "/workspace".into()),
        ("USER".into(), "agent".into()),
    ];
    for (k, v) in &cfg.env {
        env.retain(|(key, _)| key != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// What a child does between fork and exec: join the agent cgroup, reset the OOM score we
/// lowered for ourselves, drop every privilege.
#[derive(Clone)]
struct Confinement {
    procs: CString,
    oom_adj: CString,
    uid: libc::uid_t,
    gid: libc::gid_t,
}

impl Confinement {
    fn new(cfg: &GuestConfig) -> Result<Self> {
        Ok(Self {
            procs: cstr(&format!("{AGENT_CGROUP}/cgroup.procs"))?,
            oom_adj: cstr("/proc/self/oom_score_adj")?,
            uid: cfg.uid,
            gid: cfg.gid,
        })
    }

    /// Runs in the forked child: only async-signal-safe calls, no allocation.
    fn apply(&self) -> io::Result<()> {
        fn write_fd(path: &CString, value: &[u8]) -> io::Result<()> {
            // SAFETY: path is NUL-terminated; value is a valid buffer of its length.
            unsafe {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let n = libc::write(fd, value.as_ptr().cast(), value.len());
                libc::close(fd);
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        }
        write_fd(&self.procs, b"0")?;
        write_fd(&self.oom_adj, b"0")?;
        // SAFETY: plain syscalls on integers; order matters (groups and gid before uid).
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(self.gid) != 0
                || libc::setuid(self.uid) != 0
                || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Reaps every child (we are PID 1, orphans land here too) and hands exit statuses to the
/// threads waiting for specific pids. Spawning happens under the same lock so that std's own
/// `waitpid` after a failed exec never races with us.
#[derive(Clone)]
struct Reaper {
    inner: Arc<Mutex<HashMap<u32, Sender<libc::c_int>>>>,
}

impl Reaper {
    fn start() -> Self {
        let reaper = Reaper {
            inner: Arc::new(Mutex::new(HashMap::new())),
        };
        let r = reaper.clone();
        thread::spawn(move || r.run());
        reaper
    }

    fn run(&self) {
        // SAFETY: sigset_t is plain old data; zero is a valid value to initialise.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: set is a valid sigset_t we own.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
        }
        let timeout = libc::timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        loop {
            // SAFETY: set and timeout are valid; info may be null.
            unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
            let waiters = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                let mut status: libc::c_int = 0;
                // SAFETY: status is a valid out-pointer.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if let Some(tx) = waiters.get(&(pid as u32)) {
                    let _ = tx.send(status);
                }
            }
        }
    }

    fn spawn(
        &self,
        cmd: &mut Command,
        confinement: &Confinement,
    ) -> io::Result<(std::process::Child, Receiver<libc::c_int>)> {
        let c = confinement.clone();
        // SAFETY: Confinement::apply only makes async-signal-safe syscalls on data prepared
        // before the fork.
        unsafe {
            cmd.pre_exec(move || c.apply());
        }
        let mut waiters = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let child = cmd.spawn()?;
        let (tx, rx) = mpsc::channel();
        waiters.insert(child.id(), tx);
        Ok((child, rx))
    }
}

/// Relays one output pipe to the host; the receiver fires at end-of-file.
fn relay_output(
    mut pipe: impl Read + Send + 'static,
    channel: Arc<Channel>,
    stderr: bool,
) -> Receiver<()> {
    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = vec![0u8; MAX_CHUNK];
        let mut first = true;
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if std::mem::take(&mut first) {
                        stage(if stderr {
                            "first stderr"
                        } else {
                            "first stdout"
                        });
                    }
                    let data = buf[..n].to_vec();
                    let msg = if stderr {
                        GuestMsg::Stderr(data)
                    } else {
                        GuestMsg::Stdout(data)
                    };
                    if channel.send(&msg).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = channel.send(if stderr {
            &GuestMsg::StderrEof
        } else {
            &GuestMsg::StdoutEof
        });
        let _ = done_tx.send(());
    });
    done_rx
}

fn feed_stdin(mut stdin: std::process::ChildStdin, rx: Receiver<Option<Vec<u8>>>) {
    while let Ok(Some(chunk)) = rx.recv() {
        if stdin.write_all(&chunk).is_err() {
            // The program closed its stdin: drain what the host still sends.
            while let Ok(Some(_)) = rx.recv() {}
            return;
        }
    }
}

struct ReaderCtx {
    channel: Arc<Channel>,
    reaper: Reaper,
    confinement: Confinement,
    env: Vec<(String, String)>,
    workdir: String,
    pid: u32,
    stdin: Option<SyncSender<Option<Vec<u8>>>>,
    shutdown: Sender<()>,
}

fn read_host(mut reader: File, mut ctx: ReaderCtx, halt: Halt) {
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut chunk = vec![0u8; 1 << 16];
    let mut hello = false;
    let started = Instant::now();
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) if !hello && started.elapsed() < Duration::from_secs(30) => {
                // A virtio-serial port reads EOF until the host side is reported connected.
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            let (msg, used) = match split_frame(&buf) {
                Ok(Some((tag, payload, used))) => (HostMsg::decode(tag, payload), used),
                Ok(None) => break,
                Err(e) => {
                    eprintln!("symbiont-guest: {e}");
                    host_gone(halt);
                }
            };
            buf.drain(..used);
            match msg {
                Ok(msg) => {
                    if matches!(msg, HostMsg::Hello) {
                        hello = true;
                    }
                    handle_host(msg, &mut ctx);
                }
                Err(e) => eprintln!("symbiont-guest: ignoring frame: {e}"),
            }
        }
    }
    host_gone(halt);
}

/// The host closed the channel: nobody can see the program any more, so end the VM.
fn host_gone(halt: Halt) -> ! {
    eprintln!("symbiont-guest: host channel closed, powering off");
    let _ = write_file(&format!("{AGENT_CGROUP}/cgroup.kill"), "1");
    halt_now(halt)
}

fn handle_host(msg: HostMsg, ctx: &mut ReaderCtx) {
    match msg {
        HostMsg::Hello => {}
        HostMsg::Stdin(data) => {
            if let Some(tx) = &ctx.stdin {
                if tx.send(Some(data)).is_err() {
                    ctx.stdin = None;
                }
            }
        }
        HostMsg::StdinEof => {
            if let Some(tx) = ctx.stdin.take() {
                let _ = tx.send(None);
            }
        }
        HostMsg::Signal(sig) => {
            // SAFETY: kill(2) with integers; the pid is our direct child (not yet reaped).
            unsafe { libc::kill(ctx.pid as libc::pid_t, sig) };
        }
        HostMsg::Exec {
            id,
            argv,
            timeout_ms,
        } => {
            let channel = ctx.channel.clone();
            let reaper = ctx.reaper.clone();
            let confinement = ctx.confinement.clone();
            let env = ctx.env.clone();
            let workdir = ctx.workdir.clone();
            thread::spawn(move || {
                let (code, stdout, stderr) = run_exec(
                    &argv,
                    Duration::from_millis(timeout_ms),
                    &reaper,
                    &confinement,
                    &env,
                    &workdir,
                );
                let _ = channel.send(&GuestMsg::ExecDone {
                    id,
                    code,
                    stdout,
                    stderr,
                });
            });
        }
        HostMsg::Stats { id } => {
            let _ = ctx.channel.send(&GuestMsg::Stats {
                id,
                stats: read_stats(),
            });
        }
        HostMsg::Shutdown => {
            let _ = ctx.shutdown.send(());
        }
    }
}

fn read_all_capped(mut r: impl Read + Send + 'static) -> Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = EXEC_OUTPUT_CAP.saturating_sub(out.len());
                    out.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
        let _ = tx.send(out);
    });
    rx
}

fn run_exec(
    argv: &[String],
    timeout: Duration,
    reaper: &Reaper,
    confinement: &Confinement,
    env: &[(String, String)],
    workdir: &str,
) -> (i32, Vec<u8>, Vec<u8>) {
    let Some(prog) = argv.first() else {
        return (127, Vec::new(), b"exec: empty argv\n".to_vec());
    };
    let mut cmd = Command::new(prog);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let (mut child, status_rx) = match reaper.spawn(&mut cmd, confinement) {
        Ok(x) => x,
        Err(e) => return (127, Vec::new(), format!("exec {prog}: {e}\n").into_bytes()),
    };
    let out_rx = child.stdout.take().map(read_all_capped);
    let err_rx = child.stderr.take().map(read_all_capped);
    let pid = child.id() as libc::pid_t;
    let status = match status_rx.recv_timeout(timeout) {
        Ok(s) => Some(s),
        Err(_) => {
            // SAFETY: kill(2) on the exec'd process group we created.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            status_rx.recv_timeout(Duration::from_secs(5)).ok()
        }
    };
    let grab = |rx: Option<Receiver<Vec<u8>>>| {
        rx.and_then(|rx| rx.recv_timeout(Duration::from_secs(2)).ok())
            .unwrap_or_default()
    };
    let (stdout, stderr) = (grab(out_rx), grab(err_rx));
    let code = match status {
        Some(s) if libc::WIFEXITED(s) => libc::WEXITSTATUS(s),
        _ => -1,
    };
    (code, stdout, stderr)
}

fn read_u64(path: &str) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn read_stats() -> GuestStats {
    let cpu_usec = fs::read_to_string(format!("{AGENT_CGROUP}/cpu.stat"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    GuestStats {
        memory_bytes: read_u64(&format!("{AGENT_CGROUP}/memory.current")),
        memory_peak_bytes: read_u64(&format!("{AGENT_CGROUP}/memory.peak")),
        cpu_usec,
        pids: read_u64(&format!("{AGENT_CGROUP}/pids.current")),
        net_rx_bytes: read_u64("/sys/class/net/eth0/statistics/rx_bytes"),
        net_tx_bytes: read_u64("/sys/class/net/eth0/statistics/tx_bytes"),
    }
}

mod netlimit {
    //! Network bandwidth ceilings the guest kernel enforces on `eth0`, installed over rtnetlink
    //! before the unprivileged program starts (it has no CAP_NET_ADMIN to undo them):
    //! egress — a `tbf` root qdisc on the NIC; ingress — the `ingress` qdisc with a
    //! `matchall` filter whose `mirred` action redirects every packet to the IFB device
    //! `ifb0`, where another `tbf` queues it to the rate. (Shaping rather than policing:
    //! dropping at ingress makes the sender's TCP — QEMU's user-mode stack with coarse
    //! retransmission timers — collapse far below the rate.)
    use super::Result;
    use std::io;

    const RTM_NEWQDISC: u16 = 36;
    const RTM_NEWTFILTER: u16 = 44;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_ACK: u16 = 0x4;
    const NLM_F_EXCL: u16 = 0x200;
    const NLM_F_CREATE: u16 = 0x400;
    const NLMSG_ERROR: u16 = 2;
    const TCA_KIND: u16 = 1;
    const TCA_OPTIONS: u16 = 2;
    const TCA_TBF_PARMS: u16 = 1;
    const TCA_TBF_BURST: u16 = 6;
    const TCA_MATCHALL_ACT: u16 = 2;
    const TCA_ACT_KIND: u16 = 1;
    const TCA_ACT_OPTIONS: u16 = 2;
    const TCA_MIRRED_PARMS: u16 = 2;
    const TCA_EGRESS_REDIR: i32 = 1;
    const TC_ACT_STOLEN: i32 = 4;
    const TC_H_ROOT: u32 = 0xFFFF_FFFF;
    const TC_H_INGRESS: u32 = 0xFFFF_FFF1;
    const TC_LINKLAYER_ETHERNET: u8 = 1;
    const ETH_P_ALL: u16 = 0x0003;
    /// The IFB device ingress traffic is redirected to.
    const IFB: &str = "ifb0";
    /// Kernel packet-scheduler ticks are 64 ns.
    const NS_PER_TICK: u64 = 64;

    /// Builds one netlink message with nested attributes.
    pub struct NlMsg {
        buf: Vec<u8>,
        nests: Vec<usize>,
    }

    impl NlMsg {
        pub fn new(kind: u16, flags: u16) -> Self {
            let mut buf = vec![0u8; 16];
            buf[4..6].copy_from_slice(&kind.to_ne_bytes());
            buf[6..8].copy_from_slice(&flags.to_ne_bytes());
            buf[8..12].copy_from_slice(&1u32.to_ne_bytes());
            Self {
                buf,
                nests: Vec::new(),
            }
        }
        fn pad(&mut self) {
            while self.buf.len() % 4 != 0 {
                self.buf.push(0);
            }
        }
        pub fn tcmsg(&mut self, ifindex: i32, handle: u32, parent: u32, info: u32) -> &mut Self {
            self.buf.extend_from_slice(&[0u8; 4]); // family, pad
            self.buf.extend_from_slice(&ifindex.to_ne_bytes());
            self.buf.extend_from_slice(&handle.to_ne_bytes());
            self.buf.extend_from_slice(&parent.to_ne_bytes());
            self.buf.extend_from_slice(&info.to_ne_bytes());
            self
        }
        pub fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
            self.buf
                .extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
            self.buf.extend_from_slice(&kind.to_ne_bytes());
            self.buf.extend_from_slice(data);
            self.pad();
            self
        }
        pub fn nest(&mut self, kind: u16) -> &mut Self {
            self.nests.push(self.buf.len());
            self.buf.extend_from_slice(&[0, 0]);
            self.buf.extend_from_slice(&kind.to_ne_bytes());
            self
        }
        pub fn end(&mut self) -> &mut Self {
            if let Some(start) = self.nests.pop() {
                let len = (self.buf.len() - start) as u16;
                self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
            }
            self
        }
        pub fn finish(mut self) -> Vec<u8> {
            let len = self.buf.len() as u32;
            self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
            self.buf
        }
    }

    /// `struct tc_ratespec` for `bytes_per_sec`.
    pub fn ratespec(bytes_per_sec: u32, cell_log: u8) -> [u8; 12] {
        let mut r = [0u8; 12];
        r[0] = cell_log;
        r[1] = TC_LINKLAYER_ETHERNET;
        r[4..6].copy_from_slice(&(-1i16).to_ne_bytes()); // cell_align
        r[8..12].copy_from_slice(&bytes_per_sec.to_ne_bytes());
        r
    }

    /// Ticks needed to send `size` bytes at `rate` bytes/s.
    pub fn xmit_ticks(rate: u32, size: u64) -> u32 {
        let ns = size.saturating_mul(1_000_000_000) / u64::from(rate.max(1));
        (ns / NS_PER_TICK).min(u64::from(u32::MAX)) as u32
    }

    /// The `tbf` qdisc request.
    pub fn tbf_request(ifindex: i32, rate: u32, burst: u32, limit: u32) -> Vec<u8> {
        let mut qopt = Vec::with_capacity(36);
        qopt.extend_from_slice(&ratespec(rate, 0));
        qopt.extend_from_slice(&[0u8; 12]); // no peak rate
        qopt.extend_from_slice(&limit.to_ne_bytes());
        qopt.extend_from_slice(&xmit_ticks(rate, u64::from(burst)).to_ne_bytes());
        qopt.extend_from_slice(&0u32.to_ne_bytes()); // mtu (peak only)
        let mut m = NlMsg::new(
            RTM_NEWQDISC,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        );
        m.tcmsg(ifindex, 0x0001_0000, TC_H_ROOT, 0)
            .attr(TCA_KIND, b"tbf\0")
            .nest(TCA_OPTIONS)
            .attr(TCA_TBF_PARMS, &qopt)
            .attr(TCA_TBF_BURST, &burst.to_ne_bytes())
            .end();
        m.finish()
    }

    /// The `ingress` qdisc request.
    pub fn ingress_request(ifindex: i32) -> Vec<u8> {
        let mut m = NlMsg::new(
            RTM_NEWQDISC,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        );
        m.tcmsg(ifindex, 0xFFFF_0000, TC_H_INGRESS, 0)
            .attr(TCA_KIND, b"ingress\0");
        m.finish()
    }

    /// The `matchall` filter on `dev`'s ingress qdisc whose `mirred` action redirects every
    /// packet to the egress of `target` (the IFB device that shapes it).
    pub fn redirect_request(ifindex: i32, target: i32) -> Vec<u8> {
        let mut mirred = Vec::with_capacity(28);
        mirred.extend_from_slice(&0u32.to_ne_bytes()); // index
        mirred.extend_from_slice(&0u32.to_ne_bytes()); // capab
        mirred.extend_from_slice(&TC_ACT_STOLEN.to_ne_bytes()); // action
        mirred.extend_from_slice(&0i32.to_ne_bytes()); // refcnt
        mirred.extend_from_slice(&0i32.to_ne_bytes()); // bindcnt
        mirred.extend_from_slice(&TCA_EGRESS_REDIR.to_ne_bytes()); // eaction
        mirred.extend_from_slice(&(target as u32).to_ne_bytes()); // ifindex
        let info = (1u32 << 16) | u32::from(ETH_P_ALL.to_be());
        let mut m = NlMsg::new(
            RTM_NEWTFILTER,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        );
        m.tcmsg(ifindex, 0, 0xFFFF_0000, info)
            .attr(TCA_KIND, b"matchall\0")
            .nest(TCA_OPTIONS)
            .nest(TCA_MATCHALL_ACT)
            .nest(1)
            .attr(TCA_ACT_KIND, b"mirred\0")
            .nest(TCA_ACT_OPTIONS)
            .attr(TCA_MIRRED_PARMS, &mirred)
            .end()
            .end()
            .end()
            .end();
        m.finish()
    }

    fn talk(fd: libc::c_int, msg: &[u8]) -> io::Result<()> {
        // SAFETY: msg is a valid buffer of its length; the kernel is the destination (the
        // socket is unconnected and netlink's default peer is the kernel).
        if unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply = [0u8; 4096];
        // SAFETY: reply is a writable buffer of its length.
        let n = unsafe { libc::recv(fd, reply.as_mut_ptr().cast(), reply.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n >= 20 && u16::from_ne_bytes([reply[4], reply[5]]) == NLMSG_ERROR {
            let errno = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
            if errno != 0 {
                return Err(io::Error::from_raw_os_error(-errno));
            }
            return Ok(());
        }
        Err(io::Error::other("unexpected netlink reply"))
    }

    /// Applies an egress and ingress ceiling of `rate_bps` bits per second on `dev`.
    pub fn apply(dev: &str, rate_bps: u64) -> Result<()> {
        let rate = (rate_bps / 8).clamp(1, u64::from(u32::MAX)) as u32;
        // Bursts of ~20 ms of traffic (at least a few full frames), queues of ~250 ms.
        let burst = (rate / 50).max(16 * 1024);
        let limit = (rate / 4).max(64 * 1024);
        let index = |name: &str| -> Result<i32> {
            let c = super::cstr(name)?;
            // SAFETY: c is a valid NUL-terminated string.
            let i = unsafe { libc::if_nametoindex(c.as_ptr()) } as i32;
            if i == 0 {
                return Err(super::os_err(format!("if_nametoindex {name}")));
            }
            Ok(i)
        };
        let ifindex = index(dev)?;
        // The ifb module creates ifb0 when it loads.
        super::wait_for_path(
            &format!("/sys/class/net/{IFB}"),
            std::time::Duration::from_secs(5),
        )?;
        let ifb = index(IFB)?;
        super::set_link_up(IFB)?;
        let fd = netlink_socket()?;
        let steps = [
            ("egress tbf qdisc", tbf_request(ifindex, rate, burst, limit)),
            ("ingress tbf qdisc", tbf_request(ifb, rate, burst, limit)),
            ("ingress qdisc", ingress_request(ifindex)),
            ("ingress redirect filter", redirect_request(ifindex, ifb)),
        ];
        let result = send_all(fd, dev, &steps);
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        result
    }

    fn netlink_socket() -> Result<libc::c_int> {
        // SAFETY: plain socket(2); the caller closes it.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(super::os_err("netlink socket"));
        }
        Ok(fd)
    }

    fn send_all(fd: libc::c_int, dev: &str, steps: &[(&str, Vec<u8>)]) -> Result<()> {
        for (what, msg) in steps {
            talk(fd, msg).map_err(|e| format!("network limit on {dev}: {what}: {e}"))?;
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn nested_attributes_get_their_lengths() {
            let mut m = NlMsg::new(RTM_NEWQDISC, NLM_F_REQUEST);
            m.tcmsg(2, 0, 0, 0).nest(TCA_OPTIONS).attr(1, b"abc").end();
            let b = m.finish();
            assert_eq!(
                u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize,
                b.len()
            );
            // header 16 + tcmsg 20, then the nest: 4 + (4 + 3 + 1 pad)
            assert_eq!(b.len(), 16 + 20 + 12);
            assert_eq!(u16::from_ne_bytes([b[36], b[37]]), 12);
            assert_eq!(u16::from_ne_bytes([b[40], b[41]]), 7);
        }

        #[test]
        fn ticks_follow_the_rate() {
            // 1500 bytes at 1.25 MB/s (10 Mbit/s) take 1.2 ms = 18750 ticks of 64 ns.
            assert_eq!(xmit_ticks(1_250_000, 1500), 18_750);
        }

        #[test]
        fn the_kernel_accepts_the_requests() {
            // In a private network namespace (this thread only), on its loopback device.
            let handle = std::thread::spawn(|| {
                // SAFETY: unshare(2) of the calling thread's network namespace.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(format!(
                        "unshare(CLONE_NEWNET) failed ({}); these tests run as root",
                        io::Error::last_os_error()
                    ));
                }
                super::super::set_link_up("lo")?;
                // The host kernel may lack matchall/mirred (the guest kernel has them as
                // modules; the VM tests exercise that part): check the qdiscs here.
                let fd = netlink_socket()?;
                let steps = [
                    ("tbf qdisc", tbf_request(1, 1_250_000, 25_000, 125_000)),
                    ("ingress qdisc", ingress_request(1)),
                ];
                let r = send_all(fd, "lo", &steps);
                // SAFETY: fd is ours.
                unsafe { libc::close(fd) };
                r
            });
            handle
                .join()
                .expect("thread")
                .expect("tbf and ingress qdiscs accepted");
        }

        #[test]
        fn requests_are_well_formed() {
            for msg in [
                tbf_request(2, 1_250_000, 25_000, 125_000),
                ingress_request(2),
                redirect_request(2, 3),
            ] {
                assert_eq!(
                    u32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize,
                    msg.len()
                );
                assert_eq!(msg.len() % 4, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_is_split_into_params() {
        let p = parse_cmdline("console=ttyS0 quiet virtio_mmio.device=4K@0xd0000000:5 a=b=c\n");
        assert_eq!(param(&p, "console"), Some("ttyS0"));
        assert_eq!(param(&p, "quiet"), Some(""));
        assert_eq!(param(&p, "virtio_mmio.device"), Some("4K@0xd0000000:5"));
        assert_eq!(param(&p, "a"), Some("b=c"));
        assert_eq!(param(&p, "missing"), None);
    }

    #[test]
    fn program_env_overrides_defaults() {
        let cfg = GuestConfig {
            argv: vec!["/bin/true".into()],
            env: vec![("PATH".into(), "/x".into()), ("A".into(), "1".into())],
            workdir: "/workspace".into(),
            uid: 1000,
            gid: 1000,
            memory_limit_bytes: 0,
            pids_limit: 0,
            modules: vec![],
            workspace_device: None,
            network: None,
        };
        let env = program_env(&cfg);
        assert_eq!(env.iter().filter(|(k, _)| k == "PATH").count(), 1);
        assert!(env.contains(&("PATH".into(), "/x".into())));
        assert!(env.contains(&("A".into(), "1".into())));
    }
}
