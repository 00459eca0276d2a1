//! The manager's routing throughput: object events routed to the replica
//! holding each key, per second, on one core (the coordinator runs on one
//! task). Goal: at least 100,000 events/s.
//!
//! ```text
//! cargo bench -p opmesh-manager --bench routing
//! ```

// criterion_group! makes a public function it cannot document.
#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use opmesh_manager::bench::Routing;

fn routing(c: &mut Criterion) {
    const EVENTS: usize = 10_000;
    let mut meshes: Vec<(usize, usize, Routing)> = [(10_000, 2), (100_000, 10)]
        .into_iter()
        .map(|(objects, replicas)| {
            (
                objects,
                replicas,
                Routing::new(objects, objects / 100, replicas),
            )
        })
        .collect();
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(EVENTS as u64));
    for (objects, replicas, bench) in &mut meshes {
        group.bench_function(
            format!("{objects} objects, {replicas} replicas, {EVENTS} events"),
            |b| b.iter(|| bench.route(EVENTS)),
        );
    }
    group.finish();
    // What the routing task stops for every 0.5 s while keys change.
    let mut group = c.benchmark_group("snapshot");
    for (objects, replicas, bench) in &mut meshes {
        group.bench_function(format!("{objects} objects, {replicas} replicas"), |b| {
            b.iter(|| bench.snapshot())
        });
    }
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
