//! The device edge: Messina's own MQTT listener (3.1.1 and 5 on one port) that will face the
//! devices in front of the rumqttd router, acknowledging a PUBLISH only once the ingest log holds
//! it. So far this is its codec; the listener and the connection state machine come next.

pub mod codec;
