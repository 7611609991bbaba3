//! [`SandboxDriver`]: the [`AgentDriver`] that makes lifecycle transitions act on real
//! sandboxes.
//!
//! `initialize` builds the agent's [`SandboxSpec`] (through a [`SpecBuilder`]), picks the
//! backend for its tier and creates the sandbox; `start` starts the program and hands its
//! stdio to an [`StdioHandler`] (the message bridge); a watcher task reports the program's
//! exit to an [`ExitHandler`]; `suspend`/`resume` freeze and thaw; `terminate` stops with a
//! grace period and destroys; `force_kill` kills and destroys; `health_check` reports an
//! unexpected exit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::error::RuntimeError;
use crate::lifecycle::{AgentDriver, HealthStatus};
use crate::sandbox::{
    Sandbox, SandboxError, SandboxExit, SandboxRegistry, SandboxSpec, SandboxStdio,
};
use crate::types::{AgentId, AgentInstance, SecurityTier};

/// Builds the sandbox spec of an agent (from its definition and configuration) and names
/// the tier to run it in.
pub trait SpecBuilder: Send + Sync + 'static {
    /// The tier and spec to run `agent` with.
    fn build(&self, agent: &AgentInstance) -> Result<(SecurityTier, SandboxSpec), RuntimeError>;
}

impl<F> SpecBuilder for F
where
    F: Fn(&AgentInstance) -> Result<(SecurityTier, SandboxSpec), RuntimeError>
        + Send
        + Sync
        + 'static,
{
    fn build(&self, agent: &AgentInstance) -> Result<(SecurityTier, SandboxSpec), RuntimeError> {
        self(agent)
    }
}

/// Receives a started program's stdio (e.g. to bridge it to the message bus).
pub trait StdioHandler: Send + Sync + 'static {
    /// Takes ownership of the streams of `agent_id`'s program running in `sandbox`.
    fn attach(&self, agent_id: AgentId, sandbox: Arc<dyn Sandbox>, stdio: SandboxStdio);
}

/// Hears about programs that ended without being asked to.
pub trait ExitHandler: Send + Sync + 'static {
    /// `agent_id`'s program ended on its own (or was killed by a limit) with `exit`.
    fn exited(&self, agent_id: AgentId, exit: SandboxExit);
}

struct Entry {
    sandbox: Arc<dyn Sandbox>,
    /// Set before the runtime stops the program on purpose, so its exit is not a failure.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    exit: Arc<Mutex<Option<SandboxExit>>>,
}

/// The sandbox-backed [`AgentDriver`].
pub struct SandboxDriver {
    registry: SandboxRegistry,
    specs: Arc<dyn SpecBuilder>,
    stdio: Arc<dyn StdioHandler>,
    exits: Arc<dyn ExitHandler>,
    grace: Duration,
    entries: Mutex<HashMap<AgentId, Entry>>,
}

impl std::fmt::Debug for SandboxDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxDriver")
            .field("registry", &self.registry)
            .field("sandboxes", &self.entries.lock().len())
            .finish()
    }
}

