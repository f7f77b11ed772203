"""Ray Serve: an HTTP editing endpoint and a web page over the one inference path, LoRAs chosen per request."""
