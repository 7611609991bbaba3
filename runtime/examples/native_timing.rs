//! temporary timing probe
#![allow(missing_docs)]
use std::time::{Duration, Instant};
use symbiont_runtime::sandbox::native::NativeBackend;
use symbiont_runtime::sandbox::{Sandbox, SandboxConfig, SandboxSpec};
use symbiont_runtime::{AgentId, ResourceLimits};
use tokio::io::AsyncReadExt;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::var("TRACE").is_ok() {
        symbiont_runtime::init_logging("symbiont_runtime::sandbox::native=trace", symbiont_runtime::config::LogFormat::Text);
    }
    let state = tempfile::tempdir().expect("tempdir");
    let backend = NativeBackend::new(SandboxConfig { state_dir: state.path().join("s"), ..Default::default() }).expect("backend");
    let mut spec = SandboxSpec::new(AgentId::new(), ["/bin/echo", "hi"]);
    spec.limits = ResourceLimits { memory_mb: 128, cpu_cores: 1.0, disk_io_mbps: 0, network_io_mbps: 0, ..Default::default() };
    let mut tot = [Duration::ZERO; 4];
    let n: u32 = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    for _ in 0..n {
        let t0 = Instant::now();
        let sb = backend.create_native(spec.clone()).await.expect("create");
        let t1 = Instant::now();
        let mut io = match sb.start().await { Ok(io) => io, Err(e) => { eprintln!("start error: {e}"); continue } };
        let t2 = Instant::now();
        let mut b = [0u8; 1];
        io.stdout.read_exact(&mut b).await.expect("read");
        let t3 = Instant::now();
        sb.wait().await.expect("wait");
        sb.destroy().await.expect("destroy");
        let t4 = Instant::now();
        tot[0] += t1 - t0; tot[1] += t2 - t1; tot[2] += t3 - t2; tot[3] += t4 - t3;
    }
    println!("create {:?} start {:?} first-byte {:?} wait+destroy {:?}", tot[0]/n, tot[1]/n, tot[2]/n, tot[3]/n);
}
