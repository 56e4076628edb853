"""Several proxies in front of one Redis behaving as one fleet: the settings they share
(:mod:`.shared_config`, the hash's fields in :mod:`.shared_fields`)."""
