"""The node OS API's work: the host's network (net) and storage (vol), for den.services.net and .vol."""
