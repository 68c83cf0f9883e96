//! What a restarted daemon does with each recorded attachment, decided from the record
//! and what the kernel reports: pure, so every case is tested without a kernel.

use raftblk_blockdev::kernel_nbd::DeviceStatus;

/// How one recorded attachment is brought back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreStep {
    /// The kernel still holds the device (its requests queued): give it a new socket.
    Reconfigure,
    /// The kernel has no such configured device any more: connect it again at its index.
    Connect,
    /// The volume is gone: forget the record (and end the kernel device if it holds one).
    Drop {
        /// Whether the kernel still has the device configured.
        disconnect: bool,
    },
}

/// The step for a record whose volume `exists` (same name and uuid) given the kernel's
/// status of its device index (`None`: the kernel has no device there).
pub fn plan_restore(exists: bool, kernel: Option<DeviceStatus>) -> RestoreStep {
    let held = kernel.is_some_and(|d| d.connected);
    match (exists, held) {
        (false, held) => RestoreStep::Drop { disconnect: held },
        (true, true) => RestoreStep::Reconfigure,
        (true, false) => RestoreStep::Connect,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(connected: bool) -> Option<DeviceStatus> {
        Some(DeviceStatus { index: 3, connected })
    }

    #[test]
    fn every_case_of_record_and_kernel_has_its_step() {
        assert_eq!(plan_restore(true, dev(true)), RestoreStep::Reconfigure);
        assert_eq!(plan_restore(true, dev(false)), RestoreStep::Connect);
        assert_eq!(plan_restore(true, None), RestoreStep::Connect);
        assert_eq!(plan_restore(false, dev(true)), RestoreStep::Drop { disconnect: true });
        assert_eq!(plan_restore(false, dev(false)), RestoreStep::Drop { disconnect: false });
        assert_eq!(plan_restore(false, None), RestoreStep::Drop { disconnect: false });
    }
}
