//! The Tier3 microVM sandbox: every agent in its own virtual machine.
//!
//! [`MicrovmBackend`] boots Debian's cloud kernel with an initramfs the runtime builds
//! in-process (busybox, the needed kernel modules, the agent's config and files, and the
//! static guest init from the `symbiont-guest` crate) under QEMU's `microvm` machine — or
//! Firecracker when its binary is on `PATH` (`vmm = "auto"`) or demanded (`vmm =
//! "firecracker"`). It probes whether KVM really runs guests here and falls back to TCG with
//! a warning (see [`kvm`]).
//!
//! The agent's stdin/stdout/stderr, its exit status, `exec`, signals and statistics travel
//! over one multiplexed channel ([`symbiont_guest::protocol`]): a virtio-serial port under
//! QEMU, a vsock connection under Firecracker. Limits: guest RAM = `memory_mb` +
//! `memory_overhead_mb` with the program itself confined to `memory_mb` by a memory cgroup
//! inside the guest (an OOM kill is reported as [`ExitReason::OutOfMemory`]); vCPUs =
//! `ceil(cpu_cores)` plus a CFS quota of `cpu_cores` on the VMM process (host cgroup, see
//! [`hostcg`]); disk bandwidth by the VMM's block throttling on the workspace disk; network
//! bandwidth by token-bucket qdiscs the guest init installs on the guest's NIC (egress) and
//! on an IFB device its ingress is redirected to, before the unprivileged program starts. Without `Capability::Network` the VM has no NIC at all.
//!
//! Layout of the module: [`cpio`] (newc writer), [`image`] (kernel, modules, image cache),
//! [`vmm`] (QEMU/Firecracker command lines), [`kvm`] (accelerator probe), [`hostcg`] (VMM
//! cgroup), [`qmp`] (QEMU control socket) and `sandbox` (the [`Sandbox`] implementation).
//!
//! [`ExitReason::OutOfMemory`]: crate::sandbox::ExitReason::OutOfMemory
//! [`Sandbox`]: crate::sandbox::Sandbox

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use symbiont_guest::protocol::{GuestConfig, NetConfig};
use tokio::sync::OnceCell;

use crate::config::{ConfigIssue, Validate};
use crate::sandbox::{
    EnforcementSupport, Sandbox, SandboxBackend, SandboxConfig, SandboxError, SandboxSpec, TierInfo,
};
use crate::types::{Capability, SecurityTier};

pub mod cpio;
pub mod hostcg;
pub mod image;
pub mod kvm;
pub mod qmp;
mod sandbox;
pub mod vmlinux;
pub mod vmm;

pub use image::{CacheStats, DEFAULT_GUEST_INIT, DEFAULT_KERNEL_DIR};
pub use kvm::AccelMode;
pub use sandbox::MicrovmSandbox;
pub use vmm::{Accel, Vmm};

use image::{BaseInputs, GuestKernel, ImageCache, ModuleIndex};

/// The address at which a guest with `Capability::Network` reaches the host's 127.0.0.1
/// (QEMU user networking's gateway), exported to the program as `SYMBIONT_HOST_ADDR`.
pub const GUEST_HOST_ADDR: &str = "10.0.2.2";
/// The guest's own address under QEMU user networking.
pub const GUEST_ADDR: &str = "10.0.2.15/24";

/// `vmm` setting of `[sandbox.microvm]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VmmChoice {
    /// Firecracker when `firecracker_binary` is found, else QEMU.
    #[default]
    Auto,
    /// QEMU `microvm`.
    Qemu,
    /// Firecracker.
    Firecracker,
}

