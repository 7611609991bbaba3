//! Direct kernel boot: the ELF `vmlinux` inside Debian's compressed `vmlinuz` (a bzImage),
//! extracted once and booted through its PVH entry point.
//!
//! Booting the bzImage makes the guest do two slow things under TCG emulation: the firmware
//! copies the 14 MB image into place, and the kernel's own stub decompresses and relocates
//! itself. QEMU's `microvm` loads an ELF kernel that carries a PVH note
//! (`XEN_ELFNOTE_PHYS32_ENTRY`) straight into guest memory instead, and Firecracker only
//! boots such an ELF. This module finds the payload through the bzImage's boot-protocol
//! header, decompresses it (gzip or the kernel's LZ4 legacy format), checks the PVH note and
//! caches the result by the bzImage's content hash. It is the same kernel build: only the
//! packaging differs.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Offset of `setup_sects` in the bzImage (boot protocol).
const SETUP_SECTS: usize = 0x1f1;
/// Offset of the `HdrS` signature.
const HEADER_MAGIC: usize = 0x202;
/// Offset of the boot protocol version.
const VERSION: usize = 0x206;
/// Offsets of `payload_offset` and `payload_length` (boot protocol 2.08+).
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
/// The LZ4 legacy frame magic the kernel's build uses.
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Largest uncompressed chunk of the LZ4 legacy format.
const LZ4_LEGACY_CHUNK: usize = 8 << 20;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point note.
const PVH_NOTE: u32 = 18;
/// Refuse to inflate beyond this (a kernel is tens of MB).
const MAX_VMLINUX: usize = 512 << 20;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The compressed kernel inside a bzImage, located through its boot-protocol header.
pub fn payload(bzimage: &[u8]) -> Result<&[u8], String> {
    if bzimage.get(HEADER_MAGIC..HEADER_MAGIC + 4) != Some(b"HdrS") {
        return Err("not a bzImage (no HdrS boot header)".into());
    }
    let version = u16_at(bzimage, VERSION).ok_or("truncated boot header")?;
    if version < 0x0208 {
        return Err(format!(
            "boot protocol {}.{:02} has no payload fields (needs 2.08)",
            version >> 8,
            version & 0xff
        ));
    }
    let sects = match bzimage[SETUP_SECTS] {
        0 => 4,
        n => usize::from(n),
    };
    let offset = u32_at(bzimage, PAYLOAD_OFFSET).ok_or("truncated boot header")? as usize;
    let length = u32_at(bzimage, PAYLOAD_LENGTH).ok_or("truncated boot header")? as usize;
    let start = (sects + 1) * 512 + offset;
    bzimage
        .get(start..start + length)
        .ok_or_else(|| format!("payload {start}+{length} lies beyond the image"))
}

/// Decompresses a bzImage payload: gzip, or the LZ4 legacy format (Debian's choice).
pub fn decompress(payload: &[u8]) -> Result<Vec<u8>, String> {
    match payload {
        [0x1f, 0x8b, ..] => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(payload)
                .take(MAX_VMLINUX as u64)
                .read_to_end(&mut out)
                .map_err(|e| format!("gzip payload: {e}"))?;
            Ok(out)
        }
        _ if u32_at(payload, 0) == Some(LZ4_LEGACY_MAGIC) => lz4_legacy(payload),
        _ => Err(format!(
            "payload compressed with an unsupported format (magic {:02x?}); gzip and LZ4 are",
            payload.get(..4).unwrap_or_default()
        )),
    }
}

/// The kernel's LZ4 format: the legacy magic, then chunks of `u32 compressed size` + block,
/// each inflating to at most 8 MiB; the kernel's build appends the total size (`u32`).
fn lz4_legacy(payload: &[u8]) -> Result<Vec<u8>, String> {
    let total = payload
        .len()
        .checked_sub(4)
        .and_then(|at| u32_at(payload, at))
        .ok_or("truncated LZ4 payload")? as usize;
    if total > MAX_VMLINUX {
        return Err(format!("LZ4 payload claims {total} bytes"));
    }
    let mut out = vec![0u8; total];
    let (mut at, mut filled) = (4usize, 0usize);
    while filled < total {
        let size = u32_at(payload, at).ok_or("truncated LZ4 chunk header")? as usize;
        at += 4;
        if size as u32 == LZ4_LEGACY_MAGIC {
            continue; // concatenated frames
        }
        let block = payload
            .get(at..at + size)
            .ok_or("LZ4 chunk runs past the payload")?;
        let room = (total - filled).min(LZ4_LEGACY_CHUNK);
        let n = lz4_flex::block::decompress_into(block, &mut out[filled..filled + room])
            .map_err(|e| format!("LZ4 chunk at {at}: {e}"))?;
        if n == 0 {
            return Err(format!("empty LZ4 chunk at {at}"));
        }
        filled += n;
        at += size;
    }
    Ok(out)
}

