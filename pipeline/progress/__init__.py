"""Live progress: the board that prints one line per run (``board``) and its Ray Tune / Train callbacks
(``tune``)."""
