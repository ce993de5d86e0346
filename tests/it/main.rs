//! Integration tests: the real `roomcast` binary against a real Apache Kafka broker, with real
//! WebSocket clients. One test binary; one module per area.

mod auth;
mod close_handshake;
mod delivery;
mod edge_close;
mod hostile_edge;
mod hostile_patterns;
mod hostile_records;
mod hostile_session;
mod lagging;
mod ops;
mod presence;
mod presence_client;
mod protocol;
mod raw;
mod resume;
mod supervision;
mod support;
mod wire_conformance;
