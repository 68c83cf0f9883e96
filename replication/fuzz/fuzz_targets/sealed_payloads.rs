//! Arbitrary bytes (CRC made valid) as a command batch, a snapshot chunk and forwarded messages.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    raftblk_replication::fuzzing::sealed_payloads(data);
});
