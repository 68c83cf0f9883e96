//! Arbitrary client bytes into the NBD option-negotiation state machine.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    raftblk_blockdev::nbd::fuzzing::handshake(data);
});
