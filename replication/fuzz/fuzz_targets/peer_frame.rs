//! Arbitrary bytes as a peer's transport frame (CRC made valid), then each payload through its decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    raftblk_replication::fuzzing::peer_frame(data);
});
