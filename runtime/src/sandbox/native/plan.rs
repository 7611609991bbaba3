//! From a [`SandboxSpec`] to what the child must do: the root skeleton on the host, the
//! ordered mount plan, the generated `/etc`, the environment and the exec candidates.
//!
//! Everything here is plain data computed in the parent (where allocation is allowed) and
//! unit-tested; [`super::child`] only replays it with raw system calls.
//!
//! The sandbox root is a *skeleton* directory on the host: empty mount points for the
//! read-only binds, `/workspace`, `/tmp`, `/dev` entries and `/proc`, plus a generated `/etc`.
//! Sandboxes without `Capability::FileSystem` share one read-only skeleton per backend
//! (`<state_dir>/.template-<pid>-<random>`) and get only their private
//! `<state_dir>/<id>/{workspace,tmp[,etc]}`; a sandbox with `FileSystem` gets its own,
//! writable skeleton `<state_dir>/<id>/root`. In the child the skeleton is bound onto
//! itself, filled with binds and a fresh `/proc`, and made the root with `pivot_root`.
//! Mounts made in the child's mount namespace never show on the host, so a shared
//! skeleton stays empty there.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sandbox::{SandboxError, SandboxFile, SandboxSpec, WORKSPACE_DIR};

/// Device nodes bound from the host into the sandbox's `/dev` (when present on the host).
pub const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Devices the program may write to even without `Capability::FileSystem`.
pub const WRITABLE_DEVICES: [&str; 4] = ["null", "zero", "full", "tty"];

/// The default `PATH` inside the sandbox.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Environment variable carrying the host's address when the sandbox holds
/// `Capability::Network`.
pub const ENV_HOST_ADDR: &str = "SYMBIONT_HOST_ADDR";

/// One step of the child's mount plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountStep {
    /// `mount(source, target, fstype, flags, NULL)`.
    Mount {
        /// Source path or pseudo-source (`proc`); `None` for remounts/propagation changes.
        source: Option<PathBuf>,
        /// Target (a host path before the pivot, a sandbox path after it).
        target: PathBuf,
        /// Filesystem type (`proc`), `None` for binds.
        fstype: Option<String>,
        /// `MS_*` flags.
        flags: libc::c_ulong,
    },
    /// `chdir(new_root); pivot_root(".", "."); umount2(".", MNT_DETACH); chdir("/")`.
    PivotRoot {
        /// The directory that becomes `/`.
        new_root: PathBuf,
    },
}

impl MountStep {
    /// A human-readable description for error messages.
    pub fn describe(&self) -> String {
        match self {
            MountStep::Mount {
                source,
                target,
                fstype,
                flags,
            } => format!(
                "mount {} on {} (type {}, flags {flags:#x})",
                source
                    .as_ref()
                    .map(|s| s.display().to_string())
                    .unwrap_or_else(|| "-".into()),
                target.display(),
                fstype.as_deref().unwrap_or("-"),
            ),
            MountStep::PivotRoot { new_root } => format!("pivot_root into {}", new_root.display()),
        }
    }
}

/// A read-only bind of a host path (or a symlink recreated in the skeleton).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostEntry {
    /// The host path is a directory (or file): bind it read-only.
    Bind(PathBuf),
    /// The host path is a symlink (e.g. merged-/usr `/bin -> usr/bin`): recreate it.
    Symlink(PathBuf, PathBuf),
}

/// Inspects the configured read-only binds on the host: missing paths are skipped, symlinks
/// are recreated rather than followed.
pub fn host_entries(binds: &[PathBuf]) -> Vec<HostEntry> {
    let mut out = Vec::new();
    for b in binds {
        match fs::symlink_metadata(b) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(t) = fs::read_link(b) {
                    out.push(HostEntry::Symlink(b.clone(), t));
                }
            }
            Ok(_) => out.push(HostEntry::Bind(b.clone())),
            Err(_) => {}
        }
    }
    out
}

/// `MS_*` flags that a bind inherits from the host mount and that a remount inside a user
/// namespace must keep (the kernel refuses to clear locked flags).
pub fn locked_flags(path: &Path) -> libc::c_ulong {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs fills the zeroed struct; `c` is a valid C string.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return 0;
        }
        st
    };
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    flags
}

