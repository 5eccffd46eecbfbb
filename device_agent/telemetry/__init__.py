"""Reports to the fleet: the signed report format (defined here, read by the fleet monitor), the
durable outbox, and the MQTT adapter."""
