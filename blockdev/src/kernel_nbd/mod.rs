//! Kernel attach: this process serves a volume to the Linux kernel's own NBD client
//! (`/dev/nbdN`) through one end of a socket pair, and configures the client over generic
//! netlink ([`netlink`]) instead of running `nbd-client`. The handshake is skipped: the
//! kernel is told the export's size and transmission flags directly, and the server side
//! starts in the transmission phase ([`crate::nbd::NbdServer::serve_direct`]).
//!
//! The device is set up with a dead-connection timeout and without "disconnect on close",
//! so when this process exits (a restart, an upgrade, kill -9) the kernel queues the
//! device's requests; the next process hands it a new socket with RECONFIGURE and the
//! kernel resends them. Nothing above the block device sees an error.

pub mod netlink;

use std::io;
use std::os::unix::net::UnixStream;

pub use netlink::{DeviceConfig, DeviceStatus, NbdNetlink};

/// Why a kernel attach step failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The kernel has no `nbd` generic netlink family.
    #[error("the kernel has no NBD driver loaded (run `modprobe nbd`; on a kernel without CONFIG_BLK_DEV_NBD use NBD over the network or ublk instead)")]
    NoDriver,
    /// The kernel refused a command.
    #[error("the kernel refused NBD {cmd}: {}", io::Error::from_raw_os_error(*errno))]
    Kernel {
        /// The command.
        cmd: &'static str,
        /// Its errno.
        errno: i32,
    },
    /// The netlink conversation failed.
    #[error("netlink: {0}")]
    Netlink(String),
    /// Creating the socket pair failed.
    #[error("socket pair: {0}")]
    Socket(#[from] io::Error),
}

/// A connected pair: the kernel's end (handed over by CONNECT or RECONFIGURE, then closed
/// here) and the server's end, non-blocking for tokio.
pub fn socket_pair() -> Result<(UnixStream, tokio::net::UnixStream), AttachError> {
    let (kernel, server) = UnixStream::pair()?;
    server.set_nonblocking(true)?;
    Ok((kernel, tokio::net::UnixStream::from_std(server)?))
}

/// `/dev/nbd<index>`.
pub fn device_path(index: u32) -> String {
    format!("/dev/nbd{index}")
}

/// The index in a `/dev/nbdN` path (or a bare `nbdN`), if it is one.
pub fn parse_device(path: &str) -> Option<u32> {
    let name = path.strip_prefix("/dev/").unwrap_or(path);
    let digits = name.strip_prefix("nbd")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 6 {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_paths_round_trip_and_junk_is_refused() {
        assert_eq!(parse_device(&device_path(7)), Some(7));
        assert_eq!(parse_device("nbd12"), Some(12));
        for bad in ["/dev/nbd", "/dev/sda", "nbd1p1", "/dev/nbd-1", "nbd99999999", ""] {
            assert_eq!(parse_device(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn the_pair_carries_bytes_both_ways() {
        use std::io::{Read, Write};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut kernel, mut server) = socket_pair().expect("pair");
        kernel.write_all(b"ping").expect("write");
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.expect("write");
        kernel.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"pong");
    }
}
