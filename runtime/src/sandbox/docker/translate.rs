//! Pure translations between the sandbox contract and the Docker Engine API: a
//! [`SandboxSpec`](crate::sandbox::SandboxSpec) becomes a `ContainerCreateBody`, a container's
//! final state becomes a [`SandboxExit`], a stats sample becomes [`SandboxStats`]. No I/O here,
//! so every rule is unit-tested.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, ContainerStatsResponse, ContainerUpdateBody, HostConfig,
    HostConfigLogConfig, ThrottleDevice,
};

use crate::sandbox::{ExitReason, SandboxExit, SandboxStats, WORKSPACE_DIR};

/// Label naming the sandbox a container belongs to (the leak check looks for it).
pub(crate) const LABEL_SANDBOX: &str = "io.symbiont.sandbox";
/// Label naming the agent a container runs.
pub(crate) const LABEL_AGENT: &str = "io.symbiont.agent";
/// Label naming the tier (`docker`, `gvisor`).
pub(crate) const LABEL_TIER: &str = "io.symbiont.tier";

/// The unprivileged user every program runs as (`nobody:nogroup`).
pub(crate) const SANDBOX_UID: u32 = 65534;
/// The unprivileged group every program runs as.
pub(crate) const SANDBOX_GID: u32 = 65534;

/// Environment variable carrying the address at which a networked sandbox reaches services
/// the host runs on 127.0.0.1.
pub const ENV_HOST_ADDR: &str = "SYMBIONT_HOST_ADDR";

/// `PATH` given to programs whose spec sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The start gate used when bandwidth shaping must be in place before the program runs: the
/// shell waits for one line on stdin (the runtime writes it once the qdiscs are installed),
/// then becomes the program, which inherits the rest of stdin.
pub(crate) const GATE_SCRIPT: &str = "read -r _symbiont_gate || exit 111; exec \"$@\"";

/// Everything [`create_body`] needs, already resolved by the backend.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CreateInputs {
    /// Sandbox id (also the container name).
    pub sandbox_id: String,
    /// Agent id label.
    pub agent_id: String,
    /// Tier name label (`docker`, `gvisor`).
    pub tier: &'static str,
    /// Image to run.
    pub image: String,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Environment from the spec.
    pub env: HashMap<String, String>,
    /// Working directory inside the container.
    pub workdir: String,
    /// Host directory bind-mounted at `/workspace`.
    pub workspace_host: PathBuf,
    /// Docker network to join; `None` = no network at all.
    pub network: Option<String>,
    /// `SYMBIONT_HOST_ADDR` for networked sandboxes.
    pub host_addr: Option<String>,
    /// Writable root filesystem (`Capability::FileSystem`).
    pub writable_root: bool,
    /// Memory (and memory+swap) ceiling in bytes.
    pub memory_bytes: i64,
    /// CPU share in units of 1e-9 CPUs.
    pub nano_cpus: i64,
    /// Most tasks the container's pids cgroup may hold.
    pub pids_limit: i64,
    /// Block devices to throttle and the rate in bytes per second (reads and writes each).
    pub blkio: Vec<(String, u64)>,
    /// OCI runtime (`runsc`), `None` = the daemon's default (runc).
    pub runtime: Option<String>,
    /// Size of the `/tmp` tmpfs in MiB.
    pub tmp_size_mb: u64,
    /// Wrap the program in the stdin start gate ([`GATE_SCRIPT`]).
    pub gate: bool,
}

/// Nanoseconds of CPU per second for `cores` (Docker's `NanoCpus`).
pub(crate) fn nano_cpus(cores: f64) -> i64 {
    (cores * 1e9).round().clamp(1e7, i64::MAX as f64) as i64
}

/// Bytes per second for a `disk_io_mbps` limit (1 MB = 1,000,000 bytes).
pub(crate) fn disk_bytes_per_sec(mbps: u64) -> u64 {
    mbps.saturating_mul(1_000_000)
}

/// The environment list: the spec's variables plus `PATH`/`HOME` defaults and, for networked
/// sandboxes, `SYMBIONT_HOST_ADDR`. Sorted so the body is deterministic.
pub(crate) fn env_list(inputs: &CreateInputs) -> Vec<String> {
    let mut env = inputs.env.clone();
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.to_string());
    env.entry("HOME".into())
        .or_insert_with(|| WORKSPACE_DIR.to_string());
    env.insert("SYMBIONT_SANDBOX_ID".into(), inputs.sandbox_id.clone());
    match &inputs.host_addr {
        Some(addr) => {
            env.insert(ENV_HOST_ADDR.into(), addr.clone());
        }
        None => {
            env.remove(ENV_HOST_ADDR);
        }
    }
    let mut list: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    list.sort();
    list
}

