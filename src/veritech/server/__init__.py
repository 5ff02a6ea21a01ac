"""veritech: the dispatcher server (NATS in, cyclone instances out)."""
