//! Partitions: one entity spread over `partitions = N` streams
//! (`<stream>:0` … `<stream>:N-1`), each with its own state keys in its own
//! slot, so that on a Redis Cluster the entity's rows are applied by N
//! shards at once. A key always goes to the same partition, so per-key
//! order holds on its stream.
//!
//! The partition of a key is `crc32(pkey) mod N`: CRC-32 (IEEE 802.3, as
//! zlib's `crc32`, Java's `java.util.zip.CRC32`, Go's `hash/crc32`) of the
//! `pkey` field's UTF-8 bytes, as an unsigned 32-bit number. Consumers can
//! compute it to find a key's stream.

use crate::config::EntitySettings;
use crate::sink::EntityKeys;

/// The partition (0-based) of a key among `partitions`.
pub fn of(pkey: &str, partitions: u32) -> usize {
    if partitions <= 1 {
        return 0;
    }
    (crc32(pkey.as_bytes()) % partitions) as usize
}

/// The stream of partition `p` of an entity: the entity's stream itself
/// when it has one partition.
pub fn stream(entity: &EntitySettings, p: usize) -> String {
    if entity.partitions <= 1 {
        entity.stream.clone()
    } else {
        format!("{}:{p}", entity.stream)
    }
}

/// The keys of each partition of an entity, in partition order (one: the
/// entity's own keys).
pub fn keys(prefix: &str, entity: &EntitySettings) -> Vec<EntityKeys> {
    (0..entity.partitions.max(1) as usize)
        .map(|p| EntityKeys::new(prefix, &entity.name, &stream(entity, p)))
        .collect()
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320).
pub fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in bytes {
        crc = TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_zlibs() {
        // The standard check value, and zlib.crc32(b"42") in Python.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"42"), 841_265_288);
    }

    #[test]
    fn one_partition_takes_every_key() {
        assert_eq!(of("anything", 1), 0);
        let spread: std::collections::BTreeSet<usize> =
            (0..100).map(|k| of(&k.to_string(), 4)).collect();
        assert_eq!(spread.len(), 4);
    }
}
