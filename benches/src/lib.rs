//! Micro-benchmarks live in `benches/benches/`; the fio comparison runner is `benches/run.sh`.
