"""The streaming gRPC client and its command line (installed as ``flashportrait.client``)."""