/// `[sandbox.microvm]` configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MicrovmConfig {
    /// `auto`, `qemu` or `firecracker`.
    pub vmm: VmmChoice,
    /// `auto` (probe KVM, fall back to TCG with a warning), `kvm` or `tcg`.
    pub accel: AccelMode,
    /// QEMU binary (name on `PATH` or absolute path).
    pub qemu_binary: PathBuf,
    /// Firecracker binary (name on `PATH` or absolute path).
    pub firecracker_binary: PathBuf,
    /// Where the guest kernel package is unpacked (`boot/vmlinuz-*`, `lib/modules/*`).
    pub kernel_dir: PathBuf,
    /// Explicit bootable kernel image: a bzImage, or an ELF `vmlinux` (with a PVH note for
    /// QEMU's direct boot).
    pub kernel: Option<PathBuf>,
    /// Boot the ELF `vmlinux` inside the kernel image through its PVH entry (extracted once,
    /// next to the kernel or in the state directory): QEMU loads it directly, skipping the
    /// firmware's copy and the kernel's self-decompression (about 0.3 s per boot under TCG).
    /// `false` boots the image as packaged. Firecracker always boots an ELF.
    pub direct_boot: bool,
    /// The static guest init binary built from the `guest/` crate.
    pub guest_init: PathBuf,
    /// A static busybox placed in every guest.
    pub busybox: PathBuf,
    /// `mkfs.ext4`, used to format each sandbox's workspace disk.
    pub mkfs_ext4: PathBuf,
    /// Guest RAM added to the agent's `memory_mb` for the guest kernel and init, in MiB.
    pub memory_overhead_mb: u64,
    /// Host memory allowed to the VMM process beyond the guest RAM, in MiB.
    pub vmm_overhead_mb: u64,
    /// Size of the (sparse) workspace disk in MiB; 0 puts the workspace on a tmpfs (then
    /// disk bandwidth limits cannot be enforced).
    pub workspace_disk_mb: u64,
    /// Unprivileged uid (and gid) the agent's program runs as inside the guest.
    pub guest_uid: u32,
    /// Longest a VM may take from launch until the program runs.
    #[serde(with = "humantime_serde")]
    pub boot_timeout: Duration,
    /// Longest the KVM probe guest may take before KVM is declared unusable.
    #[serde(with = "humantime_serde")]
    pub kvm_probe_timeout: Duration,
    /// Most disk space the image cache may use, in MiB (least recently used evicted).
    pub image_cache_max_mb: u64,
    /// Verbose guest console: all kernel messages and the guest init's stage timings go to
    /// the sandbox's `console.log` (slower boots; for diagnosis).
    pub guest_debug: bool,
}

impl Default for MicrovmConfig {
    fn default() -> Self {
        Self {
            vmm: VmmChoice::Auto,
            accel: AccelMode::Auto,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            firecracker_binary: PathBuf::from("firecracker"),
            kernel_dir: PathBuf::from(DEFAULT_KERNEL_DIR),
            kernel: None,
            direct_boot: true,
            guest_init: PathBuf::from(DEFAULT_GUEST_INIT),
            busybox: PathBuf::from("/bin/busybox"),
            mkfs_ext4: PathBuf::from("mkfs.ext4"),
            memory_overhead_mb: 64,
            vmm_overhead_mb: 256,
            workspace_disk_mb: 512,
            guest_uid: 1000,
            boot_timeout: Duration::from_secs(60),
            kvm_probe_timeout: Duration::from_secs(5),
            image_cache_max_mb: 1024,
            guest_debug: false,
        }
    }
}

impl Validate for MicrovmConfig {
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        let k = |f: &str| format!("sandbox.microvm.{f}");
        if self.memory_overhead_mb < 32 {
            issues.push(ConfigIssue::new(
                k("memory_overhead_mb"),
                "must be at least 32 (the guest kernel needs it)",
            ));
        }
        if self.workspace_disk_mb != 0 && self.workspace_disk_mb < 16 {
            issues.push(ConfigIssue::new(
                k("workspace_disk_mb"),
                "must be 0 (tmpfs workspace) or at least 16",
            ));
        }
        if self.guest_uid == 0 {
            issues.push(ConfigIssue::new(
                k("guest_uid"),
                "must not be 0: the agent never runs as root in the guest",
            ));
        }
        if self.boot_timeout.is_zero() {
            issues.push(ConfigIssue::new(
                k("boot_timeout"),
                "must be longer than 0s",
            ));
        }
        if self.kvm_probe_timeout.is_zero() {
            issues.push(ConfigIssue::new(
                k("kvm_probe_timeout"),
                "must be longer than 0s",
            ));
        }
        for (field, p) in [
            ("qemu_binary", &self.qemu_binary),
            ("firecracker_binary", &self.firecracker_binary),
            ("kernel_dir", &self.kernel_dir),
            ("guest_init", &self.guest_init),
            ("busybox", &self.busybox),
            ("mkfs_ext4", &self.mkfs_ext4),
        ] {
            if p.as_os_str().is_empty() {
                issues.push(ConfigIssue::new(k(field), "must not be empty"));
            }
        }
    }
}

