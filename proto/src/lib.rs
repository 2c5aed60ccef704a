//! Tollgate's protobuf contracts as plain prost messages.
//!
//! - [`quota::v1`]: `tollgate.quota.v1`, the shared-limit service between
//!   every Envoy replica's filter and Redis (`proto/tollgate/quota/v1/quota.proto`).
//!   The filter encodes these messages for `dispatch_grpc_call`; the service
//!   (`tollgate-quota`) serves them with tonic.
//!
//! ```
//! use prost::Message;
//! use tollgate_proto::quota::v1::{AdmitRequest, Bucket, Charge, Refill};
//!
//! let request = AdmitRequest {
//!     request_id: "req-1".into(),
//!     charges: vec![Charge {
//!         bucket: Some(Bucket {
//!             id: "key:alice:requests_per_minute".into(),
//!             refill: Refill::PerMinute.into(),
//!             limit: 60,
//!             utc_offset_min: 0,
//!         }),
//!         amount: 1,
//!     }],
//!     key_sha256: vec![0; 32],
//! };
//! let bytes = request.encode_to_vec();
//! assert_eq!(AdmitRequest::decode(bytes.as_slice()).ok(), Some(request));
//! ```

pub use prost;

pub mod quota {
    pub mod v1 {
        #![allow(clippy::all, clippy::unwrap_used, clippy::indexing_slicing)]
        include!(concat!(env!("OUT_DIR"), "/tollgate.quota.v1.rs"));
    }
}
