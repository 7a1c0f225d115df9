//! The objects of API group `tgtd.unstable.cloud/v1alpha1` as the standalone loader reads
//! them. The types live in `ktgt_operator::api` (shared with cluster mode and the CRDs); the
//! file forms of the objects (`Target`, `InitiatorGroup`, `InitiatorGroupBinding`, with a
//! small `ObjectMeta`, and `Secret`) come from `ktgt_operator::api::document` and shadow the
//! cluster resources of the same names here.

pub use ktgt_operator::api::document::{
    InitiatorGroup, InitiatorGroupBinding, ObjectMeta, Secret, Target,
};
pub use ktgt_operator::api::*;