/// The `POST /containers/create` body for a sandbox.
pub(crate) fn create_body(inputs: &CreateInputs) -> ContainerCreateBody {
    let (entrypoint, cmd) = if inputs.gate {
        (
            vec![
                "/bin/sh".to_string(),
                "-c".to_string(),
                GATE_SCRIPT.to_string(),
                "symbiont-gate".to_string(),
            ],
            inputs.argv.clone(),
        )
    } else {
        (
            inputs.argv.iter().take(1).cloned().collect(),
            inputs.argv.iter().skip(1).cloned().collect(),
        )
    };
    let labels = HashMap::from([
        (LABEL_SANDBOX.to_string(), inputs.sandbox_id.clone()),
        (LABEL_AGENT.to_string(), inputs.agent_id.clone()),
        (LABEL_TIER.to_string(), inputs.tier.to_string()),
    ]);
    let throttle = |rate: u64| -> Option<Vec<ThrottleDevice>> {
        let devices: Vec<ThrottleDevice> = inputs
            .blkio
            .iter()
            .map(|(path, _)| ThrottleDevice {
                path: Some(path.clone()),
                rate: Some(i64::try_from(rate).unwrap_or(i64::MAX)),
            })
            .collect();
        (!devices.is_empty()).then_some(devices)
    };
    let rate = inputs.blkio.first().map(|(_, r)| *r).unwrap_or(0);
    let host_config = HostConfig {
        memory: Some(inputs.memory_bytes),
        memory_swap: Some(inputs.memory_bytes),
        oom_kill_disable: Some(false),
        nano_cpus: Some(inputs.nano_cpus),
        pids_limit: Some(inputs.pids_limit),
        blkio_device_read_bps: throttle(rate),
        blkio_device_write_bps: throttle(rate),
        binds: Some(vec![format!(
            "{}:{}:rw",
            inputs.workspace_host.display(),
            WORKSPACE_DIR
        )]),
        network_mode: Some(inputs.network.clone().unwrap_or_else(|| "none".into())),
        readonly_rootfs: Some(!inputs.writable_root),
        tmpfs: Some(HashMap::from([(
            "/tmp".to_string(),
            format!("rw,nosuid,nodev,size={}m,mode=1777", inputs.tmp_size_mb),
        )])),
        cap_drop: Some(vec!["ALL".to_string()]),
        security_opt: Some(vec!["no-new-privileges".to_string()]),
        ipc_mode: Some("private".to_string()),
        log_config: Some(HostConfigLogConfig {
            typ: Some("none".to_string()),
            config: None,
        }),
        runtime: inputs.runtime.clone(),
        auto_remove: Some(false),
        init: Some(false),
        ..Default::default()
    };
    ContainerCreateBody {
        user: Some(format!("{SANDBOX_UID}:{SANDBOX_GID}")),
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        open_stdin: Some(true),
        stdin_once: Some(true),
        tty: Some(false),
        env: Some(env_list(inputs)),
        entrypoint: Some(entrypoint),
        cmd: Some(cmd),
        image: Some(inputs.image.clone()),
        working_dir: Some(inputs.workdir.clone()),
        network_disabled: Some(inputs.network.is_none()),
        labels: Some(labels),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// The `POST /containers/{id}/update` body applying new memory, CPU and disk limits.
pub(crate) fn update_body(
    memory_bytes: i64,
    nano_cpus: i64,
    blkio: &[(String, u64)],
) -> ContainerUpdateBody {
    let devices: Vec<ThrottleDevice> = blkio
        .iter()
        .map(|(path, rate)| ThrottleDevice {
            path: Some(path.clone()),
            rate: Some(i64::try_from(*rate).unwrap_or(i64::MAX)),
        })
        .collect();
    ContainerUpdateBody {
        memory: Some(memory_bytes),
        memory_swap: Some(memory_bytes),
        nano_cpus: Some(nano_cpus),
        blkio_device_read_bps: Some(devices.clone()),
        blkio_device_write_bps: Some(devices),
        ..Default::default()
    }
}

/// How the runtime itself ended the program, if it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Intervention {
    /// The runtime did nothing; the program ended on its own (or the kernel ended it).
    None,
    /// `SandboxSpec::timeout` elapsed and the runtime killed the container.
    Timeout,
    /// `stop`/`kill`/`destroy` ended it.
    Killed,
}

/// Classifies a container's final state.
///
/// Precedence: a runtime timeout, then a runtime stop/kill, then the kernel's OOM kill
/// (`State.OOMKilled`, set by the daemon when the container's memory cgroup hit its limit),
/// then a death by signal (exit code 129..=192, the `128 + n` convention of runc and runsc),
/// else a plain exit.
pub(crate) fn classify_exit(
    exit_code: Option<i64>,
    oom_killed: bool,
    intervention: Intervention,
    duration: Duration,
) -> SandboxExit {
    let code = exit_code.and_then(|c| i32::try_from(c).ok());
    let signal_of = |c: i32| (129..=192).contains(&c).then_some(c - 128);
    let (reason, code, signal) = match intervention {
        Intervention::Timeout => (ExitReason::Timeout, code, Some(libc::SIGKILL)),
        Intervention::Killed => (ExitReason::Killed, code, code.and_then(signal_of)),
        Intervention::None if oom_killed => (
            ExitReason::OutOfMemory,
            code,
            code.and_then(signal_of).or(Some(libc::SIGKILL)),
        ),
        Intervention::None => match code.and_then(signal_of) {
            Some(sig) => (ExitReason::Signaled, None, Some(sig)),
            None => (ExitReason::Exited, code, None),
        },
    };
    SandboxExit {
        reason,
        code,
        signal,
        duration,
    }
}

/// Converts a Docker stats sample (cgroup counters read by the daemon) into [`SandboxStats`].
/// Memory excludes the inactive file cache, as `docker stats` does.
pub(crate) fn stats_from_docker(s: &ContainerStatsResponse) -> SandboxStats {
    let mut out = SandboxStats::default();
    if let Some(mem) = &s.memory_stats {
        let usage = mem.usage.unwrap_or(0);
        let inactive = mem
            .stats
            .as_ref()
            .and_then(|st| {
                st.get("total_inactive_file")
                    .or_else(|| st.get("inactive_file"))
            })
            .copied()
            .unwrap_or(0);
        out.memory_bytes = usage.saturating_sub(inactive);
        out.memory_peak_bytes = mem.max_usage.unwrap_or(usage);
    }
    if let Some(cpu) = s.cpu_stats.as_ref().and_then(|c| c.cpu_usage.as_ref()) {
        out.cpu_usage_ns = cpu.total_usage.unwrap_or(0);
    }
    if let Some(entries) = s
        .blkio_stats
        .as_ref()
        .and_then(|b| b.io_service_bytes_recursive.as_ref())
    {
        for entry in entries {
            let value = entry.value.unwrap_or(0);
            match entry.op.as_deref().map(str::to_ascii_lowercase).as_deref() {
                Some("read") => out.disk_read_bytes += value,
                Some("write") => out.disk_write_bytes += value,
                _ => {}
            }
        }
    }
    if let Some(nets) = &s.networks {
        for net in nets.values() {
            out.net_rx_bytes += net.rx_bytes.unwrap_or(0);
            out.net_tx_bytes += net.tx_bytes.unwrap_or(0);
        }
    }
    out.pids = s.pids_stats.as_ref().and_then(|p| p.current).unwrap_or(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{
        ContainerBlkioStatEntry, ContainerBlkioStats, ContainerCpuStats, ContainerCpuUsage,
        ContainerMemoryStats, ContainerNetworkStats, ContainerPidsStats,
    };

    fn inputs() -> CreateInputs {
        CreateInputs {
            sandbox_id: "symbiont-docker-abc".into(),
            agent_id: "agent-1".into(),
            tier: "docker",
            image: "symbiont/base:1234".into(),
            argv: vec!["/bin/echo".into(), "hi".into()],
            env: HashMap::from([("A".into(), "1".into())]),
            workdir: "/workspace".into(),
            workspace_host: PathBuf::from("/state/docker/x/workspace"),
            network: None,
            host_addr: None,
            writable_root: false,
            memory_bytes: 64 << 20,
            nano_cpus: nano_cpus(0.5),
            pids_limit: 64,
            blkio: vec![("/dev/vda".into(), disk_bytes_per_sec(10))],
            runtime: None,
            tmp_size_mb: 64,
            gate: false,
        }
    }

    #[test]
    fn create_body_confines_by_default() {
        let body = create_body(&inputs());
        let host = body.host_config.expect("host config");
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges".to_string()])
        );
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.memory_swap, host.memory, "swap must not extend memory");
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.pids_limit, Some(64));
        let write = host.blkio_device_write_bps.expect("write throttle");
        assert_eq!(write[0].path.as_deref(), Some("/dev/vda"));
        assert_eq!(write[0].rate, Some(10_000_000));
        assert_eq!(host.blkio_device_read_bps.map(|d| d.len()), Some(1));
        assert_eq!(
            host.binds,
            Some(vec!["/state/docker/x/workspace:/workspace:rw".to_string()])
        );
        assert!(host.tmpfs.expect("tmpfs").contains_key("/tmp"));
        assert_eq!(body.user.as_deref(), Some("65534:65534"));
        assert_eq!(body.open_stdin, Some(true));
        assert_eq!(body.stdin_once, Some(true));
        assert_eq!(body.entrypoint, Some(vec!["/bin/echo".to_string()]));
        assert_eq!(body.cmd, Some(vec!["hi".to_string()]));
        let labels = body.labels.expect("labels");
        assert_eq!(labels[LABEL_SANDBOX], "symbiont-docker-abc");
        assert_eq!(labels[LABEL_AGENT], "agent-1");
        let env = body.env.expect("env");
        assert!(env.contains(&"A=1".to_string()));
        assert!(env.iter().any(|e| e.starts_with("PATH=")));
        assert!(!env.iter().any(|e| e.starts_with(ENV_HOST_ADDR)));
    }

    #[test]
    fn create_body_grants_capabilities_and_gates() {
        let mut i = inputs();
        i.network = Some("symbiont".into());
        i.host_addr = Some("172.18.0.1".into());
        i.writable_root = true;
        i.gate = true;
        i.blkio.clear();
        i.runtime = Some("runsc".into());
        let body = create_body(&i);
        let host = body.host_config.expect("host config");
        assert_eq!(host.network_mode.as_deref(), Some("symbiont"));
        assert_eq!(host.readonly_rootfs, Some(false));
        assert_eq!(host.runtime.as_deref(), Some("runsc"));
        assert!(host.blkio_device_write_bps.is_none(), "0 = unlimited");
        assert!(body
            .env
            .expect("env")
            .contains(&"SYMBIONT_HOST_ADDR=172.18.0.1".to_string()));
        let entry = body.entrypoint.expect("entrypoint");
        assert_eq!(entry[0], "/bin/sh");
        assert_eq!(entry[2], GATE_SCRIPT);
        assert_eq!(
            body.cmd,
            Some(vec!["/bin/echo".to_string(), "hi".to_string()])
        );
    }

    #[test]
    fn spec_cannot_forge_host_addr() {
        let mut i = inputs();
        i.env.insert(ENV_HOST_ADDR.into(), "10.0.0.1".into());
        assert!(!env_list(&i).iter().any(|e| e.starts_with(ENV_HOST_ADDR)));
    }

    #[test]
    fn classify_exit_orders_causes() {
        let d = Duration::from_millis(10);
        let e = classify_exit(Some(0), false, Intervention::None, d);
        assert!(e.success());
        let e = classify_exit(Some(3), false, Intervention::None, d);
        assert_eq!((e.reason, e.code), (ExitReason::Exited, Some(3)));
        let e = classify_exit(Some(137), true, Intervention::None, d);
        assert_eq!(e.reason, ExitReason::OutOfMemory);
        assert!(e.is_resource_violation());
        let e = classify_exit(Some(137), false, Intervention::Timeout, d);
        assert_eq!(e.reason, ExitReason::Timeout);
        let e = classify_exit(Some(137), true, Intervention::Killed, d);
        assert_eq!(e.reason, ExitReason::Killed);
        let e = classify_exit(Some(143), false, Intervention::None, d);
        assert_eq!((e.reason, e.signal), (ExitReason::Signaled, Some(15)));
    }

    #[test]
    fn stats_are_summed_from_docker_counters() {
        let s = ContainerStatsResponse {
            memory_stats: Some(ContainerMemoryStats {
                usage: Some(1000),
                max_usage: Some(5000),
                stats: Some(HashMap::from([("total_inactive_file".into(), 200)])),
                ..Default::default()
            }),
            cpu_stats: Some(ContainerCpuStats {
                cpu_usage: Some(ContainerCpuUsage {
                    total_usage: Some(42),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            blkio_stats: Some(ContainerBlkioStats {
                io_service_bytes_recursive: Some(vec![
                    ContainerBlkioStatEntry {
                        major: Some(254),
                        minor: Some(0),
                        op: Some("Read".into()),
                        value: Some(7),
                    },
                    ContainerBlkioStatEntry {
                        major: Some(254),
                        minor: Some(0),
                        op: Some("Write".into()),
                        value: Some(9),
                    },
                    ContainerBlkioStatEntry {
                        major: Some(254),
                        minor: Some(0),
                        op: Some("Total".into()),
                        value: Some(16),
                    },
                ]),
                ..Default::default()
            }),
            networks: Some(HashMap::from([(
                "eth0".into(),
                ContainerNetworkStats {
                    rx_bytes: Some(11),
                    tx_bytes: Some(13),
                    ..Default::default()
                },
            )])),
            pids_stats: Some(ContainerPidsStats {
                current: Some(4),
                limit: Some(64),
            }),
            ..Default::default()
        };
        let st = stats_from_docker(&s);
        assert_eq!(st.memory_bytes, 800);
        assert_eq!(st.memory_peak_bytes, 5000);
        assert_eq!(st.cpu_usage_ns, 42);
        assert_eq!((st.disk_read_bytes, st.disk_write_bytes), (7, 9));
        assert_eq!((st.net_rx_bytes, st.net_tx_bytes), (11, 13));
        assert_eq!(st.pids, 4);
    }
}
