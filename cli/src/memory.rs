//! The daemon's resident memory after start-up.
//!
//! Starting the daemon runs a lot of code once: configuration parsing, store migrations, the
//! probes of every sandbox tier (Docker API, runsc, a test microVM), restoring agents. The
//! kernel maps those code pages, plus their neighbours (fault-around), and they stay
//! resident — file-backed and clean, but counted in the daemon's RSS. Once the daemon is
//! ready, [`release_startup_code`] hands the pages of its own executable back to the kernel
//! with `MADV_PAGEOUT`: nothing changes for the program (a page it needs again is read back
//! from the file), and the idle daemon keeps only the code it actually runs while serving.

use std::path::Path;

/// What [`release_startup_code`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Mappings advised.
    pub mappings: usize,
    /// Bytes covered by those mappings.
    pub bytes: u64,
}

/// One read-only mapping of `exe` in a `/proc/PID/maps` text: (start, end).
fn exe_mappings(maps: &str, exe: &Path) -> Vec<(usize, usize)> {
    let exe = exe.to_string_lossy();
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            // offset, device, inode, then the path (which may contain spaces).
            let path = fields.skip(3).collect::<Vec<_>>().join(" ");
            if path != exe || perms.as_bytes().get(1) == Some(&b'w') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (end > start).then_some((start, end))
        })
        .collect()
}

/// Advises the kernel to page out the read-only mappings of this process's executable
/// (code and constants). Errors are returned, never fatal: the advice is an optimisation.
pub fn release_startup_code() -> std::io::Result<Released> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut released = Released::default();
    for (start, end) in exe_mappings(&maps, &exe) {
        // SAFETY: `start..end` is a whole, page-aligned, read-only mapping of our own
        // executable, taken from /proc/self/maps a moment ago (executable mappings are never
        // unmapped while the process runs). MADV_PAGEOUT is advisory: it only drops clean,
        // file-backed pages, which the kernel reads back from the file on the next access,
        // so no memory the program can observe changes.
        let rc =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        released.mappings += 1;
        released.bytes += (end - start) as u64;
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55ee72801000-55ee72a91000 r--p 00000000 fe:00 123 /opt/sym biont/symbiont
55ee72a91000-55ee736a7000 r-xp 00290000 fe:00 123 /opt/sym biont/symbiont
55ee736df000-55ee736e6000 rw-p 00ee6000 fe:00 123 /opt/sym biont/symbiont
7f0000000000-7f0000100000 r-xp 00000000 fe:00 456 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
";

    #[test]
    fn only_the_read_only_mappings_of_the_executable_are_chosen() {
        let got = exe_mappings(MAPS, Path::new("/opt/sym biont/symbiont"));
        assert_eq!(
            got,
            vec![
                (0x55ee72801000, 0x55ee72a91000),
                (0x55ee72a91000, 0x55ee736a7000)
            ]
        );
    }

    #[test]
    fn releasing_our_own_code_keeps_the_process_working() {
        let released = release_startup_code().expect("madvise");
        assert!(released.mappings >= 1, "{released:?}");
        // Code paged out is read back on use: calling into it again works.
        assert_eq!(exe_mappings(MAPS, Path::new("/nope")), Vec::new());
        assert!(release_startup_code().expect("again").mappings >= 1);
    }
}
