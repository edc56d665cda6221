"""Root, network namespaces and nftables: a site with a stateful firewall."""
