//! Microbenchmarks of the per-record hot path: routing a record, encoding its frame, and
//! looking up its recipients in the registry. End-to-end figures come from `load/` and
//! `scripts/bench`; these isolate the pieces.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use roomcast::config::default_routes;
use roomcast::registry::Registry;
use roomcast::route::{Record, Route};
use roomcast::ws::protocol;

const ENTITY: &[u8] = br#"{"feature":"users","entity":"user","action":"deleted","data":{"id":"u123","name":"Ada Lovelace","email":"ada@example.com"},"meta":{"priority":"normal","tenantId":"acme","requestId":"4f9a2c"}}"#;

fn record(value: &[u8]) -> Record<'_> {
    Record {
        topic: "entity-updates",
        partition: 3,
        offset: 1234,
        timestamp_ms: Some(1_763_880_000_123),
        value: Some(value),
        headers: Vec::new(),
    }
}

fn routing(c: &mut Criterion) {
    let route = Route::from_config(&default_routes()[0]).unwrap();
    let mut g = c.benchmark_group("route");
    g.throughput(Throughput::Elements(1));
    g.bench_function("entity_update", |b| {
        b.iter(|| route.apply(black_box(&record(ENTITY))).unwrap())
    });
    let routed = route.apply(&record(ENTITY)).unwrap();
    g.bench_function("encode_event_frame", |b| {
        b.iter(|| protocol::event(black_box(&routed)).unwrap())
    });
    g.finish();
}

fn registry(c: &mut Criterion) {
    let mut g = c.benchmark_group("registry");
    let rooms = ["feature:users".to_string(), "user:u123".to_string()];
    for members in [1usize, 100, 10_000] {
        let r: Registry<u64> = Registry::new();
        for conn in 0..members as u64 {
            r.join(conn, Some("acme"), "feature:users", &conn, None);
        }
        r.join(0, Some("acme"), "user:u123", &0, None);
        g.throughput(Throughput::Elements(members as u64));
        g.bench_function(format!("recipients_of_2_rooms/{members}_members"), |b| {
            b.iter(|| {
                let mut n = 0u64;
                r.for_each_recipient(Some("acme"), black_box(&rooms), "users.user.deleted", |p| {
                    n = n.wrapping_add(*p)
                });
                n
            })
        });
        g.bench_function(format!("recipients_of_1_room/{members}_members"), |b| {
            b.iter(|| {
                let mut n = 0u64;
                r.for_each_recipient(Some("acme"), black_box(&rooms[..1]), "e", |p| {
                    n = n.wrapping_add(*p)
                });
                n
            })
        });
    }
    g.finish();
}

criterion_group!(benches, routing, registry);
criterion_main!(benches);
