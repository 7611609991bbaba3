//! The VMM-neutral description of one VM ([`VmPlan`]) and its translation into a QEMU
//! `microvm` command line or a Firecracker configuration file. Both are pure functions so
//! they are unit-tested without starting anything.
//!
//! The two VMMs share everything else: the kernel, the initramfs, the guest init and the
//! guest protocol. They differ only in how the channel reaches the guest (a virtio-serial
//! port backed by a Unix socket the runtime listens on, vs. a vsock connection that
//! Firecracker forwards to `<uds_path>_<port>`) and in how the VM halts (ACPI power-off vs.
//! a reboot that Firecracker treats as exit).

use std::path::PathBuf;

use serde_json::json;
use symbiont_guest::protocol::{CMDLINE_CHANNEL, VIRTIO_PORT_NAME, VSOCK_PORT};

/// Which VMM runs the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vmm {
    /// `qemu-system-x86_64 -M microvm`.
    Qemu,
    /// Firecracker.
    Firecracker,
}

impl Vmm {
    /// Backend name for [`crate::sandbox::TierInfo`].
    pub fn backend_name(&self) -> &'static str {
        match self {
            Vmm::Qemu => "qemu-microvm",
            Vmm::Firecracker => "firecracker",
        }
    }
}

/// The accelerator a VM runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's binary translator (slow, but needs nothing from the host).
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The workspace disk and its throttling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskPlan {
    /// Raw ext4 image on the host.
    pub path: PathBuf,
    /// Read and write ceiling in bytes per second each; 0 = unlimited.
    pub bps: u64,
}

/// Everything needed to start one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPlan {
    /// VM name; contains `symbiont` (the leak check looks for it).
    pub name: String,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Guest RAM in MiB.
    pub memory_mb: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Accelerator (QEMU only; Firecracker is always KVM).
    pub accel: Accel,
    /// Unix socket the runtime listens on for the guest channel (QEMU connects to it; for
    /// Firecracker it is the vsock `uds_path` base, the runtime listens on
    /// `<path>_<VSOCK_PORT>`).
    pub channel: PathBuf,
    /// QMP socket (QEMU only).
    pub qmp: PathBuf,
    /// File receiving the serial console (kernel messages).
    pub console_log: PathBuf,
    /// Workspace disk, if any.
    pub disk: Option<DiskPlan>,
    /// Give the guest a NIC (QEMU user networking).
    pub network: bool,
    /// Extra kernel command-line words.
    pub extra_cmdline: Vec<String>,
}

/// Kernel command-line words common to every VM, fast-boot oriented.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 quiet loglevel=4 panic=-1 pci=off nomodeset i8042.noaux i8042.nomux \
     no_timer_check noreplace-smp cryptomgr.notests";

impl VmPlan {
    /// The kernel command line for `vmm`.
    pub fn cmdline(&self, vmm: Vmm) -> String {
        let mut words = vec![BASE_CMDLINE.to_string()];
        match vmm {
            Vmm::Qemu => {
                words.push("reboot=t".into());
                words.push(format!("{CMDLINE_CHANNEL}=virtio-serial"));
            }
            Vmm::Firecracker => {
                words.push("reboot=k".into());
                words.push(format!("{CMDLINE_CHANNEL}=vsock"));
                words.push("symbiont.halt=reboot".into());
            }
        }
        words.extend(self.extra_cmdline.iter().cloned());
        words.join(" ")
    }

    /// The unix socket the runtime listens on for the guest channel under `vmm`.
    pub fn channel_listen_path(&self, vmm: Vmm) -> PathBuf {
        match vmm {
            Vmm::Qemu => self.channel.clone(),
            Vmm::Firecracker => {
                let mut s = self.channel.clone().into_os_string();
                s.push(format!("_{VSOCK_PORT}"));
                PathBuf::from(s)
            }
        }
    }
}

/// The accelerator and CPU model arguments of every QEMU VM on `accel`, shared by agent VMs
/// and the benchmark's bare boot so both run the same virtual machine.
///
/// Under TCG the CPU model is QEMU's default (`qemu64`) plus RDRAND, which TCG implements
/// with the host's `getrandom`. The guest kernel trusts it (`CONFIG_RANDOM_TRUST_CPU`) and
/// its CRNG is seeded within the first 0.1 s of boot. Without an entropy source the CRNG may
/// never become ready in an idle TCG guest, and programs that wait for it by polling
/// `/dev/random` (statically linked Rust agents did) block forever. Regression tests:
/// `sandbox_microvm.rs` `guest_crng_is_seeded_at_boot` and cross_tier.rs
/// `native_agent_and_microvm_agent_exchange_...`. A small translation cache keeps the VMM's
/// own memory near the guest's.
pub fn accel_args(accel: Accel) -> [&'static str; 4] {
    match accel {
        Accel::Kvm => ["-accel", "kvm", "-cpu", "qemu64"],
        Accel::Tcg => ["-accel", "tcg,tb-size=64", "-cpu", "qemu64,+rdrand"],
    }
}

