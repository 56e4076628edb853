"""Redis Cluster behind the proxy: the slot map (:mod:`.topology`) and the routing relay (:mod:`.relay`)."""
