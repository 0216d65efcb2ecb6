//! The data copies: each node's full copy of the volume.
//!
//! A copy is a file or block device whose bytes [0, volume_size_bytes) are
//! the volume, followed by one page holding a [`DataSuperblock`]. Volume
//! offsets are file offsets, so the daemon writes updates with no
//! translation and a copy can be checked with ordinary tools.

pub mod error;
pub mod superblock;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use error::StoreError;
pub use superblock::{
    data_magic_present, DataSuperblock, DATA_BLOCK_SIZE_MAX_BYTES, DATA_BLOCK_SIZE_MIN_BYTES,
    DATA_FORMAT_VERSION, DATA_MAGIC, DATA_SUPERBLOCK_SIZE_BYTES,
};

/// An opened, validated data copy.
#[derive(Debug)]
pub struct DataFile {
    path: PathBuf,
    superblock: DataSuperblock,
    /// Buffered read+write fd for the superblock. write(2) copies the page
    /// under the page lock, so writeback sees the old or the new
    /// superblock, never a mix.
    file: File,
    /// Set after a failed superblock write or fsync; see
    /// [`StoreError::Poisoned`].
    failed: bool,
}

impl DataFile {
    /// Initialises a copy at `path`. A regular file (created if missing) is
    /// sized to volume_size_bytes + one superblock page; bytes already in
    /// [0, volume_size_bytes) are kept, so an existing image can be
    /// adopted. An existing block device must be large enough and only gets
    /// the superblock. Durable on return.
    pub fn create(
        path: impl AsRef<Path>,
        superblock: &DataSuperblock,
    ) -> Result<DataFile, StoreError> {
        let path = path.as_ref();
        if let Some((field, found, expected)) =
            superblock::geometry_problem(superblock.block_size_bytes, superblock.volume_size_bytes)
        {
            return Err(StoreError::Invalid {
                path: path.to_path_buf(),
                field,
                found,
                expected,
            });
        }
        let needed = superblock
            .volume_size_bytes
            .checked_add(DATA_SUPERBLOCK_SIZE_BYTES)
            .ok_or_else(|| StoreError::Invalid {
                path: path.to_path_buf(),
                field: "volume_size_bytes",
                found: superblock.volume_size_bytes,
                expected: "a size that fits in a file".to_string(),
            })?;
        let is_block_device = match std::fs::metadata(path) {
            Ok(meta) => meta.file_type().is_block_device(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(StoreError::io(path, "inspecting the copy", e)),
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!is_block_device)
            .truncate(false)
            .open(path)
            .map_err(|e| StoreError::io(path, "opening the copy", e))?;
        if is_block_device {
            let len = file_len(path, &mut file)?;
            if len < needed {
                return Err(StoreError::Mismatch {
                    path: path.to_path_buf(),
                    field: "device size",
                    found: len,
                    expected: needed,
                });
            }
        } else {
            file.set_len(needed)
                .map_err(|e| StoreError::io(path, "sizing the copy", e))?;
        }
        let mut copy = DataFile {
            path: path.to_path_buf(),
            superblock: *superblock,
            file,
            failed: false,
        };
        copy.write_superblock(superblock)?;
        // sync_all: a new or resized file's length is metadata.
        copy.file
            .sync_all()
            .map_err(|e| StoreError::io(path, "fsync of the new copy", e))?;
        if !is_block_device {
            sync_parent_dir(path)?;
        }
        forget_cached_superblock(&copy.file, superblock.volume_size_bytes);
        copy.superblock = *superblock;
        Ok(copy)
    }

    /// Opens the copy at `path`, refusing one of another volume or node, of
    /// another geometry, or without a valid superblock.
    pub fn open(
        path: impl AsRef<Path>,
        volume_uuid: [u8; 16],
        node_id: u32,
        block_size_bytes: u32,
        volume_size_bytes: u64,
    ) -> Result<DataFile, StoreError> {
        let path = path.as_ref();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| StoreError::io(path, "opening the copy", e))?;
        let is_block_device = file
            .metadata()
            .map_err(|e| StoreError::io(path, "inspecting the copy", e))?
            .file_type()
            .is_block_device();
        let len = file_len(path, &mut file)?;
        let expected_len = volume_size_bytes.saturating_add(DATA_SUPERBLOCK_SIZE_BYTES);
        let check = |sb: &DataSuperblock| {
            check_identity(
                path,
                sb,
                volume_uuid,
                node_id,
                block_size_bytes,
                volume_size_bytes,
            )
        };

        // A regular file's length must be exact: its superblock is its last
        // page. A device may be larger than the volume.
        if len < expected_len || (!is_block_device && len != expected_len) {
            // A copy made for another geometry keeps its superblock at its
            // own end; if one is there, name the field that differs.
            if !is_block_device && len >= DATA_SUPERBLOCK_SIZE_BYTES {
                if let Ok(sb) = read_superblock(path, &file, len - DATA_SUPERBLOCK_SIZE_BYTES) {
                    check(&sb)?;
                }
            }
            return Err(StoreError::Mismatch {
                path: path.to_path_buf(),
                field: "file length",
                found: len,
                expected: expected_len,
            });
        }
        let sb = read_superblock(path, &file, volume_size_bytes)?;
        check(&sb)?;
        forget_cached_superblock(&file, volume_size_bytes);
        Ok(DataFile {
            path: path.to_path_buf(),
            superblock: sb,
            file,
            failed: false,
        })
    }