/// Joins a sandbox-absolute path onto the host root directory.
pub fn under(root: &Path, inside: &Path) -> PathBuf {
    root.join(inside.strip_prefix("/").unwrap_or(inside))
}

/// Inputs of the mount plan.
#[derive(Clone)]
pub struct MountInputs<'a> {
    /// The host directory that becomes `/`.
    pub root: &'a Path,
    /// Host entries to expose read-only.
    pub entries: &'a [HostEntry],
    /// Devices present on the host (names under `/dev`).
    pub devices: &'a [String],
    /// Whether the program may write outside `/workspace` and `/tmp`.
    pub writable_root: bool,
    /// Host directory bound (read-write) at `/workspace`.
    pub workspace: &'a Path,
    /// Host directory bound (read-write) at `/tmp`.
    pub tmp: &'a Path,
    /// Host directory bound read-only at `/etc`, when the skeleton's is not the right one.
    pub etc: Option<&'a Path>,
    /// Flag lookup (statvfs in production, a table in tests).
    pub locked: &'a dyn Fn(&Path) -> libc::c_ulong,
}

/// The ordered mount plan the child replays.
pub fn mount_plan(i: &MountInputs<'_>) -> Vec<MountStep> {
    use libc::{
        MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, MS_REMOUNT,
    };
    let mut plan = vec![
        // Nothing we mount propagates back to the host.
        MountStep::Mount {
            source: None,
            target: "/".into(),
            fstype: None,
            flags: MS_REC | MS_PRIVATE,
        },
        // pivot_root needs the new root to be a mount point.
        MountStep::Mount {
            source: Some(i.root.to_path_buf()),
            target: i.root.to_path_buf(),
            fstype: None,
            flags: MS_BIND,
        },
    ];
    let mut bind = |src: &Path, dst: PathBuf, extra: libc::c_ulong, rec: bool| {
        plan.push(MountStep::Mount {
            source: Some(src.to_path_buf()),
            target: dst.clone(),
            fstype: None,
            flags: MS_BIND | if rec { MS_REC } else { 0 },
        });
        plan.push(MountStep::Mount {
            source: None,
            target: dst,
            fstype: None,
            flags: MS_BIND | MS_REMOUNT | extra | (i.locked)(src),
        });
    };
    for e in i.entries {
        if let HostEntry::Bind(p) = e {
            bind(p, under(i.root, p), MS_RDONLY | MS_NOSUID | MS_NODEV, true);
        }
    }
    bind(
        i.workspace,
        i.root.join("workspace"),
        MS_NOSUID | MS_NODEV,
        false,
    );
    bind(i.tmp, i.root.join("tmp"), MS_NOSUID | MS_NODEV, false);
    if let Some(etc) = i.etc {
        bind(
            etc,
            i.root.join("etc"),
            MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
            false,
        );
    }
    for d in i.devices {
        bind(
            &Path::new("/dev").join(d),
            i.root.join("dev").join(d),
            MS_NOSUID | MS_NOEXEC,
            false,
        );
    }
    plan.push(MountStep::Mount {
        source: Some("proc".into()),
        target: i.root.join("proc"),
        fstype: Some("proc".into()),
        flags: MS_NOSUID | MS_NODEV | MS_NOEXEC,
    });
    plan.push(MountStep::PivotRoot {
        new_root: i.root.to_path_buf(),
    });
    plan.push(MountStep::Mount {
        source: None,
        target: "/".into(),
        fstype: None,
        flags: MS_BIND
            | MS_REMOUNT
            | MS_NOSUID
            | MS_NODEV
            | if i.writable_root { 0 } else { MS_RDONLY }
            | (i.locked)(i.root),
    });
    plan
}

/// Checks a workspace-relative path: relative, only normal components, no NUL.
pub fn check_relative(path: &Path) -> Result<(), SandboxError> {
    let raw = path.as_os_str().as_bytes();
    // Checked on the raw bytes: `Path::components` silently drops interior `.`.
    let ok = !raw.is_empty()
        && !raw.contains(&0)
        && raw
            .split(|b| *b == b'/')
            .all(|seg| !seg.is_empty() && seg != b"." && seg != b"..");
    if ok {
        Ok(())
    } else {
        Err(SandboxError::InvalidSpec(format!(
            "file path {:?} must be relative to the workspace, without `..`, `.` or NUL",
            path
        )))
    }
}

