//! Fixed newstyle option negotiation as a state machine over byte buffers.
//!
//! The I/O shell writes [`Handshake::greeting`], then repeatedly appends what it
//! reads to an input buffer and calls [`Handshake::receive`], which consumes whole
//! messages, appends replies to an output buffer, and says whether to keep going,
//! close (the client aborted), or enter transmission with a [`Negotiated`] export.
//! The only outside call is to the [`ExportCatalog`], which is synchronous.

use std::fmt;
use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};

use super::proto::{
    client_flags, clip_to_string_limit, handshake_flags, info, opt, rep, transmission_flags, MetaContextId,
    BASE_ALLOCATION, BASE_ALLOCATION_CONTEXT_ID, BASE_NAMESPACE, EXPORT_NAME_ZERO_PAD_BYTES, IHAVEOPT,
    MAX_BLOCK_SIZE_BYTES, MAX_OPTION_DATA_BYTES, MAX_STRING_BYTES, MIN_BLOCK_SIZE_BYTES, NBD_MAGIC,
    OPTION_HEADER_BYTES, OPTION_REPLY_MAGIC, PREFERRED_BLOCK_SIZE_BYTES,
};
use super::request::TransmissionPolicy;
use super::{ExportCatalog, OpenError, OpenExport};

/// Handshake flags we send: fixed newstyle, and we can omit the 124 zero bytes.
pub const SERVER_HANDSHAKE_FLAGS: u16 = handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES;

/// Bytes of the server greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags).
pub const GREETING_BYTES: usize = 18;

/// Why negotiation ended without entering transmission; each closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The client set flags we do not know or did not offer.
    #[error("client flags {0:#x} contain unknown bits")]
    UnknownClientFlags(u32),
    /// The client does not speak fixed newstyle, the only negotiation we serve.
    #[error("client did not set NBD_FLAG_C_FIXED_NEWSTYLE")]
    NotFixedNewstyle,
    /// An option did not start with `IHAVEOPT`.
    #[error("option magic {0:#018x} is not IHAVEOPT")]
    BadOptionMagic(u64),
    /// An option carried more data than we accept.
    #[error("option {option} carries {len} bytes, more than {MAX_OPTION_DATA_BYTES}")]
    OptionTooLong { option: u32, len: u32 },
    /// `NBD_OPT_EXPORT_NAME` named an export we cannot serve; that option cannot fail politely.
    #[error("NBD_OPT_EXPORT_NAME for {name:?} refused: {reason}")]
    ExportNameRefused { name: String, reason: String },
    /// [`Handshake::receive`] was called after negotiation had finished.
    #[error("negotiation already finished")]
    Finished,
}

/// The outcome of negotiation: the export to serve and how.
pub struct Negotiated {
    /// The export name the client asked for.
    pub export_name: String,
    /// The opened export; its guard lives as long as the connection.
    pub export: OpenExport,
    /// Export size sent to the client.
    pub size_bytes: u64,
    /// Transmission flags sent to the client.
    pub transmission_flags: u16,
    /// What requests are valid.
    pub policy: TransmissionPolicy,
}

impl fmt::Debug for Negotiated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Negotiated")
            .field("export_name", &self.export_name)
            .field("size_bytes", &self.size_bytes)
            .field("transmission_flags", &format_args!("{:#06x}", self.transmission_flags))
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// What the I/O shell should do after [`Handshake::receive`]. In every case it first
/// writes out whatever was appended to the output buffer.
#[derive(Debug)]
pub enum Progress {
    /// Read more bytes and call again.
    NeedMore,
    /// The client sent `NBD_OPT_ABORT`; close after writing the reply.
    Aborted,
    /// Enter transmission; bytes left in the input buffer are requests.
    Done(Box<Negotiated>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ClientFlags,
    Options,
    Finished,
}

/// Metadata contexts selected by the last `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MetaSelection {
    export_name: String,
    base_allocation: bool,
}

