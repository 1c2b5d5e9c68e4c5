"""Pure core: advantages, policy loss, wire schemas, configuration. No I/O, no services."""
