//! A writer for the `newc` cpio format the Linux kernel unpacks as its initramfs.
//!
//! Each entry is a 110-byte ASCII header (`070701`, then thirteen 8-digit hex fields), the
//! NUL-terminated name padded to a multiple of four bytes, then the data padded likewise. The
//! archive ends with the `TRAILER!!!` entry. See the kernel's
//! `Documentation/driver-api/early-userspace/buffer-format.rst`.

use std::collections::BTreeSet;

/// Builds a newc archive in memory. Parent directories are added automatically.
#[derive(Debug, Default)]
pub struct CpioWriter {
    buf: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl CpioWriter {
    /// An empty archive.
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            ino: 720_000,
            dirs: BTreeSet::new(),
        }
    }

    fn pad4(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn entry(&mut self, name: &str, mode: u32, uid: u32, gid: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let fields = [
            self.ino,
            mode,
            uid,
            gid,
            1, // nlink
            0, // mtime: fixed so equal inputs give equal archives
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            (name.len() + 1) as u32,
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad4();
        self.buf.extend_from_slice(data);
        self.pad4();
    }

    fn parents(&mut self, path: &str) {
        let path = path.trim_start_matches('/');
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                let p = prefix.clone();
                self.entry(&p, S_IFDIR | 0o755, 0, 0, &[], (0, 0));
            }
        }
    }

    /// Adds a directory (and its parents) with `mode` permission bits.
    pub fn dir(&mut self, path: &str, mode: u32) {
        self.parents(path);
        let p = path.trim_start_matches('/').to_string();
        if self.dirs.insert(p.clone()) {
            self.entry(&p, S_IFDIR | (mode & 0o7777), 0, 0, &[], (0, 0));
        }
    }

    /// Adds a regular file owned by root.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.parents(path);
        self.entry(path, S_IFREG | (mode & 0o7777), 0, 0, data, (0, 0));
    }

    /// Adds a symbolic link pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.entry(path, S_IFLNK | 0o777, 0, 0, target.as_bytes(), (0, 0));
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.parents(path);
        self.entry(path, S_IFCHR | (mode & 0o7777), 0, 0, &[], (major, minor));
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, 0, &[], (0, 0));
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, data, (rdev major, rdev minor)) of one entry.
    type Entry = (String, u32, Vec<u8>, (u32, u32));

    /// A minimal newc reader used to check the writer.
    fn parse(buf: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            assert_eq!(&buf[pos..pos + 6], b"070701", "magic at {pos}");
            let field = |i: usize| {
                let s =
                    std::str::from_utf8(&buf[pos + 6 + i * 8..pos + 14 + i * 8]).expect("ascii");
                u32::from_str_radix(s, 16).expect("hex")
            };
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6), field(9), field(10), field(11));
            let name_start = pos + 110;
            let name = std::str::from_utf8(&buf[name_start..name_start + namesize as usize - 1])
                .expect("name")
                .to_string();
            assert_eq!(
                buf[name_start + namesize as usize - 1],
                0,
                "name is NUL-terminated"
            );
            let data_start = (name_start + namesize as usize).div_ceil(4) * 4;
            let data = buf[data_start..data_start + size as usize].to_vec();
            pos = (data_start + size as usize).div_ceil(4) * 4;
            if name == "TRAILER!!!" {
                assert_eq!(pos, buf.len(), "nothing after the trailer");
                return out;
            }
            out.push((name, mode, data, (rmaj, rmin)));
        }
    }

    #[test]
    fn writes_entries_parents_and_trailer() {
        let mut w = CpioWriter::new();
        w.file("/etc/symbiont/config.bin", 0o600, b"abc");
        w.symlink("/bin/sh", "busybox");
        w.dir("/workspace", 0o755);
        w.char_dev("/dev/console", 0o600, 5, 1);
        w.file("/etc/x", 0o644, b"");
        let archive = w.finish();
        assert_eq!(archive.len() % 4, 0);
        let entries = parse(&archive);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc",
                "etc/symbiont",
                "etc/symbiont/config.bin",
                "bin",
                "bin/sh",
                "workspace",
                "dev",
                "dev/console",
                "etc/x"
            ]
        );
        assert_eq!(entries[2].1, S_IFREG | 0o600);
        assert_eq!(entries[2].2, b"abc");
        assert_eq!(entries[4].1, S_IFLNK | 0o777);
        assert_eq!(entries[4].2, b"busybox");
        assert_eq!(entries[7].1, S_IFCHR | 0o600);
        assert_eq!(entries[7].3, (5, 1));
    }

    #[test]
    fn equal_inputs_give_equal_archives() {
        let build = || {
            let mut w = CpioWriter::new();
            w.file("a/b", 0o644, b"x");
            w.finish()
        };
        assert_eq!(build(), build());
    }

    #[test]
    fn archive_is_readable_by_gnu_cpio() {
        let mut w = CpioWriter::new();
        w.file("dir/hello.txt", 0o640, b"hello cpio\n");
        w.symlink("dir/link", "hello.txt");
        let archive = w.finish();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = std::process::Command::new("cpio")
            .args(["-idm", "--quiet", "--no-absolute-filenames"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("cpio is installed (run `bash scripts/setup.sh`)");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&archive)
            .expect("write");
        assert!(child.wait().expect("wait").success());
        let text = std::fs::read_to_string(dir.path().join("dir/hello.txt")).expect("extracted");
        assert_eq!(text, "hello cpio\n");
        let link = std::fs::read_link(dir.path().join("dir/link")).expect("symlink");
        assert_eq!(link, std::path::PathBuf::from("hello.txt"));
    }
}