/// The server side of fixed newstyle negotiation for one connection.
pub struct Handshake {
    catalog: Arc<dyn ExportCatalog>,
    phase: Phase,
    no_zeroes: bool,
    structured_replies: bool,
    meta: Option<MetaSelection>,
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshake")
            .field("phase", &self.phase)
            .field("no_zeroes", &self.no_zeroes)
            .field("structured_replies", &self.structured_replies)
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

/// The transmission flags for an export.
pub fn transmission_flags_for(read_only: bool, multi_conn: bool, structured: bool) -> u16 {
    use transmission_flags::*;
    let mut flags =
        HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | SEND_FAST_ZERO | SEND_CACHE;
    if read_only {
        flags |= READ_ONLY;
    }
    if multi_conn {
        flags |= CAN_MULTI_CONN;
    }
    if structured {
        // Reads are always answered with a single content chunk.
        flags |= SEND_DF;
    }
    flags
}

/// Appends one option reply.
fn put_reply(out: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    out.reserve(20 + data.len());
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    // Every reply we build is far below 4 GiB (strings are clipped to 4096 bytes).
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// Appends an error reply with a human-readable message.
fn put_error(out: &mut BytesMut, option: u32, reply_type: u32, message: &str) {
    put_reply(out, option, reply_type, clip_to_string_limit(message).as_bytes());
}

/// A cursor over option data that fails instead of panicking.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A length-prefixed (32-bit) string.
    fn string(&mut self) -> Option<&'a str> {
        let len = self.u32()? as usize;
        parse_string(self.take(len)?)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A protocol string: UTF-8, no NUL, at most 4096 bytes.
fn parse_string(b: &[u8]) -> Option<&str> {
    if b.len() > MAX_STRING_BYTES || b.contains(&0) {
        return None;
    }
    std::str::from_utf8(b).ok()
}

/// Parsed `NBD_OPT_INFO` / `NBD_OPT_GO` data.
struct InfoRequest<'a> {
    name: &'a str,
    requests: Vec<u16>,
}

fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u16()?;
    let mut requests = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let r = c.u16()?;
        if !requests.contains(&r) {
            requests.push(r);
        }
    }
    c.is_empty().then_some(InfoRequest { name, requests })
}

/// Parsed `NBD_OPT_{LIST,SET}_META_CONTEXT` data.
struct MetaRequest<'a> {
    export_name: &'a str,
    queries: Vec<&'a str>,
}

fn parse_meta_request(data: &[u8]) -> Option<MetaRequest<'_>> {
    let mut c = Cursor(data);
    let export_name = c.string()?;
    let n = c.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        // Each query takes at least 4 bytes, so a huge count fails quickly.
        let q = c.string()?;
        // A query must start with a namespace and a colon.
        if !q.contains(':') {
            return None;
        }
        queries.push(q);
    }
    c.is_empty().then_some(MetaRequest { export_name, queries })
}

impl Handshake {
    /// A handshake that resolves export names through `catalog`.
    pub fn new(catalog: Arc<dyn ExportCatalog>) -> Self {
        Handshake {
            catalog,
            phase: Phase::ClientFlags,
            no_zeroes: false,
            structured_replies: false,
            meta: None,
        }
    }

