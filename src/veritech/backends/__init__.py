"""Where cyclone instances run: one interface, several backends."""