/// The QEMU `microvm` command line (without the binary) for `plan`.
pub fn qemu_args(plan: &VmPlan) -> Vec<String> {
    let p = |path: &PathBuf| path.to_string_lossy().to_string();
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &plan.name]);
    push(&["-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on"]);
    push(&accel_args(plan.accel));
    push(&[
        "-m",
        &plan.memory_mb.to_string(),
        "-smp",
        &plan.vcpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-monitor",
        "none",
    ]);
    push(&[
        "-chardev",
        &format!("file,id=con,path={}", p(&plan.console_log)),
        "-serial",
        "chardev:con",
    ]);
    push(&[
        "-kernel",
        &p(&plan.kernel),
        "-initrd",
        &p(&plan.initrd),
        "-append",
        &plan.cmdline(Vmm::Qemu),
    ]);
    push(&[
        "-device",
        "virtio-serial-device,max_ports=2",
        "-chardev",
        &format!("socket,id=ctl,path={}", p(&plan.channel)),
        "-device",
        &format!("virtserialport,chardev=ctl,name={VIRTIO_PORT_NAME}"),
    ]);
    if plan.accel == Accel::Kvm {
        // Under KVM the guest sees the default CPU model, which may lack RDRAND: a hardware
        // RNG fed from the host's /dev/urandom seeds its CRNG instead (see `accel_args`).
        push(&[
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-device",
            "virtio-rng-device,rng=rng0",
        ]);
    }
    push(&["-qmp", &format!("unix:{},server=on,wait=off", p(&plan.qmp))]);
    if let Some(disk) = &plan.disk {
        let mut drive = format!(
            "id=ws,file={},format=raw,if=none,cache=none,aio=threads,discard=unmap",
            p(&disk.path)
        );
        if disk.bps > 0 {
            drive.push_str(&format!(
                ",throttling.bps-read={0},throttling.bps-write={0}",
                disk.bps
            ));
        }
        push(&["-drive", &drive, "-device", "virtio-blk-device,drive=ws"]);
    }
    if plan.network {
        push(&[
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-device,netdev=net0",
        ]);
    } else {
        push(&["-net", "none"]);
    }
    a
}

/// The Firecracker `--config-file` document for `plan`.
pub fn firecracker_config(plan: &VmPlan) -> serde_json::Value {
    let mut drives = Vec::new();
    if let Some(disk) = &plan.disk {
        let mut drive = json!({
            "drive_id": "workspace",
            "path_on_host": disk.path,
            "is_root_device": false,
            "is_read_only": false,
        });
        if disk.bps > 0 {
            // A token bucket refilled every 100 ms with a tenth of the per-second budget.
            drive["rate_limiter"] = json!({
                "bandwidth": { "size": (disk.bps / 10).max(1), "refill_time": 100 }
            });
        }
        drives.push(drive);
    }
    json!({
        "boot-source": {
            "kernel_image_path": plan.kernel,
            "initrd_path": plan.initrd,
            "boot_args": plan.cmdline(Vmm::Firecracker),
        },
        "drives": drives,
        "machine-config": {
            "vcpu_count": plan.vcpus,
            "mem_size_mib": plan.memory_mb,
            "smt": false,
        },
        "vsock": {
            "guest_cid": 3,
            "uds_path": plan.channel,
        },
        "network-interfaces": [],
    })
}

