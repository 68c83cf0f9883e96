//! Arbitrary bytes into the decoders of sealed-block metadata: encoded blocks and block
//! states (as they travel between nodes) and metadata records (as they lie on disk).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    raftblk_blockdev::seal::fuzzing::sealed_metadata(data);
});
