//! Start → first output byte of `echo hi` for Tier1 (Docker/runc) and Tier2 (gVisor/runsc),
//! each against the bare baseline measured in the same run: `docker run --rm --network none
//! <same image> echo hi` through the CLI (and the same with `--runtime runsc`).
//!
//! A third column measures the same container created through the Engine API with nothing but
//! `--network none` (no limits, no workspace, no confinement), to show what the sandbox's own
//! work costs without the CLI's start-up in the baseline.
//!
//! A custom harness (criterion's model of many sub-millisecond iterations does not fit runs
//! of several hundred milliseconds): the sandbox and its baseline alternate, `SAMPLES` times
//! each after a warm-up, and the medians and their ratio are reported. Target: ratio ≤ 1.2.
//!
//! `cargo bench -p symbiont-runtime --bench sandbox_docker` (needs `bash scripts/setup.sh`).
//! `SYMBIONT_BENCH_SAMPLES` overrides the sample count.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use symbiont_runtime::sandbox::docker::DockerBackend;
use symbiont_runtime::sandbox::gvisor::GvisorBackend;
use symbiont_runtime::sandbox::{SandboxBackend, SandboxConfig, SandboxSpec};
use symbiont_runtime::{AgentId, ResourceLimits};
use tokio::io::AsyncReadExt;

const TARGET_RATIO: f64 = 1.2;

fn spec() -> SandboxSpec {
    let mut spec = SandboxSpec::new(AgentId::new(), ["/bin/echo", "hi"]);
    spec.limits = ResourceLimits {
        memory_mb: 128,
        cpu_cores: 1.0,
        disk_io_mbps: 0,
        network_io_mbps: 0,
        ..Default::default()
    };
    spec
}

/// create + start → first stdout byte through the backend; then wait and destroy (untimed).
async fn sandbox_once(backend: &Arc<dyn SandboxBackend>) -> Duration {
    let t = Instant::now();
    let sandbox = backend.create(spec()).await.expect("create");
    let mut io = sandbox.start().await.expect("start");
    let mut byte = [0u8; 1];
    io.stdout.read_exact(&mut byte).await.expect("first byte");
    let elapsed = t.elapsed();
    assert_eq!(byte[0], b'h');
    let mut rest = Vec::new();
    io.stdout.read_to_end(&mut rest).await.expect("rest");
    assert!(sandbox.wait().await.expect("wait").success());
    sandbox.destroy().await.expect("destroy");
    elapsed
}

