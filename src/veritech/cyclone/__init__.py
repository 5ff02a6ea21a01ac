"""cyclone: the small HTTP/WebSocket server that runs inside each sandbox."""