fn unavailable(reason: impl Into<String>) -> SandboxError {
    SandboxError::Unavailable {
        tier: SecurityTier::Tier3,
        reason: reason.into(),
    }
}

/// Kernel modules in load order: (name, path on the host).
type ModuleList = Vec<(String, PathBuf)>;

/// What the backend found on this host (resolved once).
#[derive(Debug)]
pub(crate) struct HostEnv {
    pub(crate) vmm: Vmm,
    pub(crate) vmm_binary: PathBuf,
    pub(crate) kernel: GuestKernel,
    pub(crate) modules: ModuleIndex,
    pub(crate) accel: Accel,
    pub(crate) warnings: Vec<String>,
}

/// Creates Tier3 microVM sandboxes.
pub struct MicrovmBackend {
    cfg: MicrovmConfig,
    state_dir: PathBuf,
    pids_limit: u64,
    cache: Arc<ImageCache>,
    env: OnceCell<Arc<HostEnv>>,
    resolved: parking_lot::Mutex<HashMap<Vec<&'static str>, ModuleList>>,
}

impl std::fmt::Debug for MicrovmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicrovmBackend")
            .field("cfg", &self.cfg)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl MicrovmBackend {
    /// A backend from the `[sandbox]` configuration (state under `state_dir/microvm`).
    pub fn new(sandbox: &SandboxConfig) -> Self {
        Self::with_config(
            sandbox.microvm.clone(),
            sandbox.state_dir.clone(),
            sandbox.pids_limit,
        )
    }

    /// A backend from its own section, a state directory and the pids limit.
    pub fn with_config(cfg: MicrovmConfig, state_dir: PathBuf, pids_limit: u64) -> Self {
        let root = state_dir.join("microvm");
        let cache = Arc::new(ImageCache::new(
            root.join("images"),
            cfg.image_cache_max_mb.saturating_mul(1 << 20),
        ));
        Self {
            cfg,
            state_dir: root,
            pids_limit,
            cache,
            env: OnceCell::new(),
            resolved: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MicrovmConfig {
        &self.cfg
    }

    /// Image cache counters (hits mean a sandbox reused a previously built image).
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// The accelerator VMs use on this host (runs the KVM probe on first use).
    pub async fn accel(&self) -> Result<Accel, SandboxError> {
        Ok(self.host_env().await?.accel)
    }

    /// The VMM in use (after probing).
    pub async fn vmm(&self) -> Result<Vmm, SandboxError> {
        Ok(self.host_env().await?.vmm)
    }

    /// The guest kernel image in use (the extracted `vmlinux` under direct boot).
    pub async fn kernel_image(&self) -> Result<PathBuf, SandboxError> {
        Ok(self.host_env().await?.kernel.image.clone())
    }

    /// The guest kernel image as packaged (Debian's `vmlinuz`), before any extraction.
    pub async fn packaged_kernel_image(&self) -> Result<PathBuf, SandboxError> {
        Ok(self.host_env().await?.kernel.packaged.clone())
    }

    /// Writes a minimal busybox initramfs whose `/init` prints [`kvm::BOOT_MARKER`] and
    /// powers off (the KVM probe's guest) and returns its path.
    pub fn minimal_initramfs(&self) -> Result<PathBuf, SandboxError> {
        let bytes = kvm::minimal_initramfs(&self.cfg.busybox)?;
        let hash = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&bytes))
        };
        let path = self
            .state_dir
            .join("images")
            .join(format!("minimal-{}.cpio.gz", &hash[..16]));
        if !path.exists() {
            image::store(&path, &[&bytes])
                .map_err(|e| SandboxError::op("image cache", format!("{}: {e}", path.display())))?;
        }
        Ok(path)
    }

    async fn host_env(&self) -> Result<Arc<HostEnv>, SandboxError> {
        self.env
            .get_or_try_init(|| async { self.discover().await.map(Arc::new) })
            .await
            .cloned()
    }

    async fn discover(&self) -> Result<HostEnv, SandboxError> {
        let cfg = &self.cfg;
        let fc = kvm::which(&cfg.firecracker_binary);
        let (vmm, vmm_binary) = match cfg.vmm {
            VmmChoice::Firecracker => (
                Vmm::Firecracker,
                fc.ok_or_else(|| {
                    unavailable(format!(
                        "vmm = \"firecracker\" but `{}` is not on PATH; Firecracker is not \
                         packaged by Debian: install its release binary, or use vmm = \"qemu\"",
                        cfg.firecracker_binary.display()
                    ))
                })?,
            ),
            VmmChoice::Auto if fc.is_some() => (Vmm::Firecracker, fc.unwrap_or_default()),
            _ => (
                Vmm::Qemu,
                kvm::which(&cfg.qemu_binary).ok_or_else(|| {
                    unavailable(format!(
                        "`{}` not found; install it with `apt-get install \
                         --no-install-recommends qemu-system-x86` (or run `bash scripts/setup.sh`)",
                        cfg.qemu_binary.display()
                    ))
                })?,
            ),
        };
        let mut kernel = GuestKernel::locate(&cfg.kernel_dir, cfg.kernel.as_deref())?;
        let mut warnings = Vec::new();
        // Firecracker boots any ELF vmlinux (its own loader, PVH note or not): a configured
        // one is used as is.
        let firecracker_elf = vmm == Vmm::Firecracker && vmlinux::is_elf(&kernel.image);
        if (cfg.direct_boot || vmm == Vmm::Firecracker) && !firecracker_elf {
            // Next to the packaged kernel when we may write there (one extraction per host),
            // else in our state directory.
            let src = kernel.image.clone();
            let mut dirs: Vec<PathBuf> = src.parent().map(Path::to_path_buf).into_iter().collect();
            dirs.push(self.state_dir.join("kernel"));
            let elf = tokio::task::spawn_blocking(move || vmlinux::direct_boot_image(&src, &dirs))
                .await
                .map_err(|e| SandboxError::op("kernel extraction", e))?;
            match elf {
                Ok(path) => kernel.image = path,
                Err(why) if vmm == Vmm::Firecracker => {
                    return Err(unavailable(format!(
                        "Firecracker boots an uncompressed ELF vmlinux, and none could be had \
                         from {}: {why}; extract it (linux's scripts/extract-vmlinux) and set \
                         [sandbox.microvm] kernel",
                        kernel.image.display()
                    )))
                }
                Err(why) => {
                    let w = format!(
                        "direct kernel boot unavailable ({why}); booting {} through the \
                         firmware, slower",
                        kernel.image.display()
                    );
                    tracing::warn!(tier = "microvm", "{w}");
                    warnings.push(w);
                }
            }
        }
        if !cfg.guest_init.is_file() {
            return Err(unavailable(format!(
                "the guest init {} is missing; build and install it with `bash \
                 scripts/setup.d/30-microvm.sh` (it runs `cargo build -p symbiont-guest \
                 --release --target x86_64-unknown-linux-gnu` with RUSTFLAGS=\"-C \
                 target-feature=+crt-static\" and copies the binary there), or set \
                 [sandbox.microvm] guest_init",
                cfg.guest_init.display()
            )));
        }
        if !cfg.busybox.is_file() {
            return Err(unavailable(format!(
                "{} is missing; install busybox-static",
                cfg.busybox.display()
            )));
        }
        if cfg.workspace_disk_mb > 0 && kvm::which(&cfg.mkfs_ext4).is_none() {
            return Err(unavailable(format!(
                "`{}` not found; install e2fsprogs",
                cfg.mkfs_ext4.display()
            )));
        }
        let modules_dir = kernel.modules_dir.clone();
        let modules = tokio::task::spawn_blocking(move || ModuleIndex::scan(&modules_dir))
            .await
            .map_err(|e| SandboxError::op("module scan", e))??;
        let accel = match vmm {
            Vmm::Firecracker => {
                if let Err(e) = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                {
                    return Err(unavailable(format!("Firecracker needs /dev/kvm: {e}")));
                }
                Accel::Kvm
            }
            Vmm::Qemu => {
                let probe = if cfg.accel == AccelMode::Tcg {
                    None
                } else {
                    Some(self.kvm_probe(&vmm_binary, &kernel).await?)
                };
                let (accel, warning) =
                    kvm::decide(cfg.accel, probe.as_ref()).map_err(unavailable)?;
                if let Some(w) = warning {
                    tracing::warn!(tier = "microvm", "{w}");
                    warnings.push(w);
                }
                accel
            }
        };
        tracing::info!(vmm = vmm.backend_name(), %accel, kernel = %kernel.image.display(), "microVM tier ready");
        Ok(HostEnv {
            vmm,
            vmm_binary,
            kernel,
            modules,
            accel,
            warnings,
        })
    }

    async fn kvm_probe(
        &self,
        qemu: &Path,
        kernel: &GuestKernel,
    ) -> Result<kvm::KvmProbe, SandboxError> {
        // One probe per host, kernel and QEMU per process (backends in the same process share
        // it) and across processes through a file in the state directory.
        static PROBES: tokio::sync::Mutex<Vec<(String, kvm::KvmProbe)>> =
            tokio::sync::Mutex::const_new(Vec::new());
        // Keyed by the packaged kernel: the same for every state directory.
        let key = kvm::probe_cache_key(qemu, &kernel.packaged);
        let mut probes = PROBES.lock().await;
        if let Some((_, p)) = probes.iter().find(|(k, _)| *k == key) {
            return Ok(p.clone());
        }
        let result = self.kvm_probe_uncached(qemu, &kernel.image, &key).await?;
        probes.push((key, result.clone()));
        Ok(result)
    }

    async fn kvm_probe_uncached(
        &self,
        qemu: &Path,
        kernel: &Path,
        key: &str,
    ) -> Result<kvm::KvmProbe, SandboxError> {
        let cache_file = self.state_dir.join("kvm-probe.json");
        if let Some(cached) = kvm::read_cached(&cache_file, key) {
            return Ok(cached);
        }
        let initrd = self.minimal_initramfs()?;
        tracing::info!("probing whether KVM runs guests on this host");
        let result = kvm::probe_kvm(qemu, kernel, &initrd, self.cfg.kvm_probe_timeout).await;
        kvm::write_cached(&cache_file, key, &result);
        Ok(result)
    }

    /// The initramfs an agent with `spec` boots: built like [`SandboxBackend::create`]
    /// builds it, or taken from the cache. The benchmark boots it bare (without the guest
    /// init) for its same-image baseline.
    pub async fn image_for(&self, spec: &SandboxSpec) -> Result<PathBuf, SandboxError> {
        spec.validate()?;
        let env = self.host_env().await?;
        Ok(self.build_image(&env, spec).await?.path)
    }

    /// Builds (or finds in the cache) the image for `spec`: the base layer for its module
    /// set and the agent layer with its guest config and files.
    async fn build_image(
        &self,
        env: &HostEnv,
        spec: &SandboxSpec,
    ) -> Result<image::BuiltImage, SandboxError> {
        let network = spec.has_capability(&Capability::Network);
        let disk = self.cfg.workspace_disk_mb > 0;
        let net_limit = network && spec.limits.network_io_mbps > 0;
        let modules = self.modules_for(
            env,
            wanted_modules(env.vmm, env.accel, disk, network, net_limit),
        )?;
        let guest = guest_config(spec, self.cfg.guest_uid, self.pids_limit, &modules, disk);
        let inputs = BaseInputs {
            guest_init: self.cfg.guest_init.clone(),
            busybox: self.cfg.busybox.clone(),
            modules,
            uid: self.cfg.guest_uid,
        };
        let cache = self.cache.clone();
        let files = spec.files.clone();
        let resolv = network.then_some("nameserver 10.0.2.3\n");
        let built = tokio::task::spawn_blocking(move || {
            let base = cache.base(&inputs)?;
            let layer = image::build_agent_layer(&guest, &files, resolv);
            cache.image(&base, &layer)
        })
        .await
        .map_err(|e| SandboxError::op("image build", e))??;
        Ok(built)
    }

    fn modules_for(
        &self,
        env: &HostEnv,
        wanted: Vec<&'static str>,
    ) -> Result<Vec<(String, PathBuf)>, SandboxError> {
        if let Some(found) = self.resolved.lock().get(&wanted) {
            return Ok(found.clone());
        }
        let found = env.modules.resolve(&wanted, &image::module_depends)?;
        self.resolved.lock().insert(wanted, found.clone());
        Ok(found)
    }
}

