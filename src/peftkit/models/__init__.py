"""Per-architecture data (default target modules, output heads); no model code."""
