//! The vocabulary every other part of the daemon speaks: volume records, nodes, catalog
//! changes, a group's view. Plain data with its validation rules and serde shapes (which
//! are on disk and on the wire, so they do not change lightly); nothing here does I/O or
//! imports another module of the crate.

pub mod group;
pub mod node;
pub mod op;
pub mod publication;
pub mod record;

pub use group::{GroupView, MembershipChange, RebuildView, WaitCondition};
pub use node::{AdminEntry, AdminState, Liveness, Member, NodeRecord, NodeReport, NodeView};
pub use op::{CatalogOp, Outcome, Proposal};
pub use publication::Publication;
pub use record::{
    parse_label, validate_labels, validate_name, validate_size, VolumeHealth, VolumeRecord, LABELS_MAX,
    LABEL_LEN_MAX, REPLICAS_MAX, VOLUME_NAME_MAX_LEN, VOLUME_SIZE_ALIGN_BYTES, VOLUME_SIZE_MAX_BYTES,
};
