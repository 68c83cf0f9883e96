//! Entry points for the cargo-fuzz target `sealed_metadata` (`blockdev/fuzz`): every
//! decoder of sealed-block metadata that reads bytes from a peer or the disk (block states
//! and runs of blocks as they travel, metadata records as they lie in a volume's metadata
//! file, and the file's header). None may panic; whatever decodes must survive a round trip.

use bytes::Bytes;

use super::wire::{decode_image, encode_blocks, get_state, put_state};
use crate::store::sealed::meta::{Header, HEADER_BYTES};
use crate::store::sealed::record::{self, Slot, RECORD_BYTES};

/// `data` as encoded blocks, as a run of block states, and as metadata records.
pub fn sealed_metadata(data: &[u8]) {
    if let Ok(image) = decode_image(Bytes::copy_from_slice(data)) {
        let blocks = image.clone().into_blocks();
        let again = decode_image(encode_blocks(&blocks)).expect("re-encoded blocks decode");
        assert_eq!(again.states, image.states, "block states changed in a round trip");
        assert_eq!(again.into_blocks(), blocks, "blocks changed in a round trip");
        let _ = image.check();
    }
    let mut rest = data;
    while let Ok(state) = get_state(&mut rest) {
        let mut out = Vec::new();
        put_state(&mut out, &state);
        assert_eq!(get_state(&mut out.as_slice()), Ok(state), "block state round trip");
    }
    if let Some(h) = data.get(..HEADER_BYTES).and_then(Header::decode) {
        assert_eq!(Header::decode(&h.encode()), Some(h), "metadata header round trip");
    }
    for rec in data.chunks_exact(RECORD_BYTES) {
        if let Slot::Valid(r) = record::decode(rec) {
            assert_eq!(record::decode(&r.encode()), Slot::Valid(r), "metadata record round trip");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_harness_takes_arbitrary_and_real_bytes() {
        let mut x = 7u64;
        for len in [0usize, 1, 12, 13, 64, 200, 5000] {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            sealed_metadata(&data);
        }
        let rec = record::Record { seq: 3, version: 4, content: record::Content::Zero }.encode();
        sealed_metadata(&rec);
        let header = Header {
            seq_reserved: 9,
            doubted: crate::store::sealed::meta::Doubted::all(2, 5),
            ..Header::new_volume()
        };
        sealed_metadata(&header.encode());
    }
}
