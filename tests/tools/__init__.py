"""Tests of peftkit.tools (a package so the test modules can share `helpers`)."""