/// The kernel modules a guest needs for its channel, disk, entropy source and network.
pub fn wanted_modules(
    vmm: Vmm,
    accel: Accel,
    disk: bool,
    network: bool,
    net_limit: bool,
) -> Vec<&'static str> {
    // The block driver first: the guest mounts the disk from a second thread while it loads
    // the rest, so the disk's I/O overlaps the boot.
    let mut m = vec!["virtio_mmio"];
    if disk {
        m.push("virtio_blk");
    }
    match vmm {
        Vmm::Qemu => m.push("virtio_console"),
        Vmm::Firecracker => m.push("vmw_vsock_virtio_transport"),
    }
    // Under TCG the guest's entropy comes from RDRAND (see `vmm::accel_args`); under KVM
    // QEMU adds a virtio-rng device.
    if vmm == Vmm::Qemu && accel == Accel::Kvm {
        m.push("virtio_rng");
    }
    if network {
        m.push("virtio_net");
        if net_limit {
            m.extend([
                "sch_tbf",
                "sch_ingress",
                "cls_matchall",
                "act_mirred",
                "ifb",
            ]);
        }
    }
    m
}

/// Translates a spec into the guest's config (deterministic: equal specs give equal bytes,
/// so their images share a cache entry).
pub fn guest_config(
    spec: &SandboxSpec,
    uid: u32,
    pids_limit: u64,
    modules: &[(String, PathBuf)],
    disk: bool,
) -> GuestConfig {
    let network = spec.has_capability(&Capability::Network);
    let mut env: Vec<(String, String)> = spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if network {
        env.push(("SYMBIONT_HOST_ADDR".into(), GUEST_HOST_ADDR.into()));
    }
    env.sort();
    GuestConfig {
        argv: spec.argv.clone(),
        env,
        workdir: spec.workdir.to_string_lossy().to_string(),
        uid,
        gid: uid,
        memory_limit_bytes: spec.limits.memory_bytes(),
        pids_limit,
        modules: modules
            .iter()
            .map(|(n, _)| image::guest_module_path(n))
            .collect(),
        workspace_device: disk.then(|| "/dev/vda".to_string()),
        network: network.then(|| NetConfig {
            address: GUEST_ADDR.into(),
            gateway: GUEST_HOST_ADDR.into(),
            rate_bps: spec.limits.network_io_mbps.saturating_mul(1_000_000),
        }),
    }
}

