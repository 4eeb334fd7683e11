"""aaekit's first-party components, registered through the ``aaekit`` entry-point group."""
