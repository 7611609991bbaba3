//! Capacity accounting: the [`Ledger`] of who holds how much of the admission capacity, and
//! the enforceability check of limits against a tier's [`EnforcementSupport`].
//!
//! The ledger is plain synchronous data; [`super::DefaultResourceManager`] keeps it behind
//! one mutex so that the check "does it fit?" and the reservation are a single atomic step —
//! no two callers can be given the same capacity.
//!
//! Units: memory in bytes, CPU in millicores (1000 = one core; requests are rounded up),
//! disk in MB/s and network in Mb/s as in [`ResourceLimits`].

use std::collections::HashMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::config::OvercommitPolicy;
use super::ResourceError;
use crate::sandbox::EnforcementSupport;
use crate::types::{AgentId, ResourceLimits, SecurityTier};

const MIB: u64 = 1024 * 1024;

/// Amounts of each accounted resource.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceAmounts {
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// CPU in thousandths of a core.
    pub cpu_millicores: u64,
    /// Disk bandwidth in MB/s (0 = unlimited; reserves nothing).
    pub disk_io_mbps: u64,
    /// Network bandwidth in Mb/s (0 = unlimited; reserves nothing).
    pub network_io_mbps: u64,
}

impl ResourceAmounts {
    /// What `limits` take from the capacity. CPU is rounded up to whole millicores.
    pub fn of(limits: &ResourceLimits) -> Self {
        let cpu = if limits.cpu_cores.is_finite() && limits.cpu_cores > 0.0 {
            // validate() bounds cpu_cores to 4096, so this cannot overflow.
            (limits.cpu_cores * 1000.0).ceil() as u64
        } else {
            0
        };
        Self {
            memory_bytes: limits.memory_bytes(),
            cpu_millicores: cpu,
            disk_io_mbps: limits.disk_io_mbps,
            network_io_mbps: limits.network_io_mbps,
        }
    }

    fn add(&mut self, other: &Self) {
        self.memory_bytes = self.memory_bytes.saturating_add(other.memory_bytes);
        self.cpu_millicores = self.cpu_millicores.saturating_add(other.cpu_millicores);
        self.disk_io_mbps = self.disk_io_mbps.saturating_add(other.disk_io_mbps);
        self.network_io_mbps = self.network_io_mbps.saturating_add(other.network_io_mbps);
    }

    fn sub(&mut self, other: &Self) {
        self.memory_bytes = self.memory_bytes.saturating_sub(other.memory_bytes);
        self.cpu_millicores = self.cpu_millicores.saturating_sub(other.cpu_millicores);
        self.disk_io_mbps = self.disk_io_mbps.saturating_sub(other.disk_io_mbps);
        self.network_io_mbps = self.network_io_mbps.saturating_sub(other.network_io_mbps);
    }
}

/// The machine's totals the capacity is derived from (configured, or detected when the
/// configuration says 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostTotals {
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// CPU cores.
    pub cpu_cores: u32,
    /// Disk bandwidth in MB/s; 0 = no ceiling.
    pub disk_io_mbps: u64,
    /// Network bandwidth in Mb/s; 0 = no ceiling.
    pub network_io_mbps: u64,
}

/// Admission capacity per resource (total × overcommit ratio). `None` = no ceiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// CPU in millicores.
    pub cpu_millicores: u64,
    /// Disk bandwidth in MB/s.
    pub disk_io_mbps: Option<u64>,
    /// Network bandwidth in Mb/s.
    pub network_io_mbps: Option<u64>,
}

impl Capacity {
    /// The capacity of `host` under `overcommit`.
    pub fn new(host: &HostTotals, overcommit: &OvercommitPolicy) -> Self {
        let scale = |total: u64, ratio: f64| -> u64 {
            let v = (total as f64) * ratio;
            if v >= u64::MAX as f64 {
                u64::MAX
            } else {
                v.floor() as u64
            }
        };
        let bandwidth = |total: u64, ratio: f64| (total > 0).then(|| scale(total, ratio));
        Self {
            memory_bytes: scale(host.memory_bytes, overcommit.memory),
            cpu_millicores: scale(u64::from(host.cpu_cores) * 1000, overcommit.cpu),
            disk_io_mbps: bandwidth(host.disk_io_mbps, overcommit.disk_io),
            network_io_mbps: bandwidth(host.network_io_mbps, overcommit.network_io),
        }
    }
}

/// Resources granted to one agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResourceAllocation {
    /// The agent.
    pub agent_id: AgentId,
    /// The limits it was admitted with.
    pub limits: ResourceLimits,
    /// What they take from the capacity.
    pub amounts: ResourceAmounts,
    /// The tier whose enforcement was checked, when admission knew it.
    pub tier: Option<SecurityTier>,
    /// True when the tier's enforcement of every limit was checked at admission.
    pub enforcement_checked: bool,
    /// When it was granted.
    pub allocated_at: SystemTime,
}

