//! Switchboard's wire types between services: one source of truth.
//!
//! - `proto/switchboard/push/v1/push.proto`: the Push API (internal services → clients).
//! - `proto/switchboard/presence/v1/presence.proto`: presence (gateways → registry, queries, watch).
//! - `proto/switchboard/bridge/v1/bridge.proto`: the Kafka envelope and the gateway Delivery stream.
//!
//! Code is generated at build time with a vendored `protoc` (no system install needed).

#![allow(unreachable_pub, missing_debug_implementations)]

/// The Push API, package `switchboard.push.v1`.
pub mod push {
    pub mod v1 {
        tonic::include_proto!("switchboard.push.v1");
    }
}

/// Presence, package `switchboard.presence.v1`.
pub mod presence {
    pub mod v1 {
        tonic::include_proto!("switchboard.presence.v1");
    }
}

/// The Kafka envelope and the gateway Delivery service, package `switchboard.bridge.v1`.
pub mod bridge {
    pub mod v1 {
        tonic::include_proto!("switchboard.bridge.v1");
    }
}

/// Encoded `FileDescriptorSet` of every proto here, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("switchboard_descriptor");

/// gRPC reflection over every Switchboard service and health, in both protocol
/// versions (grpcurl here speaks only v1alpha).
pub fn reflection() -> (
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
) {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Invariant: both descriptor sets are generated at build time and valid.
    (builder().build_v1().expect("valid descriptor sets"), builder().build_v1alpha().expect("valid descriptor sets"))
}
