//! Arbitrary bytes as a control request and as a control answer, with round trips.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    raftblk_daemon::control::fuzzing::control_message(data);
});
