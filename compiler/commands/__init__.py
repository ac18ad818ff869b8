"""Extra CLI commands. Each module defines `register(subparsers, add_common, add_calibration)` that adds its
subparser with `set_defaults(func=...)`; `modelsurgeon.cli` discovers them."""
