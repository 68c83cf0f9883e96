//! The kernel NBD client's generic netlink family (`nbd`, `include/uapi/linux/nbd-netlink.h`),
//! spoken through `neli`: CONNECT hands the kernel a connected socket and the export's
//! geometry, RECONFIGURE replaces a dead socket (or changes the size) of a live device,
//! DISCONNECT ends one, STATUS lists them.
//!
//! Every call is a blocking round trip to the kernel; callers on an async runtime run
//! them on a blocking thread.

use std::os::fd::{AsRawFd, BorrowedFd};

use neli::consts::nl::NlmF;
use neli::consts::socket::NlFamily;
use neli::err::RouterError;
use neli::genl::{AttrTypeBuilder, Genlmsghdr, GenlmsghdrBuilder, Nlattr, NlattrBuilder};
use neli::nl::NlPayload;
use neli::router::synchronous::NlRouter;
use neli::types::{Buffer, GenlBuffer};
use neli::utils::Groups;
use neli::{neli_enum, ToBytes};

use super::AttachError;

const FAMILY: &str = "nbd";
const VERSION: u8 = 1;

/// Commands of the `nbd` family.
#[neli_enum(serialized_type = "u8")]
pub enum NbdCmd {
    Unspec = 0,
    Connect = 1,
    Disconnect = 2,
    Reconfigure = 3,
    LinkDead = 4,
    Status = 5,
}
impl neli::consts::genl::Cmd for NbdCmd {}

/// Top-level attributes (`NBD_ATTR_*`).
#[neli_enum(serialized_type = "u16")]
pub enum NbdAttr {
    Unspec = 0,
    Index = 1,
    SizeBytes = 2,
    BlockSizeBytes = 3,
    Timeout = 4,
    ServerFlags = 5,
    ClientFlags = 6,
    Sockets = 7,
    DeadConnTimeout = 8,
    DeviceList = 9,
    BackendIdentifier = 10,
}
impl neli::consts::genl::NlAttrType for NbdAttr {}

/// `NBD_SOCK_ITEM` in `NBD_ATTR_SOCKETS`, and `NBD_SOCK_FD` inside it (both 1).
#[neli_enum(serialized_type = "u16")]
pub enum NbdSockAttr {
    Unspec = 0,
    /// `NBD_SOCK_ITEM` one level up, `NBD_SOCK_FD` inside it.
    Item = 1,
}
impl neli::consts::genl::NlAttrType for NbdSockAttr {}

/// `NBD_DEVICE_ITEM` in `NBD_ATTR_DEVICE_LIST`, and its `NBD_DEVICE_*` attributes.
#[neli_enum(serialized_type = "u16")]
pub enum NbdDeviceAttr {
    Unspec = 0,
    /// `NBD_DEVICE_ITEM` one level up, `NBD_DEVICE_INDEX` inside it.
    Index = 1,
    Connected = 2,
}
impl neli::consts::genl::NlAttrType for NbdDeviceAttr {}

/// What CONNECT tells the kernel about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// `/dev/nbd<index>` to use; `None` lets the kernel pick a free one.
    pub index: Option<u32>,
    /// Export size.
    pub size_bytes: u64,
    /// Logical block size (512..=4096, a power of two).
    pub block_size: u64,
    /// The NBD transmission flags the server would have sent in its handshake.
    pub server_flags: u64,
    /// Seconds before the kernel gives up on one request and resends it on a live socket.
    pub timeout_s: u64,
    /// Seconds the kernel queues requests after the socket dies, waiting for a RECONFIGURE.
    pub dead_conn_timeout_s: u64,
    /// Shown in `/sys/block/nbdN/backend` (the volume's name and uuid).
    pub backend: String,
}

/// A device as STATUS reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    /// `/dev/nbd<index>`.
    pub index: u32,
    /// Whether it is configured (connected, or waiting for a dead socket's replacement).
    pub connected: bool,
}

/// A netlink socket bound to the kernel's `nbd` family.
pub struct NbdNetlink {
    router: NlRouter,
    family: u16,
}

