//! Placement of a group task on one of the group's available agents, from live load.
//!
//! - `RoundRobin`: the available agents in turn (a cursor per group).
//! - `LeastConnections`: the agent with the fewest tasks running now (counted by the
//!   scheduler); ties go round-robin.
//! - `ResourceBased`: the agent with the lowest resource pressure (`max(cpu, memory)` as a
//!   fraction of its own limits, from the [`LoadSource`]) compared in buckets of 5 %; within a
//!   bucket the fewest running tasks, then round-robin. Samples lag behind a burst of
//!   placements; the running-task tie-break spreads a burst meanwhile. Agents without a sample
//!   count as pressure 0; without a load source this is `LeastConnections`.

use std::collections::HashMap;

use super::traits::LoadSource;
use super::LoadBalancingStrategy;
use crate::types::AgentId;

/// Width of a pressure bucket for `ResourceBased`.
const PRESSURE_BUCKET: f64 = 0.05;

pub(crate) fn choose<S: std::hash::BuildHasher>(
    strategy: LoadBalancingStrategy,
    candidates: &[AgentId],
    running: &HashMap<AgentId, usize, S>,
    load: Option<&dyn LoadSource>,
    cursor: &mut usize,
) -> Option<AgentId> {
    if candidates.is_empty() {
        return None;
    }
    let n = candidates.len();
    let start = *cursor % n;
    *cursor = cursor.wrapping_add(1);
    let rotated = (0..n).map(|i| candidates[(start + i) % n]);
    let running_of = |a: &AgentId| running.get(a).copied().unwrap_or(0);
    match (strategy, load) {
        (LoadBalancingStrategy::RoundRobin, _) => Some(candidates[start]),
        (LoadBalancingStrategy::LeastConnections, _)
        | (LoadBalancingStrategy::ResourceBased, None) => {
            // min_by_key keeps the first minimum: the rotation breaks ties.
            rotated.min_by_key(running_of)
        }
        (LoadBalancingStrategy::ResourceBased, Some(source)) => rotated.min_by_key(|a| {
            let pressure = source.load(*a).map(|l| l.pressure()).unwrap_or(0.0);
            let bucket = if pressure.is_finite() {
                (pressure.max(0.0) / PRESSURE_BUCKET) as u64
            } else {
                u64::MAX
            };
            (bucket, running_of(a))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::AgentLoad;

    struct Fixed(HashMap<AgentId, AgentLoad>);
    impl LoadSource for Fixed {
        fn load(&self, agent: AgentId) -> Option<AgentLoad> {
            self.0.get(&agent).copied()
        }
    }

    fn agents(n: usize) -> Vec<AgentId> {
        let mut v: Vec<AgentId> = (0..n).map(|_| AgentId::new()).collect();
        v.sort();
        v
    }

    #[test]
    fn round_robin_takes_turns() {
        let a = agents(3);
        let mut cursor = 0;
        let picks: Vec<_> = (0..6)
            .filter_map(|_| {
                choose(
                    LoadBalancingStrategy::RoundRobin,
                    &a,
                    &HashMap::new(),
                    None,
                    &mut cursor,
                )
            })
            .collect();
        assert_eq!(picks, [a[0], a[1], a[2], a[0], a[1], a[2]]);
    }

    #[test]
    fn least_connections_picks_the_least_busy() {
        let a = agents(3);
        let running = HashMap::from([(a[0], 4), (a[1], 1), (a[2], 2)]);
        let mut cursor = 0;
        for _ in 0..5 {
            assert_eq!(
                choose(
                    LoadBalancingStrategy::LeastConnections,
                    &a,
                    &running,
                    None,
                    &mut cursor
                ),
                Some(a[1])
            );
        }
    }

    #[test]
    fn resource_based_follows_live_pressure_then_running_tasks() {
        let a = agents(3);
        let source = Fixed(HashMap::from([
            (
                a[0],
                AgentLoad {
                    cpu: 0.9,
                    memory: 0.1,
                },
            ),
            (
                a[1],
                AgentLoad {
                    cpu: 0.2,
                    memory: 0.31,
                },
            ),
            (
                a[2],
                AgentLoad {
                    cpu: 0.1,
                    memory: 0.32,
                },
            ),
        ]));
        let running = HashMap::from([(a[1], 3), (a[2], 1)]);
        let mut cursor = 0;
        // a[1] and a[2] share the 30-35 % bucket; a[2] runs fewer tasks.
        assert_eq!(
            choose(
                LoadBalancingStrategy::ResourceBased,
                &a,
                &running,
                Some(&source),
                &mut cursor
            ),
            Some(a[2])
        );
        // Without figures it degrades to least connections.
        assert_eq!(
            choose(
                LoadBalancingStrategy::ResourceBased,
                &a,
                &running,
                None,
                &mut cursor
            ),
            Some(a[0])
        );
    }

    #[test]
    fn no_candidate_no_choice() {
        let mut cursor = 0;
        assert_eq!(
            choose(
                LoadBalancingStrategy::RoundRobin,
                &[],
                &HashMap::new(),
                None,
                &mut cursor
            ),
            None
        );
    }
}
