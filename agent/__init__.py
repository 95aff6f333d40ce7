"""edgewatch agent: scores MQTT sensor streams with a VAE bundle on an edge gateway."""
__version__ = "0.1.0"
