"""Python code generated from proto/*.proto (by `make proto`; not committed)."""