/// Capacity, use and what is left, for the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CapacitySnapshot {
    /// The totals before overcommit.
    pub host: HostTotals,
    /// The overcommit policy in force.
    pub overcommit: OvercommitPolicy,
    /// Admission capacity (totals × overcommit).
    pub capacity: Capacity,
    /// Sum of all allocations.
    pub used: ResourceAmounts,
    /// What can still be allocated.
    pub free: Capacity,
    /// Number of agents holding an allocation.
    pub agents: usize,
}

/// The outcome of a successful [`Ledger::allocate`].
#[derive(Debug)]
pub(crate) enum Allocated {
    /// Capacity was reserved now.
    New(ResourceAllocation),
    /// The agent already held exactly these limits; nothing changed.
    Existing(ResourceAllocation),
}

/// Who holds how much. Invariants (checked by the property tests): `used` is the sum of the
/// allocations' amounts, and for every bounded resource `used <= capacity`.
#[derive(Debug)]
pub(crate) struct Ledger {
    host: HostTotals,
    overcommit: OvercommitPolicy,
    capacity: Capacity,
    used: ResourceAmounts,
    allocations: HashMap<AgentId, ResourceAllocation>,
}

impl Ledger {
    pub(crate) fn new(host: HostTotals, overcommit: OvercommitPolicy) -> Self {
        Self {
            capacity: Capacity::new(&host, &overcommit),
            host,
            overcommit,
            used: ResourceAmounts::default(),
            allocations: HashMap::new(),
        }
    }

    /// Reserves `limits` for `agent_id`, or explains every resource that is short.
    pub(crate) fn allocate(
        &mut self,
        agent_id: AgentId,
        limits: &ResourceLimits,
        tier: Option<SecurityTier>,
        enforcement_checked: bool,
    ) -> Result<Allocated, ResourceError> {
        if let Some(existing) = self.allocations.get(&agent_id) {
            if &existing.limits == limits {
                return Ok(Allocated::Existing(existing.clone()));
            }
            return Err(ResourceError::AlreadyAllocated {
                agent: agent_id,
                existing: Box::new(existing.limits.clone()),
            });
        }
        let amounts = ResourceAmounts::of(limits);
        self.check_fits(&self.used, &amounts)?;
        self.used.add(&amounts);
        let allocation = ResourceAllocation {
            agent_id,
            limits: limits.clone(),
            amounts,
            tier,
            enforcement_checked,
            allocated_at: SystemTime::now(),
        };
        self.allocations.insert(agent_id, allocation.clone());
        Ok(Allocated::New(allocation))
    }

    /// Replaces an agent's limits in one step: either the new limits fit (with the old ones
    /// given back) and take effect, or nothing changes.
    pub(crate) fn resize(
        &mut self,
        agent_id: AgentId,
        limits: &ResourceLimits,
    ) -> Result<ResourceAllocation, ResourceError> {
        let old = self
            .allocations
            .get(&agent_id)
            .ok_or(ResourceError::NotAllocated(agent_id))?;
        let new_amounts = ResourceAmounts::of(limits);
        let mut without = self.used;
        without.sub(&old.amounts);
        self.check_fits(&without, &new_amounts)?;
        let mut updated = old.clone();
        updated.limits = limits.clone();
        updated.amounts = new_amounts;
        without.add(&new_amounts);
        self.used = without;
        self.allocations.insert(agent_id, updated.clone());
        Ok(updated)
    }

    /// Gives an agent's capacity back.
    pub(crate) fn release(&mut self, agent_id: AgentId) -> Option<ResourceAllocation> {
        let allocation = self.allocations.remove(&agent_id)?;
        self.used.sub(&allocation.amounts);
        Some(allocation)
    }

    pub(crate) fn get(&self, agent_id: &AgentId) -> Option<&ResourceAllocation> {
        self.allocations.get(agent_id)
    }

    pub(crate) fn allocations(&self) -> impl Iterator<Item = &ResourceAllocation> {
        self.allocations.values()
    }

    pub(crate) fn snapshot(&self) -> CapacitySnapshot {
        let free = Capacity {
            memory_bytes: self
                .capacity
                .memory_bytes
                .saturating_sub(self.used.memory_bytes),
            cpu_millicores: self
                .capacity
                .cpu_millicores
                .saturating_sub(self.used.cpu_millicores),
            disk_io_mbps: self
                .capacity
                .disk_io_mbps
                .map(|c| c.saturating_sub(self.used.disk_io_mbps)),
            network_io_mbps: self
                .capacity
                .network_io_mbps
                .map(|c| c.saturating_sub(self.used.network_io_mbps)),
        };
        CapacitySnapshot {
            host: self.host,
            overcommit: self.overcommit.clone(),
            capacity: self.capacity,
            used: self.used,
            free,
            agents: self.allocations.len(),
        }
    }