/// `docker run --rm --network none [--runtime R] IMAGE echo hi` → first stdout byte.
async fn baseline_once(image: &str, runtime: Option<&str>) -> Duration {
    let mut cmd = tokio::process::Command::new("docker");
    cmd.args(["run", "--rm", "--network", "none"]);
    if let Some(r) = runtime {
        cmd.args(["--runtime", r]);
    }
    cmd.args([image, "echo", "hi"]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    let t = Instant::now();
    let mut child = cmd.spawn().expect("docker CLI");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut byte = [0u8; 1];
    stdout.read_exact(&mut byte).await.expect("first byte");
    let elapsed = t.elapsed();
    assert_eq!(byte[0], b'h');
    let status = child.wait().await.expect("docker run");
    assert!(status.success());
    elapsed
}

/// The same container with nothing but `--network none` through the Engine API directly
/// (create, attach, start → first byte; then remove): what the sandbox adds over a bare API
/// run, without the CLI's own start-up.
async fn bare_api_once(docker: &bollard::Docker, image: &str, runtime: Option<&str>) -> Duration {
    use bollard::container::LogOutput;
    use bollard::models::{ContainerCreateBody, HostConfig};
    use bollard::query_parameters::{AttachContainerOptionsBuilder, RemoveContainerOptionsBuilder};
    use futures::StreamExt;
    let t = Instant::now();
    let body = ContainerCreateBody {
        image: Some(image.to_string()),
        cmd: Some(vec!["echo".into(), "hi".into()]),
        attach_stdout: Some(true),
        host_config: Some(HostConfig {
            network_mode: Some("none".into()),
            runtime: runtime.map(str::to_string),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = docker
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            body,
        )
        .await
        .expect("create")
        .id;
    let mut attach = docker
        .attach_container(
            &id,
            Some(
                AttachContainerOptionsBuilder::new()
                    .stdout(true)
                    .stream(true)
                    .build(),
            ),
        )
        .await
        .expect("attach");
    docker
        .start_container(
            &id,
            None::<bollard::query_parameters::StartContainerOptions>,
        )
        .await
        .expect("start");
    let elapsed = loop {
        match attach.output.next().await {
            Some(Ok(LogOutput::StdOut { message })) if !message.is_empty() => {
                assert_eq!(message[0], b'h');
                break t.elapsed();
            }
            Some(Ok(_)) => continue,
            other => panic!("no output: {other:?}"),
        }
    };
    docker
        .remove_container(
            &id,
            Some(RemoveContainerOptionsBuilder::new().force(true).build()),
        )
        .await
        .expect("remove");
    elapsed
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Row {
    tier: &'static str,
    ours: Duration,
    base: Duration,
    api: Duration,
}

async fn measure(
    tier: &'static str,
    backend: Arc<dyn SandboxBackend>,
    image: &str,
    runtime: Option<&str>,
    samples: usize,
) -> Row {
    if let Err(e) = backend.probe().await {
        panic!(
            "{tier} unavailable ({}): {e}\nrun `bash scripts/setup.sh`",
            e.code()
        );
    }
    let docker = bollard::Docker::connect_with_socket_defaults()
        .expect("docker")
        .negotiate_version()
        .await
        .expect("negotiate");
    // Warm-up: image import, network, page cache, daemon paths.
    sandbox_once(&backend).await;
    baseline_once(image, runtime).await;
    bare_api_once(&docker, image, runtime).await;
    let (mut ours, mut base, mut api) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..samples {
        ours.push(sandbox_once(&backend).await);
        base.push(baseline_once(image, runtime).await);
        api.push(bare_api_once(&docker, image, runtime).await);
    }
    Row {
        tier,
        ours: median(ours),
        base: median(base),
        api: median(api),
    }
}

fn main() {
    let samples: usize = std::env::var("SYMBIONT_BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let state = tempfile::Builder::new()
        .prefix("symbiont-bench-")
        .tempdir_in("/var/tmp")
        .expect("state dir");
    let config = SandboxConfig {
        state_dir: state.path().to_path_buf(),
        ..Default::default()
    };
    let rows = runtime.block_on(async {
        let docker = DockerBackend::new(&config).expect("docker backend");
        let image = docker.ensure_base_image().await.expect("base image");
        let gvisor: Arc<dyn SandboxBackend> =
            Arc::new(GvisorBackend::new(&config).expect("gvisor backend"));
        let docker: Arc<dyn SandboxBackend> = Arc::new(docker);
        vec![
            measure("Tier1 docker (runc)", docker, &image, None, samples).await,
            measure(
                "Tier2 gvisor (runsc)",
                gvisor,
                &image,
                Some("runsc"),
                samples,
            )
            .await,
        ]
    });
    println!("\nstart -> first output byte of `echo hi`, median of {samples} (same run)");
    println!(
        "{:<22} {:>11} {:>16} {:>7} {:>15} {:>7}  target <= {TARGET_RATIO}x vs docker run",
        "tier", "sandbox ms", "docker run ms", "ratio", "bare API ms", "ratio"
    );
    for row in &rows {
        let ratio = row.ours.as_secs_f64() / row.base.as_secs_f64();
        let api_ratio = row.ours.as_secs_f64() / row.api.as_secs_f64();
        let verdict = if ratio <= TARGET_RATIO {
            "met"
        } else {
            "MISSED"
        };
        println!(
            "{:<22} {:>11.1} {:>16.1} {:>6.2}x {:>15.1} {:>6.2}x  {verdict}",
            row.tier,
            ms(row.ours),
            ms(row.base),
            ratio,
            ms(row.api),
            api_ratio,
        );
    }
}