#[async_trait]
impl SandboxBackend for MicrovmBackend {
    fn tier(&self) -> SecurityTier {
        SecurityTier::Tier3
    }

    async fn probe(&self) -> Result<TierInfo, SandboxError> {
        let env = self.host_env().await?;
        Ok(TierInfo {
            tier: SecurityTier::Tier3,
            backend: env.vmm.backend_name().to_string(),
            details: format!(
                "{} ({}), accel {}, kernel {}",
                env.vmm_binary.display(),
                env.vmm.backend_name(),
                env.accel,
                env.kernel.release
            ),
            warnings: env.warnings.clone(),
        })
    }

    fn enforcement(&self) -> EnforcementSupport {
        EnforcementSupport {
            memory: true,
            cpu: true,
            pids: true,
            disk_io: self.cfg.workspace_disk_mb > 0,
            network_io: true,
        }
    }

    async fn create(&self, spec: SandboxSpec) -> Result<Arc<dyn Sandbox>, SandboxError> {
        spec.validate()?;
        if let Some(image) = &spec.image {
            tracing::warn!(
                image,
                "Tier3 ignores SandboxSpec::image: the guest root is the runtime-built busybox \
                 initramfs plus the agent's files"
            );
        }
        let env = self.host_env().await?;
        let network = spec.has_capability(&Capability::Network);
        if network && env.vmm == Vmm::Firecracker {
            return Err(unavailable(
                "Capability::Network under Firecracker needs a tap device, which this backend \
                 does not set up; use vmm = \"qemu\"",
            ));
        }
        let built = self.build_image(&env, &spec).await?;
        tracing::debug!(hash = %built.hash, cache_hit = built.cache_hit, "microVM image ready");
        sandbox::MicrovmSandbox::prepare(sandbox::Prepare {
            spec,
            env,
            cfg: self.cfg.clone(),
            run_root: self.state_dir.join("run"),
            image: built,
        })
        .await
        .map(|s| s as Arc<dyn Sandbox>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::AgentId;

    #[test]
    fn config_defaults_validate_and_bad_values_are_named() {
        let mut issues = Vec::new();
        MicrovmConfig::default().validate(&mut issues);
        assert!(issues.is_empty(), "{issues:?}");
        let bad = MicrovmConfig {
            guest_uid: 0,
            memory_overhead_mb: 1,
            workspace_disk_mb: 3,
            boot_timeout: Duration::ZERO,
            ..Default::default()
        };
        bad.validate(&mut issues);
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        assert!(keys.contains(&"sandbox.microvm.guest_uid"));
        assert!(keys.contains(&"sandbox.microvm.memory_overhead_mb"));
        assert!(keys.contains(&"sandbox.microvm.workspace_disk_mb"));
        assert!(keys.contains(&"sandbox.microvm.boot_timeout"));
    }

    #[test]
    fn config_parses_from_toml() {
        let cfg: MicrovmConfig =
            toml::from_str("vmm = \"firecracker\"\naccel = \"tcg\"\nboot_timeout = \"90s\"\n")
                .expect("parses");
        assert_eq!(cfg.vmm, VmmChoice::Firecracker);
        assert_eq!(cfg.accel, AccelMode::Tcg);
        assert_eq!(cfg.boot_timeout, Duration::from_secs(90));
        assert!(toml::from_str::<MicrovmConfig>("nope = 1").is_err());
    }

    #[test]
    fn guest_config_is_deterministic_and_carries_network_contract() {
        let mut spec = SandboxSpec::new(AgentId::new(), ["/bin/sh", "-c", "true"]);
        for i in 0..20 {
            spec.env.insert(format!("K{i}"), format!("v{i}"));
        }
        let a = guest_config(&spec, 1000, 64, &[], true).encode();
        let b = guest_config(&spec.clone(), 1000, 64, &[], true).encode();
        assert_eq!(a, b, "env order must not change the image hash");
        let plain = guest_config(&spec, 1000, 64, &[], false);
        assert!(plain.network.is_none());
        assert!(plain.workspace_device.is_none());
        assert!(!plain.env.iter().any(|(k, _)| k == "SYMBIONT_HOST_ADDR"));
        spec.capabilities.push(Capability::Network);
        spec.limits.network_io_mbps = 10;
        let net = guest_config(&spec, 1000, 64, &[], true);
        assert_eq!(net.network.as_ref().map(|n| n.rate_bps), Some(10_000_000));
        assert!(net.env.contains(&(
            "SYMBIONT_HOST_ADDR".to_string(),
            GUEST_HOST_ADDR.to_string()
        )));
        assert_eq!(net.memory_limit_bytes, spec.limits.memory_bytes());
    }

    #[test]
    fn modules_follow_devices() {
        assert_eq!(
            wanted_modules(Vmm::Qemu, Accel::Tcg, false, false, false),
            ["virtio_mmio", "virtio_console"]
        );
        assert_eq!(
            wanted_modules(Vmm::Qemu, Accel::Kvm, true, false, false),
            ["virtio_mmio", "virtio_blk", "virtio_console", "virtio_rng"]
        );
        let fc = wanted_modules(Vmm::Firecracker, Accel::Kvm, true, false, false);
        assert!(fc.contains(&"vmw_vsock_virtio_transport") && fc.contains(&"virtio_blk"));
        let net = wanted_modules(Vmm::Qemu, Accel::Tcg, true, true, true);
        assert!(net.contains(&"virtio_net") && net.contains(&"sch_tbf"));
    }
}
