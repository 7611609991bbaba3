//! Guest images: the kernel found on disk, the kernel modules the guest needs (resolved with
//! their dependencies from each module's `.modinfo`), and the initramfs the runtime builds
//! in-process and caches by content hash.
//!
//! An image is two gzip-compressed newc archives concatenated (the kernel unpacks each in
//! turn): a *base* layer shared by every sandbox with the same kernel, guest init, busybox
//! and module set, and an *agent* layer with the [`GuestConfig`] and the agent's files. The
//! combined file is stored as `<cache>/<sha256>.img`; a second sandbox with the same inputs
//! reuses it without building anything.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::write::GzEncoder;
use flate2::Compression;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use symbiont_guest::protocol::{GuestConfig, CONFIG_PATH, FILES_DIR};

use super::cpio::CpioWriter;
use crate::sandbox::{SandboxError, SandboxFile};
use crate::types::SecurityTier;

/// Where the setup step unpacks Debian's cloud kernel (`dpkg -x`).
pub const DEFAULT_KERNEL_DIR: &str = "/var/lib/symbiont/guest-kernel";
/// Where the setup step installs the static guest init.
pub const DEFAULT_GUEST_INIT: &str = "/var/lib/symbiont/guest/symbiont-guest";

fn unavailable(reason: impl Into<String>) -> SandboxError {
    SandboxError::Unavailable {
        tier: SecurityTier::Tier3,
        reason: reason.into(),
    }
}

/// The guest kernel and its modules.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    /// The image the VMM boots (`vmlinuz-*`, or a `vmlinux` ELF under direct boot).
    pub image: PathBuf,
    /// The image as found on disk (`vmlinuz-*`, or the configured `kernel`).
    pub packaged: PathBuf,
    /// Its release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// `lib/modules/<release>`.
    pub modules_dir: PathBuf,
}

impl GuestKernel {
    /// Finds the kernel unpacked under `dir` (`boot/vmlinuz-*`, `lib/modules/*`); `image`
    /// overrides the bootable file (its modules are still taken from `dir`).
    pub fn locate(dir: &Path, image: Option<&Path>) -> Result<Self, SandboxError> {
        let how = "run `bash scripts/setup.sh` (it fetches Debian's linux-image-cloud-amd64 \
                   with apt-get download and unpacks it with dpkg -x), or set \
                   [sandbox.microvm] kernel_dir";
        let boot = dir.join("boot");
        let mut found: Vec<(String, PathBuf)> = fs::read_dir(&boot)
            .map_err(|e| {
                unavailable(format!(
                    "guest kernel not found in {}: {e}; {how}",
                    boot.display()
                ))
            })?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.strip_prefix("vmlinuz-")
                    .map(|rel| (rel.to_string(), e.path()))
            })
            .collect();
        found.sort();
        let (release, default_image) = found
            .pop()
            .ok_or_else(|| unavailable(format!("no vmlinuz-* in {}; {how}", boot.display())))?;
        let modules_dir = dir.join("lib/modules").join(&release);
        if !modules_dir.is_dir() {
            return Err(unavailable(format!(
                "kernel modules missing at {}; {how}",
                modules_dir.display()
            )));
        }
        let image = image.map(Path::to_path_buf).unwrap_or(default_image);
        if !image.is_file() {
            return Err(unavailable(format!(
                "kernel image {} missing; {how}",
                image.display()
            )));
        }
        Ok(Self {
            packaged: image.clone(),
            image,
            release,
            modules_dir,
        })
    }
}

/// Every loadable module of a kernel and which ones are built in.
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    paths: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