    /// The superblock as last persisted.
    pub fn superblock(&self) -> DataSuperblock {
        self.superblock
    }

    /// The copy's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a new epoch in the superblock; durable on return.
    pub fn set_epoch_blocking(&mut self, epoch: u64) -> Result<(), StoreError> {
        if self.failed {
            return Err(StoreError::Poisoned {
                path: self.path.clone(),
            });
        }
        let next = DataSuperblock {
            epoch,
            ..self.superblock
        };
        self.write_superblock(&next)?;
        if let Err(e) = self.file.sync_data() {
            self.failed = true;
            return Err(StoreError::io(&self.path, "fdatasync of the superblock", e));
        }
        forget_cached_superblock(&self.file, next.volume_size_bytes);
        self.superblock = next;
        Ok(())
    }

    /// A new read+write O_DIRECT descriptor of the copy, for the async
    /// data path. Buffers, offsets and lengths must be aligned.
    pub fn direct_file(&self) -> std::io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&self.path)
    }

    /// A new buffered read+write descriptor of the copy.
    pub fn buffered_file(&self) -> std::io::Result<File> {
        OpenOptions::new().read(true).write(true).open(&self.path)
    }

    fn write_superblock(&mut self, sb: &DataSuperblock) -> Result<(), StoreError> {
        // The whole page, so the unused bytes are zero whatever was there.
        let mut page = vec![0u8; DATA_SUPERBLOCK_SIZE_BYTES as usize];
        sb.encode(&mut page);
        if let Err(e) = self.file.write_all_at(&page, sb.volume_size_bytes) {
            self.failed = true;
            return Err(StoreError::io(&self.path, "writing the superblock", e));
        }
        Ok(())
    }
}

fn file_len(path: &Path, file: &mut File) -> Result<u64, StoreError> {
    // Seeking to the end measures block devices too (their metadata
    // length is 0).
    file.seek(SeekFrom::End(0))
        .map_err(|e| StoreError::io(path, "measuring the copy", e))
}

/// Drops the superblock's page, clean by now (read, or written and
/// synced), from the page cache. The data path writes the copy with
/// O_DIRECT, and while a file has any page cached the kernel looks up and
/// tries to invalidate the range of every direct write to it: a cost per
/// write for one page nobody reads again until the next start (about 1% of
/// the primary's CPU at 4 KiB QD32). Only advice: should it fail, writes
/// are slower, nothing else, so the failure is not an error.
fn forget_cached_superblock(file: &File, offset: u64) {
    let (Ok(offset), Ok(length)) = (
        i64::try_from(offset),
        i64::try_from(DATA_SUPERBLOCK_SIZE_BYTES),
    ) else {
        return;
    };
    let advice = nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED;
    if let Err(error) = nix::fcntl::posix_fadvise(file.as_raw_fd(), offset, length, advice) {
        tracing::debug!(%error, "dropping the superblock's page from the page cache failed");
    }
}

