"""The ``graft`` command: a thin layer over the library; every subcommand is one library call."""