    /// The first bytes the server sends.
    pub fn greeting() -> [u8; GREETING_BYTES] {
        let mut g = [0u8; GREETING_BYTES];
        g[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[16..].copy_from_slice(&SERVER_HANDSHAKE_FLAGS.to_be_bytes());
        g
    }

    /// Whether structured replies have been negotiated so far.
    pub fn structured_replies(&self) -> bool {
        self.structured_replies
    }

    /// Consumes every complete message at the front of `input`, appending replies to
    /// `out`. On an error the connection must be closed (after writing `out`).
    pub fn receive(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> Result<Progress, HandshakeError> {
        loop {
            match self.phase {
                Phase::Finished => return Err(HandshakeError::Finished),
                Phase::ClientFlags => {
                    if input.len() < 4 {
                        return Ok(Progress::NeedMore);
                    }
                    let flags = input.get_u32();
                    if flags & !client_flags::KNOWN != 0 {
                        self.phase = Phase::Finished;
                        return Err(HandshakeError::UnknownClientFlags(flags));
                    }
                    if flags & client_flags::FIXED_NEWSTYLE == 0 {
                        self.phase = Phase::Finished;
                        return Err(HandshakeError::NotFixedNewstyle);
                    }
                    self.no_zeroes = flags & client_flags::NO_ZEROES != 0;
                    self.phase = Phase::Options;
                }
                Phase::Options => {
                    if input.len() < OPTION_HEADER_BYTES {
                        return Ok(Progress::NeedMore);
                    }
                    let mut h = &input[..OPTION_HEADER_BYTES];
                    let magic = h.get_u64();
                    let option = h.get_u32();
                    let len = h.get_u32();
                    if magic != IHAVEOPT {
                        self.phase = Phase::Finished;
                        return Err(HandshakeError::BadOptionMagic(magic));
                    }
                    if len > MAX_OPTION_DATA_BYTES {
                        self.phase = Phase::Finished;
                        return Err(HandshakeError::OptionTooLong { option, len });
                    }
                    let total = OPTION_HEADER_BYTES + len as usize;
                    if input.len() < total {
                        input.reserve(total - input.len());
                        return Ok(Progress::NeedMore);
                    }
                    input.advance(OPTION_HEADER_BYTES);
                    let data = input.split_to(len as usize);
                    match self.handle_option(option, &data, out) {
                        Ok(Progress::NeedMore) => {}
                        Ok(done) => {
                            self.phase = Phase::Finished;
                            return Ok(done);
                        }
                        Err(e) => {
                            self.phase = Phase::Finished;
                            return Err(e);
                        }
                    }
                }
            }
        }
    }

    fn handle_option(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut BytesMut,
    ) -> Result<Progress, HandshakeError> {
        match option {
            opt::EXPORT_NAME => self.export_name(data, out),
            opt::ABORT => {
                // The spec says to ignore any data sent with ABORT.
                put_reply(out, option, rep::ACK, &[]);
                Ok(Progress::Aborted)
            }
            opt::LIST => {
                if !data.is_empty() {
                    put_error(out, option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Ok(Progress::NeedMore);
                }
                for e in self.catalog.list() {
                    let name = clip_to_string_limit(&e.name).as_bytes();
                    let desc = clip_to_string_limit(&e.description).as_bytes();
                    let mut d = Vec::with_capacity(4 + name.len() + desc.len());
                    d.put_u32(name.len() as u32);
                    d.put_slice(name);
                    d.put_slice(desc);
                    put_reply(out, option, rep::SERVER, &d);
                }
                put_reply(out, option, rep::ACK, &[]);
                Ok(Progress::NeedMore)
            }
            opt::STARTTLS => {
                if data.is_empty() {
                    put_error(out, option, rep::ERR_UNSUP, "TLS is not supported");
                } else {
                    put_error(out, option, rep::ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
                }
                Ok(Progress::NeedMore)
            }
            opt::INFO | opt::GO => self.info_or_go(option, data, out),
            opt::STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured_replies = true;
                    put_reply(out, option, rep::ACK, &[]);
                } else {
                    put_error(out, option, rep::ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                }
                Ok(Progress::NeedMore)
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(option, data, out);
                Ok(Progress::NeedMore)
            }
            _ => {
                put_error(out, option, rep::ERR_UNSUP, "option not supported");
                Ok(Progress::NeedMore)
            }
        }
    }

    fn export_name(&mut self, data: &[u8], out: &mut BytesMut) -> Result<Progress, HandshakeError> {
        let Some(name) = parse_string(data) else {
            return Err(HandshakeError::ExportNameRefused {
                name: String::from_utf8_lossy(data).into_owned(),
                reason: "export name is not a valid string".into(),
            });
        };
        let export = self.catalog.open(name).map_err(|e| HandshakeError::ExportNameRefused {
            name: name.to_owned(),
            reason: e.to_string(),
        })?;
        let negotiated = self.negotiated(name, export);
        out.put_u64(negotiated.size_bytes);
        out.put_u16(negotiated.transmission_flags);
        if !self.no_zeroes {
            out.put_bytes(0, EXPORT_NAME_ZERO_PAD_BYTES);
        }
        Ok(Progress::Done(Box::new(negotiated)))
    }

    fn negotiated(&self, name: &str, export: OpenExport) -> Negotiated {
        let size_bytes = export.backend.size_bytes();
        let transmission_flags =
            transmission_flags_for(export.read_only, export.multi_conn, self.structured_replies);
        let base_allocation = match &self.meta {
            Some(m) if m.base_allocation && m.export_name == name && self.structured_replies => {
                Some(BASE_ALLOCATION_CONTEXT_ID)
            }
            _ => None,
        };
        let policy = TransmissionPolicy {
            read_only: export.read_only,
            structured_replies: self.structured_replies,
            base_allocation,
        };
        Negotiated { export_name: name.to_owned(), export, size_bytes, transmission_flags, policy }
    }

    fn open_for_option(&self, option: u32, name: &str, out: &mut BytesMut) -> Option<OpenExport> {
        match self.catalog.open(name) {
            Ok(e) => Some(e),
            Err(e @ OpenError::NotFound(_)) => {
                put_error(out, option, rep::ERR_UNKNOWN, &e.to_string());
                None
            }
            Err(e @ OpenError::Refused(_)) => {
                put_error(out, option, rep::ERR_POLICY, &e.to_string());
                None
            }
        }
    }

    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut BytesMut,
    ) -> Result<Progress, HandshakeError> {
        let Some(req) = parse_info_request(data) else {
            put_error(out, option, rep::ERR_INVALID, "malformed NBD_OPT_INFO/NBD_OPT_GO data");
            return Ok(Progress::NeedMore);
        };
        let Some(export) = self.open_for_option(option, req.name, out) else {
            return Ok(Progress::NeedMore);
        };
        let negotiated = self.negotiated(req.name, export);

        let mut d = Vec::with_capacity(12);
        d.put_u16(info::EXPORT);
        d.put_u64(negotiated.size_bytes);
        d.put_u16(negotiated.transmission_flags);
        put_reply(out, option, rep::INFO, &d);
        for r in &req.requests {
            let mut d = Vec::new();
            match *r {
                info::NAME => {
                    d.put_u16(info::NAME);
                    d.put_slice(req.name.as_bytes());
                }
                info::DESCRIPTION => {
                    d.put_u16(info::DESCRIPTION);
                    d.put_slice(clip_to_string_limit(&negotiated.export.description).as_bytes());
                }
                info::BLOCK_SIZE => {
                    d.put_u16(info::BLOCK_SIZE);
                    d.put_u32(MIN_BLOCK_SIZE_BYTES);
                    d.put_u32(PREFERRED_BLOCK_SIZE_BYTES);
                    d.put_u32(MAX_BLOCK_SIZE_BYTES);
                }
                // EXPORT was sent already; unknown requests are ignored.
                _ => continue,
            }
            put_reply(out, option, rep::INFO, &d);
        }
        put_reply(out, option, rep::ACK, &[]);
        if option == opt::GO {
            Ok(Progress::Done(Box::new(negotiated)))
        } else {
            // NBD_OPT_INFO: the export (and its guard) is dropped here.
            Ok(Progress::NeedMore)
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut BytesMut) {
        let set = option == opt::SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.meta = None;
        }
        if !self.structured_replies {
            put_error(out, option, rep::ERR_INVALID, "negotiate structured replies first");
            return;
        }
        let Some(req) = parse_meta_request(data) else {
            put_error(out, option, rep::ERR_INVALID, "malformed meta context request");
            return;
        };
        if self.open_for_option(option, req.export_name, out).is_none() {
            return;
        }
        let selected = if set {
            req.queries.contains(&BASE_ALLOCATION)
        } else {
            req.queries.is_empty()
                || req.queries.iter().any(|q| *q == BASE_ALLOCATION || *q == BASE_NAMESPACE)
        };
        if selected {
            let id = if set { BASE_ALLOCATION_CONTEXT_ID } else { MetaContextId(0) };
            let mut d = Vec::with_capacity(4 + BASE_ALLOCATION.len());
            d.put_u32(id.0);
            d.put_slice(BASE_ALLOCATION.as_bytes());
            put_reply(out, option, rep::META_CONTEXT, &d);
        }
        if set && selected {
            self.meta =
                Some(MetaSelection { export_name: req.export_name.to_owned(), base_allocation: true });
        }
        put_reply(out, option, rep::ACK, &[]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::nbd::{ExportInfo, OpenExport};
    use crate::store::MemBackend;
    use bytes::Bytes;

    /// A catalog with exports "disk" (1 MiB, writable, multi-conn), "ro" (read-only),
    /// "" (the default, 64 KiB) and "locked" (refused).
    pub(crate) struct TestCatalog;

    impl ExportCatalog for TestCatalog {
        fn list(&self) -> Vec<ExportInfo> {
            ["disk", "ro"]
                .iter()
                .map(|n| ExportInfo { name: (*n).into(), description: format!("{n} export") })
                .collect()
        }
        fn open(&self, name: &str) -> Result<OpenExport, OpenError> {
            let (size, read_only, multi_conn) = match name {
                "disk" => (1 << 20, false, true),
                "ro" => (1 << 20, true, false),
                "" => (64 << 10, false, false),
                "locked" => return Err(OpenError::Refused("export is locked".into())),
                other => return Err(OpenError::NotFound(other.into())),
            };
            Ok(OpenExport {
                backend: Arc::new(MemBackend::new(size)),
                read_only,
                multi_conn,
                description: format!("{name} export"),
                guard: Box::new(()),
            })
        }
    }

    fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u64(IHAVEOPT);
        v.put_u32(code);
        v.put_u32(data.len() as u32);
        v.put_slice(data);
        v
    }

    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u32(name.len() as u32);
        v.put_slice(name.as_bytes());
        v.put_u16(reqs.len() as u16);
        for r in reqs {
            v.put_u16(*r);
        }
        v
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u32(name.len() as u32);
        v.put_slice(name.as_bytes());
        v.put_u32(queries.len() as u32);
        for q in queries {
            v.put_u32(q.len() as u32);
            v.put_slice(q.as_bytes());
        }
        v
    }

    /// Decoded option replies: (option, type, data).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Bytes)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(out.get_u64(), OPTION_REPLY_MAGIC);
            let option = out.get_u32();
            let kind = out.get_u32();
            let len = out.get_u32() as usize;
            v.push((option, kind, Bytes::copy_from_slice(&out[..len])));
            out.advance(len);
        }
        v
    }

