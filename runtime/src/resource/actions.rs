//! What escalation steps do: the [`EnforcementActions`] trait, the [`SandboxDirectory`] of
//! agents' sandboxes, and [`LifecycleEnforcement`], the ready implementation over the
//! lifecycle controller and the sandboxes.
//!
//! [`LifecycleEnforcement`] acts on the sandbox itself and records the resulting state with
//! the lifecycle controller:
//!
//! | step | sandbox | lifecycle |
//! |---|---|---|
//! | throttle | `update_limits(new)` | — |
//! | suspend | `pause()` | → Suspended (the reason is the violation) |
//! | stop | `stop(stop_grace)` (SIGTERM, then SIGKILL) | `terminate_agent` → Terminated (its driver releases the sandbox and resources) |
//! | kill | `kill()` | `fail_agent(reason)` → Failed (auto-recovery may restart it) |

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::RwLock;

use super::ResourceError;
use crate::lifecycle::{transition_allowed, DefaultLifecycleController};
use crate::sandbox::Sandbox;
use crate::types::{AgentId, AgentState, ResourceLimits};

/// The actions escalation steps take. The runtime implements them with the lifecycle
/// controller and the sandboxes ([`LifecycleEnforcement`]).
#[async_trait]
pub trait EnforcementActions: Send + Sync + 'static {
    /// A warning step (the manager has already logged and audited it). Default: nothing.
    async fn warn(&self, agent_id: AgentId, reason: &str) -> Result<(), ResourceError> {
        let _ = (agent_id, reason);
        Ok(())
    }

    /// Applies lower limits to the running agent.
    async fn throttle(
        &self,
        agent_id: AgentId,
        new_limits: &ResourceLimits,
    ) -> Result<(), ResourceError>;

    /// Freezes the agent.
    async fn suspend(&self, agent_id: AgentId, reason: &str) -> Result<(), ResourceError>;

    /// Stops the agent gracefully and terminates it.
    async fn stop(&self, agent_id: AgentId, reason: &str) -> Result<(), ResourceError>;

    /// Kills the agent at once and marks it failed.
    async fn kill(&self, agent_id: AgentId, reason: &str) -> Result<(), ResourceError>;
}

/// Agents' live sandboxes, shared between the resource manager (which samples them) and
/// [`LifecycleEnforcement`] (which acts on them). Cheap to clone.
#[derive(Clone, Default)]
pub struct SandboxDirectory {
    map: Arc<RwLock<HashMap<AgentId, Arc<dyn Sandbox>>>>,
}

impl std::fmt::Debug for SandboxDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxDirectory")
            .field("sandboxes", &self.map.read().len())
            .finish()
    }
}

impl SandboxDirectory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records (or replaces) an agent's sandbox; returns the one it replaced.
    pub fn insert(&self, agent_id: AgentId, sandbox: Arc<dyn Sandbox>) -> Option<Arc<dyn Sandbox>> {
        self.map.write().insert(agent_id, sandbox)
    }

    /// The agent's sandbox.
    pub fn get(&self, agent_id: AgentId) -> Option<Arc<dyn Sandbox>> {
        self.map.read().get(&agent_id).cloned()
    }

    /// Forgets the agent's sandbox.
    pub fn remove(&self, agent_id: AgentId) -> Option<Arc<dyn Sandbox>> {
        self.map.write().remove(&agent_id)
    }

    /// Number of sandboxes.
    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.read().is_empty()
    }
}

/// [`EnforcementActions`] over [`DefaultLifecycleController`] and a [`SandboxDirectory`].
#[derive(Clone, Debug)]
pub struct LifecycleEnforcement {
    controller: DefaultLifecycleController,
    sandboxes: SandboxDirectory,
    stop_grace: Duration,
}

fn action_err(
    agent: AgentId,
    action: &'static str,
    message: impl std::fmt::Display,
) -> ResourceError {
    ResourceError::Action {
        agent,
        action,
        message: message.to_string(),
    }
}

