"""Method-agnostic machinery: configs, registry, layer views, the multi-adapter host, injection."""
