//! kube-proxy's own rules for the same Services and EndpointSlices the agent reads, so the
//! benchmark compares the dataplanes on identical input: [`iptables`] mode and [`nftables`] mode.
