# Developer shortcuts (`pip install rust-just` or `cargo install just`). CI runs .ci/run.

# The README's test command.
test:
    cargo test --locked

# The whole CI gate: installs test peers, fmt, clippy, tests.
ci:
    bash .ci/run

# Run mqic on the embedded defaults.
serve:
    cargo run --release -- serve

# Broker benchmark; set MQIC_BENCH_RABBITMQ_URL (and MQIC_BENCH_RABBITMQ_PID) to compare.
bench:
    cargo bench --bench broker

# Codec micro-benchmark: hand-written hot path against amq-protocol.
bench-codec:
    cargo bench --bench codec
