//! Host-side networking of the container tiers.
//!
//! - The `symbiont` bridge network (created through the Engine API on first use) that
//!   sandboxes holding `Capability::Network` join; sandboxes without it get `NetworkMode:
//!   none` (a network namespace with only `lo`).
//! - Host loopback access: a networked sandbox reaches a service the host runs on
//!   `127.0.0.1:PORT` at `$SYMBIONT_HOST_ADDR:PORT` (the bridge's gateway). The backend
//!   installs, idempotently, `route_localnet=1` on the bridge and a `nat PREROUTING` DNAT
//!   rule `-i <bridge> -d <gateway> -p tcp -j DNAT --to-destination 127.0.0.1`.
//! - Bandwidth: `network_io_mbps` becomes a token bucket (`tbf`) on both ends of the
//!   sandbox's veth pair: on the host end (traffic towards the sandbox) and on `eth0` inside
//!   the sandbox's network namespace (traffic from the sandbox; the sandbox has no
//!   `CAP_NET_ADMIN` to remove it). The host end is found from `eth0`'s `iflink`.
//!
//! Commands (`iptables`, `ip`, `tc`, `nsenter`) are built by pure functions (unit-tested) and
//! run through [`run`].

use std::collections::HashMap;
use std::path::Path;

use bollard::models::{Ipam, NetworkCreateRequest};
use bollard::Docker;
use tokio::process::Command;

use crate::sandbox::SandboxError;

/// The bridge network networked sandboxes join.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostNetwork {
    /// Docker network name.
    pub name: String,
    /// Linux bridge device.
    pub bridge: String,
    /// The bridge's address: `SYMBIONT_HOST_ADDR`.
    pub gateway: String,
}