/// Whether the file at `path` starts with the ELF magic.
pub fn is_elf(path: &Path) -> bool {
    let mut head = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && head == *b"\x7fELF"
}

/// Whether `elf` is a 64-bit ELF with a PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`).
pub fn has_pvh_note(elf: &[u8]) -> bool {
    pvh_note(elf).unwrap_or(false)
}

fn pvh_note(elf: &[u8]) -> Option<bool> {
    if elf.get(..5)? != b"\x7fELF\x02" {
        return Some(false);
    }
    let phoff = usize::try_from(u64_at(elf, 0x20)?).ok()?;
    let phentsize = usize::from(u16_at(elf, 0x36)?);
    let phnum = usize::from(u16_at(elf, 0x38)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(elf, ph)? != 4 {
            continue; // not PT_NOTE
        }
        let off = usize::try_from(u64_at(elf, ph + 8)?).ok()?;
        let size = usize::try_from(u64_at(elf, ph + 32)?).ok()?;
        let notes = elf.get(off..off.checked_add(size)?)?;
        let mut at = 0;
        while at + 12 <= notes.len() {
            let namesz = u32_at(notes, at)? as usize;
            let descsz = u32_at(notes, at + 4)? as usize;
            let kind = u32_at(notes, at + 8)?;
            let name = notes.get(at + 12..at + 12 + namesz)?;
            if kind == PVH_NOTE && name == b"Xen\0" {
                return Some(true);
            }
            at += 12 + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
        }
    }
    Some(false)
}

