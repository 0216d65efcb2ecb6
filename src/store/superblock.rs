//! The superblock at the end of every data copy.
//!
//! It sits at offset volume_size_bytes, after the volume's bytes, so that
//! volume offsets are file offsets and a copy can be mounted or fsck'd
//! directly (as with DRBD's internal metadata).

use crate::buf::PAGE_SIZE_BYTES;

use super::error::StoreError;

const U32_SIZE_BYTES: usize = std::mem::size_of::<u32>();
const U64_SIZE_BYTES: usize = std::mem::size_of::<u64>();
const UUID_SIZE_BYTES: usize = 16;

/// First bytes of a superblock.
pub const DATA_MAGIC: [u8; 8] = *b"RBLKDATA";
/// The only superblock version this code reads and writes.
pub const DATA_FORMAT_VERSION: u32 = 1;
/// Space the superblock occupies after the volume's bytes.
pub const DATA_SUPERBLOCK_SIZE_BYTES: u64 = PAGE_SIZE_BYTES as u64;
/// Smallest logical block size of a volume: the classic sector.
pub const DATA_BLOCK_SIZE_MIN_BYTES: u32 = 512;
/// Largest logical block size: one page, the O_DIRECT buffer alignment.
pub const DATA_BLOCK_SIZE_MAX_BYTES: u32 = PAGE_SIZE_BYTES as u32;

const SB_MAGIC_OFFSET: usize = 0;
const SB_VERSION_OFFSET: usize = SB_MAGIC_OFFSET + DATA_MAGIC.len();
const SB_RESERVED_OFFSET: usize = SB_VERSION_OFFSET + U32_SIZE_BYTES;
const SB_UUID_OFFSET: usize = SB_RESERVED_OFFSET + U32_SIZE_BYTES;
const SB_NODE_ID_OFFSET: usize = SB_UUID_OFFSET + UUID_SIZE_BYTES;
const SB_BLOCK_SIZE_OFFSET: usize = SB_NODE_ID_OFFSET + U32_SIZE_BYTES;
const SB_VOLUME_SIZE_OFFSET: usize = SB_BLOCK_SIZE_OFFSET + U32_SIZE_BYTES;
const SB_EPOCH_OFFSET: usize = SB_VOLUME_SIZE_OFFSET + U64_SIZE_BYTES;
const SB_CRC_OFFSET: usize = SB_EPOCH_OFFSET + U64_SIZE_BYTES;
/// Bytes of the superblock page that carry meaning; the rest stays zero.
pub const DATA_SUPERBLOCK_USED_BYTES: usize = SB_CRC_OFFSET + U32_SIZE_BYTES;
const _: () = assert!(SB_CRC_OFFSET == 56 && DATA_SUPERBLOCK_USED_BYTES == 60);

fn get_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + U32_SIZE_BYTES].try_into().unwrap())
}

fn get_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + U64_SIZE_BYTES].try_into().unwrap())
}

fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + U32_SIZE_BYTES].copy_from_slice(&value.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + U64_SIZE_BYTES].copy_from_slice(&value.to_le_bytes());
}

/// True if `page` starts with the superblock magic: tells "never
/// initialised" apart from "damaged".
pub fn data_magic_present(page: &[u8]) -> bool {
    page.len() >= DATA_MAGIC.len() && page[..DATA_MAGIC.len()] == DATA_MAGIC
}

/// Why a block size / volume size pair cannot describe a volume, if it
/// cannot: (field, value, requirement).
pub fn geometry_problem(
    block_size_bytes: u32,
    volume_size_bytes: u64,
) -> Option<(&'static str, u64, String)> {
    if !block_size_bytes.is_power_of_two()
        || !(DATA_BLOCK_SIZE_MIN_BYTES..=DATA_BLOCK_SIZE_MAX_BYTES).contains(&block_size_bytes)
    {
        return Some((
            "block_size_bytes",
            u64::from(block_size_bytes),
            format!(
                "a power of two from {DATA_BLOCK_SIZE_MIN_BYTES} to {DATA_BLOCK_SIZE_MAX_BYTES}"
            ),
        ));
    }
    if volume_size_bytes == 0 || !volume_size_bytes.is_multiple_of(u64::from(block_size_bytes)) {
        return Some((
            "volume_size_bytes",
            volume_size_bytes,
            format!("a non-zero multiple of block_size_bytes {block_size_bytes}"),
        ));
    }
    None
}

/// Identity, geometry and epoch of one node's copy of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataSuperblock {
    /// The replicated volume.
    pub volume_uuid: [u8; 16],
    /// The node holding this copy.
    pub node_id: u32,
    /// Logical block size of the volume.
    pub block_size_bytes: u32,
    /// Bytes of volume before the superblock.
    pub volume_size_bytes: u64,
    /// Last epoch this copy took part in.
    pub epoch: u64,
}