impl std::fmt::Debug for NbdNetlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdNetlink").field("family", &self.family).finish_non_exhaustive()
    }
}

type Attrs = GenlBuffer<NbdAttr, Buffer>;
type Reply = Genlmsghdr<NbdCmd, NbdAttr>;

fn err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> AttachError {
    move |e| AttachError::Netlink(format!("{what}: {e}"))
}

fn attr<P: neli::Size + ToBytes>(kind: NbdAttr, payload: P) -> Result<Nlattr<NbdAttr, Buffer>, AttachError> {
    let t = AttrTypeBuilder::default().nla_type(kind).build().map_err(err("attribute type"))?;
    NlattrBuilder::default().nla_type(t).nla_payload(payload).build().map_err(err("attribute"))
}

fn sockets(fd: BorrowedFd<'_>) -> Result<Nlattr<NbdAttr, Buffer>, AttachError> {
    let fd_attr = NlattrBuilder::default()
        .nla_type(AttrTypeBuilder::default().nla_type(NbdSockAttr::Item).build().map_err(err("fd type"))?)
        .nla_payload(fd.as_raw_fd() as u32)
        .build()
        .map_err(err("fd attribute"))?;
    let item = NlattrBuilder::default()
        .nla_type(AttrTypeBuilder::default().nla_type(NbdSockAttr::Item).build().map_err(err("item type"))?)
        .nla_payload(Vec::<u8>::new())
        .build()
        .map_err(err("socket item"))?
        .nest(&fd_attr)
        .map_err(err("socket item"))?;
    attr(NbdAttr::Sockets, Vec::<u8>::new())?.nest(&item).map_err(err("socket list"))
}

impl NbdNetlink {
    /// Opens a generic netlink socket and finds the `nbd` family; fails with
    /// [`AttachError::NoDriver`] when the kernel has no NBD driver loaded.
    pub fn open() -> Result<Self, AttachError> {
        let (router, _multicast) =
            NlRouter::connect(NlFamily::Generic, None, Groups::empty()).map_err(err("netlink socket"))?;
        let family = router.resolve_genl_family(FAMILY).map_err(|_| AttachError::NoDriver)?;
        Ok(NbdNetlink { router, family })
    }

    /// Sends one command and collects the kernel's answers (the last is its ACK).
    fn call(&self, cmd: NbdCmd, attrs: Attrs) -> Result<Vec<Reply>, AttachError> {
        let header = GenlmsghdrBuilder::default()
            .cmd(cmd)
            .version(VERSION)
            .attrs(attrs)
            .build()
            .map_err(err("message"))?;
        let answers = self
            .router
            .send::<u16, Genlmsghdr<NbdCmd, NbdAttr>, u16, Reply>(
                self.family,
                NlmF::ACK,
                NlPayload::Payload(header),
            )
            .map_err(err("send"))?;
        let mut replies = Vec::new();
        for answer in answers {
            match answer {
                Ok(msg) => {
                    if let NlPayload::Payload(p) = msg.nl_payload() {
                        replies.push(p.clone());
                    }
                }
                Err(RouterError::Nlmsgerr(e)) => {
                    return Err(AttachError::Kernel { cmd: cmd_name(cmd), errno: -*e.error() });
                }
                Err(e) => return Err(AttachError::Netlink(format!("{}: {e}", cmd_name(cmd)))),
            }
        }
        Ok(replies)
    }

