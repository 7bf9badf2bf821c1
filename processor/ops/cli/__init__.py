"""The click commands of ams-ops, a module for each command group (common: what they share); the work itself is
done by the modules of processor.ops. processor/ops/__main__.py puts them together under `ams-ops`."""
