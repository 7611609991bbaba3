//! Choosing the accelerator: does KVM really run a guest here?
//!
//! `/dev/kvm` opening is not enough (on nested hosts it opens, creates a VM, and the guest
//! never runs). The probe boots the guest kernel with a minimal busybox initramfs whose
//! `/init` prints a marker line and powers off, under `-accel kvm` and a short timeout. The
//! result is cached in a file keyed by the host kernel and the QEMU binary, so only the first
//! sandbox on a host pays for it. [`decide`] turns the configured mode and the probe result
//! into the accelerator and the warning shown in the log and in `TierInfo.warnings`.
//!
//! [`bare_boot`] also gives the benchmark its baselines: bare QEMU boots of the same kernel
//! and the agent's own initramfs ([`BareInit::Busybox`]), measured to the first line the
//! guest prints.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::cpio::CpioWriter;
use super::vmm::{Accel, BASE_CMDLINE};
use crate::sandbox::SandboxError;

/// The line the minimal initramfs prints.
pub const BOOT_MARKER: &str = "SYMBIONT_BOOT_MARKER";

/// `accel` setting of `[sandbox.microvm]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccelMode {
    /// KVM when the probe shows it works, else TCG with a warning.
    #[default]
    Auto,
    /// KVM or nothing (SANDBOX_001 when it does not work).
    Kvm,
    /// Always TCG; no probe.
    Tcg,
}

/// What the KVM probe found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvmProbe {
    /// A guest booted and printed its line under KVM.
    Works,
    /// `/dev/kvm` is missing or cannot be opened.
    NoDevice(String),
    /// The device opens but the guest failed or did not finish in time.
    GuestFailed(String),
}

/// The accelerator to use and a warning for the operator, from the mode and the probe.
/// `probe` is only consulted for `Auto` and `Kvm`.
pub fn decide(
    mode: AccelMode,
    probe: Option<&KvmProbe>,
) -> Result<(Accel, Option<String>), String> {
    match (mode, probe) {
        (AccelMode::Tcg, _) => Ok((Accel::Tcg, None)),
        (_, Some(KvmProbe::Works)) => Ok((Accel::Kvm, None)),
        (AccelMode::Kvm, Some(p)) => Err(format!(
            "accel = \"kvm\" but KVM cannot run guests on this host ({}); set \
             [sandbox.microvm] accel = \"auto\" or \"tcg\"",
            describe(p)
        )),
        (AccelMode::Kvm, None) | (AccelMode::Auto, None) => {
            Err("the KVM probe did not run".to_string())
        }
        (AccelMode::Auto, Some(p)) => Ok((
            Accel::Tcg,
            Some(format!(
                "KVM unusable ({}); microVMs run under TCG emulation, much slower",
                describe(p)
            )),
        )),
    }
}

fn describe(p: &KvmProbe) -> String {
    match p {
        KvmProbe::Works => "works".into(),
        KvmProbe::NoDevice(why) => format!("/dev/kvm: {why}"),
        KvmProbe::GuestFailed(why) => format!("a test guest did not run: {why}"),
    }
}

/// A gzip-compressed newc initramfs holding busybox and an `/init` that prints
/// [`BOOT_MARKER`] and powers off.
pub fn minimal_initramfs(busybox: &Path) -> Result<Vec<u8>, SandboxError> {
    let bb = std::fs::read(busybox).map_err(|e| SandboxError::Unavailable {
        tier: crate::types::SecurityTier::Tier3,
        reason: format!(
            "cannot read {}: {e}; install busybox-static (`bash scripts/setup.sh`)",
            busybox.display()
        ),
    })?;
    let mut w = CpioWriter::new();
    w.dir("dev", 0o755);
    w.char_dev("dev/console", 0o600, 5, 1);
    w.dir("proc", 0o755);
    w.file("bin/busybox", 0o755, &bb);
    w.file(
        "init",
        0o755,
        format!("#!/bin/busybox sh\n/bin/busybox echo {BOOT_MARKER}\n/bin/busybox poweroff -f\n")
            .as_bytes(),
    );
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut enc, &w.finish())
        .map_err(|e| SandboxError::op("initramfs", e))?;
    enc.finish().map_err(|e| SandboxError::op("initramfs", e))
}

