//! Maglev ring builds (criterion): M = 65537 with 100 and 1000 backends,
//! M = 655373 with 10000. `cargo xtask bench` summarises the medians.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lb_userspace::maglev::{build, RingMember};

fn members(n: u32) -> Vec<RingMember> {
    (0..n)
        .map(|i| RingMember {
            identity: [198, 51, 100, 0].iter().chain(&i.to_be_bytes()).copied().collect(),
            weight: 1 + i % 4,
        })
        .collect()
}

fn maglev_builds(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    group.sample_size(10);
    for (m, n) in [(65537u32, 100u32), (65537, 1000), (655373, 10000)] {
        let set = members(n);
        group.bench_with_input(BenchmarkId::from_parameter(format!("m{m}_n{n}")), &set, |b, set| {
            b.iter(|| build(set, m).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, maglev_builds);
criterion_main!(benches);
