"""Helpers of the tests (not tests themselves): real runs in subprocesses, the tiny teachers, the
PyTorch reference, fault injectors. Imported as `support.<module>` (tests/ is on the path)."""
