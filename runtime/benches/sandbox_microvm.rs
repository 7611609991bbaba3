//! Tier3 boot benchmark: boot → first output of an agent in a microVM, against a bare QEMU
//! boot of the same kernel with a minimal busybox initramfs whose `/init` prints a line,
//! measured in the same run (interleaved, so both see the same machine load).
//!
//! `cargo bench -p symbiont-runtime --bench sandbox_microvm` (iterations:
//! `SYMBIONT_BENCH_ITERS`, default 11; `SYMBIONT_BENCH_VERBOSE=1` prints every iteration). Needs `bash scripts/setup.sh`.

use std::time::{Duration, Instant};

use symbiont_runtime::sandbox::microvm::{kvm, MicrovmBackend};
use symbiont_runtime::sandbox::{SandboxBackend, SandboxConfig, SandboxSpec, SandboxStdio};
use symbiont_runtime::AgentId;
use tokio::io::AsyncReadExt;

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs us once as a smoke test.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let iters: usize = if smoke {
        1
    } else {
        std::env::var("SYMBIONT_BENCH_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(11)
    };
    let state = tempfile::Builder::new()
        .prefix("symbiont-mvm-bench")
        .tempdir()
        .expect("tempdir");
    let cfg = SandboxConfig {
        state_dir: state.path().to_path_buf(),
        ..Default::default()
    };
    let backend = MicrovmBackend::new(&cfg);
    let info = backend
        .probe()
        .await
        .unwrap_or_else(|e| panic!("microVM tier unavailable: {e}; run `bash scripts/setup.sh`"));
    let accel = backend.accel().await.expect("accel");
    let kernel = backend.kernel_image().await.expect("kernel");
    let initrd = backend.minimal_initramfs().expect("minimal initramfs");
    let qemu = kvm::which(std::path::Path::new(&backend.config().qemu_binary)).expect("qemu");
    let mut spec = SandboxSpec::new(AgentId::new(), ["/bin/sh", "-c", "echo ready"]);
    spec.limits.memory_mb = 128;
    let vm_memory = spec.limits.memory_mb + backend.config().memory_overhead_mb;

    // Warm-up: builds and caches the image, loads files into the page cache.
    let _ = agent_boot(&backend, &spec).await;

    let mut bare = Vec::new();
    let mut agent = Vec::new();
    let mut create = Vec::new();
    for _ in 0..iters {
        let b = kvm::bare_boot(
            &qemu,
            &kernel,
            &initrd,
            accel,
            vm_memory,
            Duration::from_secs(120),
        )
        .await
        .expect("bare boot");
        bare.push(b.first_line);
        let (c, first) = agent_boot(&backend, &spec).await;
        create.push(c);
        agent.push(first);
    }
    if std::env::var_os("SYMBIONT_BENCH_VERBOSE").is_some() {
        for (i, (b, a)) in bare.iter().zip(&agent).enumerate() {
            println!(
                "sandbox_microvm: iteration {i}: bare {:7.1} ms, agent {:7.1} ms",
                ms(*b),
                ms(*a)
            );
        }
    }
    let (b, a, c) = (median(&mut bare), median(&mut agent), median(&mut create));
    println!(
        "sandbox_microvm: backend {} ({})",
        info.backend, info.details
    );
    for w in &info.warnings {
        println!("sandbox_microvm: warning: {w}");
    }
    println!("sandbox_microvm: accelerator {accel}, guest RAM {vm_memory} MiB, {iters} iterations (medians)");
    println!(
        "sandbox_microvm: bare QEMU boot -> first line      {:8.1} ms",
        ms(b)
    );
    println!(
        "sandbox_microvm: agent start() -> first output    {:8.1} ms",
        ms(a)
    );
    println!(
        "sandbox_microvm: create() with cached image       {:8.1} ms",
        ms(c)
    );
    println!(
        "sandbox_microvm: ratio agent/bare {:.3}x (target <= 1.2x)",
        a.as_secs_f64() / b.as_secs_f64()
    );
}

/// Creates a sandbox (image from the cache after the first run), then measures start() →
/// first stdout byte. Returns (create time, boot-to-first-output time).
async fn agent_boot(backend: &MicrovmBackend, spec: &SandboxSpec) -> (Duration, Duration) {
    let t = Instant::now();
    let sb = backend.create(spec.clone()).await.expect("create");
    let create = t.elapsed();
    let t = Instant::now();
    let SandboxStdio {
        stdin,
        mut stdout,
        stderr: _e,
    } = sb.start().await.expect("start");
    drop(stdin);
    let mut byte = [0u8; 1];
    let n = stdout.read(&mut byte).await.expect("read");
    let first = t.elapsed();
    assert_eq!(n, 1, "the agent printed something");
    let mut rest = Vec::new();
    let _ = stdout.read_to_end(&mut rest).await;
    let exit = sb.wait().await.expect("wait");
    assert!(exit.success(), "{exit:?}");
    sb.destroy().await.expect("destroy");
    (create, first)
}