/// Returns an ELF kernel with a PVH note for `image`: `image` itself when it already is one,
/// else the vmlinux extracted from it, cached under the first of `cache_dirs` that holds it
/// or accepts it (extracted once per image path, size and mtime).
pub fn direct_boot_image(image: &Path, cache_dirs: &[PathBuf]) -> Result<PathBuf, String> {
    let stamp = super::image::file_stamp(image).map_err(|e| format!("{}: {e}", image.display()))?;
    let key = Sha256::digest(stamp);
    let name = format!("vmlinux-{}", &hex::encode(key)[..16]);
    if let Some(found) = cache_dirs
        .iter()
        .map(|d| d.join(&name))
        .find(|p| p.is_file())
    {
        return Ok(found);
    }
    let bytes = fs::read(image).map_err(|e| format!("{}: {e}", image.display()))?;
    if bytes.starts_with(b"\x7fELF") {
        return if has_pvh_note(&bytes) {
            Ok(image.to_path_buf())
        } else {
            Err(format!(
                "{} is an ELF kernel without a PVH entry note",
                image.display()
            ))
        };
    }
    let elf = decompress(payload(&bytes)?)?;
    if !has_pvh_note(&elf) {
        return Err("the kernel inside has no PVH entry note (CONFIG_PVH)".into());
    }
    let mut errors = Vec::new();
    for dir in cache_dirs {
        let path = dir.join(&name);
        match super::image::store(&path, &[&elf]) {
            Ok(()) => return Ok(path),
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    Err(format!(
        "cannot store the extracted kernel: {}",
        errors.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal ELF64 with one PT_NOTE segment holding `note_type` under `name`.
    fn elf_with_note(name: &[u8], note_type: u32) -> Vec<u8> {
        let mut notes = Vec::new();
        notes.extend((name.len() as u32).to_le_bytes());
        notes.extend(8u32.to_le_bytes());
        notes.extend(note_type.to_le_bytes());
        notes.extend(name);
        while notes.len() % 4 != 0 {
            notes.push(0);
        }
        notes.extend(0x0100_0000u64.to_le_bytes());
        let mut elf = vec![0u8; 64];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        ph[32..40].copy_from_slice(&(notes.len() as u64).to_le_bytes()); // p_filesz
        elf.extend(ph);
        elf.extend(notes);
        elf
    }

    /// A bzImage shell (boot protocol 2.15, one setup sector) around `payload`.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 2 * 512];
        img[SETUP_SECTS] = 1;
        img[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        img[VERSION..VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        img[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&16u32.to_le_bytes());
        img[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend([0u8; 16]);
        img.extend(payload);
        img
    }

    fn lz4_legacy_of(data: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for part in data.chunks(chunk) {
            let block = lz4_flex::block::compress(part);
            out.extend((block.len() as u32).to_le_bytes());
            out.extend(block);
        }
        out.extend((data.len() as u32).to_le_bytes());
        out
    }

    #[test]
    fn pvh_note_is_found_only_under_the_xen_name_and_type() {
        assert!(has_pvh_note(&elf_with_note(b"Xen\0", PVH_NOTE)));
        assert!(!has_pvh_note(&elf_with_note(b"Xen\0", 5)));
        assert!(!has_pvh_note(&elf_with_note(b"GNU\0", PVH_NOTE)));
        assert!(!has_pvh_note(b"\x7fELF\x01 not 64-bit"));
        assert!(!has_pvh_note(b""));
        // Truncated program headers are rejected, not read past the end.
        let elf = elf_with_note(b"Xen\0", PVH_NOTE);
        assert!(!has_pvh_note(&elf[..100]));
    }

    #[test]
    fn gzip_and_lz4_payloads_inflate_to_the_elf_inside() {
        let mut elf = elf_with_note(b"Xen\0", PVH_NOTE);
        elf.extend((0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).expect("gzip");
        let gz = gz.finish().expect("gzip");
        for packed in [gz, lz4_legacy_of(&elf, 64 << 10)] {
            let image = bzimage(&packed);
            let inner = decompress(payload(&image).expect("payload")).expect("inflates");
            assert_eq!(inner, elf);
            assert!(has_pvh_note(&inner));
        }
    }

    #[test]
    fn bad_images_are_refused_with_the_reason() {
        assert!(payload(b"not a kernel")
            .expect_err("refused")
            .contains("HdrS"));
        let mut old = bzimage(b"x");
        old[VERSION..VERSION + 2].copy_from_slice(&0x0206u16.to_le_bytes());
        assert!(payload(&old).expect_err("refused").contains("2.08"));
        let mut long = bzimage(b"x");
        long[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&1_000u32.to_le_bytes());
        assert!(payload(&long).expect_err("refused").contains("beyond"));
        assert!(decompress(b"\xfd7zXZ\0")
            .expect_err("refused")
            .contains("unsupported"));
        let mut cut = lz4_legacy_of(&[7u8; 100_000], 1 << 16);
        let n = cut.len();
        cut.drain(20..n - 4);
        assert!(decompress(&cut).is_err());
    }

    #[test]
    fn direct_boot_image_extracts_once_and_reuses_the_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let elf = elf_with_note(b"Xen\0", PVH_NOTE);
        let src = dir.path().join("vmlinuz-test");
        fs::write(&src, bzimage(&lz4_legacy_of(&elf, 1 << 16))).expect("write");
        let cache = vec![
            dir.path().join("unwritable/\0bad"),
            dir.path().join("cache"),
        ];
        let first = direct_boot_image(&src, &cache).expect("extracts into the writable dir");
        assert!(
            first.starts_with(dir.path().join("cache")),
            "{}",
            first.display()
        );
        assert_eq!(fs::read(&first).expect("read"), elf);
        let modified = fs::metadata(&first)
            .and_then(|m| m.modified())
            .expect("mtime");
        let second = direct_boot_image(&src, &cache).expect("cached");
        assert_eq!(first, second);
        assert_eq!(
            fs::metadata(&second)
                .and_then(|m| m.modified())
                .expect("mtime"),
            modified,
            "not rewritten"
        );
        // An ELF with the note is used as is; one without is refused.
        let direct = dir.path().join("vmlinux");
        fs::write(&direct, &elf).expect("write");
        assert_eq!(direct_boot_image(&direct, &cache).expect("as is"), direct);
        fs::write(&direct, elf_with_note(b"Xen\0", 1)).expect("write");
        assert!(direct_boot_image(&direct, &cache)
            .expect_err("refused")
            .contains("PVH"));
        assert!(is_elf(&direct));
        assert!(!is_elf(&src));
        assert!(!is_elf(&dir.path().join("missing")));
    }
}
