//! The base image, built by the runtime itself (there is no registry).
//!
//! A root filesystem tar is assembled in memory from the host's static busybox (one binary
//! plus a symlink per applet: `sh`, `echo`, `cat`, `dd`, `nc`, `wget`, `sleep`, ...) and a
//! minimal `/etc` (`passwd`/`group` with `nobody` = 65534), with fixed timestamps and owners
//! so the same inputs give the same bytes. It is imported through the Engine API
//! (`POST /images/create?fromSrc=-`, i.e. `docker import`) and tagged
//! `symbiont/base:<first 16 hex digits of the tar's SHA-256>`; a later start finds the tag
//! and reuses it.

use std::io;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Repository name of the base image.
pub const BASE_IMAGE_REPO: &str = "symbiont/base";

/// Bumped whenever the layout below changes (part of the hashed content).
const RECIPE: &str = "symbiont-base/1";

/// Applets linked when `busybox --list-full` cannot be run.
const FALLBACK_APPLETS: &[&str] = &[
    "bin/sh",
    "bin/ash",
    "bin/echo",
    "bin/cat",
    "bin/dd",
    "bin/sleep",
    "bin/ls",
    "bin/mkdir",
    "bin/rm",
    "bin/cp",
    "bin/mv",
    "bin/touch",
    "bin/chmod",
    "bin/grep",
    "bin/sed",
    "bin/kill",
    "bin/ps",
    "bin/true",
    "bin/false",
    "bin/date",
    "bin/hostname",
    "bin/usleep",
    "bin/stat",
    "usr/bin/id",
    "usr/bin/head",
    "usr/bin/tail",
    "usr/bin/wc",
    "usr/bin/env",
    "usr/bin/seq",
    "usr/bin/nc",
    "usr/bin/wget",
    "usr/bin/awk",
    "usr/bin/tr",
    "usr/bin/cut",
    "usr/bin/tee",
    "usr/bin/timeout",
    "usr/bin/yes",
    "usr/bin/sha256sum",
    "usr/bin/test",
    "usr/bin/[",
    "usr/bin/printf",
    "usr/bin/xargs",
    "usr/bin/find",
    "usr/bin/nproc",
    "usr/bin/whoami",
];

/// A built base root filesystem.
#[derive(Clone, Debug)]
pub(crate) struct BaseImage {
    /// `symbiont/base:<hash>`.
    pub name: String,
    /// The tag part (`<hash>`).
    pub tag: String,
    /// The root filesystem as an uncompressed tar.
    pub tar: Vec<u8>,
}

/// The applet paths (relative, e.g. `usr/bin/nc`) busybox reports, or a fixed list.
fn applets(busybox: &Path) -> Vec<String> {
    let listed: Vec<String> = crate::sandbox::busybox_list(busybox, "--list-full")
        .into_iter()
        .map(|l| l.trim_start_matches('/').to_string())
        .filter(|l| !l.is_empty() && !l.contains(".."))
        .collect();
    let mut list = if listed.is_empty() {
        FALLBACK_APPLETS.iter().map(|s| s.to_string()).collect()
    } else {
        listed
    };
    list.retain(|p| p != "bin/busybox");
    list.sort();
    list.dedup();
    list
}

fn header(kind: tar::EntryType, mode: u32, size: u64, uid: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_mtime(0);
    h
}

/// Builds the base root filesystem from `busybox` (deterministic).
pub(crate) fn build_base(busybox: &Path) -> io::Result<BaseImage> {
    let binary = std::fs::read(busybox).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot read {} to build the base image ({e}); install busybox-static \
                 (`apt-get install busybox-static`, or run `bash scripts/setup.sh`)",
                busybox.display()
            ),
        )
    })?;
    let mut b = tar::Builder::new(Vec::new());
    let dirs: &[(&str, u32, u64)] = &[
        ("bin", 0o755, 0),
        ("dev", 0o755, 0),
        ("etc", 0o755, 0),
        ("home", 0o755, 0),
        ("proc", 0o555, 0),
        ("root", 0o700, 0),
        ("sbin", 0o755, 0),
        ("sys", 0o555, 0),
        ("tmp", 0o1777, 0),
        ("usr", 0o755, 0),
        ("usr/bin", 0o755, 0),
        ("usr/sbin", 0o755, 0),
        ("var", 0o755, 0),
        ("var/tmp", 0o1777, 0),
        ("workspace", 0o755, 65534),
    ];
    for (path, mode, uid) in dirs {
        let mut h = header(tar::EntryType::Directory, *mode, 0, *uid);
        b.append_data(&mut h, format!("{path}/"), io::empty())?;
    }
    let mut h = header(tar::EntryType::Regular, 0o755, binary.len() as u64, 0);
    b.append_data(&mut h, "bin/busybox", binary.as_slice())?;
    for applet in applets(busybox) {
        let depth = applet.matches('/').count();
        let target = format!("{}bin/busybox", "../".repeat(depth));
        let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0);
        b.append_link(&mut h, &applet, &target)?;
    }
    let files: &[(&str, &str)] = &[
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/workspace:/bin/sh\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hosts", "127.0.0.1\tlocalhost\n"),
        ("etc/hostname", "sandbox\n"),
        ("etc/resolv.conf", ""),
        ("etc/symbiont-release", RECIPE),
    ];
    for (path, contents) in files {
        let mut h = header(tar::EntryType::Regular, 0o644, contents.len() as u64, 0);
        b.append_data(&mut h, path, contents.as_bytes())?;
    }
    let tar = b.into_inner()?;
    let digest = Sha256::digest(&tar);
    let tag = hex::encode(&digest[..8]);
    Ok(BaseImage {
        name: format!("{BASE_IMAGE_REPO}:{tag}"),
        tag,
        tar,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_image_is_deterministic_and_complete() {
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "/bin/busybox is missing: run `bash scripts/setup.sh` (installs busybox-static)"
        );
        let a = build_base(busybox).expect("build");
        let b = build_base(busybox).expect("build");
        assert_eq!(a.name, b.name, "same inputs, same tag");
        assert_eq!(a.tar, b.tar);
        let mut archive = tar::Archive::new(a.tar.as_slice());
        let paths: Vec<String> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        for needed in [
            "bin/busybox",
            "bin/sh",
            "etc/passwd",
            "workspace/",
            "var/tmp/",
        ] {
            assert!(paths.iter().any(|p| p == needed), "{needed} missing");
        }
        assert!(
            paths.iter().any(|p| p.ends_with("/nc")),
            "nc applet missing"
        );
    }

    #[test]
    fn missing_busybox_says_how_to_install() {
        let err = build_base(Path::new("/nonexistent/busybox")).expect_err("must fail");
        assert!(err.to_string().contains("busybox-static"), "{err}");
    }
}