impl ModuleIndex {
    /// Scans `modules_dir` (`kernel/**.ko` and `modules.builtin`).
    pub fn scan(modules_dir: &Path) -> Result<Self, SandboxError> {
        let mut paths = HashMap::new();
        let mut stack = vec![modules_dir.join("kernel")];
        while let Some(dir) = stack.pop() {
            let entries = fs::read_dir(&dir)
                .map_err(|e| unavailable(format!("cannot read {}: {e}", dir.display())))?;
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Some(name) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".ko"))
                {
                    paths.insert(normalize(name), path);
                }
            }
        }
        let builtin = fs::read_to_string(modules_dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                Path::new(l)
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".ko"))
                    .map(normalize)
            })
            .collect();
        Ok(Self { paths, builtin })
    }

    /// An index from explicit parts (tests).
    pub fn from_parts(paths: HashMap<String, PathBuf>, builtin: HashSet<String>) -> Self {
        Self { paths, builtin }
    }

    /// The modules to load for `wanted`, dependencies first, without built-ins. `deps_of`
    /// reads a module's dependencies (normally [`module_depends`]).
    pub fn resolve(
        &self,
        wanted: &[&str],
        deps_of: &dyn Fn(&Path) -> Result<Vec<String>, SandboxError>,
    ) -> Result<Vec<(String, PathBuf)>, SandboxError> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        let mut visiting = HashSet::new();
        for name in wanted {
            self.visit(
                &normalize(name),
                deps_of,
                &mut order,
                &mut done,
                &mut visiting,
            )?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        deps_of: &dyn Fn(&Path) -> Result<Vec<String>, SandboxError>,
        order: &mut Vec<(String, PathBuf)>,
        done: &mut HashSet<String>,
        visiting: &mut HashSet<String>,
    ) -> Result<(), SandboxError> {
        if done.contains(name) || self.builtin.contains(name) {
            return Ok(());
        }
        if !visiting.insert(name.to_string()) {
            return Err(unavailable(format!("module dependency cycle at {name}")));
        }
        let path = self.paths.get(name).ok_or_else(|| {
            unavailable(format!(
                "the guest kernel has no module `{name}` (neither loadable nor built in)"
            ))
        })?;
        for dep in deps_of(path)? {
            self.visit(&normalize(&dep), deps_of, order, done, visiting)?;
        }
        visiting.remove(name);
        done.insert(name.to_string());
        order.push((name.to_string(), path.clone()));
        Ok(())
    }
}

/// Reads the `depends=` entry of a module's `.modinfo` ELF section.
pub fn module_depends(path: &Path) -> Result<Vec<String>, SandboxError> {
    let data = fs::read(path).map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
    let modinfo = elf_section(&data, ".modinfo")
        .ok_or_else(|| unavailable(format!("{}: no .modinfo section", path.display())))?;
    Ok(modinfo
        .split(|b| *b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|deps| {
            String::from_utf8_lossy(deps)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect())
}

/// The bytes of section `name` of a little-endian ELF64 file.
pub fn elf_section<'a>(data: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(data.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(data.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(data.get(o..o + 8)?.try_into().ok()?));
    if data.get(0..4)? != b"\x7fELF" || data.get(4)? != &2 || data.get(5)? != &1 {
        return None;
    }
    let shoff = u64_at(0x28)? as usize;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    let shstrndx = u16_at(0x3e)? as usize;
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let base = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((
            u32_at(base)?,
            u64_at(base + 0x18)? as usize,
            u64_at(base + 0x20)? as usize,
        ))
    };
    let (_, str_off, str_size) = section(shstrndx)?;
    let strtab = data.get(str_off..str_off.checked_add(str_size)?)?;
    for i in 0..shnum {
        let (name_off, off, size) = section(i)?;
        let rest = strtab.get(name_off as usize..)?;
        let end = rest.iter().position(|b| *b == 0)?;
        if &rest[..end] == name.as_bytes() {
            return data.get(off..off.checked_add(size)?);
        }
    }
    None
}

/// The marker ending a signed kernel module.
const MODULE_SIG_MAGIC: &[u8] = b"~Module signature appended~\n";

/// `data` without its appended module signature (unchanged when unsigned).
///
/// The guest kernel would verify each signature (RSA + SHA-256) at load time, which costs
/// tens of milliseconds per module under TCG. It adds no trust here: the host builds the
/// image and controls the VM anyway, and the modules come from the same apt-verified Debian
/// package as the kernel. Unsigned modules load (`CONFIG_MODULE_SIG_FORCE` is off); the guest
/// kernel notes a taint once.
pub fn strip_module_signature(data: &[u8]) -> &[u8] {
    let Some(body) = data.strip_suffix(MODULE_SIG_MAGIC) else {
        return data;
    };
    // struct module_signature (12 bytes) ends with the signature length, big-endian.
    if body.len() < 12 {
        return data;
    }
    let info = &body[body.len() - 12..];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    let signer_len = info[3] as usize;
    let key_id_len = info[4] as usize;
    let total = 12 + sig_len + signer_len + key_id_len;
    if total > body.len() {
        return data;
    }
    &body[..body.len() - total]
}

