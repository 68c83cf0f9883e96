//! Entry point for the cargo-fuzz target in `daemon/fuzz`: the bytes a peer's control
//! message arrives as, through both decoders. None may panic, and whatever decodes must
//! survive an encode/decode round trip unchanged.

use super::protocol::{Answer, Request};

/// `data` as a control request and as a control answer.
pub fn control_message(data: &[u8]) {
    if let Ok(r) = Request::decode(data) {
        assert_eq!(Request::decode(&r.encode()).as_ref(), Ok(&r), "a request changed in a round trip");
    }
    if let Ok(a) = Answer::decode(data) {
        assert_eq!(Answer::decode(&a.encode()).as_ref(), Ok(&a), "an answer changed in a round trip");
    }
}