fn read_superblock(path: &Path, file: &File, offset: u64) -> Result<DataSuperblock, StoreError> {
    let mut page = vec![0u8; DATA_SUPERBLOCK_SIZE_BYTES as usize];
    file.read_exact_at(&mut page, offset)
        .map_err(|e| StoreError::io(path, "reading the superblock", e))?;
    if !data_magic_present(&page) {
        return Err(StoreError::NoSuperblock {
            path: path.to_path_buf(),
            offset,
            found: format!("{:02x?}", &page[..DATA_MAGIC.len()]),
        });
    }
    DataSuperblock::decode(&page).map_err(|e| e.at(path))
}

fn check_identity(
    path: &Path,
    sb: &DataSuperblock,
    volume_uuid: [u8; 16],
    node_id: u32,
    block_size_bytes: u32,
    volume_size_bytes: u64,
) -> Result<(), StoreError> {
    if sb.volume_uuid != volume_uuid {
        return Err(StoreError::WrongVolume {
            path: path.to_path_buf(),
            found: sb.volume_uuid,
            expected: volume_uuid,
        });
    }
    let fields = [
        ("node id", u64::from(sb.node_id), u64::from(node_id)),
        (
            "block_size_bytes",
            u64::from(sb.block_size_bytes),
            u64::from(block_size_bytes),
        ),
        ("volume_size_bytes", sb.volume_size_bytes, volume_size_bytes),
    ];
    for (field, found, expected) in fields {
        if found != expected {
            return Err(StoreError::Mismatch {
                path: path.to_path_buf(),
                field,
                found,
                expected,
            });
        }
    }
    Ok(())
}

