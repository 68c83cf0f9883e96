//! The CSI (Container Storage Interface 1.12) driver that Kubernetes uses to provision,
//! publish and mount raftblk volumes.

pub mod proto;
