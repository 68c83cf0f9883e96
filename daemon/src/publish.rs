//! Who may attach a volume (CSI ControllerPublish/Unpublish), decided as a pure function
//! of the volume's publications, the request and which nodes are dead.
//!
//! A read-write publication is exclusive (ReadWriteOnce): a second node is refused while
//! the first holds it, unless the first is dead or the request forces a takeover (an
//! operator's force-detach). Every read-write publication gets a new *generation*, and the
//! volume's fence moves to it: attachments of an older generation have their writes
//! refused, so a node that was declared dead but is only partitioned cannot write once
//! another node has taken the volume over. Read-only publications may be many, on any
//! nodes, as long as no other node holds the volume read-write.

use crate::model::Publication;

/// A publish request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishRequest {
    /// The node that will attach.
    pub node: u64,
    /// Read-only.
    pub read_only: bool,
    /// Take the volume over from live holders (an operator's force-detach).
    pub force: bool,
}

/// The publications and fence after a publish, and the caller's publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Every publication of the volume now.
    pub publications: Vec<Publication>,
    /// The volume's fence now.
    pub fence: u64,
    /// The requester's own publication.
    pub mine: Publication,
    /// Nodes whose publications were taken over (dead, or forced).
    pub fenced_out: Vec<u64>,
    /// Whether anything changed (a repeated publish changes nothing).
    pub changed: bool,
}

/// Why a publish is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishRefusal {
    /// Another live node holds it (CSI FAILED_PRECONDITION).
    #[error("volume is published read-write to node {holder}; unpublish it there first (or it must be declared dead, or force the takeover)")]
    HeldElsewhere {
        /// The node holding it.
        holder: u64,
    },
    /// Read-write asked while live nodes have it read-only, or the other way round.
    #[error("volume is published read-only to node(s) {holders:?}; a read-write publication needs them unpublished first")]
    ReadersPresent {
        /// Those nodes.
        holders: Vec<u64>,
    },
    /// The node holds it already in the other mode (CSI ALREADY_EXISTS).
    #[error("volume is published to node {node} already as {}; unpublish it before publishing it {}", mode(*read_only), mode(!*read_only))]
    OtherMode {
        /// The node.
        node: u64,
        /// Its current mode.
        read_only: bool,
    },
    /// The volume itself is read-only.
    #[error("the volume is read-only; publish it read-only")]
    VolumeReadOnly,
}

fn mode(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "read-write"
    }
}

/// Decides a publish. `dead(node)` says whether the cluster has declared a node dead.
pub fn publish(
    current: &[Publication],
    fence: u64,
    volume_read_only: bool,
    req: PublishRequest,
    dead: impl Fn(u64) -> bool,
) -> Result<Published, PublishRefusal> {
    if let Some(p) = current.iter().find(|p| p.node == req.node) {
        if p.read_only != req.read_only {
            return Err(PublishRefusal::OtherMode { node: p.node, read_only: p.read_only });
        }
        // A repeat, unless the holder was fenced out by a newer writer meanwhile (then it
        // needs a new generation, which the rules below decide like a new request).
        if p.read_only || p.generation >= fence {
            return Ok(Published {
                publications: current.to_vec(),
                fence,
                mine: p.clone(),
                fenced_out: Vec::new(),
                changed: false,
            });
        }
    }
    if !req.read_only && volume_read_only {
        return Err(PublishRefusal::VolumeReadOnly);
    }
    let others = current.iter().filter(|p| p.node != req.node);
    let mut kept = Vec::new();
    let mut fenced_out = Vec::new();
    let mut readers = Vec::new();
    for p in others {
        let conflicts = !p.read_only || !req.read_only;
        if !conflicts {
            kept.push(p.clone());
        } else if req.force || dead(p.node) {
            fenced_out.push(p.node);
        } else if p.read_only {
            readers.push(p.node);
        } else {
            return Err(PublishRefusal::HeldElsewhere { holder: p.node });
        }
    }
    if !readers.is_empty() {
        return Err(PublishRefusal::ReadersPresent { holders: readers });
    }
    // A reader carries the current fence: it never writes, and a later writer's
    // generation is higher anyway.
    let (fence, generation) = if req.read_only { (fence, fence) } else { (fence + 1, fence + 1) };
    let mine = Publication { node: req.node, read_only: req.read_only, generation };
    kept.push(mine.clone());
    kept.sort_by_key(|p| p.node);
    Ok(Published { publications: kept, fence, mine, fenced_out, changed: true })
}

