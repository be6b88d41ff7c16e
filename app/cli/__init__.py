"""The ``rlpips`` command line (:mod:`app.cli.main`)."""