/// Runs `program args...`, returning stdout; a failure carries stderr.
pub(crate) async fn run(program: &str, args: &[String]) -> Result<String, SandboxError> {
    let out = Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            SandboxError::op(
                format!("run {program}"),
                format!("{e} (install it: `bash scripts/setup.sh`)"),
            )
        })?;
    if !out.status.success() {
        return Err(SandboxError::op(
            format!("{program} {}", args.join(" ")),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The DNAT rule (without the `-C`/`-I` verb) that sends TCP for the gateway to 127.0.0.1.
pub(crate) fn dnat_rule(bridge: &str, gateway: &str) -> Vec<String> {
    strings(&[
        "PREROUTING",
        "-i",
        bridge,
        "-d",
        gateway,
        "-p",
        "tcp",
        "-j",
        "DNAT",
        "--to-destination",
        "127.0.0.1",
    ])
}

/// The INPUT rule that accepts the DNATed connections even under a DROP policy.
pub(crate) fn input_rule(bridge: &str) -> Vec<String> {
    strings(&[
        "INPUT",
        "-i",
        bridge,
        "-d",
        "127.0.0.1/32",
        "-p",
        "tcp",
        "-j",
        "ACCEPT",
    ])
}

/// Adds `rule` to `table` unless an identical rule exists (`iptables -C` first).
async fn ensure_rule(table: &str, rule: Vec<String>) -> Result<(), SandboxError> {
    let mut check = strings(&["-w", "-t", table, "-C"]);
    check.extend(rule.iter().cloned());
    if run("iptables", &check).await.is_ok() {
        return Ok(());
    }
    let mut insert = strings(&["-w", "-t", table, "-I"]);
    insert.push(rule[0].clone());
    insert.push("1".into());
    insert.extend(rule.iter().skip(1).cloned());
    run("iptables", &insert).await.map(|_| ())
}

/// Creates (or finds) the bridge network and installs the host-loopback plumbing.
pub(crate) async fn ensure_network(
    docker: &Docker,
    name: &str,
    bridge: &str,
) -> Result<HostNetwork, SandboxError> {
    let existing = docker
        .inspect_network(
            name,
            None::<bollard::query_parameters::InspectNetworkOptions>,
        )
        .await;
    let network = match existing {
        Ok(n) => n,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {
            let request = NetworkCreateRequest {
                name: name.to_string(),
                driver: Some("bridge".into()),
                ipam: Some(Ipam::default()),
                options: Some(HashMap::from([
                    (
                        "com.docker.network.bridge.name".to_string(),
                        bridge.to_string(),
                    ),
                    // Sandboxes must not talk to each other over the bridge.
                    (
                        "com.docker.network.bridge.enable_icc".to_string(),
                        "false".to_string(),
                    ),
                ])),
                labels: Some(HashMap::from([(
                    "io.symbiont.network".to_string(),
                    "1".to_string(),
                )])),
                ..Default::default()
            };
            match docker.create_network(request).await {
                Ok(_) => {}
                // Another process created it meanwhile.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 409, ..
                }) => {}
                Err(e) => return Err(SandboxError::op("create network", e)),
            }
            docker
                .inspect_network(
                    name,
                    None::<bollard::query_parameters::InspectNetworkOptions>,
                )
                .await
                .map_err(|e| SandboxError::op("inspect network", e))?
        }
        Err(e) => return Err(SandboxError::op("inspect network", e)),
    };
    let gateway = network
        .ipam
        .as_ref()
        .and_then(|i| i.config.as_ref())
        .and_then(|c| c.iter().find_map(|c| c.gateway.clone()))
        .filter(|g| !g.contains(':'))
        .ok_or_else(|| {
            SandboxError::op(
                "inspect network",
                format!("network {name} has no IPv4 gateway"),
            )
        })?;
    let bridge = network
        .options
        .as_ref()
        .and_then(|o| o.get("com.docker.network.bridge.name").cloned())
        .or_else(|| {
            network
                .id
                .as_ref()
                .map(|id| format!("br-{}", &id[..id.len().min(12)]))
        })
        .unwrap_or_else(|| bridge.to_string());
    let sysctl = format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet");
    if std::fs::read_to_string(&sysctl)
        .map(|v| v.trim() != "1")
        .unwrap_or(true)
    {
        std::fs::write(&sysctl, "1")
            .map_err(|e| SandboxError::op("enable route_localnet", format!("{sysctl}: {e}")))?;
    }
    ensure_rule("nat", dnat_rule(&bridge, &gateway)).await?;
    ensure_rule("filter", input_rule(&bridge)).await?;
    tracing::debug!(network = name, %bridge, %gateway, "sandbox bridge ready");
    Ok(HostNetwork {
        name: name.to_string(),
        bridge,
        gateway,
    })
}

/// Parses `eth0@if123` out of `ip -o link show eth0` and returns 123 (the host end's ifindex).
pub(crate) fn parse_peer_ifindex(ip_link_line: &str) -> Option<u32> {
    let name = ip_link_line.split(':').nth(1)?.trim();
    name.split_once("@if")?.1.parse().ok()
}

/// The host interface whose ifindex is `index` (searched in `sys_class_net`).
pub(crate) fn interface_by_index(sys_class_net: &Path, index: u32) -> Option<String> {
    std::fs::read_dir(sys_class_net).ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let idx = std::fs::read_to_string(entry.path().join("ifindex")).ok()?;
        (idx.trim().parse::<u32>().ok()? == index)
            .then(|| entry.file_name().to_string_lossy().into_owned())
    })
}

/// `tc qdisc replace dev <dev> root tbf ...` arguments for `mbps` megabits per second.
/// The bucket holds max(64 KiB, 50 ms of traffic) so GSO-sized packets pass; the queue holds
/// up to 2 s of traffic, because gVisor's netstack TCP recovers poorly from tail drops (a
/// 100 ms queue cut its uploads to ~1 Mb/s under an 8 Mb/s limit; 2 s gives ~7.7 Mb/s).
pub(crate) fn tbf_args(dev: &str, mbps: u64) -> Vec<String> {
    crate::sandbox::native::net::tbf_args_shaped(dev, mbps, 50, 2000)
}

