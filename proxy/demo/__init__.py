"""Demo helpers: simulated back ends for the demo, the tests and the load tests."""
