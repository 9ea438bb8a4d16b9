"""The benchmark harness: see bench/README.md and docs/performance.md."""