/// The host end of the veth pair whose other end is `eth0` in the network namespace of `pid`.
pub(crate) async fn host_veth(pid: i64) -> Result<String, SandboxError> {
    let show = vec![
        format!("--net=/proc/{pid}/ns/net"),
        "ip".to_string(),
        "-o".to_string(),
        "link".to_string(),
        "show".to_string(),
        "eth0".to_string(),
    ];
    let line = run("nsenter", &show).await?;
    let index = parse_peer_ifindex(&line).ok_or_else(|| {
        SandboxError::op("find veth", format!("unexpected `ip link` output: {line}"))
    })?;
    let host_dev = interface_by_index(Path::new("/sys/class/net"), index).ok_or_else(|| {
        SandboxError::op(
            "find veth",
            format!("no host interface with ifindex {index}"),
        )
    })?;
    if !host_dev.starts_with("veth") {
        // Refuse to touch anything but the sandbox's own veth end.
        return Err(SandboxError::op(
            "find veth",
            format!("peer of eth0 is {host_dev}, not a veth"),
        ));
    }
    Ok(host_dev)
}

/// Puts a `tbf` of `mbps` on both ends of the veth pair of the container whose init process
/// (in its network namespace) is `pid`. Returns the host end's name.
pub(crate) async fn shape(pid: i64, mbps: u64) -> Result<String, SandboxError> {
    let host_dev = host_veth(pid).await?;
    run("tc", &tbf_args(&host_dev, mbps)).await?;
    let mut inner = vec![format!("--net=/proc/{pid}/ns/net"), "tc".to_string()];
    inner.extend(tbf_args("eth0", mbps));
    run("nsenter", &inner).await?;
    tracing::debug!(pid, %host_dev, mbps, "bandwidth shaped");
    Ok(host_dev)
}

/// Removes the qdiscs [`shape`] installed (bandwidth back to unlimited).
pub(crate) async fn unshape(pid: i64) -> Result<(), SandboxError> {
    let host_dev = host_veth(pid).await?;
    run("tc", &strings(&["qdisc", "del", "dev", &host_dev, "root"])).await?;
    let mut inner = vec![format!("--net=/proc/{pid}/ns/net"), "tc".to_string()];
    inner.extend(strings(&["qdisc", "del", "dev", "eth0", "root"]));
    run("nsenter", &inner).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ifindex_is_parsed_from_ip_link() {
        let line = "21: eth0@if22: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue";
        assert_eq!(parse_peer_ifindex(line), Some(22));
        assert_eq!(parse_peer_ifindex("1: lo: <LOOPBACK,UP> mtu 65536"), None);
    }

    #[test]
    fn tbf_bucket_fits_gso_packets() {
        let args = tbf_args("veth1", 8);
        assert_eq!(args[3], "veth1");
        assert_eq!(args[7], "8mbit");
        assert_eq!(args[9], (64 * 1024).to_string());
        let fast = tbf_args("eth0", 1000);
        assert_eq!(fast[9], (125_000_000u64 / 20).to_string());
    }

    #[test]
    fn dnat_rule_targets_loopback() {
        let rule = dnat_rule("symbiont0", "172.18.0.1");
        assert_eq!(rule[0], "PREROUTING");
        assert!(rule.windows(2).any(|w| w[0] == "-i" && w[1] == "symbiont0"));
        assert_eq!(rule.last().map(String::as_str), Some("127.0.0.1"));
    }

    #[test]
    fn interfaces_are_found_by_index() {
        let root = tempfile::tempdir().expect("tempdir");
        for (name, idx) in [("lo", 1), ("veth9", 22)] {
            let dir = root.path().join(name);
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("ifindex"), format!("{idx}\n")).expect("write");
        }
        assert_eq!(
            interface_by_index(root.path(), 22),
            Some("veth9".to_string())
        );
        assert_eq!(interface_by_index(root.path(), 5), None);
    }
}
