"""The embedded toy settings' judges (digits, scenes) and their shared ``eval digits`` / ``eval scenes`` run."""