impl LifecycleEnforcement {
    /// Acts on the sandboxes in `sandboxes` and records states with `controller`. `stop`
    /// gives the program `stop_grace` between SIGTERM and SIGKILL.
    pub fn new(
        controller: DefaultLifecycleController,
        sandboxes: SandboxDirectory,
        stop_grace: Duration,
    ) -> Self {
        Self {
            controller,
            sandboxes,
            stop_grace,
        }
    }

    fn sandbox(
        &self,
        agent: AgentId,
        action: &'static str,
    ) -> Result<Arc<dyn Sandbox>, ResourceError> {
        self.sandboxes
            .get(agent)
            .ok_or_else(|| action_err(agent, action, "no sandbox is registered for this agent"))
    }
}

#[async_trait]
impl EnforcementActions for LifecycleEnforcement {
    async fn throttle(
        &self,
        agent_id: AgentId,
        new_limits: &ResourceLimits,
    ) -> Result<(), ResourceError> {
        let sandbox = self.sandbox(agent_id, "throttle")?;
        sandbox
            .update_limits(new_limits)
            .await
            .map_err(|e| action_err(agent_id, "throttle", format!("{e} ({})", e.code())))
    }

    async fn suspend(&self, agent_id: AgentId, reason: &str) -> Result<(), ResourceError> {
        let state = self
            .controller
            .get_state(agent_id)
            .map_err(|e| action_err(agent_id, "suspend", e))?;
        if state == AgentState::Suspended {
            return Ok(());
        }
        if !transition_allowed(state, AgentState::Suspended) {
            return Err(action_err(
                agent_id,
                "suspend",
                format!("the agent is {state:?} and cannot be suspended"),
            ));
        }
        let sandbox = self.sandbox(agent_id, "suspend")?;
        sandbox
            .pause()
            .await
            .map_err(|e| action_err(agent_id, "suspend", format!("{e} ({})", e.code())))?;
        if let Err(e) = self
            .controller
            .transition(agent_id, AgentState::Suspended, reason)
        {
            // The agent changed state meanwhile; do not leave it frozen behind its back.
            if let Err(re) = sandbox.resume().await {
                tracing::error!(%agent_id, error = %re, "could not thaw after a refused suspend");
            }
            return Err(action_err(agent_id, "suspend", e));
        }
        Ok(())
    }

    async fn stop(&self, agent_id: AgentId, reason: &str) -> Result<(), ResourceError> {
        if let Some(sandbox) = self.sandboxes.get(agent_id) {
            if let Err(e) = sandbox.stop(self.stop_grace).await {
                tracing::warn!(%agent_id, error = %e, "graceful stop failed; killing");
                sandbox
                    .kill()
                    .await
                    .map_err(|e| action_err(agent_id, "stop", format!("{e} ({})", e.code())))?;
            }
        }
        match self.controller.get_state(agent_id) {
            Ok(AgentState::Terminating | AgentState::Terminated) => Ok(()),
            Ok(_) => {
                tracing::info!(%agent_id, reason, "terminating agent");
                self.controller
                    .terminate_agent(agent_id)
                    .await
                    .map(|_| ())
                    .map_err(|e| action_err(agent_id, "stop", e))
            }
            Err(e) => Err(action_err(agent_id, "stop", e)),
        }
    }

    async fn kill(&self, agent_id: AgentId, reason: &str) -> Result<(), ResourceError> {
        let sandbox = self.sandbox(agent_id, "kill")?;
        sandbox
            .kill()
            .await
            .map_err(|e| action_err(agent_id, "kill", format!("{e} ({})", e.code())))?;
        match self.controller.get_state(agent_id) {
            Ok(AgentState::Failed | AgentState::Terminating | AgentState::Terminated) => Ok(()),
            Ok(_) => self
                .controller
                .fail_agent(agent_id, reason)
                .map_err(|e| action_err(agent_id, "kill", e)),
            Err(e) => Err(action_err(agent_id, "kill", e)),
        }
    }
}
