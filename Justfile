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


# Portable binary (glibc >= 2.17) and tarball in target/dist/ (.ci/package installs missing tools).
dist:
    bash .ci/package dist

# dist, then target/dist/mqic_<version>-1_amd64.deb.
deb:
    bash .ci/package deb

# dist, then target/dist/mqic-<version>-1.x86_64.rpm (gzip payload, systemd scriptlets).
rpm:
    bash .ci/package rpm

# All artefacts, then the install tests (root on Debian: installs, upgrades, purges mqic here).
package-test:
    bash .ci/package test