impl SandboxDriver {
    /// A driver creating sandboxes from `registry`, stopping programs with `grace` before
    /// killing them.
    pub fn new(
        registry: SandboxRegistry,
        specs: Arc<dyn SpecBuilder>,
        stdio: Arc<dyn StdioHandler>,
        exits: Arc<dyn ExitHandler>,
        grace: Duration,
    ) -> Self {
        Self {
            registry,
            specs,
            stdio,
            exits,
            grace,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The live sandbox of `agent_id`, if it has one.
    pub fn sandbox(&self, agent_id: AgentId) -> Option<Arc<dyn Sandbox>> {
        self.entries
            .lock()
            .get(&agent_id)
            .map(|e| e.sandbox.clone())
    }

    /// Every agent that has a sandbox, with it.
    pub fn sandboxes(&self) -> Vec<(AgentId, Arc<dyn Sandbox>)> {
        self.entries
            .lock()
            .iter()
            .map(|(id, e)| (*id, e.sandbox.clone()))
            .collect()
    }

    fn take(&self, agent_id: AgentId) -> Option<Entry> {
        self.entries.lock().remove(&agent_id)
    }

    async fn discard(entry: Entry) {
        entry
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = entry.sandbox.destroy().await {
            tracing::warn!(sandbox = entry.sandbox.id(), error = %e, "destroying sandbox failed");
        }
    }

    fn missing(agent_id: AgentId) -> RuntimeError {
        RuntimeError::Sandbox(SandboxError::InvalidState {
            id: agent_id.to_string(),
            message: "the agent has no sandbox (not initialized)".into(),
        })
    }
}

#[async_trait]
impl AgentDriver for SandboxDriver {
    async fn initialize(&self, agent: &AgentInstance) -> Result<(), RuntimeError> {
        // A restart replaces the previous sandbox.
        if let Some(old) = self.take(agent.id) {
            Self::discard(old).await;
        }
        let (tier, spec) = self.specs.build(agent)?;
        spec.validate()?;
        let backend = self.registry.backend(tier)?;
        let sandbox = backend.create(spec).await?;
        self.entries.lock().insert(
            agent.id,
            Entry {
                sandbox,
                stopping: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                exit: Arc::new(Mutex::new(None)),
            },
        );
        Ok(())
    }

    async fn start(&self, agent: &AgentInstance) -> Result<(), RuntimeError> {
        let (sandbox, stopping, exit_slot) = {
            let entries = self.entries.lock();
            let entry = entries
                .get(&agent.id)
                .ok_or_else(|| Self::missing(agent.id))?;
            (
                entry.sandbox.clone(),
                entry.stopping.clone(),
                entry.exit.clone(),
            )
        };
        let stdio = sandbox.start().await?;
        self.stdio.attach(agent.id, sandbox.clone(), stdio);
        let exits = self.exits.clone();
        let agent_id = agent.id;
        tokio::spawn(async move {
            match sandbox.wait().await {
                Ok(exit) => {
                    *exit_slot.lock() = Some(exit.clone());
                    if !stopping.load(std::sync::atomic::Ordering::SeqCst) {
                        exits.exited(agent_id, exit);
                    }
                }
                Err(e) => tracing::warn!(%agent_id, error = %e, "waiting for sandbox failed"),
            }
        });
        Ok(())
    }

    async fn suspend(&self, agent_id: AgentId) -> Result<(), RuntimeError> {
        let sandbox = self
            .sandbox(agent_id)
            .ok_or_else(|| Self::missing(agent_id))?;
        sandbox.pause().await?;
        Ok(())
    }

    async fn resume(&self, agent_id: AgentId) -> Result<(), RuntimeError> {
        let sandbox = self
            .sandbox(agent_id)
            .ok_or_else(|| Self::missing(agent_id))?;
        sandbox.resume().await?;
        Ok(())
    }

    async fn terminate(&self, agent_id: AgentId) -> Result<(), RuntimeError> {
        let Some(entry) = self.take(agent_id) else {
            return Ok(());
        };
        entry
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let stopped = entry.sandbox.stop(self.grace).await;
        let destroyed = entry.sandbox.destroy().await;
        stopped?;
        destroyed?;
        Ok(())
    }

    async fn force_kill(&self, agent_id: AgentId) -> Result<(), RuntimeError> {
        let Some(entry) = self.take(agent_id) else {
            return Ok(());
        };
        entry
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let killed = entry.sandbox.kill().await;
        let destroyed = entry.sandbox.destroy().await;
        if let Err(e) = killed {
            tracing::warn!(%agent_id, error = %e, "kill failed; destroy result decides");
        }
        destroyed?;
        Ok(())
    }

    async fn health_check(&self, agent_id: AgentId) -> HealthStatus {
        let exit = self
            .entries
            .lock()
            .get(&agent_id)
            .and_then(|e| e.exit.lock().clone());
        match exit {
            Some(exit) => HealthStatus::Unhealthy(format!(
                "program ended ({:?}, code {:?}, signal {:?})",
                exit.reason, exit.code, exit.signal
            )),
            None => HealthStatus::Healthy,
        }
    }
}
