//! Messina's benchmarks. The micro benchmarks live in `benches/` (`cargo bench -p messina-benches`);
//! each measures Messina's code beside a peer doing the least comparable work in the same run, so
//! the ratio is meaningful on any machine.