    /// Configures a device served over `sock` (the kernel keeps its own reference to the
    /// socket; the caller may close its descriptor afterwards) and returns its index.
    pub fn connect(&self, config: &DeviceConfig, sock: BorrowedFd<'_>) -> Result<u32, AttachError> {
        let mut attrs = Attrs::new();
        if let Some(index) = config.index {
            attrs.push(attr(NbdAttr::Index, index)?);
        }
        attrs.push(attr(NbdAttr::SizeBytes, config.size_bytes)?);
        attrs.push(attr(NbdAttr::BlockSizeBytes, config.block_size)?);
        attrs.push(attr(NbdAttr::ServerFlags, config.server_flags)?);
        attrs.push(attr(NbdAttr::Timeout, config.timeout_s)?);
        attrs.push(attr(NbdAttr::DeadConnTimeout, config.dead_conn_timeout_s)?);
        // No NBD_CFLAG_DESTROY_ON_DISCONNECT / DISCONNECT_ON_CLOSE: the device must outlive
        // this daemon's process (a restart reattaches it) and every opener of the device.
        attrs.push(attr(NbdAttr::ClientFlags, 0u64)?);
        attrs.push(sockets(sock)?);
        if !config.backend.is_empty() {
            attrs.push(attr(NbdAttr::BackendIdentifier, config.backend.as_str())?);
        }
        let replies = self.call(NbdCmd::Connect, attrs)?;
        for r in &replies {
            if let Ok(index) = r.attrs().get_attr_handle().get_attr_payload_as::<u32>(NbdAttr::Index) {
                return Ok(index);
            }
        }
        match config.index {
            Some(i) => Ok(i),
            None => Err(AttachError::Netlink("CONNECT answered without a device index".into())),
        }
    }

    /// Gives a configured device a new socket in place of its dead one; also sets its size
    /// when `size_bytes` is given (online grow). The kernel resends queued requests on it.
    /// `backend` must be the identifier the device was connected with (the kernel refuses
    /// a RECONFIGURE that names none or another, so a socket cannot go to the wrong device).
    pub fn reconfigure(
        &self,
        index: u32,
        backend: &str,
        sock: Option<BorrowedFd<'_>>,
        size_bytes: Option<u64>,
        dead_conn_timeout_s: Option<u64>,
    ) -> Result<(), AttachError> {
        let mut attrs = Attrs::new();
        attrs.push(attr(NbdAttr::Index, index)?);
        if !backend.is_empty() {
            attrs.push(attr(NbdAttr::BackendIdentifier, backend)?);
        }
        if let Some(size) = size_bytes {
            attrs.push(attr(NbdAttr::SizeBytes, size)?);
        }
        if let Some(t) = dead_conn_timeout_s {
            attrs.push(attr(NbdAttr::DeadConnTimeout, t)?);
        }
        if let Some(sock) = sock {
            attrs.push(sockets(sock)?);
        }
        self.call(NbdCmd::Reconfigure, attrs).map(drop)
    }

    /// Ends a device: the kernel fails its queued requests and frees it.
    pub fn disconnect(&self, index: u32) -> Result<(), AttachError> {
        let mut attrs = Attrs::new();
        attrs.push(attr(NbdAttr::Index, index)?);
        self.call(NbdCmd::Disconnect, attrs).map(drop)
    }

    /// Every NBD device the kernel has, or the one at `index`.
    pub fn status(&self, index: Option<u32>) -> Result<Vec<DeviceStatus>, AttachError> {
        let mut attrs = Attrs::new();
        if let Some(i) = index {
            attrs.push(attr(NbdAttr::Index, i)?);
        }
        let replies = self.call(NbdCmd::Status, attrs)?;
        let mut out = Vec::new();
        for r in &replies {
            let handle = r.attrs().get_attr_handle();
            let Ok(list) = handle.get_nested_attributes::<NbdDeviceAttr>(NbdAttr::DeviceList) else {
                continue;
            };
            for item in list.iter() {
                let Ok(fields) = item.get_attr_handle::<NbdDeviceAttr>() else { continue };
                let Ok(index) = fields.get_attr_payload_as::<u32>(NbdDeviceAttr::Index) else { continue };
                let connected = fields.get_attr_payload_as::<u8>(NbdDeviceAttr::Connected).unwrap_or(0) != 0;
                out.push(DeviceStatus { index, connected });
            }
        }
        Ok(out)
    }
}

fn cmd_name(cmd: NbdCmd) -> &'static str {
    match cmd {
        NbdCmd::Connect => "CONNECT",
        NbdCmd::Disconnect => "DISCONNECT",
        NbdCmd::Reconfigure => "RECONFIGURE",
        NbdCmd::Status => "STATUS",
        _ => "nbd command",
    }
}
