//! Tier3 boot benchmark: boot → first output of an agent in a microVM, against two bare QEMU
//! boots of the same kernel and the same initramfs (the agent's own, with busybox as the
//! first process printing a line instead of the guest init, and no devices), measured in the
//! same run (interleaved, in rotating order, so all three see the same machine load):
//!
//! - **packaged kernel**: Debian's `vmlinuz` booted as shipped, through the firmware and the
//!   kernel's self-decompression: what a bare `qemu -M microvm -kernel vmlinuz` costs;
//! - **same boot path** (stricter): the `vmlinux` the runtime extracts from that `vmlinuz`,
//!   booted through its PVH entry like the agent. The difference between the agent and this
//!   one is everything the runtime adds: devices, modules, guest init, channel.
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
    let packaged = backend.packaged_kernel_image().await.expect("kernel");
    let qemu = kvm::which(std::path::Path::new(&backend.config().qemu_binary)).expect("qemu");
    let mut spec = SandboxSpec::new(AgentId::new(), ["/bin/sh", "-c", "echo ready"]);
    spec.limits.memory_mb = 128;
    let vm_memory = spec.limits.memory_mb + backend.config().memory_overhead_mb;

    // Warm-up: builds and caches the image, loads files into the page cache.
    let _ = agent_boot(&backend, &spec).await;
    let image = backend.image_for(&spec).await.expect("agent image");
    let bare = |kernel: std::path::PathBuf| {
        let (qemu, image) = (qemu.clone(), image.clone());
        async move {
            kvm::bare_boot(
                &qemu,
                &kernel,
                &image,
                kvm::BareInit::Busybox,
                accel,
                vm_memory,
                Duration::from_secs(120),
            )
            .await
            .expect("bare boot")
            .first_line
        }
    };

    let mut shipped = Vec::new();
    let mut same = Vec::new();
    let mut agent = Vec::new();
    let mut create = Vec::new();
    for i in 0..iters {
        for step in 0..3 {
            match (i + step) % 3 {
                0 => shipped.push(bare(packaged.clone()).await),
                1 => same.push(bare(kernel.clone()).await),
                _ => {
                    let (c, first) = agent_boot(&backend, &spec).await;
                    create.push(c);
                    agent.push(first);
                }
            }
        }
        if std::env::var_os("SYMBIONT_BENCH_VERBOSE").is_some() {
            println!(
                "sandbox_microvm: iteration {i}: bare packaged kernel {:7.1} ms, bare same boot \
                 path {:7.1} ms, agent {:7.1} ms",
                ms(shipped[i]),
                ms(same[i]),
                ms(agent[i])
            );
        }
    }
    let (p, s, a, c) = (
        median(&mut shipped),
        median(&mut same),
        median(&mut agent),
        median(&mut create),
    );
    println!(
        "sandbox_microvm: backend {} ({})",
        info.backend, info.details
    );
    for w in &info.warnings {
        println!("sandbox_microvm: warning: {w}");
    }
    println!("sandbox_microvm: accelerator {accel}, guest RAM {vm_memory} MiB, {iters} iterations (medians)");
    println!(
        "sandbox_microvm: bare boot, packaged kernel -> line {:8.1} ms",
        ms(p)
    );
    println!(
        "sandbox_microvm: bare boot, same boot path -> line {:8.1} ms",
        ms(s)
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
        "sandbox_microvm: ratio agent/bare packaged kernel {:.3}x (target <= 1.2x)",
        a.as_secs_f64() / p.as_secs_f64()
    );
    println!(
        "sandbox_microvm: ratio agent/bare same boot path {:.3}x (stricter: the runtime's \
         own share)",
        a.as_secs_f64() / s.as_secs_f64()
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
