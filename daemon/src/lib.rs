//! raftblk daemon library.
