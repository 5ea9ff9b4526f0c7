//! The bridge between the broker and storage: the device wire contract (topics, MessagePack
//! payloads, validation), batching, and writing through the storage trait. It knows neither
//! rumqttd nor HTTP, so all of it is testable without a network.

pub mod alerts;
pub mod meter;
pub mod pipeline;
pub mod topics;
pub mod wire;

pub use pipeline::{spawn, BridgeClosed, BridgeHandle, Inbound, Settings};
pub use wire::{Decoded, Kind, Limits, Rejection};
