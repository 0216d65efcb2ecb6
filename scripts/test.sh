#!/usr/bin/env bash
# Installs what the tests need and runs every test of the workspace:
# unit and property tests, the multi-process replication tests, the lints,
# and the ublk end-to-end test in a qemu guest whose kernel has ublk
# (scripts/vm/e2e.sh; it installs qemu and Debian's 6.12 kernel itself).
# Usage: scripts/test.sh            (from anywhere in the checkout)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
    echo "scripts/test.sh: cargo is not installed; install a Rust toolchain (rustup) first" >&2
    exit 1
fi
# The build needs a C compiler for a few -sys crates, and libclang for
# libublk's bindgen (the ublk frontend).
if ! command -v cc >/dev/null 2>&1 || ! ldconfig -p | grep -q 'libclang[-.0-9]*\.so '; then
    log "installing a C compiler and libclang"
    apt-get update -qq && apt-get install -y -qq build-essential libclang-dev
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        rustup component add "$component"
    fi
done

log "formatting"
cargo fmt --all -- --check

log "lints"
cargo clippy --workspace --all-targets --release -- -D warnings

# Optimized builds (Cargo.toml's optimized-tests: release without its
# link-time optimization): the multi-process tests push tens of thousands
# of writes through three processes, which a debug build makes several
# times slower.
log "tests"
results=$(mktemp)
trap 'rm -f "$results"' EXIT
cargo test --workspace --profile optimized-tests 2>&1 | tee "$results"
log "ublk end to end, in a VM (Debian's 6.12 kernel, qemu TCG)"
e2e=passed
scripts/vm/e2e.sh || e2e=failed
# cargo's last line belongs to whichever runner came last (often an empty
# doc-test run): close with the totals over every runner, the VM test one
# more.
awk -v e2e="$e2e" '/^test result:/ { passed += $4; failed += $6 }
     END { if (e2e == "passed") passed += 1; else failed += 1
           printf "\ntests: %d passed, %d failed\n", passed, failed
           exit failed > 0 }' "$results"
