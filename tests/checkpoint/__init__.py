"""Checkpoint format and peft interop tests (a package so the test modules can share `helpers`)."""
