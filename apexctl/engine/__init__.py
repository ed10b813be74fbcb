"""The APEX method, independent of any model family (docs/design.md §5)."""