/// The host's TSC frequency in kHz, measured once (`None` off x86-64).
///
/// Under TCG the guest's TSC runs at the host's rate but the guest kernel often fails to
/// calibrate it (no HPET or PM timer on `microvm`, a PIT that loses ticks when the host is
/// busy) and then hangs; passing `tsc_early_khz=` skips the calibration.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(measure_tsc_khz)
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    let mut best: Option<u64> = None;
    for _ in 0..3 {
        let t0 = Instant::now();
        // SAFETY: rdtsc has no memory effects and exists on every x86-64 CPU.
        let c0 = unsafe { std::arch::x86_64::_rdtsc() };
        std::thread::sleep(Duration::from_millis(10));
        // SAFETY: as above.
        let c1 = unsafe { std::arch::x86_64::_rdtsc() };
        let ns = t0.elapsed().as_nanos() as u64;
        if ns == 0 || c1 <= c0 {
            continue;
        }
        let khz = (c1 - c0).saturating_mul(1_000_000) / ns;
        // Keep the median-ish (first sane) sample; all should agree within a fraction.
        best = Some(best.map_or(khz, |b: u64| b.min(khz)));
    }
    best.filter(|k| *k > 100_000)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
}

/// Extra kernel command-line words for `accel` (the TSC settings under TCG).
pub fn accel_cmdline(accel: Accel) -> Vec<String> {
    match (accel, host_tsc_khz()) {
        (Accel::Tcg, Some(khz)) => vec![format!("tsc_early_khz={khz}"), "tsc=reliable".into()],
        _ => Vec::new(),
    }
}

/// Result of one bare boot.
#[derive(Clone, Copy, Debug)]
pub struct BareBoot {
    /// From spawning QEMU to the marker line on the console.
    pub first_line: Duration,
    /// From spawning QEMU to its exit.
    pub total: Duration,
}

/// What the guest of a [`bare_boot`] runs as its first process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BareInit {
    /// The initramfs's own `/init` (that of a [`minimal_initramfs`] prints the marker).
    Image,
    /// The initramfs's `/bin/busybox`, told on the kernel command line to print the marker
    /// and power off: boots an image the runtime built for an agent without its guest init.
    Busybox,
}

impl BareInit {
    fn cmdline(self) -> String {
        match self {
            BareInit::Image => String::new(),
            BareInit::Busybox => format!(
                "rdinit=/bin/busybox -- sh -c \"/bin/busybox echo {BOOT_MARKER}; /bin/busybox \
                 poweroff -f\""
            ),
        }
    }
}

/// Boots `kernel` + `initrd` with QEMU `microvm`, running `init` as the first process, and
/// measures the time to the marker line. Fails when the line does not appear within
/// `timeout`; the QEMU process is killed either way.
pub async fn bare_boot(
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    init: BareInit,
    accel: Accel,
    memory_mb: u64,
    timeout: Duration,
) -> Result<BareBoot, String> {
    let start = Instant::now();
    let mut child = Command::new(qemu)
        .args(["-name", "symbiont-bare-boot"])
        .args(["-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on"])
        .args(super::vmm::accel_args(accel))
        .args(["-m", &memory_mb.to_string(), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none", "-net", "none"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            &format!(
                "{BASE_CMDLINE} reboot=t {} {}",
                accel_cmdline(accel).join(" "),
                init.cmdline()
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(timeout, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(BOOT_MARKER) {
                return Some(start.elapsed());
            }
        }
        None
    })
    .await;
    let first_line = match found {
        Ok(Some(t)) => t,
        Ok(None) => {
            let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
            return Err(format!(
                "guest exited without printing its line: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Err(_) => {
            let _ = child.kill().await;
            return Err(format!("no output within {timeout:?}"));
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
        Ok(_) => {}
        Err(_) => {
            let _ = child.kill().await;
        }
    }
    Ok(BareBoot {
        first_line,
        total: start.elapsed(),
    })
}

/// Probes KVM: checks `/dev/kvm`, then boots a test guest under it.
pub async fn probe_kvm(qemu: &Path, kernel: &Path, initrd: &Path, timeout: Duration) -> KvmProbe {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return KvmProbe::NoDevice(e.to_string());
    }
    match bare_boot(
        qemu,
        kernel,
        initrd,
        BareInit::Image,
        Accel::Kvm,
        128,
        timeout,
    )
    .await
    {
        Ok(_) => KvmProbe::Works,
        Err(e) => KvmProbe::GuestFailed(e),
    }
}

/// The key under which a probe result is cached: host kernel, QEMU binary and guest kernel.
pub fn probe_cache_key(qemu: &Path, kernel: &Path) -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let stamp = |p: &Path| {
        let resolved = which(p).unwrap_or_else(|| p.to_path_buf());
        std::fs::metadata(&resolved)
            .map(|m| format!("{}:{}", resolved.display(), m.len()))
            .unwrap_or_else(|_| p.display().to_string())
    };
    format!("{}|{}|{}", release.trim(), stamp(qemu), stamp(kernel))
}

#[derive(Serialize, Deserialize)]
struct CachedProbe {
    key: String,
    result: KvmProbe,
}

/// Reads a cached probe result for `key` from `file`.
pub fn read_cached(file: &Path, key: &str) -> Option<KvmProbe> {
    let text = std::fs::read_to_string(file).ok()?;
    let cached: CachedProbe = serde_json::from_str(&text).ok()?;
    (cached.key == key).then_some(cached.result)
}

/// Stores a probe result for `key` in `file`.
pub fn write_cached(file: &Path, key: &str, result: &KvmProbe) {
    if let Some(dir) = file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let doc = CachedProbe {
        key: key.to_string(),
        result: result.clone(),
    };
    if let Ok(text) = serde_json::to_string(&doc) {
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, file);
        }
    }
}

