"""The APEX method, independent of any model family (DESIGN §5)."""
