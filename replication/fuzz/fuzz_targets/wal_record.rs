//! Arbitrary bytes as a WAL record (length and CRC made valid), with a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    raftblk_replication::fuzzing::wal_record(data);
});
