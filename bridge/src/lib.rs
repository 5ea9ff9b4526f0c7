//! The bridge between the broker and storage: the device wire contract (topics, MessagePack
//! payloads, validation), batching, and writing through the storage trait. It knows neither
//! rumqttd nor HTTP, so all of it is testable without a network.

pub mod alerts;
pub mod meter;
pub mod pipeline;
pub mod topics;
pub mod wire;

pub use pipeline::{spawn, AfterWrite, BridgeClosed, BridgeHandle, Inbound, Settings};
pub use wire::{Decoded, Kind, Limits, Rejection};

/// Told, in log order, a position through which everything is done with: every message that ends
/// at or before it is stored (or was handled elsewhere and passed, see [`BridgeHandle::pass`]),
/// and so is what the alert rules remember of it. The broker makes it the ingest log's checkpoint.
pub type OnStored = std::sync::Arc<dyn Fn(u64) + Send + Sync>;
