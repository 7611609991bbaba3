//! Integrations with the world outside the runtime. Today: the audit trail.

pub mod audit_trail;
