//! Integration tests for dsc live in tests/tests/.
