//! The composition root: [`driver::SandboxDriver`] makes lifecycle transitions act on real
//! sandboxes; the `Runtime` that wires every component together is built on it.

pub mod driver;
