//! Start → first byte of output of `/bin/echo hi` in a fresh native sandbox, against a bare
//! `std::process::Command` spawn of the same program measured in the same run.
//!
//! Run: `cargo bench -p symbiont-runtime --bench sandbox_native` (as root).

#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use symbiont_runtime::sandbox::native::NativeBackend;
use symbiont_runtime::sandbox::{Sandbox, SandboxConfig, SandboxSpec};
use symbiont_runtime::{AgentId, ResourceLimits};
use tokio::io::AsyncReadExt;

fn bench(c: &mut Criterion) {
    // `SYMBIONT_LOG_LEVEL=symbiont_runtime::sandbox::native=trace` shows per-stage timings.
    symbiont_runtime::init_logging("warn", symbiont_runtime::config::LogFormat::Text);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let state = tempfile::tempdir().expect("tempdir");
    let backend = NativeBackend::new(SandboxConfig {
        state_dir: state.path().join("sandboxes"),
        ..Default::default()
    })
    .expect("native backend (run as root; see docs/sandbox-native.md)");
    let spec = {
        let mut s = SandboxSpec::new(AgentId::new(), ["/bin/echo", "hi"]);
        s.limits = ResourceLimits {
            memory_mb: 128,
            cpu_cores: 1.0,
            disk_io_mbps: 0,
            network_io_mbps: 0,
            ..Default::default()
        };
        s
    };

    let mut g = c.benchmark_group("start_to_first_byte");
    g.sample_size(60).measurement_time(Duration::from_secs(15));
    g.bench_function("bare_command_echo", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let mut child = Command::new("/bin/echo")
                    .arg("hi")
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("spawn");
                let mut first = [0u8; 1];
                child
                    .stdout
                    .as_mut()
                    .expect("stdout")
                    .read_exact(&mut first)
                    .expect("read");
                total += t.elapsed();
                child.wait().expect("wait");
            }
            total
        })
    });
    g.bench_function("native_sandbox_echo", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let backend = backend.clone();
            let spec = spec.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let sb = backend.create_native(spec.clone()).await.expect("create");
                    let mut io = sb.start().await.expect("start");
                    let mut first = [0u8; 1];
                    io.stdout.read_exact(&mut first).await.expect("read");
                    total += t.elapsed();
                    sb.wait().await.expect("wait");
                    sb.destroy().await.expect("destroy");
                }
                total
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
