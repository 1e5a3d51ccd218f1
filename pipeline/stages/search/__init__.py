"""The search stage: one search as a worker group (``worker``), in one process without Ray (``local``), a
Tune grid of them (``sweep``), and the dry run's projection of its cost (``projection``)."""
