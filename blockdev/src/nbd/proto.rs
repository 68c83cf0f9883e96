//! Wire constants and small newtypes of the NBD protocol (doc/proto.md of the
//! NetworkBlockDevice/nbd repository). Everything on the wire is big-endian.

use crate::backend::BackendError;

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic, and the magic that starts every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply during fixed newstyle negotiation.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Bytes of a request header (magic, flags, type, cookie, offset, length).
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Bytes of a simple reply header (magic, error, cookie).
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;
/// Bytes of a structured reply chunk header (magic, flags, type, cookie, length).
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;
/// Bytes of a client option header (magic, option, length).
pub const OPTION_HEADER_BYTES: usize = 16;
/// Bytes of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Zero bytes after an `NBD_OPT_EXPORT_NAME` reply unless the client negotiated `NO_ZEROES`.
pub const EXPORT_NAME_ZERO_PAD_BYTES: usize = 124;

/// Largest option payload we accept; a longer one closes the connection.
pub const MAX_OPTION_DATA_BYTES: u32 = 64 * 1024;
/// Longest string (export name, query) the spec allows.
pub const MAX_STRING_BYTES: usize = 4096;

/// Smallest block size we advertise (requests need not honour it; we are lenient).
pub const MIN_BLOCK_SIZE_BYTES: u32 = 512;
/// Preferred block size we advertise.
pub const PREFERRED_BLOCK_SIZE_BYTES: u32 = 4096;
/// Largest read or write we serve; a larger write payload closes the connection.
pub const MAX_BLOCK_SIZE_BYTES: u32 = 32 * 1024 * 1024;