/// Inputs of the base layer.
#[derive(Debug, Clone)]
pub struct BaseInputs {
    /// The static guest init binary.
    pub guest_init: PathBuf,
    /// The static busybox binary.
    pub busybox: PathBuf,
    /// Modules in load order.
    pub modules: Vec<(String, PathBuf)>,
    /// Unprivileged uid/gid of the agent.
    pub uid: u32,
}

/// Where a module lives inside the guest.
pub fn guest_module_path(name: &str) -> String {
    format!("/lib/modules/{name}.ko")
}

/// `path|size|mtime` of a file: a cheap key for "this input has not changed".
pub(crate) fn file_stamp(path: &Path) -> std::io::Result<String> {
    let m = fs::metadata(path)?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(format!("{}|{}|{mtime}", path.display(), m.len()))
}

/// Writes `parts` to `path` atomically: into a uniquely named temporary file next to it,
/// synced, then renamed over `path` (concurrent writers of the same content are harmless).
/// The temporary file is removed on failure.
pub(crate) fn store(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let write = || -> std::io::Result<()> {
        fs::create_dir_all(dir)?;
        let mut f = fs::File::create(&tmp)?;
        for part in parts {
            f.write_all(part)?;
        }
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

fn gzip(data: &[u8], level: Compression) -> Result<Vec<u8>, SandboxError> {
    let mut enc = GzEncoder::new(Vec::with_capacity(data.len() / 2), level);
    enc.write_all(data)
        .map_err(|e| SandboxError::op("image build", e))?;
    let mut out = enc
        .finish()
        .map_err(|e| SandboxError::op("image build", e))?;
    // The kernel expects the next archive on a 4-byte boundary.
    while out.len() % 4 != 0 {
        out.push(0);
    }
    Ok(out)
}

fn busybox_applets(busybox: &Path) -> Vec<String> {
    let names: Vec<String> = crate::sandbox::busybox_list(busybox, "--list")
        .into_iter()
        .filter(|a| !a.contains('/'))
        .collect();
    if names.is_empty() {
        ["sh", "ls", "cat", "echo"].map(String::from).to_vec()
    } else {
        names
    }
}

/// Builds the base layer (uncompressed cpio).
pub fn build_base(inputs: &BaseInputs) -> Result<Vec<u8>, SandboxError> {
    let read = |p: &Path| {
        fs::read(p).map_err(|e| unavailable(format!("cannot read {}: {e}", p.display())))
    };
    let mut w = CpioWriter::new();
    for d in [
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "workspace",
        "root",
        "etc/symbiont",
    ] {
        w.dir(d, if d == "tmp" { 0o1777 } else { 0o755 });
    }
    w.char_dev("dev/console", 0o600, 5, 1);
    w.char_dev("dev/null", 0o666, 1, 3);
    w.file("init", 0o755, &read(&inputs.guest_init)?);
    w.file("bin/busybox", 0o755, &read(&inputs.busybox)?);
    for applet in busybox_applets(&inputs.busybox) {
        if applet != "busybox" {
            w.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    let uid = inputs.uid;
    w.file(
        "etc/passwd",
        0o644,
        format!("root:x:0:0:root:/root:/bin/sh\nagent:x:{uid}:{uid}:agent:/workspace:/bin/sh\n")
            .as_bytes(),
    );
    w.file(
        "etc/group",
        0o644,
        format!("root:x:0:\nagent:x:{uid}:\n").as_bytes(),
    );
    w.file("etc/hostname", 0o644, b"symbiont\n");
    for (name, path) in &inputs.modules {
        let data = read(path)?;
        w.file(
            &guest_module_path(name),
            0o644,
            strip_module_signature(&data),
        );
    }
    Ok(w.finish())
}

/// Builds the agent layer (uncompressed cpio): the config and the workspace files.
pub fn build_agent_layer(
    config: &GuestConfig,
    files: &[SandboxFile],
    resolv_conf: Option<&str>,
) -> Vec<u8> {
    let mut w = CpioWriter::new();
    w.file(CONFIG_PATH, 0o600, &config.encode());
    w.dir(FILES_DIR, 0o755);
    if let Some(conf) = resolv_conf {
        w.file("etc/resolv.conf", 0o644, conf.as_bytes());
    }
    for f in files {
        let path = format!("{FILES_DIR}/{}", f.path.to_string_lossy());
        w.file(&path, f.mode, &f.contents);
    }
    w.finish()
}

/// Counters of the image cache.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Images reused from the cache.
    pub hits: u64,
    /// Images built.
    pub misses: u64,
}

/// The content-addressed image cache.
#[derive(Debug)]
pub struct ImageCache {
    dir: PathBuf,
    max_bytes: u64,
    /// Compressed base layers by the hash of their inputs.
    bases: Mutex<BTreeMap<String, std::sync::Arc<Vec<u8>>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// One image ready to boot.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The initramfs file.
    pub path: PathBuf,
    /// Its content hash.
    pub hash: String,
    /// True when it came from the cache.
    pub cache_hit: bool,
}

impl ImageCache {
    /// A cache in `dir` holding at most `max_bytes` of images (oldest evicted first).
    pub fn new(dir: PathBuf, max_bytes: u64) -> Self {
        Self {
            dir,
            max_bytes,
            bases: Mutex::new(BTreeMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Hit and miss counters since this cache was created.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    fn base_key(inputs: &BaseInputs) -> Result<String, SandboxError> {
        let mut h = Sha256::new();
        let mut stamp = |p: &Path| -> Result<(), SandboxError> {
            let stamp = file_stamp(p)
                .map_err(|e| unavailable(format!("cannot read {}: {e}", p.display())))?;
            h.update(format!("{stamp}\n").as_bytes());
            Ok(())
        };
        stamp(&inputs.guest_init)?;
        stamp(&inputs.busybox)?;
        for (_, p) in &inputs.modules {
            stamp(p)?;
        }
        h.update(inputs.uid.to_le_bytes());
        Ok(hex::encode(h.finalize()))
    }

    /// The compressed base layer for `inputs`, built once per process.
    pub fn base(&self, inputs: &BaseInputs) -> Result<std::sync::Arc<Vec<u8>>, SandboxError> {
        let key = Self::base_key(inputs)?;
        if let Some(b) = self.bases.lock().get(&key) {
            return Ok(b.clone());
        }
        let gz = std::sync::Arc::new(gzip(&build_base(inputs)?, Compression::default())?);
        self.bases.lock().insert(key, gz.clone());
        Ok(gz)
    }

    /// Returns the image for `base` + `agent_layer`, building and storing it when missing.
    pub fn image(&self, base: &[u8], agent_layer: &[u8]) -> Result<BuiltImage, SandboxError> {
        let mut h = Sha256::new();
        h.update(Sha256::digest(base));
        h.update(agent_layer);
        let hash = hex::encode(h.finalize());
        let path = self.dir.join(format!("{hash}.img"));
        if path.is_file() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            // Refresh the mtime so eviction removes the least recently used images first.
            let _ = fs::File::options()
                .append(true)
                .open(&path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            return Ok(BuiltImage {
                path,
                hash,
                cache_hit: true,
            });
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let agent_gz = gzip(agent_layer, Compression::fast())?;
        store(&path, &[base, &agent_gz])
            .map_err(|e| SandboxError::op("image cache", format!("{}: {e}", path.display())))?;
        self.evict(&path);
        Ok(BuiltImage {
            path,
            hash,
            cache_hit: false,
        })
    }

    /// Removes the least recently used images beyond `max_bytes`, never `keep`.
    fn evict(&self, keep: &Path) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut images: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "img"))
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = images.iter().map(|i| i.1).sum();
        images.sort();
        for (_, len, path) in images {
            if total <= self.max_bytes {
                break;
            }
            if path != keep && fs::remove_file(&path).is_ok() {
                total = total.saturating_sub(len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_orders_dependencies_first_and_skips_builtins() {
        let paths: HashMap<String, PathBuf> = [
            "virtio",
            "virtio_ring",
            "virtio_mmio",
            "virtio_console",
            "failover",
        ]
        .iter()
        .map(|n| (n.to_string(), PathBuf::from(format!("/m/{n}.ko"))))
        .collect();
        let builtin: HashSet<String> = ["ext4".to_string()].into_iter().collect();
        let idx = ModuleIndex::from_parts(paths, builtin);
        let deps = |p: &Path| -> Result<Vec<String>, SandboxError> {
            Ok(match p.file_stem().and_then(|s| s.to_str()) {
                Some("virtio") => vec!["virtio_ring".into()],
                Some("virtio_mmio") => vec!["virtio".into(), "virtio_ring".into()],
                Some("virtio_console") => vec!["virtio".into(), "virtio_ring".into()],
                _ => vec![],
            })
        };
        let order: Vec<String> = idx
            .resolve(&["virtio_mmio", "virtio-console", "ext4"], &deps)
            .expect("resolves")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            order,
            ["virtio_ring", "virtio", "virtio_mmio", "virtio_console"]
        );
        let err = idx.resolve(&["nope"], &deps).expect_err("missing module");
        assert_eq!(err.code(), "SANDBOX_001");
    }

    #[test]
    fn elf_section_reads_modinfo_of_a_minimal_elf() {
        // A hand-built ELF64 with a section-name table and one `.modinfo` section.
        let shstr = b"\0.shstrtab\0.modinfo\0";
        let modinfo = b"license=GPL\0depends=virtio,virtio_ring\0name=virtio_mmio\0";
        let mut data = vec![0u8; 64];
        data[0..4].copy_from_slice(b"\x7fELF");
        data[4] = 2;
        data[5] = 1;
        let shstr_off = data.len();
        data.extend_from_slice(shstr);
        let modinfo_off = data.len();
        data.extend_from_slice(modinfo);
        while data.len() % 8 != 0 {
            data.push(0);
        }
        let shoff = data.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut s = vec![0u8; 64];
            s[0..4].copy_from_slice(&name.to_le_bytes());
            s[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            s[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            data.extend_from_slice(&s);
        };
        sh(0, 0, 0);
        sh(1, shstr_off, shstr.len());
        sh(11, modinfo_off, modinfo.len());
        data[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        data[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        data[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        data[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(elf_section(&data, ".modinfo"), Some(&modinfo[..]));
        assert_eq!(elf_section(&data, ".missing"), None);
        assert_eq!(elf_section(b"not an elf", ".modinfo"), None);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("virtio_mmio.ko");
        fs::write(&path, &data).expect("write");
        assert_eq!(
            module_depends(&path).expect("parses"),
            ["virtio".to_string(), "virtio_ring".to_string()]
        );
    }

    #[test]
    fn module_signatures_are_stripped() {
        let module = b"\x7fELF module body".to_vec();
        let mut signed = module.clone();
        signed.extend_from_slice(&[0xAA; 300]); // PKCS#7 blob
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        signed.extend_from_slice(&300u32.to_be_bytes());
        signed.extend_from_slice(MODULE_SIG_MAGIC);
        assert_eq!(strip_module_signature(&signed), &module[..]);
        assert_eq!(
            strip_module_signature(&module),
            &module[..],
            "unsigned: unchanged"
        );
        let mut bogus = module.clone();
        bogus.extend_from_slice(&u32::MAX.to_be_bytes());
        bogus.extend_from_slice(MODULE_SIG_MAGIC);
        assert_eq!(
            strip_module_signature(&bogus),
            &bogus[..],
            "impossible length: unchanged"
        );
    }

    #[test]
    fn image_cache_reuses_equal_images_and_evicts_old_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::new(dir.path().to_path_buf(), 1 << 20);
        let base = gzip(b"base", Compression::fast()).expect("gzip");
        let a = cache.image(&base, b"agent-a").expect("build");
        assert!(!a.cache_hit);
        let again = cache.image(&base, b"agent-a").expect("reuse");
        assert!(again.cache_hit);
        assert_eq!(a.path, again.path);
        let b = cache.image(&base, b"agent-b").expect("build");
        assert_ne!(a.hash, b.hash);
        assert_eq!(cache.stats(), CacheStats { hits: 1, misses: 2 });
        // A tiny budget keeps only the newest image.
        let small = ImageCache::new(dir.path().to_path_buf(), 1);
        let c = small.image(&base, b"agent-c").expect("build");
        assert!(c.path.exists());
        assert!(!a.path.exists() && !b.path.exists());
    }
}