/// The Firecracker command line (without the binary).
pub fn firecracker_args(config_file: &std::path::Path, plan: &VmPlan) -> Vec<String> {
    vec![
        "--no-api".into(),
        "--id".into(),
        plan.name.clone(),
        "--config-file".into(),
        config_file.to_string_lossy().to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> VmPlan {
        VmPlan {
            name: "symbiont-abc".into(),
            kernel: "/k/vmlinuz".into(),
            initrd: "/c/x.img".into(),
            memory_mb: 320,
            vcpus: 2,
            accel: Accel::Tcg,
            channel: "/run/vm/ctl.sock".into(),
            qmp: "/run/vm/qmp.sock".into(),
            console_log: "/run/vm/console.log".into(),
            disk: Some(DiskPlan {
                path: "/run/vm/ws.img".into(),
                bps: 50_000_000,
            }),
            network: false,
            extra_cmdline: vec![],
        }
    }

    fn window<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn qemu_command_line_carries_limits_channel_and_name() {
        let args = qemu_args(&plan());
        assert!(args.iter().any(|a| a.contains("symbiont")));
        assert_eq!(window(&args, "-m"), ["320"]);
        assert_eq!(window(&args, "-smp"), ["2"]);
        assert_eq!(window(&args, "-accel"), ["tcg,tb-size=64"]);
        // TCG: entropy from RDRAND, no virtio-rng device.
        assert_eq!(window(&args, "-cpu"), ["qemu64,+rdrand"]);
        assert!(!args.iter().any(|a| a.contains("virtio-rng")));
        assert_eq!(
            window(&args, "-M")[0],
            "microvm,x-option-roms=off,isa-serial=on,rtc=on"
        );
        let drive = window(&args, "-drive")[0];
        assert!(drive.contains("throttling.bps-read=50000000"));
        assert!(drive.contains("throttling.bps-write=50000000"));
        assert!(window(&args, "-chardev").contains(&"socket,id=ctl,path=/run/vm/ctl.sock"));
        assert!(window(&args, "-device").contains(&"virtserialport,chardev=ctl,name=symbiont.0"));
        // No network capability: no NIC at all.
        assert_eq!(window(&args, "-net"), ["none"]);
        assert!(window(&args, "-netdev").is_empty());
        let append = window(&args, "-append")[0];
        assert!(append.contains("symbiont.channel=virtio-serial"));
        assert!(append.contains("reboot=t"));
        assert!(args.contains(&"-no-reboot".to_string()));
    }

    #[test]
    fn qemu_network_and_kvm_variants() {
        let mut p = plan();
        p.network = true;
        p.accel = Accel::Kvm;
        p.disk = None;
        let args = qemu_args(&p);
        assert_eq!(window(&args, "-netdev"), ["user,id=net0"]);
        assert!(window(&args, "-device").contains(&"virtio-net-device,netdev=net0"));
        assert!(window(&args, "-net").is_empty());
        assert_eq!(window(&args, "-accel"), ["kvm"]);
        assert!(window(&args, "-device").contains(&"virtio-rng-device,rng=rng0"));
        assert!(window(&args, "-drive").is_empty());
        let mut unthrottled = plan();
        unthrottled.disk = Some(DiskPlan {
            path: "/d".into(),
            bps: 0,
        });
        assert!(!window(&qemu_args(&unthrottled), "-drive")[0].contains("throttling"));
    }

    #[test]
    fn firecracker_config_matches_the_plan() {
        let p = plan();
        let cfg = firecracker_config(&p);
        assert_eq!(cfg["machine-config"]["vcpu_count"], 2);
        assert_eq!(cfg["machine-config"]["mem_size_mib"], 320);
        assert_eq!(cfg["boot-source"]["kernel_image_path"], "/k/vmlinuz");
        assert_eq!(cfg["boot-source"]["initrd_path"], "/c/x.img");
        let boot_args = cfg["boot-source"]["boot_args"].as_str().expect("string");
        assert!(boot_args.contains("symbiont.channel=vsock"));
        assert!(boot_args.contains("symbiont.halt=reboot"));
        assert!(boot_args.contains("reboot=k"));
        assert_eq!(cfg["vsock"]["uds_path"], "/run/vm/ctl.sock");
        assert_eq!(cfg["vsock"]["guest_cid"], 3);
        let drive = &cfg["drives"][0];
        assert_eq!(drive["path_on_host"], "/run/vm/ws.img");
        assert_eq!(drive["is_root_device"], false);
        assert_eq!(drive["rate_limiter"]["bandwidth"]["size"], 5_000_000);
        assert_eq!(drive["rate_limiter"]["bandwidth"]["refill_time"], 100);
        assert_eq!(cfg["network-interfaces"].as_array().map(Vec::len), Some(0));
        assert_eq!(
            p.channel_listen_path(Vmm::Firecracker),
            PathBuf::from("/run/vm/ctl.sock_1024")
        );
        let args = firecracker_args(std::path::Path::new("/run/vm/fc.json"), &p);
        assert_eq!(
            args,
            [
                "--no-api",
                "--id",
                "symbiont-abc",
                "--config-file",
                "/run/vm/fc.json"
            ]
        );
    }
}