/// Removes `node`'s publication (idempotent: `None` when it had none).
pub fn unpublish(current: &[Publication], node: u64) -> Option<Vec<Publication>> {
    current
        .iter()
        .any(|p| p.node == node)
        .then(|| current.iter().filter(|p| p.node != node).cloned().collect())
}

/// Whether an attachment of `generation` may write to a volume fenced at `fence`
/// (generation 0: an attachment made outside CSI, by an operator, which is never fenced).
pub fn may_write(generation: u64, fence: u64) -> bool {
    generation == 0 || generation >= fence
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(node: u64) -> PublishRequest {
        PublishRequest { node, read_only: false, force: false }
    }

    fn ro(node: u64) -> PublishRequest {
        PublishRequest { node, read_only: true, force: false }
    }

    const ALIVE: fn(u64) -> bool = |_| false;

    #[test]
    fn read_write_is_exclusive_until_the_holder_is_dead_or_forced_out() {
        let a = publish(&[], 0, false, rw(1), ALIVE).expect("first");
        assert_eq!((a.fence, a.mine.generation, a.changed), (1, 1, true));
        let again = publish(&a.publications, a.fence, false, rw(1), ALIVE).expect("repeat");
        assert_eq!((again.changed, again.mine.generation), (false, 1));
        assert_eq!(
            publish(&a.publications, a.fence, false, rw(2), ALIVE),
            Err(PublishRefusal::HeldElsewhere { holder: 1 })
        );
        let b = publish(&a.publications, a.fence, false, rw(2), |n| n == 1).expect("holder dead");
        assert_eq!((b.fence, b.mine.generation, b.fenced_out.clone()), (2, 2, vec![1]));
        assert_eq!(b.publications, vec![b.mine.clone()]);
        assert!(!may_write(1, b.fence), "the old holder's writes are refused");
        assert!(may_write(2, b.fence));
        let forced = publish(&b.publications, b.fence, false, PublishRequest { force: true, ..rw(3) }, ALIVE)
            .expect("forced");
        assert_eq!((forced.fence, forced.fenced_out.clone()), (3, vec![2]));
    }

    #[test]
    fn readers_share_and_exclude_writers() {
        let a = publish(&[], 0, false, ro(1), ALIVE).expect("ro 1");
        let b = publish(&a.publications, a.fence, false, ro(2), ALIVE).expect("ro 2");
        assert_eq!(b.publications.len(), 2);
        assert_eq!(b.fence, 0, "readers do not move the fence");
        assert_eq!(
            publish(&b.publications, b.fence, false, rw(3), ALIVE),
            Err(PublishRefusal::ReadersPresent { holders: vec![1, 2] })
        );
        let w = publish(&[], 0, false, rw(1), ALIVE).expect("rw");
        assert_eq!(
            publish(&w.publications, w.fence, false, ro(2), ALIVE),
            Err(PublishRefusal::HeldElsewhere { holder: 1 })
        );
        assert_eq!(
            publish(&w.publications, w.fence, false, ro(1), ALIVE),
            Err(PublishRefusal::OtherMode { node: 1, read_only: false })
        );
        assert_eq!(publish(&[], 0, true, rw(1), ALIVE), Err(PublishRefusal::VolumeReadOnly));
        assert!(publish(&[], 0, true, ro(1), ALIVE).is_ok());
    }

    #[test]
    fn a_fenced_out_holder_that_publishes_again_gets_a_new_generation() {
        let a = publish(&[], 0, false, rw(1), ALIVE).expect("a");
        let b = publish(&a.publications, a.fence, false, rw(2), |n| n == 1).expect("b");
        let stale = vec![a.mine.clone()];
        // Node 1's own view still lists it, but the fence moved on: not a repeat.
        let c = publish(&stale, b.fence, false, rw(1), ALIVE).expect("c");
        assert!(c.changed);
        assert_eq!(c.mine.generation, 3);
    }

    #[test]
    fn unpublish_is_idempotent() {
        let a = publish(&[], 0, false, rw(1), ALIVE).expect("a");
        assert_eq!(unpublish(&a.publications, 1), Some(vec![]));
        assert_eq!(unpublish(&[], 1), None);
        assert!(may_write(0, 9), "attachments outside CSI are not fenced");
    }
}