/// Resolves a program name through `PATH` (absolute or relative paths are returned as is
/// when they exist).
pub fn which(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::metadata(candidate)
                    .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                    .unwrap_or(false)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_busybox_init_runs_the_marker_command_after_the_double_dash() {
        assert_eq!(BareInit::Image.cmdline(), "");
        let words = BareInit::Busybox.cmdline();
        let (kernel, init) = words.split_once(" -- ").expect("init arguments after --");
        assert_eq!(kernel, "rdinit=/bin/busybox");
        // One quoted argument for `sh -c`: the kernel strips the quotes.
        assert_eq!(
            init,
            format!("sh -c \"/bin/busybox echo {BOOT_MARKER}; /bin/busybox poweroff -f\"")
        );
    }

    #[test]
    fn auto_uses_kvm_only_when_a_guest_ran() {
        assert_eq!(
            decide(AccelMode::Auto, Some(&KvmProbe::Works)),
            Ok((Accel::Kvm, None))
        );
        let (accel, warning) = decide(
            AccelMode::Auto,
            Some(&KvmProbe::GuestFailed("no output within 5s".into())),
        )
        .expect("falls back");
        assert_eq!(accel, Accel::Tcg);
        let warning = warning.expect("a warning");
        assert!(
            warning.contains("KVM unusable") && warning.contains("TCG"),
            "{warning}"
        );
        let (accel, warning) = decide(
            AccelMode::Auto,
            Some(&KvmProbe::NoDevice("No such file".into())),
        )
        .expect("falls back");
        assert_eq!(accel, Accel::Tcg);
        assert!(warning.expect("warning").contains("/dev/kvm"));
    }

    #[test]
    fn explicit_modes() {
        assert_eq!(decide(AccelMode::Tcg, None), Ok((Accel::Tcg, None)));
        assert_eq!(
            decide(AccelMode::Tcg, Some(&KvmProbe::Works)),
            Ok((Accel::Tcg, None))
        );
        assert_eq!(
            decide(AccelMode::Kvm, Some(&KvmProbe::Works)),
            Ok((Accel::Kvm, None))
        );
        let err = decide(AccelMode::Kvm, Some(&KvmProbe::GuestFailed("hang".into())))
            .expect_err("kvm demanded but broken");
        assert!(err.contains("accel = \"kvm\""));
    }

    #[test]
    fn probe_results_are_cached_per_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sub/kvm-probe.json");
        assert_eq!(read_cached(&file, "k1"), None);
        write_cached(&file, "k1", &KvmProbe::GuestFailed("hang".into()));
        assert_eq!(
            read_cached(&file, "k1"),
            Some(KvmProbe::GuestFailed("hang".into()))
        );
        assert_eq!(
            read_cached(&file, "k2"),
            None,
            "another host/QEMU re-probes"
        );
    }

    #[test]
    fn tcg_guests_get_the_host_tsc_frequency() {
        let khz = host_tsc_khz().expect("x86-64 host has a TSC");
        assert!((100_000..10_000_000).contains(&khz), "{khz} kHz");
        let words = accel_cmdline(Accel::Tcg);
        assert_eq!(words[0], format!("tsc_early_khz={khz}"));
        assert!(accel_cmdline(Accel::Kvm).is_empty());
    }

    #[test]
    fn which_finds_programs_on_path() {
        assert!(which(Path::new("sh")).is_some());
        assert!(which(Path::new("definitely-not-a-program-symbiont")).is_none());
    }
}
