"""The benchmarks: scripts run as `python benchmarks/<name>.py`; importable as a package by the tests
(the repository root is on pytest's `pythonpath`)."""