/// Checks the working directory: absolute, normalized, no NUL.
pub fn check_workdir(path: &Path) -> Result<(), SandboxError> {
    let raw = path.as_os_str().as_bytes();
    let ok = raw.first() == Some(&b'/')
        && !raw.contains(&0)
        && raw[1..]
            .split(|b| *b == b'/')
            .all(|seg| seg != b"." && seg != b"..");
    if ok {
        Ok(())
    } else {
        Err(SandboxError::InvalidSpec(format!(
            "workdir {:?} must be an absolute path without `..` or `.`",
            path
        )))
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), SandboxError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .map_err(|e| SandboxError::op("prepare root", format!("chown {}: {e}", path.display())))
}

fn io<'p>(what: &str, path: &'p Path) -> impl FnOnce(std::io::Error) -> SandboxError + 'p {
    let what = what.to_string();
    move |e| SandboxError::op("prepare root", format!("{what} {}: {e}", path.display()))
}

/// Places `files` in `workspace`, creating parent directories; every created entry is owned
/// by (`uid`, `gid`). Refuses paths that escape and never follows symlinks.
pub fn place_files(
    workspace: &Path,
    files: &[SandboxFile],
    uid: u32,
    gid: u32,
) -> Result<(), SandboxError> {
    for f in files {
        check_relative(&f.path)?;
        let mut dir = workspace.to_path_buf();
        if let Some(parent) = f.path.parent() {
            for c in parent.components() {
                dir.push(c);
                match fs::symlink_metadata(&dir) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        return Err(SandboxError::InvalidSpec(format!(
                            "file path {:?}: {} is not a directory",
                            f.path,
                            dir.display()
                        )))
                    }
                    Err(_) => {
                        fs::create_dir(&dir).map_err(io("mkdir", &dir))?;
                        chown(&dir, uid, gid)?;
                    }
                }
            }
        }
        let target = workspace.join(&f.path);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&target)
            .map_err(io("create", &target))?;
        file.write_all(&f.contents).map_err(io("write", &target))?;
        file.set_permissions(fs::Permissions::from_mode(f.mode & 0o7777))
            .map_err(io("chmod", &target))?;
        chown(&target, uid, gid)?;
    }
    Ok(())
}

/// The generated `/etc` files: (name, contents).
pub fn etc_files(
    hostname: &str,
    uid: u32,
    gid: u32,
    host_addr: Option<std::net::Ipv4Addr>,
) -> Vec<(&'static str, String)> {
    let mut hosts = format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{hostname}\n");
    let mut resolv = String::from("# symbiont native sandbox: no DNS resolver is provided\n");
    if let Some(a) = host_addr {
        hosts.push_str(&format!("{a}\tsymbiont-host\n"));
        resolv = format!("nameserver {a}\n");
    }
    vec![
        (
            "passwd",
            format!(
                "root:x:0:0:root:/root:/usr/sbin/nologin\nagent:x:{uid}:{gid}:symbiont agent:{WORKSPACE_DIR}:/bin/sh\n"
            ),
        ),
        ("group", format!("root:x:0:\nagent:x:{gid}:\n")),
        ("hosts", hosts),
        ("resolv.conf", resolv),
        ("hostname", format!("{hostname}\n")),
        ("nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n".into()),
    ]
}

/// What the parent creates on the host before the child starts.
#[derive(Clone, Debug)]
pub struct Skeleton<'a> {
    /// `<state_dir>/<id>/root`.
    pub root: &'a Path,
    /// Host entries (binds and symlinks).
    pub entries: &'a [HostEntry],
    /// Devices to provide.
    pub devices: &'a [String],
    /// Host uid/gid of the sandbox user (owner of `/workspace`, `/tmp`).
    pub host_uid: u32,
    /// See `host_uid`.
    pub host_gid: u32,
    /// When true the root directory itself is owned by the sandbox user (writable root).
    pub writable_root: bool,
    /// The generated `/etc` files.
    pub etc: Vec<(&'static str, String)>,
}

