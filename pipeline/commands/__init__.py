"""One module per ``dcpnas`` command: ``register(sub)`` adds its arguments, ``main(args)`` runs it."""
