//! `symbiont`: the daemon (`symbiont up`: the runtime behind a REST API) and the
//! command-line client that talks to it.
//!
//! - [`api`]: the API's wire types (shared by server and client; the OpenAPI schemas).
//! - [`server`]: the axum application: routes, authentication, errors, metrics, OpenAPI.
//! - [`client`]: the HTTP client the commands use.
//! - [`tokens`]: API bearer tokens (created offline, stored hashed).
//! - [`commands`]: one module per subcommand (`up`, `agent`, `task`, `send`, `audit`,
//!   `config`, `token`, `dsl`, `bench`, `demo`).
//! - [`output`]: tables, JSON output and progress display.
//! - [`lockfile`]: `flock` locks (one daemon per data directory; token file updates).
//! - [`memory`]: the daemon gives its start-up code pages back to the kernel once ready.

pub mod api;
pub mod client;
pub mod commands;
pub mod lockfile;
pub mod memory;
pub mod output;
pub mod server;
pub mod tokens;
