//! Arbitrary bytes into the NBD request decoder and validator, with reply
//! encode/decode round trips for whatever validates.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    raftblk_blockdev::nbd::fuzzing::request(data);
});