/// Creates a sandbox's private directories under `dir`: `workspace` (0755) and `tmp`
/// (01777) owned by the sandbox user, and, when `etc` is given, an `etc` with those files.
pub fn create_private_dirs(
    dir: &Path,
    host_uid: u32,
    host_gid: u32,
    etc: Option<&[(&'static str, String)]>,
) -> Result<(), SandboxError> {
    fs::create_dir_all(dir).map_err(io("mkdir", dir))?;
    for (d, mode) in [("workspace", 0o755), ("tmp", 0o1777)] {
        let p = dir.join(d);
        fs::create_dir(&p).map_err(io("mkdir", &p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io("chmod", &p))?;
        chown(&p, host_uid, host_gid)?;
    }
    if let Some(files) = etc {
        write_etc(&dir.join("etc"), files)?;
    }
    Ok(())
}

/// Writes the generated `/etc` files (and a copy of the host's `ld.so.cache`) into `etc`.
pub fn write_etc(etc: &Path, files: &[(&'static str, String)]) -> Result<(), SandboxError> {
    fs::create_dir_all(etc).map_err(io("mkdir", etc))?;
    for (name, body) in files {
        let p = etc.join(name);
        fs::write(&p, body).map_err(io("write", &p))?;
    }
    // The dynamic linker's cache is not secret and saves a directory search per library.
    let cache = etc.join("ld.so.cache");
    if Path::new("/etc/ld.so.cache").is_file() && !cache.exists() {
        let _ = fs::copy("/etc/ld.so.cache", &cache);
    }
    Ok(())
}

/// Creates the root skeleton on the host.
pub fn create_skeleton(s: &Skeleton<'_>) -> Result<(), SandboxError> {
    let root = s.root;
    fs::create_dir_all(root).map_err(io("mkdir", root))?;
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).map_err(io("chmod", root))?;
    for e in s.entries {
        match e {
            HostEntry::Bind(p) => {
                let dst = under(root, p);
                if let Some(parent) = dst.parent() {
                    fs::create_dir_all(parent).map_err(io("mkdir", parent))?;
                }
                if p.is_dir() {
                    fs::create_dir_all(&dst).map_err(io("mkdir", &dst))?;
                } else {
                    fs::write(&dst, b"").map_err(io("create", &dst))?;
                }
            }
            HostEntry::Symlink(p, target) => {
                let dst = under(root, p);
                if let Some(parent) = dst.parent() {
                    fs::create_dir_all(parent).map_err(io("mkdir", parent))?;
                }
                std::os::unix::fs::symlink(target, &dst).map_err(io("symlink", &dst))?;
            }
        }
    }
    for (d, mode) in [("proc", 0o555), ("dev", 0o755), ("etc", 0o755)] {
        let p = root.join(d);
        fs::create_dir_all(&p).map_err(io("mkdir", &p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io("chmod", &p))?;
    }
    for (d, mode) in [("workspace", 0o755), ("tmp", 0o1777)] {
        let p = root.join(d);
        fs::create_dir_all(&p).map_err(io("mkdir", &p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(io("chmod", &p))?;
        chown(&p, s.host_uid, s.host_gid)?;
    }
    let dev = root.join("dev");
    for d in s.devices {
        let p = dev.join(d);
        fs::write(&p, b"").map_err(io("create", &p))?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let p = dev.join(name);
        std::os::unix::fs::symlink(target, &p).map_err(io("symlink", &p))?;
    }
    let etc = root.join("etc");
    write_etc(&etc, &s.etc)?;
    if s.writable_root {
        // The sandbox's own copy of the root and /etc belong to the sandbox user; the host
        // binds inside stay read-only mounts.
        chown(root, s.host_uid, s.host_gid)?;
        chown(&etc, s.host_uid, s.host_gid)?;
        for entry in fs::read_dir(&etc).map_err(io("list", &etc))? {
            let p = entry.map_err(io("list", &etc))?.path();
            chown(&p, s.host_uid, s.host_gid)?;
        }
    }
    Ok(())
}

/// `KEY=value` strings for the program: the spec's variables over the defaults (`PATH`,
/// `HOME`), plus `SYMBIONT_HOST_ADDR` when the sandbox has a route to the host. Nothing from
/// the runtime's own environment leaks in.
pub fn environment(
    spec: &SandboxSpec,
    host_addr: Option<std::net::Ipv4Addr>,
) -> Result<Vec<String>, SandboxError> {
    let mut env: std::collections::BTreeMap<String, String> = [
        ("PATH".to_string(), DEFAULT_PATH.to_string()),
        ("HOME".to_string(), WORKSPACE_DIR.to_string()),
        ("USER".to_string(), "agent".to_string()),
    ]
    .into_iter()
    .collect();
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(SandboxError::InvalidSpec(format!(
                "environment variable {k:?} must be non-empty without `=` or NUL"
            )));
        }
        env.insert(k.clone(), v.clone());
    }
    if let Some(a) = host_addr {
        env.insert(ENV_HOST_ADDR.to_string(), a.to_string());
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// Paths to try for `argv[0]`: itself when it contains `/`, otherwise each `PATH` entry.
pub fn exec_candidates(program: &str, env: &[String]) -> Vec<String> {
    if program.contains('/') {
        return vec![program.to_string()];
    }
    let path = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| format!("{}/{program}", d.trim_end_matches('/')))
        .collect()
}

/// Converts strings to C strings, refusing interior NULs.
pub fn cstrings<S: AsRef<str>>(items: &[S], what: &str) -> Result<Vec<CString>, SandboxError> {
    items
        .iter()
        .map(|s| {
            CString::new(s.as_ref())
                .map_err(|_| SandboxError::InvalidSpec(format!("{what} contains a NUL byte")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{AgentId, Capability};

    fn no_locks(_: &Path) -> libc::c_ulong {
        0
    }

    fn inputs<'a>(
        root: &'a Path,
        entries: &'a [HostEntry],
        devices: &'a [String],
        writable: bool,
    ) -> MountInputs<'a> {
        MountInputs {
            root,
            entries,
            devices,
            writable_root: writable,
            workspace: Path::new("/state/s1/workspace"),
            tmp: Path::new("/state/s1/tmp"),
            etc: None,
            locked: &no_locks,
        }
    }

    fn targets(plan: &[MountStep]) -> Vec<String> {
        plan.iter()
            .map(|s| match s {
                MountStep::Mount { target, .. } => target.display().to_string(),
                MountStep::PivotRoot { .. } => "PIVOT".into(),
            })
            .collect()
    }

    #[test]
    fn mount_plan_binds_host_dirs_read_only_and_workspace_writable() {
        let root = Path::new("/state/s1/root");
        let entries = vec![
            HostEntry::Bind("/usr".into()),
            HostEntry::Symlink("/bin".into(), "usr/bin".into()),
        ];
        let devices = vec!["null".to_string()];
        let plan = mount_plan(&inputs(root, &entries, &devices, false));
        use libc::*;
        // /usr: a recursive bind, then a read-only nosuid nodev remount.
        let i = plan
            .iter()
            .position(
                |s| matches!(s, MountStep::Mount { source: Some(p), .. } if p == Path::new("/usr")),
            )
            .expect("usr bound");
        assert_eq!(
            plan[i],
            MountStep::Mount {
                source: Some("/usr".into()),
                target: "/state/s1/root/usr".into(),
                fstype: None,
                flags: MS_BIND | MS_REC,
            }
        );
        assert_eq!(
            plan[i + 1],
            MountStep::Mount {
                source: None,
                target: "/state/s1/root/usr".into(),
                fstype: None,
                flags: MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV,
            }
        );
        // The symlinked /bin is not mounted at all.
        assert!(!targets(&plan).iter().any(|t| t.ends_with("/bin")));
        // The private workspace is bound into the (shared) root and stays writable.
        assert!(plan.iter().any(|s| matches!(s,
            MountStep::Mount { source: Some(src), target, .. }
                if src == Path::new("/state/s1/workspace")
                    && target == Path::new("/state/s1/root/workspace"))));
        let ws = plan
            .iter()
            .filter_map(|s| match s {
                MountStep::Mount {
                    source: None,
                    target,
                    flags,
                    ..
                } if target == Path::new("/state/s1/root/workspace") => Some(*flags),
                _ => None,
            })
            .next()
            .expect("workspace remount");
        assert_eq!(ws & MS_RDONLY, 0);
        assert_ne!(ws & MS_NOSUID, 0);
        // Devices keep MS_NODEV clear (they must open) but are noexec.
        let dev = plan
            .iter()
            .filter_map(|s| match s {
                MountStep::Mount {
                    source: None,
                    target,
                    flags,
                    ..
                } if target == Path::new("/state/s1/root/dev/null") => Some(*flags),
                _ => None,
            })
            .next()
            .expect("dev remount");
        assert_eq!(dev & MS_NODEV, 0);
        assert_ne!(dev & MS_NOEXEC, 0);
    }

    #[test]
    fn mount_plan_order_private_then_binds_then_proc_then_pivot_then_readonly_root() {
        let root = Path::new("/r");
        let entries = vec![HostEntry::Bind("/lib".into())];
        let plan = mount_plan(&inputs(root, &entries, &[], false));
        let t = targets(&plan);
        assert_eq!(t[0], "/");
        assert_eq!(t[1], "/r");
        let proc_i = t.iter().position(|x| x == "/r/proc").expect("proc");
        let pivot_i = t.iter().position(|x| x == "PIVOT").expect("pivot");
        // /proc must be mounted while the host's /proc is still visible (user namespaces
        // refuse a fresh proc otherwise), i.e. before the pivot.
        assert!(proc_i < pivot_i);
        assert_eq!(pivot_i, t.len() - 2);
        match plan.last().expect("last") {
            MountStep::Mount { target, flags, .. } => {
                assert_eq!(target, Path::new("/"));
                assert_ne!(
                    flags & libc::MS_RDONLY,
                    0,
                    "root read-only without FileSystem"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        // No host /etc is ever bound.
        assert!(!plan.iter().any(
            |s| matches!(s, MountStep::Mount { source: Some(p), .. } if p.starts_with("/etc"))
        ));
    }

    #[test]
    fn filesystem_capability_leaves_root_writable() {
        let plan = mount_plan(&inputs(Path::new("/r"), &[], &[], true));
        match plan.last().expect("last") {
            MountStep::Mount { flags, .. } => assert_eq!(flags & libc::MS_RDONLY, 0),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn locked_host_flags_are_carried_into_remounts() {
        let locked = |p: &Path| {
            if p == Path::new("/usr") {
                libc::MS_NOATIME
            } else {
                0
            }
        };
        let entries = vec![HostEntry::Bind("/usr".into())];
        let i = MountInputs {
            root: Path::new("/r"),
            entries: &entries,
            devices: &[],
            writable_root: false,
            workspace: Path::new("/s/workspace"),
            tmp: Path::new("/s/tmp"),
            etc: Some(Path::new("/s/etc")),
            locked: &locked,
        };
        let plan = mount_plan(&i);
        assert!(plan.iter().any(|s| matches!(s,
            MountStep::Mount { source: None, target, flags, .. }
                if target == Path::new("/r/usr") && flags & libc::MS_NOATIME != 0)));
        // A per-sandbox /etc is bound read-only over the skeleton's.
        assert!(plan.iter().any(|s| matches!(s,
            MountStep::Mount { source: None, target, flags, .. }
                if target == Path::new("/r/etc") && flags & libc::MS_RDONLY != 0)));
    }

    #[test]
    fn path_safety_rejects_escapes() {
        for bad in [
            "../x",
            "/etc/passwd",
            "a/../../b",
            "",
            "./a",
            "a/./b",
            "a//b",
            "a/",
        ] {
            assert!(check_relative(Path::new(bad)).is_err(), "{bad}");
        }
        for good in ["a", "a/b/c.txt", "run.sh"] {
            check_relative(Path::new(good)).expect(good);
        }
        for bad in ["relative", "/a/../b", "/a/./b"] {
            assert!(check_workdir(Path::new(bad)).is_err(), "{bad}");
        }
        check_workdir(Path::new("/workspace/sub")).expect("ok");
    }

    #[test]
    fn files_are_placed_with_modes_and_never_through_symlinks() {
        let t = tempfile::tempdir().expect("tempdir");
        let ws = t.path().join("ws");
        fs::create_dir(&ws).expect("mkdir");
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let files = vec![
            SandboxFile {
                path: "bin/run.sh".into(),
                contents: b"#!/bin/sh\necho hi\n".to_vec(),
                mode: 0o755,
            },
            SandboxFile {
                path: "data.txt".into(),
                contents: b"x".to_vec(),
                mode: 0o640,
            },
        ];
        place_files(&ws, &files, uid, gid).expect("place");
        let m = fs::metadata(ws.join("bin/run.sh")).expect("meta");
        assert_eq!(m.permissions().mode() & 0o7777, 0o755);
        assert_eq!(
            fs::metadata(ws.join("data.txt"))
                .expect("meta")
                .permissions()
                .mode()
                & 0o7777,
            0o640
        );
        // A symlink planted in the workspace is not followed.
        let outside = t.path().join("outside");
        std::os::unix::fs::symlink(&outside, ws.join("link")).expect("symlink");
        let err = place_files(
            &ws,
            &[SandboxFile {
                path: "link".into(),
                contents: b"pwned".to_vec(),
                mode: 0o644,
            }],
            uid,
            gid,
        )
        .expect_err("must not follow");
        assert_eq!(err.code(), "SANDBOX_004");
        assert!(!outside.exists());
        let err = place_files(
            &ws,
            &[SandboxFile {
                path: "link/x".into(),
                contents: vec![],
                mode: 0o644,
            }],
            uid,
            gid,
        )
        .expect_err("symlinked dir");
        assert_eq!(err.code(), "SANDBOX_002");
        assert!(place_files(
            &ws,
            &[SandboxFile {
                path: "../escape".into(),
                contents: vec![],
                mode: 0o644
            }],
            uid,
            gid
        )
        .is_err());
    }

    #[test]
    fn etc_is_generated_and_has_no_shadow() {
        let etc = etc_files("sbx", 65534, 65534, None);
        let names: Vec<&str> = etc.iter().map(|(n, _)| *n).collect();
        assert!(names.contains(&"passwd") && names.contains(&"resolv.conf"));
        assert!(!names.contains(&"shadow"));
        let passwd = &etc.iter().find(|(n, _)| *n == "passwd").expect("passwd").1;
        assert!(passwd.contains("agent:x:65534:65534"));
        let with_net = etc_files("sbx", 1, 1, Some("10.0.0.1".parse().expect("ip")));
        let hosts = &with_net
            .iter()
            .find(|(n, _)| *n == "hosts")
            .expect("hosts")
            .1;
        assert!(hosts.contains("10.0.0.1\tsymbiont-host"));
    }

    #[test]
    fn environment_is_built_from_the_spec_only() {
        let mut spec = SandboxSpec::new(AgentId::new(), ["/bin/true"]);
        spec.env.insert("FOO".into(), "bar".into());
        spec.capabilities.push(Capability::Network);
        let env = environment(&spec, Some("10.1.2.1".parse().expect("ip"))).expect("env");
        assert!(env.contains(&"FOO=bar".to_string()));
        assert!(env.contains(&"SYMBIONT_HOST_ADDR=10.1.2.1".to_string()));
        assert!(env.iter().any(|e| e.starts_with("PATH=")));
        assert!(!env.iter().any(|e| e.starts_with("CARGO")));
        spec.env.insert("BAD=KEY".into(), "x".into());
        assert!(environment(&spec, None).is_err());
    }

    #[test]
    fn exec_candidates_search_path_only_for_bare_names() {
        let env = vec!["PATH=/usr/bin:/bin".to_string()];
        assert_eq!(exec_candidates("/bin/sh", &env), vec!["/bin/sh"]);
        assert_eq!(
            exec_candidates("sh", &env),
            vec!["/usr/bin/sh".to_string(), "/bin/sh".to_string()]
        );
    }
}