    fn check_fits(
        &self,
        used: &ResourceAmounts,
        req: &ResourceAmounts,
    ) -> Result<(), ResourceError> {
        let cap = &self.capacity;
        let mem_ok = fits(used.memory_bytes, req.memory_bytes, cap.memory_bytes);
        let cpu_ok = fits(used.cpu_millicores, req.cpu_millicores, cap.cpu_millicores);
        let disk_ok = cap
            .disk_io_mbps
            .is_none_or(|c| fits(used.disk_io_mbps, req.disk_io_mbps, c));
        let net_ok = cap
            .network_io_mbps
            .is_none_or(|c| fits(used.network_io_mbps, req.network_io_mbps, c));
        if mem_ok && cpu_ok && disk_ok && net_ok {
            return Ok(());
        }
        Err(ResourceError::Insufficient(self.shortage_message(
            used,
            req,
            [mem_ok, cpu_ok, disk_ok, net_ok],
        )))
    }

    #[cold]
    fn shortage_message(
        &self,
        used: &ResourceAmounts,
        req: &ResourceAmounts,
        ok: [bool; 4],
    ) -> String {
        let cap = &self.capacity;
        let oc = &self.overcommit;
        let mut parts = Vec::new();
        if !ok[0] {
            let mut s = format!(
                "memory: requested {}, available {} of {}",
                fmt_mib(req.memory_bytes),
                fmt_mib(cap.memory_bytes.saturating_sub(used.memory_bytes)),
                fmt_mib(cap.memory_bytes)
            );
            if oc.memory != 1.0 {
                s.push_str(&format!(
                    " ({} × overcommit {})",
                    fmt_mib(self.host.memory_bytes),
                    oc.memory
                ));
            }
            parts.push(s);
        }
        if !ok[1] {
            let mut s = format!(
                "cpu: requested {} cores, available {} of {} cores",
                fmt_cores(req.cpu_millicores),
                fmt_cores(cap.cpu_millicores.saturating_sub(used.cpu_millicores)),
                fmt_cores(cap.cpu_millicores)
            );
            if oc.cpu != 1.0 {
                s.push_str(&format!(
                    " ({} host cores × overcommit {})",
                    self.host.cpu_cores, oc.cpu
                ));
            }
            parts.push(s);
        }
        if let (false, Some(c)) = (ok[2], cap.disk_io_mbps) {
            parts.push(format!(
                "disk_io: requested {} MB/s, available {} MB/s of {} MB/s",
                req.disk_io_mbps,
                c.saturating_sub(used.disk_io_mbps),
                c
            ));
        }
        if let (false, Some(c)) = (ok[3], cap.network_io_mbps) {
            parts.push(format!(
                "network_io: requested {} Mb/s, available {} Mb/s of {} Mb/s",
                req.network_io_mbps,
                c.saturating_sub(used.network_io_mbps),
                c
            ));
        }
        parts.join("; ")
    }
}

fn fits(used: u64, req: u64, cap: u64) -> bool {
    used.checked_add(req).is_some_and(|total| total <= cap)
}

/// Bytes as MiB, with one decimal when not a whole number.
pub(crate) fn fmt_mib(bytes: u64) -> String {
    if bytes % MIB == 0 {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}

/// Millicores as cores (`1500` → `1.5`).
pub(crate) fn fmt_cores(millicores: u64) -> String {
    format!("{}", millicores as f64 / 1000.0)
}

/// The limits in `limits` that a tier with `support` cannot enforce, described for an
/// error message. Disk and network limits of 0 mean unlimited and need no enforcement;
/// `execution_timeout` and `idle_timeout` are enforced by the resource monitor itself.
pub fn unenforceable_limits(limits: &ResourceLimits, support: &EnforcementSupport) -> Vec<String> {
    let mut out = Vec::new();
    if !support.memory {
        out.push(format!("memory_mb = {} MiB", limits.memory_mb));
    }
    if !support.cpu {
        out.push(format!("cpu_cores = {}", limits.cpu_cores));
    }
    if limits.disk_io_mbps > 0 && !support.disk_io {
        out.push(format!("disk_io_mbps = {} MB/s", limits.disk_io_mbps));
    }
    if limits.network_io_mbps > 0 && !support.network_io {
        out.push(format!("network_io_mbps = {} Mb/s", limits.network_io_mbps));
    }
    out
}