impl DataSuperblock {
    /// Writes the superblock's [`DATA_SUPERBLOCK_USED_BYTES`] into `page`,
    /// checksum included; the rest of `page` is left as it is.
    pub fn encode(&self, page: &mut [u8]) {
        assert!(page.len() >= DATA_SUPERBLOCK_USED_BYTES);
        // A superblock our own decode refuses must never reach the disk.
        assert!(geometry_problem(self.block_size_bytes, self.volume_size_bytes).is_none());
        let page = &mut page[..DATA_SUPERBLOCK_USED_BYTES];
        page.fill(0);
        page[SB_MAGIC_OFFSET..SB_VERSION_OFFSET].copy_from_slice(&DATA_MAGIC);
        put_u32(page, SB_VERSION_OFFSET, DATA_FORMAT_VERSION);
        page[SB_UUID_OFFSET..SB_NODE_ID_OFFSET].copy_from_slice(&self.volume_uuid);
        put_u32(page, SB_NODE_ID_OFFSET, self.node_id);
        put_u32(page, SB_BLOCK_SIZE_OFFSET, self.block_size_bytes);
        put_u64(page, SB_VOLUME_SIZE_OFFSET, self.volume_size_bytes);
        put_u64(page, SB_EPOCH_OFFSET, self.epoch);
        let crc = crc32fast::hash(&page[..SB_CRC_OFFSET]);
        put_u32(page, SB_CRC_OFFSET, crc);
    }

    /// Parses and validates a superblock page.
    pub fn decode(page: &[u8]) -> Result<DataSuperblock, StoreError> {
        if page.len() < DATA_SUPERBLOCK_USED_BYTES {
            return Err(StoreError::garbled(
                "length",
                page.len(),
                format!(">= {DATA_SUPERBLOCK_USED_BYTES} bytes"),
            ));
        }
        if !data_magic_present(page) {
            return Err(StoreError::garbled(
                "magic",
                format!("{:02x?}", &page[..DATA_MAGIC.len()]),
                "\"RBLKDATA\"",
            ));
        }
        let version = get_u32(page, SB_VERSION_OFFSET);
        if version != DATA_FORMAT_VERSION {
            return Err(StoreError::garbled("version", version, DATA_FORMAT_VERSION));
        }
        let found = get_u32(page, SB_CRC_OFFSET);
        let computed = crc32fast::hash(&page[..SB_CRC_OFFSET]);
        if found != computed {
            return Err(StoreError::garbled(
                "crc32",
                format!("{found:#010x}"),
                format!("{computed:#010x}, the checksum of bytes 0..56"),
            ));
        }
        let reserved = get_u32(page, SB_RESERVED_OFFSET);
        if reserved != 0 {
            return Err(StoreError::garbled("reserved bytes 12..16", reserved, 0));
        }
        let sb = DataSuperblock {
            volume_uuid: page[SB_UUID_OFFSET..SB_NODE_ID_OFFSET].try_into().unwrap(),
            node_id: get_u32(page, SB_NODE_ID_OFFSET),
            block_size_bytes: get_u32(page, SB_BLOCK_SIZE_OFFSET),
            volume_size_bytes: get_u64(page, SB_VOLUME_SIZE_OFFSET),
            epoch: get_u64(page, SB_EPOCH_OFFSET),
        };
        if let Some((field, found, expected)) =
            geometry_problem(sb.block_size_bytes, sb.volume_size_bytes)
        {
            return Err(StoreError::garbled(field, found, expected));
        }
        Ok(sb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> DataSuperblock {
        DataSuperblock {
            volume_uuid: [3; 16],
            node_id: 2,
            block_size_bytes: 4096,
            volume_size_bytes: 1 << 24,
            epoch: 11,
        }
    }

    fn garbled_field(result: Result<DataSuperblock, StoreError>) -> &'static str {
        match result {
            Err(StoreError::Garbled { field, .. }) => field,
            other => panic!("expected a Garbled error, got {other:?}"),
        }
    }

    fn patched(at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut page = vec![0u8; DATA_SUPERBLOCK_SIZE_BYTES as usize];
        sb().encode(&mut page);
        page[at..at + bytes.len()].copy_from_slice(bytes);
        let crc = crc32fast::hash(&page[..SB_CRC_OFFSET]);
        put_u32(&mut page, SB_CRC_OFFSET, crc);
        page
    }

    #[test]
    fn round_trip() {
        let mut page = vec![0u8; DATA_SUPERBLOCK_SIZE_BYTES as usize];
        sb().encode(&mut page);
        assert_eq!(&page[..8], b"RBLKDATA");
        assert_eq!(get_u64(&page, 40), 1 << 24);
        assert_eq!(DataSuperblock::decode(&page).unwrap(), sb());
    }

    #[test]
    fn corruptions_refused() {
        let mut page = vec![0u8; DATA_SUPERBLOCK_SIZE_BYTES as usize];
        sb().encode(&mut page);
        for byte in 0..DATA_SUPERBLOCK_USED_BYTES {
            let mut bad = page.clone();
            bad[byte] ^= 0x04;
            assert!(DataSuperblock::decode(&bad).is_err(), "byte {byte}");
        }
        let mut bad = page.clone();
        bad[SB_EPOCH_OFFSET] ^= 1;
        assert_eq!(garbled_field(DataSuperblock::decode(&bad)), "crc32");
        assert_eq!(garbled_field(DataSuperblock::decode(&[0; 4096])), "magic");
        assert_eq!(
            garbled_field(DataSuperblock::decode(&patched(SB_VERSION_OFFSET, &[9]))),
            "version"
        );
        assert_eq!(
            garbled_field(DataSuperblock::decode(&patched(SB_RESERVED_OFFSET, &[1]))),
            "reserved bytes 12..16"
        );
        assert_eq!(
            garbled_field(DataSuperblock::decode(&patched(
                SB_BLOCK_SIZE_OFFSET,
                &1000u32.to_le_bytes()
            ))),
            "block_size_bytes"
        );
        assert_eq!(
            garbled_field(DataSuperblock::decode(&patched(
                SB_VOLUME_SIZE_OFFSET,
                &4097u64.to_le_bytes()
            ))),
            "volume_size_bytes"
        );
    }
}
