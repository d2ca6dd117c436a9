"""The edge: what clients talk to. Sockets (entrance, connection, hub, watch), the pub/sub
fan-out (bus), the REST API, token verification and the conversation service both serve."""
