//! Finds the block device behind a path, so blkio throttles land on the disk that actually
//! serves the sandbox's workspace (cgroup v1 `blk-throttle` rules name a whole disk, not a
//! partition).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The whole-disk device node (e.g. `/dev/vda`) holding `path`'s file system, or `None` when
/// the file system is not on a block device (tmpfs, overlay, NFS, ...).
pub(crate) fn disk_of(path: &Path) -> io::Result<Option<PathBuf>> {
    let dev = std::fs::metadata(path)?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    disk_of_dev(Path::new("/sys/dev/block"), major, minor)
}

/// [`disk_of`] with the sysfs root injectable (for tests).
pub(crate) fn disk_of_dev(
    sys_dev_block: &Path,
    major: u32,
    minor: u32,
) -> io::Result<Option<PathBuf>> {
    if major == 0 {
        return Ok(None); // anonymous device: tmpfs, overlay, proc, ...
    }
    let node = sys_dev_block.join(format!("{major}:{minor}"));
    let Ok(dir) = std::fs::canonicalize(&node) else {
        return Ok(None);
    };
    // A partition's sysfs directory sits inside its disk's directory.
    let disk_dir = if dir.join("partition").exists() {
        match dir.parent() {
            Some(parent) => parent.to_path_buf(),
            None => return Ok(None),
        }
    } else {
        dir
    };
    let uevent = std::fs::read_to_string(disk_dir.join("uevent"))?;
    let name = uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .map(str::to_string);
    Ok(name
        .map(|n| PathBuf::from("/dev").join(n))
        .filter(|p| p.exists()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_devices_have_no_disk() {
        assert_eq!(
            disk_of_dev(Path::new("/sys/dev/block"), 0, 42).expect("lookup"),
            None
        );
    }

    #[test]
    fn partitions_resolve_to_their_disk() {
        let root = tempfile::tempdir().expect("tempdir");
        let disk = root.path().join("devices/vdz");
        let part = disk.join("vdz1");
        std::fs::create_dir_all(&part).expect("mkdir");
        std::fs::write(disk.join("uevent"), "MAJOR=254\nMINOR=0\nDEVNAME=null\n").expect("w");
        std::fs::write(part.join("uevent"), "DEVNAME=vdz1\n").expect("w");
        std::fs::write(part.join("partition"), "1\n").expect("w");
        let links = root.path().join("block");
        std::fs::create_dir_all(&links).expect("mkdir");
        std::os::unix::fs::symlink(&part, links.join("254:1")).expect("symlink");
        // DEVNAME=null so the resolved node (/dev/null) exists on any machine.
        assert_eq!(
            disk_of_dev(&links, 254, 1).expect("lookup"),
            Some(PathBuf::from("/dev/null"))
        );
    }
}
