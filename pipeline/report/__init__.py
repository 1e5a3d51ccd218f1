"""The comparison report of a sweep: ``collect`` (from the tracking store) -> ``summary`` / ``plots`` /
``groups`` -> ``page`` -> ``build`` (write and log it). ``model`` holds the data types and columns."""