    fn started(flags: u32) -> (Handshake, BytesMut, BytesMut) {
        let mut hs = Handshake::new(Arc::new(TestCatalog));
        let mut input = BytesMut::from(&flags.to_be_bytes()[..]);
        let mut out = BytesMut::new();
        assert!(matches!(hs.receive(&mut input, &mut out), Ok(Progress::NeedMore)));
        assert!(out.is_empty());
        (hs, input, out)
    }

    type Sent = (Result<Progress, HandshakeError>, Vec<(u32, u32, Bytes)>);

    fn send(hs: &mut Handshake, bytes: &[u8]) -> Sent {
        let mut input = BytesMut::from(bytes);
        let mut out = BytesMut::new();
        let r = hs.receive(&mut input, &mut out);
        (r, replies(&out))
    }

    const FIXED: u32 = client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES;

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_flags() {
        let g = Handshake::greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn client_flags_are_checked() {
        let mut hs = Handshake::new(Arc::new(TestCatalog));
        let (r, _) = send(&mut hs, &[0, 0, 0, 4 | 1]);
        assert_eq!(r.err(), Some(HandshakeError::UnknownClientFlags(5)));
        let mut hs = Handshake::new(Arc::new(TestCatalog));
        let (r, _) = send(&mut hs, &[0, 0, 0, 2]);
        assert_eq!(r.err(), Some(HandshakeError::NotFixedNewstyle));
        assert_eq!(send(&mut hs, &[0, 0, 0, 1]).0.err(), Some(HandshakeError::Finished));
    }

    #[test]
    fn partial_input_is_not_consumed() {
        let (mut hs, _, _) = started(FIXED);
        let msg = option(opt::GO, &info_data("disk", &[]));
        for cut in 0..msg.len() {
            let mut input = BytesMut::from(&msg[..cut]);
            let mut out = BytesMut::new();
            assert!(matches!(hs.receive(&mut input, &mut out), Ok(Progress::NeedMore)));
            assert_eq!(input.len(), cut);
            assert!(out.is_empty());
        }
        let (r, _) = send(&mut hs, &msg);
        assert!(matches!(r, Ok(Progress::Done(_))));
    }

    #[test]
    fn go_sends_export_info_and_honours_info_requests() {
        let (mut hs, _, _) = started(FIXED);
        let reqs = [info::NAME, info::DESCRIPTION, info::BLOCK_SIZE, 0x7777, info::NAME];
        let (r, rs) = send(&mut hs, &option(opt::GO, &info_data("disk", &reqs)));
        let Ok(Progress::Done(n)) = r else { panic!("expected Done, got {r:?}") };
        assert_eq!(n.size_bytes, 1 << 20);
        assert_eq!(n.export_name, "disk");
        let flags = n.transmission_flags;
        use transmission_flags::*;
        assert_eq!(
            flags & (HAS_FLAGS | SEND_FLUSH | SEND_FUA | CAN_MULTI_CONN),
            HAS_FLAGS | SEND_FLUSH | SEND_FUA | CAN_MULTI_CONN
        );
        assert_eq!(flags & (READ_ONLY | SEND_DF), 0);
        assert!(!n.policy.structured_replies);

        assert_eq!(rs.len(), 5, "EXPORT, NAME, DESCRIPTION, BLOCK_SIZE, ACK: {rs:?}");
        assert!(rs.iter().all(|(o, _, _)| *o == opt::GO));
        let mut export = rs[0].2.clone();
        assert_eq!((rs[0].1, export.len()), (rep::INFO, 12));
        assert_eq!(export.get_u16(), info::EXPORT);
        assert_eq!(export.get_u64(), 1 << 20);
        assert_eq!(export.get_u16(), flags);
        assert_eq!(&rs[1].2[..], b"\x00\x01disk");
        assert_eq!(&rs[2].2[..], b"\x00\x02disk export");
        let mut bs = rs[3].2.clone();
        assert_eq!(bs.get_u16(), info::BLOCK_SIZE);
        assert_eq!((bs.get_u32(), bs.get_u32(), bs.get_u32()), (512, 4096, 32 << 20));
        assert_eq!((rs[4].1, rs[4].2.len()), (rep::ACK, 0));
    }

    #[test]
    fn info_does_not_end_negotiation_and_errors_are_reported() {
        let (mut hs, _, _) = started(FIXED);
        let (r, rs) = send(&mut hs, &option(opt::INFO, &info_data("ro", &[])));
        assert!(matches!(r, Ok(Progress::NeedMore)));
        assert_eq!(rs.len(), 2);
        let mut export = rs[0].2.clone();
        export.advance(10);
        assert_ne!(export.get_u16() & transmission_flags::READ_ONLY, 0);

        let (_, rs) = send(&mut hs, &option(opt::GO, &info_data("nope", &[])));
        assert_eq!(rs.len(), 1);
        assert_eq!(rs[0].1, rep::ERR_UNKNOWN);
        assert!(String::from_utf8_lossy(&rs[0].2).contains("nope"));
        let (_, rs) = send(&mut hs, &option(opt::GO, &info_data("locked", &[])));
        assert_eq!(rs[0].1, rep::ERR_POLICY);

        // Bad lengths: name longer than the data, trailing bytes, odd request list.
        let mut bad = info_data("disk", &[]);
        bad[3] = 200;
        assert_eq!(send(&mut hs, &option(opt::GO, &bad)).1[0].1, rep::ERR_INVALID);
        let mut trailing = info_data("disk", &[]);
        trailing.push(0);
        assert_eq!(send(&mut hs, &option(opt::GO, &trailing)).1[0].1, rep::ERR_INVALID);
        assert_eq!(send(&mut hs, &option(opt::INFO, &[0, 0])).1[0].1, rep::ERR_INVALID);
        let bad_utf8 = info_data("\u{0}x", &[]);
        assert_eq!(send(&mut hs, &option(opt::INFO, &bad_utf8)).1[0].1, rep::ERR_INVALID);

        // Still negotiating: the default export works.
        let (r, _) = send(&mut hs, &option(opt::GO, &info_data("", &[])));
        let Ok(Progress::Done(n)) = r else { panic!("expected Done") };
        assert_eq!(n.size_bytes, 64 << 10);
    }

    #[test]
    fn export_name_replies_with_or_without_zeroes() {
        let (mut hs, _, _) = started(client_flags::FIXED_NEWSTYLE);
        let mut input = BytesMut::from(&option(opt::EXPORT_NAME, b"disk")[..]);
        let mut out = BytesMut::new();
        let r = hs.receive(&mut input, &mut out);
        assert!(matches!(r, Ok(Progress::Done(_))));
        assert_eq!(out.len(), 8 + 2 + 124);
        assert_eq!(&out[..8], &(1u64 << 20).to_be_bytes());
        assert!(out[10..].iter().all(|b| *b == 0));

        let (mut hs, _, _) = started(FIXED);
        let mut input = BytesMut::from(&option(opt::EXPORT_NAME, b"disk")[..]);
        input.extend_from_slice(b"leftover request bytes");
        let mut out = BytesMut::new();
        assert!(matches!(hs.receive(&mut input, &mut out), Ok(Progress::Done(_))));
        assert_eq!(out.len(), 10);
        assert_eq!(&input[..], b"leftover request bytes", "transmission bytes are left alone");

        let (mut hs, _, _) = started(FIXED);
        let (r, _) = send(&mut hs, &option(opt::EXPORT_NAME, b"nope"));
        assert!(matches!(r, Err(HandshakeError::ExportNameRefused { .. })));
    }

    #[test]
    fn list_abort_starttls_and_unknown_options() {
        let (mut hs, _, _) = started(FIXED);
        let (_, rs) = send(&mut hs, &option(opt::LIST, &[]));
        assert_eq!(rs.len(), 3);
        let mut first = rs[0].2.clone();
        assert_eq!(rs[0].1, rep::SERVER);
        assert_eq!(first.get_u32(), 4);
        assert_eq!(&first[..], b"diskdisk export");
        assert_eq!(rs[2].1, rep::ACK);
        assert_eq!(send(&mut hs, &option(opt::LIST, b"x")).1[0].1, rep::ERR_INVALID);
        assert_eq!(send(&mut hs, &option(opt::STARTTLS, &[])).1[0].1, rep::ERR_UNSUP);
        assert_eq!(send(&mut hs, &option(4, &[1, 2, 3])).1[0].1, rep::ERR_UNSUP);
        assert_eq!(send(&mut hs, &option(0xdead, &[])).1[0].1, rep::ERR_UNSUP);
        assert_eq!(send(&mut hs, &option(opt::STRUCTURED_REPLY, b"x")).1[0].1, rep::ERR_INVALID);
        let (r, rs) = send(&mut hs, &option(opt::ABORT, &[]));
        assert!(matches!(r, Ok(Progress::Aborted)));
        assert_eq!(rs, vec![(opt::ABORT, rep::ACK, Bytes::new())]);
    }

    #[test]
    fn framing_violations_close() {
        let (mut hs, _, _) = started(FIXED);
        let mut bad = option(opt::LIST, &[]);
        bad[0] = b'X';
        assert!(matches!(send(&mut hs, &bad).0, Err(HandshakeError::BadOptionMagic(_))));

        let (mut hs, _, _) = started(FIXED);
        let mut long = Vec::new();
        long.put_u64(IHAVEOPT);
        long.put_u32(opt::GO);
        long.put_u32(MAX_OPTION_DATA_BYTES + 1);
        assert_eq!(
            send(&mut hs, &long).0.err(),
            Some(HandshakeError::OptionTooLong { option: opt::GO, len: MAX_OPTION_DATA_BYTES + 1 })
        );
    }

    #[test]
    fn meta_contexts_need_structured_replies_and_select_base_allocation() {
        let (mut hs, _, _) = started(FIXED);
        let set = option(opt::SET_META_CONTEXT, &meta_data("disk", &[BASE_ALLOCATION]));
        assert_eq!(send(&mut hs, &set).1[0].1, rep::ERR_INVALID);
        assert_eq!(send(&mut hs, &option(opt::STRUCTURED_REPLY, &[])).1[0].1, rep::ACK);
        assert!(hs.structured_replies());

        // LIST with no query, with "base:", and with an unknown namespace.
        for (queries, expect) in [(&[][..], true), (&["base:"][..], true), (&["x-foo:bar"][..], false)] {
            let (_, rs) = send(&mut hs, &option(opt::LIST_META_CONTEXT, &meta_data("disk", queries)));
            if expect {
                assert_eq!(rs.len(), 2, "{queries:?}");
                assert_eq!(rs[0].1, rep::META_CONTEXT);
                assert_eq!(&rs[0].2[..], b"\x00\x00\x00\x00base:allocation");
            } else {
                assert_eq!(rs.len(), 1);
            }
            assert_eq!(rs.last().map(|r| r.1), Some(rep::ACK));
        }
        let unknown = option(opt::LIST_META_CONTEXT, &meta_data("nope", &[]));
        assert_eq!(send(&mut hs, &unknown).1[0].1, rep::ERR_UNKNOWN);
        let no_colon = option(opt::LIST_META_CONTEXT, &meta_data("disk", &["base"]));
        assert_eq!(send(&mut hs, &no_colon).1[0].1, rep::ERR_INVALID);
        let mut overrun = meta_data("disk", &["base:allocation"]);
        overrun.truncate(overrun.len() - 1);
        assert_eq!(send(&mut hs, &option(opt::SET_META_CONTEXT, &overrun)).1[0].1, rep::ERR_INVALID);

        // SET with "base:" alone selects nothing.
        let (_, rs) = send(&mut hs, &option(opt::SET_META_CONTEXT, &meta_data("disk", &["base:"])));
        assert_eq!(rs.len(), 1);
        let (_, rs) = send(&mut hs, &set);
        assert_eq!(rs.len(), 2);
        assert_eq!(&rs[0].2[..], b"\x00\x00\x00\x01base:allocation");
        let (r, _) = send(&mut hs, &option(opt::GO, &info_data("disk", &[])));
        let Ok(Progress::Done(n)) = r else { panic!("expected Done") };
        assert_eq!(n.policy.base_allocation, Some(BASE_ALLOCATION_CONTEXT_ID));
        assert!(n.policy.structured_replies);
        assert_ne!(n.transmission_flags & transmission_flags::SEND_DF, 0);
    }

    #[test]
    fn meta_context_for_another_export_is_not_active() {
        let (mut hs, _, _) = started(FIXED);
        assert_eq!(send(&mut hs, &option(opt::STRUCTURED_REPLY, &[])).1[0].1, rep::ACK);
        let set = option(opt::SET_META_CONTEXT, &meta_data("ro", &[BASE_ALLOCATION]));
        assert_eq!(send(&mut hs, &set).1.len(), 2);
        let (r, _) = send(&mut hs, &option(opt::GO, &info_data("disk", &[])));
        let Ok(Progress::Done(n)) = r else { panic!("expected Done") };
        assert_eq!(n.policy.base_allocation, None);
    }
}