/// Handshake flags (16 bits, server → client).
pub mod handshake_flags {
    /// `NBD_FLAG_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// `NBD_FLAG_NO_ZEROES`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits, client → server).
pub mod client_flags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag a client may set.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (16 bits, sent with the export size).
pub mod transmission_flags {
    /// `NBD_FLAG_HAS_FLAGS`: always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`: only with structured replies.
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_RESIZE` (not supported).
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_FLAG_SEND_CACHE`.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME`.
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_STARTTLS`.
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`.
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT`.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT`.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// `NBD_REP_ACK`.
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`.
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`.
    pub const INFO: u32 = 3;
    /// `NBD_REP_META_CONTEXT`.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set in every error reply type.
    pub const ERR_FLAG: u32 = 1 << 31;
    /// `NBD_REP_ERR_UNSUP`.
    pub const ERR_UNSUP: u32 = ERR_FLAG | 1;
    /// `NBD_REP_ERR_POLICY`.
    pub const ERR_POLICY: u32 = ERR_FLAG | 2;
    /// `NBD_REP_ERR_INVALID`.
    pub const ERR_INVALID: u32 = ERR_FLAG | 3;
    /// `NBD_REP_ERR_PLATFORM`.
    pub const ERR_PLATFORM: u32 = ERR_FLAG | 4;
    /// `NBD_REP_ERR_TLS_REQD`.
    pub const ERR_TLS_REQD: u32 = ERR_FLAG | 5;
    /// `NBD_REP_ERR_UNKNOWN`.
    pub const ERR_UNKNOWN: u32 = ERR_FLAG | 6;
    /// `NBD_REP_ERR_SHUTDOWN`.
    pub const ERR_SHUTDOWN: u32 = ERR_FLAG | 7;
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_FLAG | 8;
    /// `NBD_REP_ERR_TOO_BIG`.
    pub const ERR_TOO_BIG: u32 = ERR_FLAG | 9;
}

/// Information types of `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`: canonical export name.
    pub const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION`: human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block size.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    /// `NBD_CMD_READ`.
    pub const READ: u16 = 0;
    /// `NBD_CMD_WRITE`.
    pub const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`.
    pub const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`.
    pub const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`.
    pub const TRIM: u16 = 4;
    /// `NBD_CMD_CACHE`.
    pub const CACHE: u16 = 5;
    /// `NBD_CMD_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u16 = 6;
    /// `NBD_CMD_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flags {
    /// `NBD_CMD_FLAG_FUA`: valid on every command.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`: write zeroes only.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`: read only, when `SEND_DF` was advertised.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`: block status only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_FLAG_FAST_ZERO`: write zeroes only.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk flags.
pub mod reply_flags {
    /// `NBD_REPLY_FLAG_DONE`: last chunk of a reply.
    pub const DONE: u16 = 1 << 0;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
pub mod reply_type {
    /// `NBD_REPLY_TYPE_NONE`.
    pub const NONE: u16 = 0;
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    pub const OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    pub const OFFSET_HOLE: u16 = 2;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 5;
    /// `NBD_REPLY_TYPE_ERROR`.
    pub const ERROR: u16 = (1 << 15) | 1;
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// Flags of a `base:allocation` block status descriptor.
pub mod state {
    /// `NBD_STATE_HOLE`: not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// `NBD_STATE_ZERO`: reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context we support.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The namespace query that lists every `base:` context.
pub const BASE_NAMESPACE: &str = "base:";
/// The id we give `base:allocation` when a client selects it.
pub const BASE_ALLOCATION_CONTEXT_ID: MetaContextId = MetaContextId(1);

/// Cuts `s` to the spec's 4096-byte string limit on a character boundary.
pub fn clip_to_string_limit(s: &str) -> &str {
    if s.len() <= MAX_STRING_BYTES {
        return s;
    }
    let mut end = MAX_STRING_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The opaque value a client tags a request with; replies echo it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cookie(pub u64);

/// A metadata context id as sent in `NBD_REP_META_CONTEXT` and block status chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MetaContextId(pub u32);

/// An NBD error value as carried in replies (the spec's fixed set, not host errnos).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NbdErrno(pub u32);

impl NbdErrno {
    /// `NBD_EPERM`.
    pub const EPERM: NbdErrno = NbdErrno(1);
    /// `NBD_EIO`.
    pub const EIO: NbdErrno = NbdErrno(5);
    /// `NBD_ENOMEM`.
    pub const ENOMEM: NbdErrno = NbdErrno(12);
    /// `NBD_EINVAL`.
    pub const EINVAL: NbdErrno = NbdErrno(22);
    /// `NBD_ENOSPC`.
    pub const ENOSPC: NbdErrno = NbdErrno(28);
    /// `NBD_EOVERFLOW`.
    pub const EOVERFLOW: NbdErrno = NbdErrno(75);
    /// `NBD_ENOTSUP`.
    pub const ENOTSUP: NbdErrno = NbdErrno(95);
    /// `NBD_ESHUTDOWN`.
    pub const ESHUTDOWN: NbdErrno = NbdErrno(108);

    /// Maps a host errno to the NBD value; anything outside the spec's set becomes `EIO`.
    pub fn from_host_errno(errno: i32) -> NbdErrno {
        match errno {
            libc::EPERM => NbdErrno::EPERM,
            libc::EIO => NbdErrno::EIO,
            libc::ENOMEM => NbdErrno::ENOMEM,
            libc::EINVAL => NbdErrno::EINVAL,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NbdErrno::ENOSPC,
            libc::EOVERFLOW => NbdErrno::EOVERFLOW,
            libc::ENOTSUP => NbdErrno::ENOTSUP,
            libc::ESHUTDOWN => NbdErrno::ESHUTDOWN,
            _ => NbdErrno::EIO,
        }
    }

    /// The NBD value for a backend failure.
    pub fn from_backend(err: &BackendError) -> NbdErrno {
        NbdErrno::from_host_errno(err.errno())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_values_match_the_spec() {
        assert_eq!(NbdErrno::from_host_errno(libc::EPERM), NbdErrno(1));
        assert_eq!(NbdErrno::from_host_errno(libc::EIO), NbdErrno(5));
        assert_eq!(NbdErrno::from_host_errno(libc::ENOMEM), NbdErrno(12));
        assert_eq!(NbdErrno::from_host_errno(libc::EINVAL), NbdErrno(22));
        assert_eq!(NbdErrno::from_host_errno(libc::ENOSPC), NbdErrno(28));
        assert_eq!(NbdErrno::from_host_errno(libc::EDQUOT), NbdErrno(28));
        assert_eq!(NbdErrno::from_host_errno(libc::EFBIG), NbdErrno(28));
        assert_eq!(NbdErrno::from_host_errno(libc::EOVERFLOW), NbdErrno(75));
        assert_eq!(NbdErrno::from_host_errno(libc::ENOTSUP), NbdErrno(95));
        assert_eq!(NbdErrno::from_host_errno(libc::ESHUTDOWN), NbdErrno(108));
        assert_eq!(NbdErrno::from_host_errno(libc::EBADF), NbdErrno::EIO);
    }

    #[test]
    fn backend_errors_map_to_nbd_errnos() {
        let range = BackendError::OutOfRange { offset: 1, len: 2, size: 2 };
        assert_eq!(NbdErrno::from_backend(&range), NbdErrno::EINVAL);
        assert_eq!(NbdErrno::from_backend(&BackendError::ReadOnly), NbdErrno::EPERM);
        assert_eq!(NbdErrno::from_backend(&BackendError::NotSupported), NbdErrno::ENOTSUP);
        assert_eq!(NbdErrno::from_backend(&BackendError::NoSpace), NbdErrno::ENOSPC);
        assert_eq!(NbdErrno::from_backend(&BackendError::ShuttingDown), NbdErrno::ESHUTDOWN);
        let io = BackendError::Io(std::io::Error::from_raw_os_error(libc::EBADF));
        assert_eq!(NbdErrno::from_backend(&io), NbdErrno::EIO);
    }

    #[test]
    fn magics_spell_their_ascii_names() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }
}
