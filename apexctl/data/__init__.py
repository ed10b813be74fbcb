"""Data sources for apexctl: the embedded scikit-learn digits (`digits`) and, later, folders / parquet / prompts."""