fn sync_parent_dir(path: &Path) -> Result<(), StoreError> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| StoreError::io(path, "fsync of the copy's directory", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::AlignedBuf;

    const UUID: [u8; 16] = [0x5a; 16];
    const VOLUME_BYTES: u64 = 1 << 20;

    fn sb() -> DataSuperblock {
        DataSuperblock {
            volume_uuid: UUID,
            node_id: 4,
            block_size_bytes: 512,
            volume_size_bytes: VOLUME_BYTES,
            epoch: 1,
        }
    }

    fn open(path: &Path) -> Result<DataFile, StoreError> {
        DataFile::open(path, UUID, 4, 512, VOLUME_BYTES)
    }

    fn mismatch_field(result: Result<DataFile, StoreError>) -> &'static str {
        match result {
            Err(StoreError::Mismatch { field, .. }) => field,
            other => panic!("expected a Mismatch error, got {other:?}"),
        }
    }

    #[test]
    fn create_then_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        let created = DataFile::create(&path, &sb()).unwrap();
        assert_eq!(created.superblock(), sb());
        drop(created);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            VOLUME_BYTES + DATA_SUPERBLOCK_SIZE_BYTES
        );
        let mut copy = open(&path).unwrap();
        assert_eq!(copy.superblock(), sb());
        assert_eq!(copy.path(), path);

        copy.set_epoch_blocking(9).unwrap();
        drop(copy);
        assert_eq!(open(&path).unwrap().superblock().epoch, 9);
    }

    /// Whether the page at `offset` of the file at `path` is in the page
    /// cache.
    fn page_cached(path: &Path, offset: u64) -> bool {
        let file = File::open(path).unwrap();
        // SAFETY: the mapping is only handed to mincore, which reads no
        // byte of it, and the file keeps its length while it lives.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(DATA_SUPERBLOCK_SIZE_BYTES as usize)
                .map(&file)
        }
        .unwrap();
        let mut resident = [0u8; 1];
        // SAFETY: a live mapping of one page, and a vector of one byte for it.
        let result = unsafe {
            libc::mincore(
                map.as_ptr() as *mut libc::c_void,
                map.len(),
                resident.as_mut_ptr(),
            )
        };
        assert_eq!(result, 0, "mincore: {}", std::io::Error::last_os_error());
        resident[0] & 1 == 1
    }

    #[test]
    fn the_superblock_leaves_no_page_in_the_cache_behind() {
        // On a disk's filesystem (the source tree's): tmpfs keeps its pages.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("copy");
        drop(DataFile::create(&path, &sb()).unwrap());
        assert!(!page_cached(&path, VOLUME_BYTES), "after create");
        let mut copy = open(&path).unwrap();
        assert!(!page_cached(&path, VOLUME_BYTES), "after open");
        copy.set_epoch_blocking(3).unwrap();
        assert!(!page_cached(&path, VOLUME_BYTES), "after a new epoch");
        // The check itself sees a cached page.
        let mut page = vec![0u8; DATA_SUPERBLOCK_SIZE_BYTES as usize];
        copy.file.read_exact_at(&mut page, VOLUME_BYTES).unwrap();
        assert!(page_cached(&path, VOLUME_BYTES), "after a buffered read");
    }

    #[test]
    fn volume_offsets_are_file_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        let copy = DataFile::create(&path, &sb()).unwrap();
        let block = AlignedBuf::copy_from(&[0x77; 4096]);
        copy.direct_file()
            .unwrap()
            .write_all_at(block.as_slice(), VOLUME_BYTES - 4096)
            .unwrap();
        let mut back = [0u8; 4096];
        copy.buffered_file()
            .unwrap()
            .read_exact_at(&mut back, VOLUME_BYTES - 4096)
            .unwrap();
        assert_eq!(back, [0x77; 4096]);
        // The superblock right behind the volume is untouched.
        drop(copy);
        open(&path).unwrap();
    }

    #[test]
    fn mismatches_refused_with_the_field_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        DataFile::create(&path, &sb()).unwrap();

        let err = DataFile::open(&path, [1; 16], 4, 512, VOLUME_BYTES).unwrap_err();
        assert!(matches!(err, StoreError::WrongVolume { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "data copy {}: volume uuid 5a5a5a5a-",
                path.display()
            )),
            "{text}"
        );
        assert!(
            text.contains("belongs to another volume (expected 01010101-"),
            "{text}"
        );

        let err = DataFile::open(&path, UUID, 5, 512, VOLUME_BYTES).unwrap_err();
        assert!(
            err.to_string().contains("node id is 4 but 5 was expected"),
            "{err}"
        );
        assert_eq!(mismatch_field(Err(err)), "node id");

        let result = DataFile::open(&path, UUID, 4, 4096, VOLUME_BYTES);
        assert_eq!(mismatch_field(result), "block_size_bytes");

        // A different volume size moves the expected superblock; the one
        // at the file's end still names the field.
        let result = DataFile::open(&path, UUID, 4, 512, VOLUME_BYTES * 2);
        assert_eq!(mismatch_field(result), "volume_size_bytes");
        let result = DataFile::open(&path, UUID, 4, 512, VOLUME_BYTES - 512);
        assert_eq!(mismatch_field(result), "volume_size_bytes");
    }

    #[test]
    fn missing_or_garbled_superblock_refused_with_the_init_hint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(VOLUME_BYTES + DATA_SUPERBLOCK_SIZE_BYTES)
            .unwrap();
        let err = open(&path).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::NoSuperblock {
                    offset: VOLUME_BYTES,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("run `replblk-ctl init`"), "{err}");

        DataFile::create(&path, &sb()).unwrap();
        let byte = VOLUME_BYTES + 50; // inside the epoch field
        let mut one = [0u8];
        file.read_exact_at(&mut one, byte).unwrap();
        file.write_all_at(&[one[0] ^ 0x80], byte).unwrap();
        let err = open(&path).unwrap_err();
        match &err {
            StoreError::Garbled { field, .. } => assert_eq!(*field, "crc32"),
            other => panic!("expected a Garbled error, got {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("superblock crc32 is 0x"), "{text}");
        assert!(text.contains("run `replblk-ctl init`"), "{text}");

        // Too short to hold a superblock at all.
        file.set_len(100).unwrap();
        assert_eq!(mismatch_field(open(&path)), "file length");
    }

    #[test]
    fn create_refuses_impossible_geometry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        for (block, size) in [(1000, 1 << 20), (8192, 1 << 20), (4096, 0), (4096, 6144)] {
            let bad = DataSuperblock {
                block_size_bytes: block,
                volume_size_bytes: size,
                ..sb()
            };
            let err = DataFile::create(&path, &bad).unwrap_err();
            assert!(matches!(err, StoreError::Invalid { .. }), "{err}");
        }
        assert!(!path.exists());
    }

    #[test]
    fn create_keeps_existing_volume_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        std::fs::write(&path, vec![0x42; 8192]).unwrap();
        let copy = DataFile::create(&path, &sb()).unwrap();
        let mut back = [0u8; 8192];
        copy.buffered_file()
            .unwrap()
            .read_exact_at(&mut back, 0)
            .unwrap();
        assert_eq!(back, [0x42; 8192]);
    }
}
