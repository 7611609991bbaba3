//! Advisory file locks (`flock(2)`): one daemon per data directory, and serialized
//! read-modify-write of the token file. The kernel drops a lock when its holder dies, so
//! a `kill -9` never leaves a stale lock behind.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct Lock {
    file: File,
    path: PathBuf,
}

impl Lock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: flock on a descriptor this struct owns; unlocking cannot affect memory.
        unsafe {
            libc::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

fn open(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed to the kernel.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Waits for an exclusive lock on `path`.
pub fn lock(path: &Path) -> Result<Lock> {
    let file = open(path)?;
    flock(&file, libc::LOCK_EX).with_context(|| format!("locking {}", path.display()))?;
    Ok(Lock {
        file,
        path: path.to_path_buf(),
    })
}

/// Takes the exclusive lock of `data_dir` for a daemon, or fails naming the daemon that
/// holds it. The holder's pid is written into the lock file.
pub fn lock_data_dir(data_dir: &Path) -> Result<Lock> {
    let path = data_dir.join("daemon.lock");
    let mut file = open(&path)?;
    if let Err(e) = flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "another symbiont daemon (pid {}) is using the data directory {}; two runtimes \
                 on one directory would corrupt its store and audit log",
                holder.trim(),
                data_dir.display()
            );
        }
        return Err(e).with_context(|| format!("locking {}", path.display()));
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    file.flush()?;
    Ok(Lock { file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_is_locked_once_and_freed_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = lock_data_dir(dir.path()).expect("first");
        let err = lock_data_dir(dir.path()).expect_err("second must fail");
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(held);
        lock_data_dir(dir.path()).expect("free again");
    }
}
