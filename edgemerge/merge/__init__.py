"""The merge: methods (pure maths), backends (torch | mlx), the streaming engine and whole-merge runs."""
