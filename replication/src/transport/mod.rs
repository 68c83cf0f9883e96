//! Peer transport shared by every Raft group on a node.

pub mod frame;
